//! Fresh network namespaces for tests, and namespace inode numbers: what the kernel program
//! reports as a socket's `netns` (`sk->__sk_common.skc_net.net->ns.inum`).
use std::process::Command;

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
        ip(&["-n", &me.name, "link", "set", "lo", "up"]);
        me
    }

    /// `/run/netns/<name>`, the namespace's file.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's inode number.
    pub fn inode(&self) -> u64 {
        netns_inode(&self.path().to_string_lossy())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
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
