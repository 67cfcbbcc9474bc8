//! The tracker: every live TCP socket, how long it has been in its state, which processes hold
//! it, and which (rule, process) pairs alert.
//!
//! Pure by design (STYLE.md, habit 5): no aya, no tokio, no clock, no IO. Every instant is a
//! `now_ns` argument on CLOCK_MONOTONIC, the clock of [`Transition::ts_ns`], so every rule is
//! unit-tested with exact timestamps. One task owns the [`Tracker`] (habit 6).
//!
//! Inputs: [`Tracker::apply`] for each transition, [`Tracker::set_owners`] when the owner
//! resolver answers, [`Tracker::forget_process`] when a process exits, and
//! [`Tracker::reconcile`] with inet_diag snapshots (bootstrap, then periodically). Outputs:
//! [`Tracker::evaluate`] (alert changes), [`Tracker::next_deadline`] (when to evaluate again
//! without an event), [`Tracker::processes`] / [`Tracker::unowned`] (`tcpwait status`), counters
//! and gauges for metrics.
//!
//! Files: `table` (compact socket slab + indices), `procs` (per-process indices), `rules`
//! (rules as data), `alerts` (firing state, deadlines), `reconcile` (inet_diag truth),
//! `snapshot` (status views), `timewait` (TIME_WAIT pile-ups per peer, peer rules).
pub mod alerts;
mod candidates;
pub mod host;
pub mod ports;
mod procs;
pub mod reconcile;
pub mod rules;
mod slots;
pub mod snapshot;
mod table;
#[cfg(test)]
pub(crate) mod tests;
pub mod timewait;

use self::{
    alerts::{Alert, AlertChange, Engine},
    procs::Registry,
    reconcile::is_synthetic,
    rules::Rule,
    table::{CompactTuple, Table, state_index},
};
use crate::{
    event::{SocketId, TcpState, Transition},
    model::{ProcessInfo, ProcessKey},
};

/// How many peers a process summary or an alert lists.
pub const TOP_PEERS: usize = 5;

/// Default [`TrackerConfig::max_sockets`]: 1,000,000 sockets, ≈ 140 MB of table at the
/// measured ≈ 138 bytes per socket (see `table`), plus ≈ 32 bytes per *owned* socket.
pub const DEFAULT_MAX_SOCKETS: usize = 1_000_000;

/// Tracker settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Most sockets tracked at once (default [`DEFAULT_MAX_SOCKETS`]). At capacity a socket not
    /// yet tracked is refused and [`Counters::overflowed`] counts it; tracked sockets keep being
    /// updated and removed, so space comes back as sockets close. A refused socket that later
    /// shows up in an inet_diag snapshot is added by `reconcile` if there is room.
    pub max_sockets: usize,
    /// Alerting rules (default: [`Rule::defaults`]). Their states are the *watched*
    /// states: a socket entering one without a known owner asks for owner resolution.
    pub rules: Vec<Rule>,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            max_sockets: DEFAULT_MAX_SOCKETS,
            rules: Rule::defaults(),
        }
    }
}

/// Cumulative counters (Prometheus counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New sockets refused because the table was at `max_sockets`.
    pub overflowed: u64,
    /// A tuple was already indexed for another live socket (another network namespace, or a
    /// missed CLOSE); the newer socket took the index entry.
    pub tuple_conflicts: u64,
    /// Transitions to CLOSE for a socket not tracked (born before the agent, or refused).
    pub close_untracked: u64,
    /// A transition out of CLOSE for an address still tracked: the previous socket's CLOSE was
    /// lost and the kernel reused the address; the stale entry was replaced.
    pub reused_address: u64,
    /// Synthetic entries (from inet_diag) that met their kernel address in a transition.
    pub rekeyed: u64,
    /// Transitions into the state a socket is already in, from another state: the kernel side
    /// delivered a transition twice (its rescue of nested transitions can, rarely); ignored.
    pub duplicates: u64,
    /// Sockets `reconcile` added (tracked nowhere, inet_diag shows them).
    pub repairs_added: u64,
    /// Sockets `reconcile` removed (tracked, inet_diag no longer shows them).
    pub repairs_removed: u64,
    /// Sockets `reconcile` moved to the state inet_diag shows.
    pub repairs_corrected: u64,
}

/// What [`Tracker::apply`] did to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableChange {
    /// A socket not tracked before is now.
    Inserted,
    /// A tracked socket changed state.
    Updated,
    /// A synthetic entry (from `reconcile`) was matched by tuple; it now has its kernel address
    /// and the new state.
    Rekeyed {
        /// The synthetic id it had.
        from: SocketId,
    },
    /// The socket reached CLOSE and left the table.
    Removed,
    /// CLOSE for a socket that was not tracked: nothing to do.
    Untracked,
    /// The table is full; the socket was not inserted ([`Counters::overflowed`]).
    Overflow,
    /// The socket is already in the new state: a transition delivered twice, ignored
    /// ([`Counters::duplicates`]).
    Duplicate,
}

/// The answer of [`Tracker::apply`]: what happened, and what the daemon should do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// What happened to the table.
    pub change: TableChange,
    /// The socket just entered a watched state (a rule's state, CLOSE_WAIT by default) and no
    /// owner is known: resolve its owners (inet_diag by tuple, then `/proc/<pid>/fd` inodes)
    /// and call [`Tracker::set_owners`]. The transition's on-CPU task is never a substitute:
    /// ESTABLISHED→CLOSE_WAIT runs in softirq, where it is the peer or an idle task.
    pub needs_owners: bool,
}

/// The socket table, process registry and alert state. See the module comment.
pub struct Tracker {
    max_sockets: usize,
    table: Table,
    procs: Registry,
    engine: Engine,
    counters: Counters,
    watched: [bool; 12],
    /// Timestamp of the last refused insert: a socket missing from the table may have entered
    /// its state as late as this (used for `reconcile` lower bounds).
    last_overflow_ns: Option<u64>,
    /// Listening sockets by (network namespace, local port) → the pid that called `listen()`
    /// (CLOSE → LISTEN runs in the caller's context). The candidate owner of the sockets it
    /// accepts: one map entry per listener, so bounded by the host's listeners; and the last
    /// listeners that closed (bounded, `ports`).
    listeners: ports::Listeners,
    /// Host-scope rules and their alerts (`host`).
    host: host::HostRules,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(config: TrackerConfig) -> Self {
        // Peer rules count TIME_WAIT sockets from the kernel's lists (`timewait`), host rules
        // the table's own counts (`host`): neither needs owners.
        let host = host::HostRules::new(&config.rules);
        let rules: Vec<Rule> = config
            .rules
            .into_iter()
            .filter(|r| r.scope == rules::Scope::Process)
            .collect();
        let mut watched = [false; 12];
        for r in &rules {
            watched[state_index(r.state)] = true;
        }
        let mut tracker = Self {
            max_sockets: config.max_sockets,
            table: Table::new(),
            procs: Registry::default(),
            engine: Engine::new(rules),
            counters: Counters::default(),
            watched,
            last_overflow_ns: None,
            listeners: ports::Listeners::default(),
            host,
        };
        tracker.index_ages();
        tracker
    }

    /// What is known of a process that owns tracked sockets.
    pub fn process_info(&self, key: &ProcessKey) -> Option<&ProcessInfo> {
        self.procs.by_key(key).map(|r| &r.info)
    }

    /// Applies one transition. CLOSE removes the socket; any other state inserts or updates it
    /// with `entered_ns = t.ts_ns` (exact). A socket unknown by address whose tuple belongs to a
    /// synthetic entry takes that entry over (rekey). `t.task` is ignored on purpose (see
    /// [`Applied::needs_owners`]). O(owners × (log n + rules)).
    pub fn apply(&mut self, t: &Transition) -> Applied {
        let tuple = CompactTuple::new(t.netns, t.saddr, t.sport, t.daddr, t.dport);
        self.note_listener(t);
        let mut change = TableChange::Updated;
        let mut slot = self.table.slot_of(t.sock);
        if let Some(s) = slot
            && t.old == TcpState::Close
            && t.new != TcpState::Close
        {
            // Every socket starts in CLOSE: this is a new socket at a reused address.
            self.counters.reused_address += 1;
            self.drop_slot(s);
            slot = None;
        }
        if let Some(s) = slot {
            let e = self.table.get(s);
            // Only an entry whose state came from a transition (not from inet_diag, which may
            // run ahead of the ring) says for sure the socket is in `new` already.
            if e.state == Some(t.new) && t.old != t.new && !e.lower_bound() && !is_synthetic(e.id) {
                self.counters.duplicates += 1;
                return Applied {
                    change: TableChange::Duplicate,
                    needs_owners: false,
                };
            }
        }
        if slot.is_none()
            && tuple.indexable()
            && let Some(s) = self.table.find_tuple(&tuple)
            && is_synthetic(self.table.get(s).id)
        {
            if t.old == TcpState::Close {
                // A new socket with the tuple of a synthetic entry: the old socket is gone
                // (its CLOSE was lost or happened before the agent could see it).
                self.counters.reused_address += 1;
                self.drop_slot(s);
                return self.apply(t);
            }
            change = TableChange::Rekeyed {
                from: self.table.get(s).id,
            };
            self.table.rekey(s, t.sock);
            self.counters.rekeyed += 1;
            slot = Some(s);
        }
        if t.new == TcpState::Close {
            let change = match slot {
                Some(s) => {
                    self.drop_slot(s);
                    TableChange::Removed
                }
                None => {
                    self.counters.close_untracked += 1;
                    TableChange::Untracked
                }
            };
            return Applied {
                change,
                needs_owners: false,
            };
        }
        let slot = match slot {
            // The transition gives the exact entry time, better than any lower bound.
            Some(s) => {
                self.move_slot(s, t.new, t.ts_ns, false, tuple);
                s
            }
            None if self.table.len() >= self.max_sockets => {
                self.counters.overflowed += 1;
                self.last_overflow_ns = Some(self.last_overflow_ns.unwrap_or(0).max(t.ts_ns));
                return Applied {
                    change: TableChange::Overflow,
                    needs_owners: false,
                };
            }
            None => {
                change = TableChange::Inserted;
                self.insert_slot(t.sock, t.new, t.ts_ns, false, tuple)
            }
        };
        if t.old == TcpState::Close && t.new == TcpState::SynSent {
            // connect() runs in the caller's context: the likely owner.
            self.table.set_hint(slot, t.task.pid);
        }
        Applied {
            change,
            needs_owners: self.watched[state_index(t.new)] && !self.table.has_owner(slot),
        }
    }

    /// Sets the processes that hold `sock` (replacing any known before; duplicates ignored) and
    /// records what is known of each process. Returns false if the socket is not tracked.
    #[cfg(test)]
    pub fn set_owners(&mut self, sock: SocketId, owners: Vec<ProcessInfo>) -> bool {
        match self.table.slot_of(sock) {
            Some(slot) => {
                self.assign_owners(slot, owners);
                true
            }
            None => false,
        }
    }

    /// The process exited: its sockets lose it as an owner and its alerts resolve at the next
    /// `evaluate`. Returns false if the process owned no tracked socket.
    pub fn forget_process(&mut self, key: &ProcessKey) -> bool {
        let Some(idx) = self.procs.index_of(key) else {
            return false;
        };
        let Some(rec) = self.procs.remove(idx) else {
            return false;
        };
        for (_, _, slot) in rec.sockets() {
            self.table.remove_owner(slot, idx);
        }
        self.engine.touch(*key, None);
        true
    }

    /// True while `sock` is still in the watched state it entered at `entered_ns` (the same
    /// stint: not closed, not moved on, not a reused address) and no owner is known. The daemon
    /// resolves owners only for sockets that stay this way for a while: most sockets pass
    /// through CLOSE_WAIT in microseconds, and one inet_diag dump per passing socket would cost
    /// more than everything else the agent does.
    pub fn awaits_owner(&self, sock: SocketId, entered_ns: u64) -> bool {
        self.table.slot_of(sock).is_some_and(|slot| {
            let s = self.table.get(slot);
            s.entered_ns == entered_ns
                && s.state.is_some_and(|st| self.watched[state_index(st)])
                && !self.table.has_owner(slot)
        })
    }

    /// The tracked socket with this namespace and 4-tuple (connected sockets only: both ports
    /// non-zero).
    #[cfg(test)]
    pub fn socket_by_tuple(&self, netns: u32, tuple: &crate::model::Tuple) -> Option<SocketId> {
        let t = CompactTuple::from_tuple(netns, tuple);
        if !t.indexable() {
            return None;
        }
        self.table.find_tuple(&t).map(|s| self.table.get(s).id)
    }

    /// The first process known to hold `sock`. Allocation-free:
    /// the daemon asks for every transition while a `tail` client or the transition log is on.
    pub fn first_owner(&self, sock: SocketId) -> Option<ProcessKey> {
        let slot = self.table.slot_of(sock)?;
        self.table
            .first_owner(slot)
            .and_then(|p| self.procs.key_of(p))
    }

    /// The processes known to hold `sock` (empty: unknown or untracked).
    #[cfg(test)]
    pub fn owners_of(&self, sock: SocketId) -> Vec<ProcessKey> {
        self.table.slot_of(sock).map_or_else(Vec::new, |slot| {
            self.table
                .owners(slot)
                .into_iter()
                .filter_map(|p| self.procs.key_of(p))
                .collect()
        })
    }

    /// Alert changes since the last call; see `alerts`. Looks only at processes whose sockets
    /// changed and at age deadlines that have passed.
    pub fn evaluate(&mut self, now_ns: u64) -> Vec<AlertChange> {
        self.engine.evaluate(now_ns, &self.procs, &self.table)
    }

    /// The earliest instant at which a (rule, process) pair that does not fire yet will match by
    /// age with no further event (oldest socket's `entered_ns + max_age_ns`). O(1). May be in
    /// the past if `evaluate` has not run since: evaluate at once then.
    pub fn next_deadline(&self) -> Option<u64> {
        self.engine.next_deadline()
    }

    /// Alerts firing as of the last `evaluate`, by process then rule.
    pub fn firing(&self) -> Vec<Alert> {
        self.engine.firing()
    }

    /// Sockets tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no socket is tracked.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the pair of len(); used by tests")
    )]
    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }

    /// The processes known to own at least one tracked socket.
    pub fn process_keys(&self) -> Vec<ProcessKey> {
        self.procs.iter().map(|r| r.info.key).collect()
    }

    /// Processes known to own at least one tracked socket.
    #[cfg(test)]
    pub fn process_count(&self) -> usize {
        self.procs.len()
    }

    /// Cumulative counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Gauge: tracked sockets per state, indexed by `TcpState as usize - 1` (kernel order, as
    /// [`TcpState::ALL`]).
    pub fn sockets_by_state(&self) -> [u64; 12] {
        self.table.by_state()
    }

    /// Approximate heap bytes of the socket table and its indices, from their capacities
    /// (per-process indices excluded).
    #[cfg(test)]
    pub fn approx_table_bytes(&self) -> usize {
        self.table.approx_heap_bytes()
    }
}
