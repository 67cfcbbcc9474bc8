//! Read-only views for `tcpwait status`: who holds sockets in a state, since when, toward whom.
//!
//! [`Tracker::processes`] walks the per-process indices: O(processes + their sockets in the
//! state). [`Tracker::unowned`] has no index to use and walks the slab, O(table): it is for an
//! operator's request, not for a hot path.
use std::net::IpAddr;

use super::{Tracker, table::Slot};
use crate::{
    event::{SocketId, TcpState},
    model::{ProcessInfo, Tuple},
};

/// One socket as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketDetail {
    /// Kernel address, or a synthetic id (see `reconcile`).
    pub id: SocketId,
    /// Current state.
    pub state: TcpState,
    /// Network namespace inode (0: unknown).
    pub netns: u32,
    /// Local and remote endpoints.
    pub tuple: Tuple,
    /// When it entered `state` (the latest possible instant when `age_is_lower_bound`).
    pub entered_ns: u64,
    /// Time in `state` at the `now_ns` of the request.
    pub age_ns: u64,
    /// True when the age is "at least" (known from inet_diag only).
    pub age_is_lower_bound: bool,
    /// Recv-Q bytes from the last inet_diag snapshot, if any.
    pub recv_q: Option<u32>,
}

impl SocketDetail {
    fn new(s: &Slot, state: TcpState, now_ns: u64) -> Self {
        Self {
            id: s.id,
            state,
            netns: s.tuple.netns,
            tuple: s.tuple.to_tuple(),
            entered_ns: s.entered_ns,
            age_ns: now_ns.saturating_sub(s.entered_ns),
            age_is_lower_bound: s.lower_bound(),
            recv_q: s.recv_q(),
        }
    }
}

/// One process's sockets in one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSummary {
    /// The process as last known.
    pub process: ProcessInfo,
    /// The state summarised.
    pub state: TcpState,
    /// Sockets it holds in `state` (a socket with several owners counts for each).
    pub count: u32,
    /// Age of the oldest of them.
    pub oldest_age_ns: u64,
    /// True when that age is "at least".
    pub oldest_is_lower_bound: bool,
    /// Remote addresses with the most sockets (at most [`super::TOP_PEERS`]), most first.
    pub top_peers: Vec<(IpAddr, u32)>,
    /// Every socket, oldest first.
    pub sockets: Vec<SocketDetail>,
}

impl Tracker {
    /// Processes holding sockets in `state`, most sockets first, then oldest first, then pid.
    pub fn processes(&self, state: TcpState, now_ns: u64) -> Vec<ProcessSummary> {
        let mut out: Vec<ProcessSummary> = self
            .procs
            .iter()
            .filter_map(|rec| {
                let idx = rec.state(state);
                let (oldest_entered, oldest_slot) = idx.oldest()?;
                Some(ProcessSummary {
                    process: rec.info.clone(),
                    state,
                    count: u32::try_from(idx.len()).unwrap_or(u32::MAX),
                    oldest_age_ns: now_ns.saturating_sub(oldest_entered),
                    oldest_is_lower_bound: self.table.get(oldest_slot).lower_bound(),
                    top_peers: idx.top_peers(),
                    sockets: idx
                        .by_age
                        .iter()
                        .map(|&(_, slot)| SocketDetail::new(self.table.get(slot), state, now_ns))
                        .collect(),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(b.oldest_age_ns.cmp(&a.oldest_age_ns))
                .then(a.process.key.cmp(&b.process.key))
        });
        out
    }

    /// Sockets in `state` with no known owner, oldest first. O(table).
    pub fn unowned(&self, state: TcpState, now_ns: u64) -> Vec<SocketDetail> {
        let mut out: Vec<SocketDetail> = self
            .table
            .iter()
            .filter(|(slot, s)| s.state == Some(state) && !self.table.has_owner(*slot))
            .map(|(_, s)| SocketDetail::new(s, state, now_ns))
            .collect();
        out.sort_by_key(|d| (d.entered_ns, d.id));
        out
    }

    /// Every tracked socket of network namespace `netns`, whatever its state (O(table)): what
    /// the agent believes that namespace holds, to compare with `ss` there.
    pub fn sockets_in(&self, netns: u32, now_ns: u64) -> Vec<SocketDetail> {
        self.table
            .iter()
            .filter(|(_, s)| s.tuple.netns == netns)
            .filter_map(|(_, s)| Some(SocketDetail::new(s, s.state?, now_ns)))
            .collect()
    }

    /// One tracked socket.
    pub fn socket(&self, sock: SocketId, now_ns: u64) -> Option<SocketDetail> {
        let slot = self.table.slot_of(sock)?;
        let s = self.table.get(slot);
        Some(SocketDetail::new(s, s.state?, now_ns))
    }
}
