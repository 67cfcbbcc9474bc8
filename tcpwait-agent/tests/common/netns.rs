//! Fresh network namespaces for tests, and namespace inode numbers: what the kernel program
//! reports as a socket's `netns` (`sk->__sk_common.skc_net.net->ns.inum`).
use std::process::Command;

use super::{Peer, wait_until};

/// A fresh network namespace (`ip netns add`, loopback up), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `tw-<test pid>-<tag>`.
    pub fn new(tag: &str) -> Self {
        let name = format!("tw-{}-{tag}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("run ip {args:?} (iproute2 installed?): {e}"));
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        let me = Self { name };
        me.ip(&["link", "set", "lo", "up"]);
        me
    }

    /// Runs `ip -n <name> <args>` (e.g. to add a link or a neighbour inside).
    pub fn ip(&self, args: &[&str]) {
        if let Err(e) = self.try_ip(args) {
            panic!("{e}");
        }
    }

    /// [`NetNs::ip`], returning its error (e.g. a link type this kernel lacks).
    pub fn try_ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }

    /// Sets the namespace's own sysctl `key` (a path under `/proc/sys`, e.g.
    /// `net/ipv4/tcp_rfc1337`), as `ip netns exec` sees it.
    pub fn sysctl(&self, key: &str, value: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c"])
            .args([r#"printf '%s' "$1" > "/proc/sys/$0""#, key, value])
            .output()
            .unwrap_or_else(|e| panic!("run ip netns exec: {e}"));
        assert!(
            out.status.success(),
            "{key} = {value} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// `/run/netns/<name>`, the namespace's file.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's inode number.
    pub fn inode(&self) -> u64 {
        netns_inode(&self.path().to_string_lossy())
    }

    /// Starts a peer inside the namespace.
    pub fn spawn(&self, role: &str, comm: &str, args: &[String]) -> Peer {
        Peer::spawn_in(Some(self), role, comm, args)
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
        if self.name.is_empty() {
            return;
        }
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
            .expect("run ip netns del");
        assert!(
            out.status.success(),
            "ip netns del: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = self.path();
        assert!(wait_until(std::time::Duration::from_secs(2), || !path.exists()));
        self.name.clear();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The inode number of a namespace file (`/proc/<pid>/ns/net`, `/run/netns/<name>`).
pub fn netns_inode(path: &str) -> u64 {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    std::os::unix::fs::MetadataExt::ino(&meta)
}

/// The inode of this process's network namespace.
pub fn own_inode() -> u64 {
    netns_inode("/proc/self/ns/net")
}
