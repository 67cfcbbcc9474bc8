//! Socket inode → the processes holding it, from `/proc/<pid>/fd`, with each process's
//! details (comm, cmdline, cgroup, container) read once per process and guarded against pid
//! reuse by the process start time.
//!
//! Processes are found and opened with the `procfs` crate. A `procfs::process::Process` holds
//! an `O_PATH` descriptor of `/proc/<pid>`, and every later read goes through it (`openat`), so
//! the fd table, `stat` and `cmdline` of one scan all belong to the same process: if it exits
//! and its pid is reused meanwhile, the reads fail (the descriptor pins the old `struct pid`)
//! instead of mixing two processes.
//!
//! The fd tables are read without the crate's `FDInfo` (which allocates a path per fd): a
//! reused `getdents64` buffer and `readlinkat` into a stack buffer, so a scan allocates per
//! process, not per fd.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

use procfs::{
    ProcError,
    process::{Process, all_processes_with_root},
};
use rustix::{
    fs::{OFlags, RawDir, readlinkat_raw},
    io::Errno,
};
use tracing::debug;

use crate::model::{ProcessInfo, ProcessKey};

/// Size of the reused `getdents64` buffer: ~250 fd entries per call.
const DIRENT_BUF: usize = 8 * 1024;

/// What one [`ProcScanner::holders`] pass saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Process directories opened.
    pub processes: u64,
    /// fd links read.
    pub fds: u64,
    /// Processes that exited during the scan (skipped).
    pub vanished: u64,
    /// Processes whose fd table or details were refused (skipped): without `CAP_SYS_PTRACE`
    /// only one's own processes can be read, and `hidepid` hides others.
    pub denied: u64,
    /// Processes skipped for any other I/O or parse error.
    pub failed: u64,
    /// Holders whose details came from the cache.
    pub cached: u64,
}

/// A cached process, and the scan that last saw its pid listed.
struct Cached {
    info: ProcessInfo,
    seen: u64,
}

/// Why a process was skipped.
enum Skip {
    Vanished,
    Denied,
    Failed,
}

impl From<ProcError> for Skip {
    fn from(e: ProcError) -> Self {
        match e {
            // procfs maps ESRCH to NotFound as well.
            ProcError::NotFound(_) => Skip::Vanished,
            ProcError::PermissionDenied(_) => Skip::Denied,
            _ => Skip::Failed,
        }
    }
}

impl From<io::Error> for Skip {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => Skip::Vanished,
            io::ErrorKind::PermissionDenied => Skip::Denied,
            _ if e.raw_os_error() == Some(libc::ESRCH) => Skip::Vanished,
            _ => Skip::Failed,
        }
    }
}

impl From<Errno> for Skip {
    fn from(e: Errno) -> Self {
        io::Error::from(e).into()
    }
}

/// Scans a proc filesystem (normally `/proc`; a fake tree in tests) for socket holders.
/// Owned by one thread (the daemon's resolver); not called per event.
pub struct ProcScanner {
    root: PathBuf,
    /// Details of processes seen holding a requested socket, by pid; an entry whose start time
    /// differs from the live process's is stale (pid reused). Entries whose pid is no longer
    /// listed are dropped after each scan, so the cache is bounded by live processes.
    cache: HashMap<u32, Cached>,
    /// Scan counter, for [`Cached::seen`].
    generation: u64,
    /// Reused `getdents64` buffer.
    dirents: Vec<u8>,
    last: ScanStats,
}

impl ProcScanner {
    /// A scanner over `root` (`/proc` on a host; the agent must share the host's pid
    /// namespace to see its processes).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cache: HashMap::new(),
            generation: 0,
            dirents: Vec::with_capacity(DIRENT_BUF),
            last: ScanStats::default(),
        }
    }

    /// What the last [`ProcScanner::holders`] pass saw.
    pub fn last_scan(&self) -> ScanStats {
        self.last
    }

    /// One pass over every process's fd table: the holders of each of `inodes`. A socket held
    /// by several processes (fork, fd passing) lists each of them once, in pid order; inodes
    /// no process holds are absent. Threads share their process's fd table, and the `/proc`
    /// listing holds processes only (not tasks), so each table is read once. Processes that
    /// exit or refuse access during the pass are skipped and counted ([`ScanStats`]).
    /// Cost: one `openat` + `getdents64` per process and one `readlinkat` per fd.
    pub fn holders(&mut self, inodes: &HashSet<u64>) -> HashMap<u64, Vec<ProcessInfo>> {
        let mut found: HashMap<u64, Vec<ProcessInfo>> = HashMap::new();
        self.last = ScanStats::default();
        if inodes.is_empty() {
            return found;
        }
        let procs = match all_processes_with_root(&self.root) {
            Ok(p) => p,
            Err(e) => {
                debug!(root = %self.root.display(), error = %e, "cannot list processes");
                return found;
            }
        };
        self.generation += 1;
        let mut held: Vec<u64> = Vec::new();
        for proc in procs {
            let outcome = proc
                .map_err(Skip::from)
                .and_then(|proc| self.scan_one(&proc, inodes, &mut held));
            self.record(outcome, &held, &mut found);
        }
        let generation = self.generation;
        self.cache.retain(|_, c| c.seen == generation);
        // The listing is in readdir order, pid order in practice; make it so.
        for holders in found.values_mut() {
            holders.sort_unstable_by_key(|p| p.key);
        }
        found
    }

    /// Adds one process's scan to `found` (it holds `held`), or counts why it was skipped.
    fn record(
        &mut self,
        outcome: Result<Option<ProcessInfo>, Skip>,
        held: &[u64],
        found: &mut HashMap<u64, Vec<ProcessInfo>>,
    ) {
        match outcome {
            Ok(None) => {}
            Ok(Some(info)) => {
                for &inode in held {
                    found.entry(inode).or_default().push(info.clone());
                }
            }
            Err(Skip::Vanished) => self.last.vanished += 1,
            Err(Skip::Denied) => self.last.denied += 1,
            Err(Skip::Failed) => self.last.failed += 1,
        }
    }

    /// The holders of `inodes` among `pids` only: reads just those processes' fd tables. The
    /// cheap first try of owner resolution (see `Tracker::owner_query`): a socket is usually
    /// held by the process that called `connect()` on it, or by one that holds the listener it
    /// came from. Inodes none of them holds are absent from the answer. Updates
    /// [`ProcScanner::last_scan`] for this pass; the details cache is kept as it is.
    pub fn holders_among(
        &mut self,
        pids: &[u32],
        inodes: &HashSet<u64>,
    ) -> HashMap<u64, Vec<ProcessInfo>> {
        let mut found: HashMap<u64, Vec<ProcessInfo>> = HashMap::new();
        self.last = ScanStats::default();
        if inodes.is_empty() {
            return found;
        }
        let mut held: Vec<u64> = Vec::new();
        for &pid in pids {
            let outcome = Process::new_with_root(self.root.join(pid.to_string()))
                .map_err(Skip::from)
                .and_then(|proc| self.scan_one(&proc, inodes, &mut held));
            self.record(outcome, &held, &mut found);
        }
        for holders in found.values_mut() {
            holders.sort_unstable_by_key(|p| p.key);
        }
        found
    }

    /// Scans one process: fills `held` with the requested inodes its fd table refers to
    /// (sorted, each once) and returns its details if there is any.
    fn scan_one(
        &mut self,
        proc: &Process,
        inodes: &HashSet<u64>,
        held: &mut Vec<u64>,
    ) -> Result<Option<ProcessInfo>, Skip> {
        self.last.processes += 1;
        let pid = u32::try_from(proc.pid).map_err(|_| Skip::Failed)?;
        if let Some(c) = self.cache.get_mut(&pid) {
            c.seen = self.generation;
        }
        held.clear();
        self.last.fds += scan_fds(proc, &mut self.dirents, inodes, held)?;
        if held.is_empty() {
            return Ok(None);
        }
        held.sort_unstable();
        held.dedup();
        self.info(proc, pid).map(Some)
    }

    /// The details of a process holding a requested socket, from the cache when its start
    /// time still matches.
    fn info(&mut self, proc: &Process, pid: u32) -> Result<ProcessInfo, Skip> {
        let stat = proc.stat()?;
        let key = ProcessKey {
            pid,
            start_ticks: stat.starttime,
        };
        if let Some(c) = self.cache.get(&pid)
            && c.info.key == key
        {
            self.last.cached += 1;
            return Ok(c.info.clone());
        }
        let comm = match read_all(proc, "comm") {
            Ok(mut bytes) => {
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            // Same text, from the stat line already read.
            Err(_) => stat.comm,
        };
        let cmdline = join_cmdline(&read_all(proc, "cmdline")?);
        // No cgroup file (a kernel without cgroups) is no cgroup, not a failure.
        let cgroups = read_all(proc, "cgroup").unwrap_or_default();
        let cgroups = String::from_utf8_lossy(&cgroups);
        let cgroup = super::cgroup::unified_path(&cgroups).map(str::to_owned);
        // cgroup v1 or hybrid hosts: the ids are in the controllers' paths.
        let context = super::cgroup::from_proc_cgroup(&cgroups);
        let netns = read_link(proc, "ns/net").and_then(|l| super::netns::parse_ns_link(&l));
        let info = ProcessInfo {
            key,
            comm,
            cmdline,
            cgroup,
            container: context.container_id,
            pod_uid: context.pod_uid,
            runtime: context.runtime.map(super::cgroup::Runtime::as_str),
            netns,
        };
        self.cache.insert(
            pid,
            Cached {
                info: info.clone(),
                seen: self.generation,
            },
        );
        Ok(info)
    }

    /// Whether `key` has exited: its pid is gone, names a later process (a reused pid has a
    /// later start time), or a zombie (whose fds are already closed). A read that fails for
    /// another reason (no permission, no memory) proves nothing: the process counts as alive.
    pub fn has_exited(&self, key: ProcessKey) -> bool {
        match Process::new_with_root(self.root.join(key.pid.to_string())).and_then(|p| p.stat()) {
            Ok(s) => s.starttime != key.start_ticks || matches!(s.state, 'Z' | 'X'),
            Err(e) => matches!(Skip::from(e), Skip::Vanished),
        }
    }
}

/// Reads a process's fd table: pushes onto `held` each inode of `inodes` that one of its
/// `socket:[N]` links names. Returns how many fds were read. No allocation per fd.
fn scan_fds(
    proc: &Process,
    dirents: &mut Vec<u8>,
    inodes: &HashSet<u64>,
    held: &mut Vec<u64>,
) -> Result<u64, Skip> {
    let dir =
        proc.open_relative_flags("fd", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC)?;
    dirents.clear();
    let mut entries = RawDir::new(&dir, dirents.spare_capacity_mut());
    // "socket:[4294967295]" is 19 bytes; a longer link (a file path) fills the buffer and is
    // not a socket.
    let mut link = [0u8; 32];
    let mut fds = 0;
    while let Some(entry) = entries.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            continue;
        }
        fds += 1;
        // An fd closed since the listing is simply gone.
        let Ok(len) = readlinkat_raw(&dir, name, &mut link[..]) else {
            continue;
        };
        if let Some(inode) = link.get(..len).and_then(socket_inode)
            && inodes.contains(&inode)
        {
            held.push(inode);
        }
    }
    Ok(fds)
}

/// The inode in a `socket:[N]` fd link.
pub(crate) fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The start time (`/proc/<pid>/stat` field 22, ticks of `ticks_per_second` since boot) of
/// the process `pid` under `root`, if it started no later than `boot_ns` (CLOCK_BOOTTIME ns,
/// the clock of that field): one that started later reused the pid after the moment in
/// question. `None`: gone, unreadable, or a later process.
pub fn start_ticks_before(
    root: &Path,
    pid: u32,
    boot_ns: u64,
    ticks_per_second: u64,
) -> Option<u64> {
    let stat = Process::new_with_root(root.join(pid.to_string()))
        .and_then(|p| p.stat())
        .ok()?;
    // The field is truncated to a tick: a start up to one tick after `boot_ns` passes.
    let started_ns =
        u128::from(stat.starttime) * 1_000_000_000 / u128::from(ticks_per_second.max(1));
    (started_ns <= u128::from(boot_ns)).then_some(stat.starttime)
}

/// Reads a symbolic link of a process's `/proc` directory (`ns/net`), through its descriptor.
fn read_link(proc: &Process, name: &str) -> Option<Vec<u8>> {
    let dir = proc
        .open_relative_flags(".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC)
        .ok()?;
    let mut link = [0u8; 64];
    let len = readlinkat_raw(&dir, name, &mut link[..]).ok()?;
    link.get(..len).map(<[u8]>::to_vec)
}

/// Reads a whole file of a process's `/proc` directory, through the process's descriptor.
fn read_all(proc: &Process, name: &str) -> Result<Vec<u8>, Skip> {
    let mut f: File = proc.open_relative(name)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// `/proc/<pid>/cmdline` as one line: NUL-separated arguments joined by spaces, the trailing
/// NULs dropped (one ends the last argument; `setproctitle` pads with more). Bytes are kept raw
/// (control characters included) and invalid UTF-8 replaced: escape before printing.
pub(crate) fn join_cmdline(raw: &[u8]) -> String {
    let end = raw.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let joined: Vec<u8> = raw[..end]
        .iter()
        .map(|&b| if b == 0 { b' ' } else { b })
        .collect();
    String::from_utf8_lossy(&joined).into_owned()
}

#[cfg(test)]
mod tests;
