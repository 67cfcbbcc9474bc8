//! The owner resolver: a thread that takes inet_diag snapshots and maps socket inodes to the
//! processes holding them (`/proc/<pid>/fd`). It owns the procfs scanner and its cache; the
//! daemon's state task asks it for snapshots over a channel and receives them as messages, so
//! the blocking netlink and /proc work never stalls the ring-buffer reader.
//!
//! One request is in flight at a time (the daemon enforces it), so the /proc scan rate is
//! bounded by its own duration and by the daemon's minimum interval.
use std::{collections::HashSet, path::PathBuf, sync::mpsc as std_mpsc, thread};

use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    event::TcpState,
    model::{DiagSocket, ProcessInfo, ProcessKey},
    output::clock_ns,
    owners::{
        diag,
        procs::{ProcScanner, ScanStats},
    },
};

/// One inet_diag snapshot with the holders of each socket.
#[derive(Debug)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC ns when the dump started: the table is newer than the snapshot for
    /// every socket that changed after it.
    pub taken_ns: u64,
    /// The states the snapshot is complete for.
    pub states: Vec<TcpState>,
    /// Sockets in those states, each with the processes holding it (empty: none found).
    pub sockets: Vec<(DiagSocket, Vec<ProcessInfo>)>,
    /// Why the snapshot is empty, if it failed.
    pub error: Option<String>,
    /// What the /proc scan saw (processes skipped because they could not be read, above all).
    pub scan: ScanStats,
    /// Of the processes the request named or the scan found, those that have exited (or
    /// whose pid now names another process) by the end of the scan: they hold nothing any more.
    pub gone: Vec<ProcessKey>,
}

/// What the daemon asks for.
struct Request {
    states: Vec<TcpState>,
    /// Processes known to hold tracked sockets: each is checked for liveness.
    known: Vec<ProcessKey>,
}

/// Handle to the resolver thread.
pub struct Resolver {
    requests: std_mpsc::Sender<Request>,
    /// Snapshots, in request order.
    pub snapshots: mpsc::Receiver<Snapshot>,
}

impl Resolver {
    /// Starts the thread; `proc_root` is normally `/proc`.
    pub fn spawn(proc_root: PathBuf) -> std::io::Result<Self> {
        let (req_tx, req_rx) = std_mpsc::channel::<Request>();
        let (snap_tx, snap_rx) = mpsc::channel(4);
        thread::Builder::new()
            .name("tcpwait-owners".into())
            .spawn(move || {
                let mut scanner = ProcScanner::new(proc_root);
                while let Ok(Request { states, known }) = req_rx.recv() {
                    let mut snapshot = take(&mut scanner, states);
                    // Checked after the scan: the processes the daemon knows, and those the
                    // scan just found, which may have exited since it saw their fds.
                    let mut candidates: HashSet<ProcessKey> = known.into_iter().collect();
                    candidates.extend(
                        snapshot
                            .sockets
                            .iter()
                            .flat_map(|(_, holders)| holders.iter().map(|p| p.key)),
                    );
                    snapshot.gone = candidates
                        .into_iter()
                        .filter(|k| scanner.has_exited(*k))
                        .collect();
                    if snap_tx.blocking_send(snapshot).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            requests: req_tx,
            snapshots: snap_rx,
        })
    }

    /// Asks for a snapshot of `states`, and which of `known` have exited; the answer arrives on
    /// [`Resolver::snapshots`].
    pub fn request(&self, states: Vec<TcpState>, known: Vec<ProcessKey>) {
        if self.requests.send(Request { states, known }).is_err() {
            warn!("owner resolver thread is gone");
        }
    }
}

fn take(scanner: &mut ProcScanner, states: Vec<TcpState>) -> Snapshot {
    let taken_ns = clock_ns(libc::CLOCK_MONOTONIC);
    let dump = match diag::dump_tcp(&states) {
        Ok(d) => d,
        Err(e) => {
            return Snapshot {
                taken_ns,
                states,
                sockets: Vec::new(),
                error: Some(format!("inet_diag dump failed: {e}")),
                scan: ScanStats::default(),
                gone: Vec::new(),
            };
        }
    };
    let inodes: HashSet<u64> = dump.iter().map(|d| d.inode).filter(|&i| i != 0).collect();
    let mut holders = scanner.holders(&inodes);
    let sockets = dump
        .into_iter()
        .map(|d| {
            let owners = holders.remove(&d.inode).unwrap_or_default();
            (d, owners)
        })
        .collect();
    Snapshot {
        taken_ns,
        states,
        sockets,
        error: None,
        scan: scanner.last_scan(),
        gone: Vec::new(),
    }
}
