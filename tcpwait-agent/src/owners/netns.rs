//! The host's network namespaces, and inet_diag inside each of them.
//!
//! An inet_diag dump answers for the namespace of the netlink socket that asks (DESIGN.md,
//! "Network namespaces"), and most sockets of a container host live in namespaces other than
//! the agent's (every pod without `hostNetwork`, every bridged container). So the owner
//! resolver finds every namespace — the ones processes use (`/proc/<pid>/ns/net`, deduplicated
//! by inode) and the named ones (`/run/netns/*`, `ip netns add`) — and dumps each from inside:
//! `setns(CLONE_NEWNET)` on its own dedicated thread (setns moves only the calling thread),
//! open the netlink socket there, and move back at once. A socket keeps the namespace it was
//! created in, so the dump itself runs after the thread is home again.
//!
//! Why this and not the alternatives (measured on 6.18, see DESIGN.md): `/proc/<pid>/net/tcp`
//! needs no privilege but cannot filter by state (it prints every socket of the namespace,
//! TIME_WAIT included) and has no `tcp_info`, whose ACK clock bounds the age of sockets that
//! predate the agent; a BPF `iter/tcp` walks only the namespace of the task that creates it, so
//! it needs the same setns. setns needs `CAP_SYS_ADMIN`; a namespace that cannot be entered is
//! reported, and its sockets are never removed for being absent from a dump that did not see
//! them.
//!
//! Namespace files are opened only for the instant of the setns and closed at once: a held
//! descriptor would keep a deleted namespace alive.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use netlink_sys::Socket;
use rustix::{
    fs::{Mode, OFlags, RawDir, readlinkat_raw},
    thread::{LinkNameSpaceType, move_into_link_name_space},
};

/// Paths kept per namespace: if the process behind one exits before the dump, the next is tried.
const PATHS_PER_NAMESPACE: usize = 3;

/// Why a namespace could not be dumped.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// No path that names it could be opened with the expected inode any more (its processes
    /// exited and no mount holds it: the namespace is gone or unreachable).
    #[error("network namespace {0} is gone (no process or mount refers to it any more)")]
    Gone(u32),
    /// `setns` was refused: the agent lacks `CAP_SYS_ADMIN` (or a seccomp/LSM rule forbids it).
    #[error(
        "cannot enter network namespace {inode} ({path}): {source}; grant CAP_SYS_ADMIN \
         (systemd: AmbientCapabilities, RestrictNamespaces=net) to see its sockets"
    )]
    Enter {
        inode: u32,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The thread could not return to the agent's own namespace: fatal for the resolver thread.
    #[error("cannot return to the agent's own network namespace")]
    Return(#[source] io::Error),
    /// The netlink socket could not be opened inside the namespace.
    #[error("cannot open a NETLINK_SOCK_DIAG socket in network namespace {0}")]
    Socket(u32, #[source] io::Error),
}

/// Every network namespace found, by inode, with paths that name it (`/run/netns/NAME` first,
/// then `/proc/<pid>/ns/net` of a few processes in it).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    pub by_inode: BTreeMap<u32, Vec<PathBuf>>,
    /// Processes whose namespace link could not be read (exited, or denied).
    pub unreadable: u64,
}

impl Namespaces {
    /// The inodes found.
    pub fn inodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_inode.keys().copied()
    }

    fn add(&mut self, inode: u32, path: PathBuf) {
        let paths = self.by_inode.entry(inode).or_default();
        if paths.len() < PATHS_PER_NAMESPACE {
            paths.push(path);
        }
    }
}

/// The inode in a `net:[N]` namespace link.
pub fn parse_ns_link(link: &[u8]) -> Option<u32> {
    let digits = link.strip_prefix(b"net:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Finds the namespaces of every process under `proc_root` and the named ones under
/// `run_netns` (either may be absent). One `readlinkat` per process; no allocation per process
/// beyond the paths kept.
pub fn discover(proc_root: &Path, run_netns: &Path) -> Namespaces {
    let mut found = Namespaces::default();
    if let Ok(entries) = fs::read_dir(run_netns) {
        for e in entries.flatten() {
            // stat follows the bind mount to the namespace file: its inode is the namespace's.
            if let Ok(meta) = fs::metadata(e.path())
                && let Ok(inode) = u32::try_from(meta.ino())
                && meta.dev() != 0
            {
                found.add(inode, e.path());
            }
        }
    }
    let Ok(dir) = rustix::fs::open(
        proc_root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return found;
    };
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut entries = RawDir::new(&dir, buf.spare_capacity_mut());
    let mut link = [0u8; 32];
    let mut path = Vec::with_capacity(24);
    while let Some(entry) = entries.next() {
        let Ok(entry) = entry else { break };
        let name = entry.file_name().to_bytes();
        if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
            continue;
        }
        path.clear();
        path.extend_from_slice(name);
        path.extend_from_slice(b"/ns/net");
        let Ok(rel) = std::ffi::CString::new(path.as_slice()) else {
            continue;
        };
        match readlinkat_raw(&dir, rel.as_c_str(), &mut link[..]) {
            Ok(len) => {
                if let Some(inode) = link.get(..len).and_then(parse_ns_link) {
                    let mut p = proc_root.to_path_buf();
                    p.push(std::str::from_utf8(name).unwrap_or_default());
                    p.push("ns/net");
                    found.add(inode, p);
                }
            }
            Err(_) => found.unreadable += 1,
        }
    }
    found
}

/// The inode of the calling thread's network namespace.
#[cfg(test)]
pub fn current_inode() -> io::Result<u32> {
    let meta = fs::metadata("/proc/thread-self/ns/net")?;
    u32::try_from(meta.ino()).map_err(|_| io::Error::other("namespace inode above 2^32"))
}

/// A thread's way home: its own namespace, opened once before it ever leaves.
pub struct Home {
    file: File,
    inode: u32,
}

impl Home {
    /// Opens the calling thread's namespace. Call on the thread that will use [`Home::socket_in`].
    pub fn here() -> io::Result<Self> {
        let file = File::open("/proc/thread-self/ns/net")?;
        let inode = u32::try_from(file.metadata()?.ino())
            .map_err(|_| io::Error::other("namespace inode above 2^32"))?;
        Ok(Self { file, inode })
    }

    /// A `NETLINK_SOCK_DIAG` socket that lives in namespace `inode` (found through `paths`):
    /// the thread enters the namespace, opens the socket and comes home before returning, so
    /// the dump on that socket runs from home. The home namespace needs no setns.
    pub fn socket_in(&self, inode: u32, paths: &[PathBuf]) -> Result<Socket, NsError> {
        self.within(inode, paths, super::diag::open)
    }

    /// Runs `f` inside namespace `inode` (found through `paths`) and comes home: for what
    /// answers for the namespace of the thread that opens it (a netlink socket, a
    /// `/proc/sys/net` file). An error of `f` is reported as [`NsError::Socket`].
    pub fn within<T>(
        &self,
        inode: u32,
        paths: &[PathBuf],
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<T, NsError> {
        if inode == self.inode {
            return f().map_err(|e| NsError::Socket(inode, e));
        }
        let mut last = None;
        for path in paths {
            let Ok(file) = File::open(path) else { continue };
            // A pid reused by a process of another namespace names another inode: skip it.
            match file.metadata() {
                Ok(m) if m.ino() == u64::from(inode) => {}
                _ => continue,
            }
            if let Err(e) = move_into_link_name_space(
                rustix::fd::AsFd::as_fd(&file),
                Some(LinkNameSpaceType::Network),
            ) {
                last = Some((path, io::Error::from(e)));
                continue;
            }
            let out = f();
            move_into_link_name_space(
                rustix::fd::AsFd::as_fd(&self.file),
                Some(LinkNameSpaceType::Network),
            )
            .map_err(|e| NsError::Return(e.into()))?;
            return out.map_err(|e| NsError::Socket(inode, e));
        }
        Err(match last {
            Some((path, source)) => NsError::Enter {
                inode,
                path: path.display().to_string(),
                source,
            },
            None => NsError::Gone(inode),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_links() {
        assert_eq!(parse_ns_link(b"net:[4026531840]"), Some(4_026_531_840));
        assert_eq!(parse_ns_link(b"net:[]"), None);
        assert_eq!(parse_ns_link(b"mnt:[4026531840]"), None);
        assert_eq!(parse_ns_link(b"net:[99999999999]"), None, "above u32");
        assert_eq!(parse_ns_link(b"net:[12a]"), None);
    }

    #[test]
    fn finds_this_process_namespace() {
        let ns = discover(Path::new("/proc"), Path::new("/nonexistent/run/netns"));
        let own = current_inode().expect("own namespace");
        let paths = &ns.by_inode[&own];
        assert!(
            !paths.is_empty() && paths.len() <= PATHS_PER_NAMESPACE,
            "{paths:?}"
        );
    }

    #[test]
    fn a_missing_proc_root_finds_nothing() {
        let ns = discover(Path::new("/nonexistent/proc"), Path::new("/nonexistent"));
        assert_eq!(ns, Namespaces::default());
    }
}
