//! The owner resolver: a thread that takes inet_diag snapshots in every network namespace and
//! maps socket inodes to the processes holding them (`/proc/<pid>/fd`). It owns the procfs
//! scanner and its cache; the daemon's state task asks it over a channel and receives
//! snapshots as messages, so the blocking setns, netlink and /proc work never stalls the
//! ring-buffer reader. It is a dedicated OS thread because `setns` moves only the calling
//! thread (`owners::netns`).
//!
//! Two kinds of request (one in flight at a time; the daemon enforces it):
//! - [`Ask::Resolve`]: a few sockets settled in a watched state without an owner. Each is
//!   looked up by its exact tuple in its namespace (inet_diag without `NLM_F_DUMP`: a hash
//!   lookup; a dump walks every bucket of the established hash, ~7 ms here whatever its state
//!   filter), and only their candidates' fd tables are read (the process that called
//!   `connect()`, the one that called `listen()`). A socket no candidate holds falls back
//!   to a walk of every process's fd table, at most [`WALK_DUTY`] of the thread's time: that walk
//!   costs ~0.3 s of CPU on a host with 110,000 fds, so one per settled socket would cost most
//!   of a core (measured before this design: 44 % at 10 leaked sockets/s).
//! - [`Ask::Reconcile`]: every namespace dumped, every fd table walked (bootstrap, then every
//!   `agent.reconcile_interval`): the full truth, which also finds holders that fork or fd
//!   passing added.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread,
    time::Instant,
};

use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    event::TcpState,
    model::{DiagSocket, OwnerQuery, ProcessInfo, ProcessKey},
    output::clock_ns,
    owners::{
        diag,
        netns::{self, Home, Namespaces},
        procs::{ProcScanner, ScanStats},
    },
};

/// The share of the resolver thread's time that fallback fd walks may take: after a walk that
/// took `d`, the next may start `d × (1 / WALK_DUTY − 1)` later.
pub const WALK_DUTY: f64 = 0.05;

/// One snapshot: inet_diag records of the namespaces it dumped, with the holders of each socket
/// that were looked for.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC ns when the first dump started: the table is newer than the snapshot for
    /// every socket that changed after it.
    pub taken_ns: u64,
    /// The states the snapshot is complete for.
    pub states: Vec<TcpState>,
    /// The namespaces dumped completely (inodes; `[0]` when socket namespaces are unknown and
    /// only the agent's own was dumped).
    pub namespaces: Vec<u32>,
    /// Sockets in those states and namespaces, each with the processes found holding it (empty:
    /// not looked for, or none found).
    pub sockets: Vec<(DiagSocket, Vec<ProcessInfo>)>,
    /// Namespaces that could not be dumped, and why.
    pub failed: Vec<(u32, String)>,
    /// A failure that left the whole snapshot empty.
    pub error: Option<String>,
    /// What the /proc scans saw (processes skipped because they could not be read, above all).
    pub scan: ScanStats,
    /// Of the processes the request named or the scan found, those that have exited (or
    /// whose pid now names another process) by the end of the scan: they hold nothing any more.
    pub gone: Vec<ProcessKey>,
    /// How the holders were found.
    pub cost: Cost,
    /// An answer to [`Ask::Reconcile`]: every namespace, every holder.
    pub reconcile: bool,
}

/// What a snapshot cost, for metrics and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Namespaces dumped.
    pub namespaces: u64,
    /// Sockets resolved by reading only their candidates' fd tables.
    pub by_candidate: u64,
    /// Whether every fd table of the host was walked.
    pub full_walk: bool,
    /// Wall time of the whole snapshot.
    pub seconds: f64,
}

/// What the daemon asks for.
#[derive(Debug)]
pub enum Ask {
    /// Holders of these sockets (settled in a watched state without one).
    Resolve(Vec<OwnerQuery>),
    /// The whole truth: every namespace, every holder.
    Reconcile,
}

struct Request {
    ask: Ask,
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

/// Where the thread looks.
#[derive(Clone, Debug)]
pub struct Roots {
    /// The proc filesystem (normally `/proc`).
    pub proc: PathBuf,
    /// Named network namespaces (normally `/run/netns`).
    pub run_netns: PathBuf,
    /// False when the kernel program cannot read socket namespaces: only the agent's own
    /// namespace is dumped, labelled 0 like the events.
    pub per_namespace: bool,
}

impl Resolver {
    /// Starts the thread.
    pub fn spawn(roots: Roots) -> std::io::Result<Self> {
        let (req_tx, req_rx) = std_mpsc::channel::<Request>();
        let (snap_tx, snap_rx) = mpsc::channel(4);
        thread::Builder::new()
            .name("tcpwait-owners".into())
            .spawn(move || {
                let mut worker = match Worker::new(roots) {
                    Ok(w) => w,
                    Err(e) => {
                        warn!(error = %e, "cannot open the agent's own network namespace");
                        return;
                    }
                };
                while let Ok(req) = req_rx.recv() {
                    let snapshot = worker.take(req);
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
    pub fn request(&self, ask: Ask, states: Vec<TcpState>, known: Vec<ProcessKey>) {
        if self.requests.send(Request { ask, states, known }).is_err() {
            warn!("owner resolver thread is gone");
        }
    }
}

struct Worker {
    roots: Roots,
    scanner: ProcScanner,
    home: Home,
    namespaces: Namespaces,
    /// When the next fallback walk may start.
    walk_allowed: Instant,
}

impl Worker {
    fn new(roots: Roots) -> std::io::Result<Self> {
        Ok(Self {
            scanner: ProcScanner::new(roots.proc.clone()),
            home: Home::here()?,
            namespaces: Namespaces::default(),
            walk_allowed: Instant::now(),
            roots,
        })
    }

    fn take(&mut self, req: Request) -> Snapshot {
        let started = Instant::now();
        let mut snap = Snapshot {
            taken_ns: clock_ns(libc::CLOCK_MONOTONIC),
            states: req.states,
            ..Snapshot::default()
        };
        match req.ask {
            Ask::Reconcile => {
                snap.reconcile = true;
                // Every state a tracked socket can be in, so that an entry left in any of them
                // by a lost transition is repaired; holders only for the watched ones.
                let watched = std::mem::replace(&mut snap.states, TcpState::TRACKED.to_vec());
                self.rediscover();
                let all: Vec<u32> = self.namespaces.inodes().collect();
                self.dump(&all, &mut snap);
                let inodes = inodes_of(&snap.sockets, &watched);
                let holders = self.scanner.holders(&inodes);
                snap.scan = self.scanner.last_scan();
                snap.cost.full_walk = true;
                attach(&mut snap.sockets, holders);
            }
            Ask::Resolve(queries) => self.resolve(&queries, &mut snap),
        }
        // Checked after the scan: the processes the daemon knows, and those the scan just
        // found, which may have exited since it saw their fds.
        let mut candidates: HashSet<ProcessKey> = req.known.into_iter().collect();
        candidates.extend(
            snap.sockets
                .iter()
                .flat_map(|(_, holders)| holders.iter().map(|p| p.key)),
        );
        snap.gone = candidates
            .into_iter()
            .filter(|k| self.scanner.has_exited(*k))
            .collect();
        snap.cost.seconds = started.elapsed().as_secs_f64();
        snap
    }

    fn resolve(&mut self, queries: &[OwnerQuery], snap: &mut Snapshot) {
        let mut by_ns: BTreeMap<u32, Vec<&OwnerQuery>> = BTreeMap::new();
        for q in queries {
            by_ns.entry(q.netns).or_default().push(q);
        }
        if self.roots.per_namespace
            && by_ns
                .keys()
                .any(|ns| !self.namespaces.by_inode.contains_key(ns))
        {
            self.rediscover();
        }
        // Each queried socket by its exact tuple, in its namespace: a hash lookup in the kernel,
        // where a dump walks the whole established hash. No namespace is dumped whole, so this
        // snapshot removes nothing (its `namespaces` stay empty).
        let mut pids: Vec<u32> = Vec::new();
        for (ns, qs) in by_ns {
            let socket = if self.roots.per_namespace {
                let paths = self
                    .namespaces
                    .by_inode
                    .get(&ns)
                    .map_or(&[][..], Vec::as_slice);
                self.home.socket_in(ns, paths).map_err(|e| e.to_string())
            } else {
                diag::open().map_err(|e| format!("cannot open a NETLINK_SOCK_DIAG socket: {e}"))
            };
            snap.cost.namespaces += 1;
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    snap.failed.push((ns, e));
                    continue;
                }
            };
            // Connecting sockets whose SYN_SENT transition came before their port was picked:
            // one dump of the namespace's SYN_SENT sockets finds them by the rest of the tuple.
            let mut syn_sent: Option<Vec<DiagSocket>> = None;
            let mut taken: HashSet<u64> = HashSet::new();
            for q in qs {
                if q.tuple.sport == 0 {
                    if syn_sent.is_none() {
                        match diag::dump_on(&socket, &[TcpState::SynSent], ns) {
                            Ok(d) => syn_sent = Some(d),
                            Err(e) => {
                                snap.failed
                                    .push((ns, format!("inet_diag dump failed: {e}")));
                                break;
                            }
                        }
                    }
                    let same_peer = |d: &&DiagSocket| {
                        d.tuple.saddr == q.tuple.saddr
                            && d.tuple.daddr == q.tuple.daddr
                            && d.tuple.dport == q.tuple.dport
                    };
                    for d in syn_sent.iter().flatten().filter(same_peer) {
                        if snap.states.contains(&d.state) && taken.insert(d.cookie) {
                            pids.extend(q.candidates.iter().copied());
                            snap.sockets.push((d.clone(), Vec::new()));
                        }
                    }
                    continue;
                }
                match diag::lookup_on(&socket, &q.tuple, ns) {
                    Ok(Some(d)) if snap.states.contains(&d.state) => {
                        pids.extend(q.candidates.iter().copied());
                        snap.sockets.push((d, Vec::new()));
                    }
                    // Gone or moved on since it settled: its transitions say so.
                    Ok(_) => {}
                    Err(e) => {
                        snap.failed
                            .push((ns, format!("inet_diag lookup failed: {e}")));
                        break;
                    }
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        let queried = inodes_of(&snap.sockets, &snap.states);
        let mut holders = self.scanner.holders_among(&pids, &queried);
        let mut scan = self.scanner.last_scan();
        snap.cost.by_candidate = holders.len() as u64;
        let missing: HashSet<u64> = queried
            .iter()
            .copied()
            .filter(|i| !holders.contains_key(i))
            .collect();
        if !missing.is_empty() {
            let now = Instant::now();
            if now < self.walk_allowed {
                thread::sleep(self.walk_allowed - now);
            }
            let walk = Instant::now();
            holders.extend(self.scanner.holders(&missing));
            let took = walk.elapsed();
            self.walk_allowed = Instant::now() + took.mul_f64(1.0 / WALK_DUTY - 1.0);
            add_scan(&mut scan, self.scanner.last_scan());
            snap.cost.full_walk = true;
        }
        snap.scan = scan;
        attach(&mut snap.sockets, holders);
    }

    fn rediscover(&mut self) {
        if self.roots.per_namespace {
            self.namespaces = netns::discover(&self.roots.proc, &self.roots.run_netns);
        }
    }

    /// Dumps `namespaces` (inodes) into `snap`, recording those dumped and those that failed.
    fn dump(&mut self, namespaces: &[u32], snap: &mut Snapshot) {
        if !self.roots.per_namespace {
            match diag::open()
                .map_err(diag::DiagError::Socket)
                .and_then(|s| diag::dump_on(&s, &snap.states, 0))
            {
                Ok(d) => {
                    snap.namespaces.push(0);
                    snap.sockets.extend(d.into_iter().map(|d| (d, Vec::new())));
                }
                Err(e) => snap.error = Some(format!("inet_diag dump failed: {e}")),
            }
            snap.cost.namespaces = 1;
            return;
        }
        for &inode in namespaces {
            let paths = self
                .namespaces
                .by_inode
                .get(&inode)
                .map_or(&[][..], Vec::as_slice);
            let result = self
                .home
                .socket_in(inode, paths)
                .map_err(|e| e.to_string())
                .and_then(|socket| {
                    diag::dump_on(&socket, &snap.states, inode)
                        .map_err(|e| format!("inet_diag dump failed: {e}"))
                });
            snap.cost.namespaces += 1;
            match result {
                Ok(d) => {
                    snap.namespaces.push(inode);
                    snap.sockets.extend(d.into_iter().map(|d| (d, Vec::new())));
                }
                Err(e) => snap.failed.push((inode, e)),
            }
        }
    }
}

/// The inodes of the records in `states` that have one (orphans have 0).
fn inodes_of(sockets: &[(DiagSocket, Vec<ProcessInfo>)], states: &[TcpState]) -> HashSet<u64> {
    sockets
        .iter()
        .filter(|(d, _)| states.contains(&d.state))
        .map(|(d, _)| d.inode)
        .filter(|&i| i != 0)
        .collect()
}

/// Gives each record the holders found for its inode (records of one inode are one socket).
fn attach(sockets: &mut [(DiagSocket, Vec<ProcessInfo>)], holders: HashMap<u64, Vec<ProcessInfo>>) {
    for (d, owners) in sockets.iter_mut() {
        if let Some(h) = holders.get(&d.inode) {
            owners.clone_from(h);
        }
    }
}

fn add_scan(total: &mut ScanStats, more: ScanStats) {
    total.processes += more.processes;
    total.fds += more.fds;
    total.vanished += more.vanished;
    total.denied += more.denied;
    total.failed += more.failed;
    total.cached += more.cached;
}

/// The default roots.
pub fn host_roots(per_namespace: bool) -> Roots {
    Roots {
        proc: Path::new("/proc").to_owned(),
        run_netns: Path::new("/run/netns").to_owned(),
        per_namespace,
    }
}
