//! Who aborts connections, and what it costs: per-process tallies of aborts (by reason, bytes
//! thrown away, peers, last time), resets received per process and peer, and the abort rule
//! (data: a process that aborts more than `count` times within `window` fires an alert that
//! says what to do instead). Pure: no clock, no I/O; time is an argument, so every threshold
//! is tested exactly.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::{
    event::reset::{Reset, ResetKind},
    model::ProcessKey,
};

/// Processes tallied at most; past it the one whose last abort is oldest is forgotten (and
/// counted in [`Tally::evicted`]). Aggregates by reason stay exact whatever the cap.
pub const MAX_PROCESSES: usize = 1024;
/// Peers kept per process; past it new peers count under [`OTHER_PEERS`].
pub const MAX_PEERS: usize = 64;
/// (process, peer) pairs of received resets kept; past it they count under an unknown owner.
pub const MAX_RECEIVED: usize = 4096;
/// The peer key of peers past [`MAX_PEERS`].
pub const OTHER_PEERS: &str = "other";

/// The abort rule: more than `count` aborts of the listed reasons by one process within
/// `window_ns` fires; it resolves when the window holds `count` or fewer again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRule {
    pub name: String,
    /// Reasons that count (`linger_0`, `unread_data`, a kernel reason); empty: every abort.
    pub reasons: Vec<String>,
    /// Fires above this many aborts in the window.
    pub count: u32,
    pub window_ns: u64,
    pub alertname: String,
    pub severity: String,
    pub remedy: String,
}

impl AbortRule {
    /// The embedded default: `discard_on_close`.
    pub fn discard_on_close() -> Self {
        Self {
            name: "discard_on_close".into(),
            reasons: vec!["linger_0".into(), "unread_data".into()],
            count: 10,
            window_ns: 60_000_000_000,
            alertname: "TcpDiscardOnClose".into(),
            severity: "warning".into(),
            remedy: "the process resets connections on close and throws away data the peer never \
                     got (SO_LINGER {1,0}) or it never read: close gracefully instead — \
                     shutdown(SHUT_WR), read until EOF, then close(); if a linger is needed, \
                     use a timeout above 0"
                .into(),
        }
    }

    fn counts(&self, reason: &str) -> bool {
        self.reasons.is_empty() || self.reasons.iter().any(|r| r == reason)
    }
}

/// A process as the abort events name it: its key (pid and start time, so that a process that
/// reuses the pid is another one, as for the other per-process alerts) and task name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Aborter {
    /// `start_ticks` 0: the process had exited (or reused its pid) before the agent read its
    /// start time.
    pub key: ProcessKey,
    pub comm: String,
}

/// One process's aborts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessAborts {
    pub pid: u32,
    /// Start time (`/proc/<pid>/stat` field 22); 0 when unknown (see [`Aborter`]).
    #[serde(default)]
    pub start_ticks: u64,
    pub comm: String,
    /// Aborts by reason.
    pub by_reason: BTreeMap<String, u64>,
    /// Bytes written and never acknowledged, summed over its aborts.
    pub unsent_bytes: u64,
    /// Bytes received and never read, summed.
    pub unread_bytes: u64,
    /// Aborts per peer address (at most [`MAX_PEERS`], then [`OTHER_PEERS`]).
    pub peers: BTreeMap<String, u64>,
    /// CLOCK_MONOTONIC ns of the last abort.
    pub last_ns: u64,
    /// Times of the aborts the rule counts, within its window.
    #[serde(skip)]
    recent: VecDeque<u64>,
    #[serde(skip)]
    firing: bool,
    /// CLOCK_MONOTONIC ns at which its alert last fired.
    #[serde(skip)]
    fired_at_ns: u64,
}

impl ProcessAborts {
    /// All its aborts.
    pub fn total(&self) -> u64 {
        self.by_reason.values().sum()
    }

    /// Whether the rule's alert fires for it.
    pub fn is_firing(&self) -> bool {
        self.firing
    }

    /// Its peers, most aborts first, at most `n`.
    pub fn top_peers(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.peers.iter().map(|(p, c)| (p.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// An abort alert that fired or resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortAlert {
    pub firing: bool,
    /// The process: one alert per (pid, start time).
    pub key: ProcessKey,
    pub comm: String,
    /// Aborts the rule counted in its window.
    pub count: u64,
    /// The process's tallies when it changed.
    pub aborts: ProcessAborts,
    /// CLOCK_MONOTONIC ns at which the alert fired (for a resolution: at which it had fired).
    pub fired_at_ns: u64,
    /// CLOCK_MONOTONIC ns at which it resolved; `None` while it fires.
    pub resolved_at_ns: Option<u64>,
}

/// Everything tallied.
#[derive(Debug)]
pub struct Tally {
    rule: AbortRule,
    procs: HashMap<ProcessKey, ProcessAborts>,
    /// Aborts by reason, every process.
    pub by_reason: BTreeMap<String, u64>,
    /// Aborts whose process is unknown (they ran outside any process's context).
    pub unattributed: u64,
    pub unsent_bytes: u64,
    pub unread_bytes: u64,
    /// Resets received, by owner — `None` when unknown — and peer.
    pub received: HashMap<(Option<Aborter>, IpAddr), u64>,
    pub received_total: u64,
    /// Processes forgotten at the cap.
    pub evicted: u64,
}

impl Tally {
    /// An empty tally under `rule`.
    pub fn new(rule: AbortRule) -> Self {
        Self {
            rule,
            procs: HashMap::new(),
            by_reason: BTreeMap::new(),
            unattributed: 0,
            unsent_bytes: 0,
            unread_bytes: 0,
            received: HashMap::new(),
            received_total: 0,
            evicted: 0,
        }
    }

    /// The rule.
    pub fn rule(&self) -> &AbortRule {
        &self.rule
    }

    /// Counts a reset. `reason` is the abort's (see `Reset::reason`); `caller` the process in
    /// whose context it ran (`Reset::caller` with its start time), `None` outside any; `owner`
    /// the socket's holder as the agent knows it (for a received reset, whose on-CPU task is
    /// unrelated).
    pub fn add(
        &mut self,
        r: &Reset,
        reason: &str,
        caller: Option<Aborter>,
        owner: Option<Aborter>,
    ) {
        if r.kind == ResetKind::Received {
            self.received_total += 1;
            let owner = owner.or(caller);
            let key = if self.received.len() < MAX_RECEIVED {
                (owner, r.daddr)
            } else {
                (None, r.daddr)
            };
            *self.received.entry(key).or_default() += 1;
            return;
        }
        *self.by_reason.entry(reason.to_owned()).or_default() += 1;
        self.unsent_bytes += u64::from(r.unsent.unwrap_or(0));
        self.unread_bytes += u64::from(r.unread.unwrap_or(0));
        // The closing process when the abort ran in its context, else the holder if known.
        let Some(who) = caller.or(owner) else {
            self.unattributed += 1;
            return;
        };
        if !self.procs.contains_key(&who.key) && self.procs.len() >= MAX_PROCESSES {
            let oldest = self
                .procs
                .iter()
                .filter(|(_, p)| !p.firing)
                .min_by_key(|(_, p)| p.last_ns)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => {
                    self.procs.remove(&k);
                    self.evicted += 1;
                }
                None => {
                    self.evicted += 1;
                    return;
                }
            }
        }
        let p = self.procs.entry(who.key).or_insert_with(|| ProcessAborts {
            pid: who.key.pid,
            start_ticks: who.key.start_ticks,
            comm: who.comm,
            ..Default::default()
        });
        *p.by_reason.entry(reason.to_owned()).or_default() += 1;
        p.unsent_bytes += u64::from(r.unsent.unwrap_or(0));
        p.unread_bytes += u64::from(r.unread.unwrap_or(0));
        let peer = r.daddr.to_string();
        let peer = if p.peers.len() < MAX_PEERS || p.peers.contains_key(&peer) {
            peer
        } else {
            OTHER_PEERS.to_owned()
        };
        *p.peers.entry(peer).or_default() += 1;
        p.last_ns = p.last_ns.max(r.ts_ns);
        if self.rule.counts(reason) {
            p.recent.push_back(r.ts_ns);
        }
    }

    /// Applies the rule at `now_ns`: what fired or resolved since the last call.
    pub fn evaluate(&mut self, now_ns: u64) -> Vec<AbortAlert> {
        let (count, window) = (u64::from(self.rule.count), self.rule.window_ns);
        let mut changes = Vec::new();
        for p in self.procs.values_mut() {
            // An abort at t counts while now < t + window.
            while p
                .recent
                .front()
                .is_some_and(|&t| t.saturating_add(window) <= now_ns)
            {
                p.recent.pop_front();
            }
            let n = p.recent.len() as u64;
            if (n > count) != p.firing {
                p.firing = n > count;
                if p.firing {
                    p.fired_at_ns = now_ns;
                }
                changes.push(AbortAlert {
                    fired_at_ns: p.fired_at_ns,
                    resolved_at_ns: (!p.firing).then_some(now_ns),
                    firing: p.firing,
                    key: ProcessKey {
                        pid: p.pid,
                        start_ticks: p.start_ticks,
                    },
                    comm: p.comm.clone(),
                    count: n,
                    aborts: p.clone(),
                });
            }
        }
        changes.sort_by_key(|a| a.key);
        changes
    }

    /// When the next firing alert may resolve (its oldest counted abort leaves the window).
    pub fn next_deadline(&self) -> Option<u64> {
        self.procs
            .values()
            .filter(|p| p.firing)
            .filter_map(|p| {
                p.recent
                    .front()
                    .map(|t| t.saturating_add(self.rule.window_ns))
            })
            .min()
    }

    /// Processes that aborted, most aborts first.
    pub fn processes(&self) -> Vec<&ProcessAborts> {
        let mut v: Vec<_> = self.procs.values().collect();
        v.sort_by(|a, b| {
            b.total()
                .cmp(&a.total())
                .then((a.pid, a.start_ticks).cmp(&(b.pid, b.start_ticks)))
        });
        v
    }
}

#[cfg(test)]
mod tests;
