//! Network namespaces for tests: a named namespace (`ip netns add`, so `/run/netns/NAME` names
//! it like a CNI plugin's), deleted on drop, and peers started inside it.
use std::{os::unix::fs::MetadataExt as _, process::Command};

use super::{Peer, wait_until};

/// A fresh named network namespace with its loopback up; deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}; install iproute2 (cargo xtask test does)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// Creates `tw-<test pid>-<tag>`.
    pub fn new(tag: &str) -> Self {
        let name = format!("tw-{}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// The namespace's inode: what the kernel event's `netns` and `/proc/<pid>/ns/net` say.
    pub fn inode(&self) -> u32 {
        let meta = std::fs::metadata(format!("/run/netns/{}", self.name)).expect("netns file");
        u32::try_from(meta.ino()).expect("inode fits u32")
    }

    /// Starts a peer inside the namespace.
    pub fn spawn(&self, role: &str, comm: &str, args: &[String]) -> Peer {
        Peer::spawn_via(&["ip", "netns", "exec", &self.name], role, comm, args)
    }

    /// A server inside: listens on `addr`, accepts `n` and closes each (see `super::server`).
    pub fn server(&self, comm: &str, addr: &str, n: usize) -> (Peer, u16) {
        let mut p = self.spawn("server", comm, &[addr.to_owned(), n.to_string()]);
        let port = p.expect_line("port").parse().expect("port number");
        (p, port)
    }

    /// A client inside holding `n` sockets to `addr` from local ports `lport..lport + n`
    /// (bound explicitly), which the server closes: `n` CLOSE_WAIT sockets.
    pub fn bound_client(&self, comm: &str, addr: &str, n: usize, lport: u16) -> Peer {
        let mut p = self.spawn(
            "client_bound",
            comm,
            &[addr.to_owned(), n.to_string(), lport.to_string()],
        );
        p.expect_line("connected");
        p
    }

    /// Deletes the namespace now (its processes must be gone for it to die).
    pub fn delete(&mut self) {
        if !self.name.is_empty() {
            ip(&["netns", "del", &self.name]);
            let path = format!("/run/netns/{}", self.name);
            assert!(wait_until(std::time::Duration::from_secs(2), || {
                !std::path::Path::new(&path).exists()
            }));
            self.name.clear();
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }
}

/// The inode of this process's network namespace.
pub fn own_inode() -> u32 {
    let meta = std::fs::metadata("/proc/self/ns/net").expect("own netns");
    u32::try_from(meta.ino()).expect("inode fits u32")
}
