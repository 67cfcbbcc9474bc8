//! Reconciliation with inet_diag, the kernel's own list of sockets: at start (bootstrap: the
//! sockets that were already in CLOSE_WAIT before the agent ran) and periodically (repairs
//! after lost events or a full table).
//!
//! inet_diag gives no kernel socket address, so records are matched to tracked sockets by
//! 4-tuple. A socket inet_diag shows and the table lacks gets a *synthetic* [`SocketId`] built
//! from its inet_diag cookie, and an entry time that is only a bound: its age is "at least".
//! The first real transition of that tuple rekeys the entry to the kernel address
//! (`Tracker::apply`).
//!
//! Cost: O(truth + tracked sockets), one pass over the slab to find the sockets inet_diag no
//! longer shows; it runs every few tens of seconds, next to a netlink dump of the same order.
//! The daemon should drain the ring buffer right before calling it, so that the snapshot and the
//! table describe the same instant; a transition still queued is applied afterwards and fixes
//! the entry again with its exact timestamp.
use std::collections::{HashMap, HashSet};

use super::{Tracker, table::CompactTuple};
use crate::{
    event::{SocketId, TcpState},
    model::{DiagSocket, ProcessInfo, ProcessKey},
};

/// Tag in bits 63..48 of a synthetic [`SocketId`]. Kernel `struct sock` addresses live in the
/// kernel half of the address space, whose bits 63..48 are all ones on x86_64 (and arm64), so a
/// synthetic id (`0x0001` there) never equals a real one.
const SYNTHETIC_TAG: u64 = 0x0001 << 48;
const COOKIE_MASK: u64 = (1 << 48) - 1;

/// `tcpi_last_ack_recv` is computed in jiffies (`tcp_get_info`: `jiffies_to_msecs(now -
/// tp->rcv_tstamp)`), so it may exceed the true elapsed time by up to one jiffy: 10 ms at
/// HZ=100, the coarsest setting. The bound subtracts this margin so it stays a lower bound.
pub const ACK_CLOCK_MARGIN_NS: u64 = 10_000_000;

/// The synthetic id of a socket known only from inet_diag: the low 48 bits of its cookie
/// (cookies count up from 1 per boot, so 48 bits never wrap in practice) under a tag that no
/// kernel address carries.
pub fn synthetic_id(cookie: u64) -> SocketId {
    SocketId(SYNTHETIC_TAG | (cookie & COOKIE_MASK))
}

/// True for ids made by [`synthetic_id`].
pub fn is_synthetic(id: SocketId) -> bool {
    id.0 & !COOKIE_MASK == SYNTHETIC_TAG
}

/// What one [`Tracker::reconcile`] repaired. `added`, `removed` and `corrected` are also summed
/// in [`super::Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Shown by inet_diag, not tracked: added under a synthetic id with a lower-bound age.
    pub added: u64,
    /// Tracked in one of the reconciled states, no longer shown: removed.
    pub removed: u64,
    /// Tracked in another state than inet_diag shows: moved, with a lower-bound age.
    pub corrected: u64,
    /// Records that cannot be matched by tuple (a zero port: listeners, unconnected sockets), or
    /// whose synthetic id is already taken.
    pub skipped: u64,
    /// Records not added because the table is full.
    pub overflowed: u64,
}

/// Whether a socket's age in `state` is at least `tcpi_last_ack_recv`: true when the state is
/// entered on receipt of an acceptable ACK, which sets `tp->rcv_tstamp` (`tcp_ack`). CLOSE_WAIT
/// is entered on the peer's FIN (it carries an ACK), FIN_WAIT2 when the ACK of our FIN arrives.
/// Later ACKs only make the bound looser, never wrong.
fn ack_bounds_age(state: TcpState) -> bool {
    matches!(state, TcpState::CloseWait | TcpState::FinWait2)
}

/// The latest instant at which the socket can have entered its state, from the ACK clock.
fn ack_bound(d: &DiagSocket, now_ns: u64) -> u64 {
    match d.last_ack_recv_ms {
        Some(ms) if ack_bounds_age(d.state) => {
            let age = u64::from(ms)
                .saturating_mul(1_000_000)
                .saturating_sub(ACK_CLOCK_MARGIN_NS);
            now_ns.saturating_sub(age)
        }
        _ => now_ns,
    }
}

/// A connecting socket tracked from its CLOSE→SYN_SENT transition, which runs before
/// `inet_hash_connect` picks the local port (`tcp_v4_connect`, `tcp_v6_connect`): its tuple
/// has port 0 until inet_diag shows the real one. One still portless after a full dump of its
/// namespace is gone.
fn is_portless(state: Option<TcpState>, t: &CompactTuple) -> bool {
    state == Some(TcpState::SynSent) && t.local_port() == 0
}

impl Tracker {
    /// Aligns the table with `truth`, an inet_diag snapshot taken just before `now_ns` that is
    /// complete for `states`, each record with the processes that hold it (empty: unknown; known
    /// owners are then kept). Only records in `states` are considered.
    ///
    /// - Not tracked (by tuple): added under [`synthetic_id`]`(cookie)` with `entered_ns` =
    ///   the latest instant it can have entered the state, flagged as a lower bound: the earliest
    ///   of `now_ns`, the ACK bound (`now - last_ack_recv` + [`ACK_CLOCK_MARGIN_NS`], CLOSE_WAIT
    ///   and FIN_WAIT2 only), and the instant since which the table is complete —
    ///   `agent_start_ns` or the last refused insert, whichever is later. Pass as
    ///   `agent_start_ns` the later of the agent's start and the last observed event loss: a
    ///   socket missed through loss may be younger than the agent.
    /// - Tracked in SYN_SENT without its local port (see `is_portless`) and shown with it:
    ///   takes the shown tuple, keeping its exact entry time.
    /// - Tracked in another state: moved to inet_diag's state; it entered it after its tracked
    ///   entry time and no later than the ACK bound.
    /// - Tracked in one of `states`, in one of `namespaces` (the network namespaces the snapshot
    ///   dumped whole), and absent from `truth`: removed. A socket of a namespace the snapshot
    ///   did not dump whole (not entered, or looked up socket by socket) is never removed: the
    ///   snapshot cannot say it is gone. Records of such namespaces are applied all the same.
    /// - A socket whose tracked entry time is at or after `now_ns` changed after the snapshot:
    ///   the table is newer than `truth` for it, so it is neither corrected nor removed. Pass as
    ///   `now_ns` the instant the snapshot *started*.
    /// - Recv-Q is updated for every matched or added socket.
    ///
    /// [`Tracker::reconcile_all`] widens what is repaired to every state the snapshot is
    /// complete for (the daemon's way, through [`Tracker::apply_snapshot`]).
    #[cfg(test)]
    pub fn reconcile(
        &mut self,
        truth: &[(DiagSocket, Vec<ProcessInfo>)],
        states: &[TcpState],
        namespaces: &[u32],
        now_ns: u64,
        agent_start_ns: u64,
    ) -> ReconcileReport {
        self.reconcile_all(truth, states, states, namespaces, now_ns, agent_start_ns)
    }

    /// [`Tracker::reconcile`] with `truth` complete for the states `complete` (a superset of
    /// `states`, the watched ones): a tracked socket in any of them is corrected or removed as
    /// in a watched state, and a socket shown in any of them and not tracked is added, so that
    /// after a loss the table equals the kernel's lists within one reconciliation: an entry
    /// left in any state by a lost transition (a FIN_WAIT1 whose FIN_WAIT2 and CLOSE were lost)
    /// goes, a connection whose transitions were all lost comes. Holders are looked for only
    /// in the watched states (`daemon::resolver`).
    pub fn reconcile_all(
        &mut self,
        truth: &[(DiagSocket, Vec<ProcessInfo>)],
        states: &[TcpState],
        complete: &[TcpState],
        namespaces: &[u32],
        now_ns: u64,
        agent_start_ns: u64,
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let dumped: HashSet<u32> = namespaces.iter().copied().collect();
        let complete_since = agent_start_ns.max(self.last_overflow_ns.unwrap_or(0));
        let mut seen: HashSet<CompactTuple> = HashSet::with_capacity(truth.len());
        // Connecting sockets tracked without their local port, built on first need.
        let mut portless: Option<HashMap<CompactTuple, Vec<u32>>> = None;
        for (d, owners) in truth
            .iter()
            .filter(|(d, _)| states.contains(&d.state) || complete.contains(&d.state))
        {
            let tuple = CompactTuple::from_tuple(d.netns, &d.tuple);
            if !tuple.indexable() {
                report.skipped += 1;
                continue;
            }
            seen.insert(tuple);
            let mut found = self.table.find_tuple(&tuple);
            if found.is_none() && d.state == TcpState::SynSent {
                found = self.adopt_portless(&mut portless, tuple);
            }
            let slot = match found {
                Some(slot) => {
                    let s = *self.table.get(slot);
                    // A transition applied after the snapshot was taken is newer than it.
                    if s.state != Some(d.state) && s.entered_ns < now_ns {
                        let entered = ack_bound(d, now_ns).max(s.entered_ns);
                        self.move_slot(slot, d.state, entered, true, tuple);
                        report.corrected += 1;
                    }
                    slot
                }
                None if self.table.len() >= self.max_sockets => {
                    report.overflowed += 1;
                    self.counters.overflowed += 1;
                    continue;
                }
                None => {
                    let id = synthetic_id(d.cookie);
                    if self.table.slot_of(id).is_some() {
                        report.skipped += 1;
                        continue;
                    }
                    let entered = ack_bound(d, now_ns).min(complete_since).min(now_ns);
                    report.added += 1;
                    self.insert_slot(id, d.state, entered, true, tuple)
                }
            };
            self.table.set_recv_q(slot, d.recv_q);
            if !owners.is_empty() {
                self.assign_owners(slot, owners.clone());
            }
        }
        let gone: Vec<u32> = self
            .table
            .iter()
            .filter(|(_, s)| {
                s.state
                    .is_some_and(|st| states.contains(&st) || complete.contains(&st))
                    && dumped.contains(&s.tuple.netns)
                    && s.entered_ns < now_ns
                    // An entry without both ports (a connect before its port was picked;
                    // before Linux 6.15 an accepted socket's LISTEN → SYN_RECV, whose peer is
                    // still unset) can match no dumped socket: if its later transitions were
                    // lost it is a phantom, and a live one is in the dump under its full tuple.
                    && (!s.tuple.indexable() || !seen.contains(&s.tuple))
            })
            .map(|(slot, _)| slot)
            .collect();
        for slot in gone {
            self.drop_slot(slot);
            report.removed += 1;
        }
        self.counters.repairs_added += report.added;
        self.counters.repairs_removed += report.removed;
        self.counters.repairs_corrected += report.corrected;
        report
    }

    /// A SYN_SENT entry tracked without its local port whose other fields are `tuple`'s: it
    /// takes `tuple` (its entry time, exact, stays). Several such entries toward one peer from
    /// one address are told apart by nothing inet_diag shows; any one of them is taken.
    fn adopt_portless(
        &mut self,
        portless: &mut Option<HashMap<CompactTuple, Vec<u32>>>,
        tuple: CompactTuple,
    ) -> Option<u32> {
        let index = portless.get_or_insert_with(|| {
            let mut m: HashMap<CompactTuple, Vec<u32>> = HashMap::new();
            for (slot, s) in self.table.iter() {
                if is_portless(s.state, &s.tuple) {
                    m.entry(s.tuple).or_default().push(slot);
                }
            }
            m
        });
        let slot = index.get_mut(&tuple.portless())?.pop()?;
        let s = *self.table.get(slot);
        self.move_slot(
            slot,
            TcpState::SynSent,
            s.entered_ns,
            s.lower_bound(),
            tuple,
        );
        Some(slot)
    }

    /// Applies one owner snapshot: [`Tracker::reconcile`] with its sockets and their holders,
    /// then forgets the processes found exited (`exited`). Their liveness was checked after the
    /// /proc scan, so a holder that died in between is listed by the scan but must stay gone.
    /// `complete`: the states `truth` is complete for (see [`Tracker::reconcile_all`]).
    pub fn apply_snapshot(
        &mut self,
        truth: &[(DiagSocket, Vec<ProcessInfo>)],
        complete: &[TcpState],
        namespaces: &[u32],
        now_ns: u64,
        agent_start_ns: u64,
        exited: &[ProcessKey],
    ) -> ReconcileReport {
        let watched = self.watched_states();
        let report = self.reconcile_all(
            truth,
            &watched,
            complete,
            namespaces,
            now_ns,
            agent_start_ns,
        );
        self.forget_processes(exited);
        report
    }

    /// Forgets processes that have exited (see [`Tracker::forget_process`]).
    pub fn forget_processes(&mut self, exited: &[ProcessKey]) {
        for key in exited {
            self.forget_process(key);
        }
    }
}
