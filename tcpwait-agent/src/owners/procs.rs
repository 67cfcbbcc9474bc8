//! Socket inode → the processes holding it, from `/proc/<pid>/fd` (through the `procfs`
//! crate), with process details read once per process and guarded against pid reuse by the
//! process start time.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use procfs::process::{FDTarget, Process};
use tracing::debug;

use crate::model::{ProcessInfo, ProcessKey};

/// Scans a proc filesystem (normally `/proc`; a fake tree in tests).
pub struct ProcScanner {
    root: PathBuf,
    cache: HashMap<ProcessKey, ProcessInfo>,
    /// Processes that vanished or refused access during scans.
    pub skipped: u64,
}

impl ProcScanner {
    /// A scanner over `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            cache: HashMap::new(),
            skipped: 0,
        }
    }

    /// One pass over every process's fd table: the holders of each of `inodes`. A socket held
    /// by several processes (fork, fd passing) lists each once. Threads share their process's
    /// fd table, so only processes are scanned. O(total fds on the host).
    pub fn holders(&mut self, inodes: &HashSet<u64>) -> HashMap<u64, Vec<ProcessInfo>> {
        let mut found: HashMap<u64, Vec<ProcessInfo>> = HashMap::new();
        if inodes.is_empty() {
            return found;
        }
        let Ok(all) = procfs::process::all_processes_with_root(&self.root) else {
            debug!(root = %self.root.display(), "cannot list processes");
            return found;
        };
        let mut alive = HashSet::new();
        for proc in all {
            let Ok(proc) = proc else {
                self.skipped += 1;
                continue;
            };
            let Ok(fds) = proc.fd() else {
                self.skipped += 1;
                continue;
            };
            let mut mine: Vec<u64> = fds
                .filter_map(Result::ok)
                .filter_map(|fd| match fd.target {
                    FDTarget::Socket(inode) if inodes.contains(&inode) => Some(inode),
                    _ => None,
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort_unstable();
            mine.dedup();
            let Some(info) = self.info(&proc) else {
                self.skipped += 1;
                continue;
            };
            alive.insert(info.key);
            for inode in mine {
                found.entry(inode).or_default().push(info.clone());
            }
        }
        // Forget processes that no longer hold anything we asked about, to bound the cache.
        self.cache.retain(|k, _| alive.contains(k));
        found
    }

    /// Whether `key` still names a live process (same pid, same start time).
    pub fn is_alive(&self, key: ProcessKey) -> bool {
        Process::new_with_root(self.root.join(key.pid.to_string()))
            .and_then(|p| p.stat())
            .is_ok_and(|s| s.starttime == key.start_ticks)
    }

    fn info(&mut self, proc: &Process) -> Option<ProcessInfo> {
        let stat = proc.stat().ok()?;
        let key = ProcessKey {
            pid: u32::try_from(stat.pid).ok()?,
            start_ticks: stat.starttime,
        };
        if let Some(info) = self.cache.get(&key) {
            return Some(info.clone());
        }
        let cmdline = proc
            .cmdline()
            .map(|args| args.join(" "))
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(self.root.join(key.pid.to_string()).join("cgroup"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            });
        let container = cgroup.as_deref().and_then(container_id);
        let info = ProcessInfo {
            key,
            comm: stat.comm,
            cmdline,
            cgroup,
            container,
        };
        self.cache.insert(key, info.clone());
        Some(info)
    }
}

/// The container id in a cgroup path: a 64-hex-digit component, bare (`/docker/<id>`) or
/// wrapped as systemd scopes name them (`docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`).
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.split('/').rev().find_map(|part| {
        let part = part.strip_suffix(".scope").unwrap_or(part);
        let id = part.rsplit('-').next().unwrap_or(part);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, os::unix::fs::symlink, path::Path};

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A fake /proc/<pid> with a stat line, cmdline, cgroup, and fds.
    fn fake(
        root: &Path,
        pid: u32,
        comm: &str,
        start: u64,
        cmdline: &[u8],
        cgroup: &str,
        fds: &[&str],
    ) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).expect("mkdir");
        let stat = format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 100 \
             18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        );
        fs::write(dir.join("stat"), stat).expect("stat");
        fs::write(dir.join("cmdline"), cmdline).expect("cmdline");
        fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
        for (i, target) in fds.iter().enumerate() {
            symlink(target, dir.join("fd").join(i.to_string())).expect("fd link");
        }
    }

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        let r = d.path();
        fake(
            r,
            100,
            "leaky",
            5000,
            b"leaky\0--port\x1b[2J\0",
            &format!("0::/system.slice/docker-{ID}.scope\n"),
            &["socket:[11]", "socket:[12]", "/dev/null"],
        );
        fake(
            r,
            101,
            "leaky",
            6000,
            b"leaky\0",
            "0::/user.slice\n",
            &["socket:[11]"],
        );
        fake(
            r,
            200,
            "other",
            7000,
            b"other\0",
            "0::/\n",
            &["socket:[99]", "pipe:[11]"],
        );
        d
    }

    #[test]
    fn maps_inodes_to_every_holder() {
        let d = tree();
        let mut s = ProcScanner::new(d.path().into());
        let found = s.holders(&HashSet::from([11, 12, 13]));
        let mut h11: Vec<u32> = found[&11].iter().map(|p| p.key.pid).collect();
        h11.sort_unstable();
        assert_eq!(h11, [100, 101]);
        assert_eq!(found[&12].len(), 1);
        assert!(!found.contains_key(&13));
        let p = &found[&12][0];
        assert_eq!(
            p.key,
            ProcessKey {
                pid: 100,
                start_ticks: 5000
            }
        );
        assert_eq!(p.comm, "leaky");
        assert_eq!(
            p.cmdline, "leaky --port\x1b[2J",
            "raw: escaped only when shown"
        );
        assert_eq!(p.container.as_deref(), Some(ID));
        assert_eq!(
            found[&11]
                .iter()
                .find(|p| p.key.pid == 101)
                .expect("101")
                .container,
            None
        );
    }

    #[test]
    fn pid_reuse_is_detected_by_start_time() {
        let d = tree();
        let s = ProcScanner::new(d.path().into());
        assert!(s.is_alive(ProcessKey {
            pid: 100,
            start_ticks: 5000
        }));
        assert!(!s.is_alive(ProcessKey {
            pid: 100,
            start_ticks: 4999
        }));
        assert!(!s.is_alive(ProcessKey {
            pid: 555,
            start_ticks: 5000
        }));
    }

    #[test]
    fn container_ids() {
        assert_eq!(container_id(&format!("/docker/{ID}")).as_deref(), Some(ID));
        assert_eq!(
            container_id(&format!("/kubepods.slice/cri-containerd-{ID}.scope")).as_deref(),
            Some(ID)
        );
        assert_eq!(
            container_id(&format!("/machine.slice/crio-{ID}.scope")).as_deref(),
            Some(ID)
        );
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-1.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
    }
}
