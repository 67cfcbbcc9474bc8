//! "Who holds port P": the tracked sockets whose local port is P in any state, with their
//! holders, and the listeners of P — open ones and, bounded, the last ones that closed, with
//! the process that called `listen()` (CLOSE → LISTEN runs in the caller's context). After a
//! server dies, its listener is gone from every kernel list; this memory is what still names
//! it when the restarted server cannot bind ("address already in use").
use std::collections::VecDeque;

use super::{Tracker, snapshot::SocketDetail};
use crate::{
    event::{TcpState, Transition},
    model::ProcessInfo,
};

/// Closed listeners remembered at most (the oldest is forgotten first).
pub const MAX_CLOSED_LISTENERS: usize = 1024;

/// An open listener: who called `listen()`, when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub pid: u32,
    /// Task name, raw (escape before printing).
    pub comm: String,
    pub since_ns: u64,
}

/// A listener that closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedListener {
    pub netns: u32,
    pub port: u16,
    pub listener: Listener,
    pub closed_ns: u64,
}

/// What the tracker knows of one local port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortView {
    /// Tracked sockets with this local port (any state, any namespace), each with its known
    /// holders, by namespace then state then tuple.
    pub sockets: Vec<(SocketDetail, Vec<ProcessInfo>)>,
    /// Open listeners, by namespace.
    pub listening: Vec<(u32, Listener)>,
    /// Listeners of the port that closed, newest first.
    pub closed: Vec<ClosedListener>,
}

/// Listeners by (namespace, port), and the last ones that closed.
#[derive(Debug, Default)]
pub(super) struct Listeners {
    pub(super) open: std::collections::HashMap<(u32, u16), Listener>,
    closed: VecDeque<ClosedListener>,
}

impl Tracker {
    /// Listeners come and go in their caller's context (`listen()`, `close()`).
    pub(super) fn note_listener(&mut self, t: &Transition) {
        let l = &mut self.listeners;
        if t.new == TcpState::Listen {
            l.open.insert(
                (t.netns, t.sport),
                Listener {
                    pid: t.task.pid,
                    comm: t.task.comm.to_string_lossy().into_owned(),
                    since_ns: t.ts_ns,
                },
            );
        } else if t.old == TcpState::Listen
            && let Some(listener) = l.open.remove(&(t.netns, t.sport))
        {
            if l.closed.len() >= MAX_CLOSED_LISTENERS {
                l.closed.pop_front();
            }
            l.closed.push_back(ClosedListener {
                netns: t.netns,
                port: t.sport,
                listener,
                closed_ns: t.ts_ns,
            });
        }
    }

    /// Everything tracked about local port `port` at `now_ns`. O(table): an operator's request.
    pub fn on_port(&self, port: u16, now_ns: u64) -> PortView {
        let mut sockets: Vec<(SocketDetail, Vec<ProcessInfo>)> = self
            .table
            .iter()
            .filter(|(_, s)| s.tuple.local_port() == port)
            .filter_map(|(slot, s)| {
                let detail = self.socket(s.id, now_ns)?;
                let holders = self
                    .table
                    .owners(slot)
                    .into_iter()
                    .filter_map(|p| self.procs.get(p).map(|r| r.info.clone()))
                    .collect();
                Some((detail, holders))
            })
            .collect();
        sockets.sort_by(|(a, _), (b, _)| {
            (a.netns, a.state, a.tuple).cmp(&(b.netns, b.state, b.tuple))
        });
        let mut listening: Vec<(u32, Listener)> = self
            .listeners
            .open
            .iter()
            .filter(|((_, p), _)| *p == port)
            .map(|((ns, _), l)| (*ns, l.clone()))
            .collect();
        listening.sort_by_key(|(ns, _)| *ns);
        let closed = self
            .listeners
            .closed
            .iter()
            .rev()
            .filter(|c| c.port == port)
            .cloned()
            .collect();
        PortView {
            sockets,
            listening,
            closed,
        }
    }
}
