//! Alert state: which (rule, process) pairs fire, what changed since the last evaluation, and
//! the next instant at which one more pair starts matching by age alone.
//!
//! The daemon does not scan: it sleeps until `min(next event, next_deadline())`. The engine
//! keeps
//! - `dirty`: processes whose sockets changed since the last `evaluate` (marked by the tracker on
//!   every change that touches a process's index);
//! - `deadlines`: an ordered set of `(oldest entered_ns + max_age, process, rule)` for every
//!   (rule, process) pair that has sockets in the rule's state, an age threshold, and is not
//!   firing. It is maintained on every touch, so `next_deadline` is its first element, O(1).
//!
//! `evaluate` looks only at dirty processes and at pairs whose deadline has passed: O((dirty +
//! due) × rules × (log n + distinct peers of the process)), independent of the table size.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use super::{procs::ProcRecord, procs::Registry, rules::Rule, table::Table};
use crate::{
    event::TcpState,
    model::{ProcessInfo, ProcessKey},
};

/// One (rule, process) pair that matches or matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// [`Rule::name`].
    pub rule: String,
    /// [`Rule::state`].
    pub state: TcpState,
    /// The process (pid, comm, cmdline, cgroup, container) as last known.
    pub process: ProcessInfo,
    /// Sockets the process owns in `state`, as of `as_of_ns`.
    pub count: u32,
    /// When the oldest of them entered `state` (CLOCK_MONOTONIC ns).
    pub oldest_entered_ns: u64,
    /// Age of the oldest at `as_of_ns`; use [`Alert::oldest_age_at`] for another instant.
    pub oldest_age_ns: u64,
    /// True when the oldest age is only known to be at least `oldest_age_ns` (the socket
    /// predates the agent or a lost event; see `Tracker::reconcile`).
    pub oldest_is_lower_bound: bool,
    /// Remote addresses with the most sockets (at most [`super::TOP_PEERS`]), most first.
    pub top_peers: Vec<(IpAddr, u32)>,
    /// The local processes holding the other end of these sockets (the reverse tuple in the
    /// same network namespace), most sockets first: for a FIN_WAIT2 alert, the peer that
    /// never closes and the CLOSE_WAIT sockets it holds. Empty when the peers are remote.
    pub peer_holders: Vec<PeerHolder>,
    /// When `count`, the ages and `top_peers` were measured (the last `evaluate` that saw a
    /// change to this process while the alert fired).
    pub as_of_ns: u64,
    /// The `evaluate` call that started the alert.
    pub fired_at_ns: u64,
    /// The `evaluate` call that ended it; `None` while firing. A resolved alert keeps the
    /// figures last measured while it fired.
    pub resolved_at_ns: Option<u64>,
}

/// A local process holding the other end of some of an alert's sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerHolder {
    /// The process as last known.
    pub process: ProcessInfo,
    /// The state of its ends (the state of the first one found).
    pub state: TcpState,
    /// How many of the alert's sockets it holds the other end of.
    pub count: u32,
}

/// An alert's sockets whose other end is looked up, at most (the oldest first): bounds the
/// cost of measuring a process that holds very many.
const PEER_LOOKUPS: usize = 256;

impl Alert {
    /// Age of the oldest socket at `now_ns`.
    pub fn oldest_age_at(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.oldest_entered_ns)
    }
}

/// What `Tracker::evaluate` reports: each (rule, process) fires once, then resolves once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertChange {
    /// The pair started matching.
    Firing(Alert),
    /// The pair stopped matching: its sockets closed or left the state, or the process is gone.
    Resolved(Alert),
}

/// Alert state; see the module comment.
pub(super) struct Engine {
    rules: Vec<Rule>,
    firing: BTreeMap<(ProcessKey, usize), Alert>,
    deadlines: BTreeSet<(u64, ProcessKey, usize)>,
    deadline_of: HashMap<(ProcessKey, usize), u64>,
    dirty: BTreeSet<ProcessKey>,
}

impl Engine {
    pub(super) fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules,
            firing: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    pub(super) fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Replaces the rule set (a configuration reload). A firing alert whose rule is still
    /// there (same name, same state) keeps firing, with its `fired_at_ns`; one whose rule went
    /// or watches another state now resolves at `now_ns`, and is returned. Every process is
    /// looked at again by the next `evaluate`, under the new thresholds, and its age
    /// deadlines are recomputed: a socket's age is its own, so a lower age threshold fires at
    /// once on sockets already older than it.
    pub(super) fn replace_rules(
        &mut self,
        rules: Vec<Rule>,
        procs: &Registry,
        now_ns: u64,
    ) -> Vec<AlertChange> {
        let old = std::mem::replace(&mut self.rules, rules);
        let mut resolved = Vec::new();
        for ((key, i), mut alert) in std::mem::take(&mut self.firing) {
            let same = |r: &Rule| r.name == old[i].name && r.state == old[i].state;
            match self.rules.iter().position(same) {
                Some(j) => {
                    self.firing.insert((key, j), alert);
                }
                None => {
                    alert.resolved_at_ns = Some(now_ns);
                    resolved.push(AlertChange::Resolved(alert));
                }
            }
        }
        self.deadlines.clear();
        self.deadline_of.clear();
        for rec in procs.iter() {
            self.touch(rec.info.key, Some(rec));
        }
        resolved
    }

    /// Records that `key`'s sockets changed; `rec` is its record now (`None`: it has no socket
    /// left or was forgotten).
    pub(super) fn touch(&mut self, key: ProcessKey, rec: Option<&ProcRecord>) {
        self.dirty.insert(key);
        for i in 0..self.rules.len() {
            self.refresh_deadline(key, i, rec);
        }
    }

    fn refresh_deadline(&mut self, key: ProcessKey, rule: usize, rec: Option<&ProcRecord>) {
        let r = &self.rules[rule];
        let new = if self.firing.contains_key(&(key, rule)) {
            None
        } else {
            rec.and_then(|rec| rec.state(r.state).oldest())
                .and_then(|(entered, _)| r.age_deadline(entered))
        };
        let old = self.deadline_of.get(&(key, rule)).copied();
        if old == new {
            return;
        }
        if let Some(d) = old {
            self.deadlines.remove(&(d, key, rule));
            self.deadline_of.remove(&(key, rule));
        }
        if let Some(d) = new {
            self.deadlines.insert((d, key, rule));
            self.deadline_of.insert((key, rule), d);
        }
    }

    /// The earliest instant at which a pair that does not fire starts matching by age.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|&(d, _, _)| d)
    }

    /// Alerts firing now, by process then rule.
    pub(super) fn firing(&self) -> Vec<Alert> {
        self.firing.values().cloned().collect()
    }

    pub(super) fn evaluate(
        &mut self,
        now_ns: u64,
        procs: &Registry,
        table: &Table,
    ) -> Vec<AlertChange> {
        let mut candidates = std::mem::take(&mut self.dirty);
        candidates.extend(
            self.deadlines
                .iter()
                .take_while(|&&(d, _, _)| d <= now_ns)
                .map(|&(_, key, _)| key),
        );
        let mut changes = Vec::new();
        for key in candidates {
            let rec = procs.by_key(&key);
            for i in 0..self.rules.len() {
                if let Some(change) = self.evaluate_pair(key, i, (rec, procs), table, now_ns) {
                    changes.push(change);
                }
                self.refresh_deadline(key, i, rec);
            }
        }
        changes
    }

    fn evaluate_pair(
        &mut self,
        key: ProcessKey,
        i: usize,
        (rec, procs): (Option<&ProcRecord>, &Registry),
        table: &Table,
        now_ns: u64,
    ) -> Option<AlertChange> {
        let rule = &self.rules[i];
        let idx = rec.map(|r| r.state(rule.state));
        let count = idx.map_or(0, |s| s.len());
        let oldest = idx.and_then(|s| s.oldest());
        let matching = rule.matches(count, oldest.map(|(e, _)| e), now_ns);
        match (matching, self.firing.get_mut(&(key, i))) {
            (true, Some(alert)) => {
                // Still firing: refresh the figures (this pair is dirty or due).
                if let (Some(rec), Some(o)) = (rec, oldest) {
                    measure(alert, rec, o, table, procs, now_ns);
                }
                None
            }
            (true, None) => {
                let (rec, o) = (rec?, oldest?);
                let mut alert = Alert {
                    rule: rule.name.clone(),
                    state: rule.state,
                    process: rec.info.clone(),
                    count: 0,
                    oldest_entered_ns: 0,
                    oldest_age_ns: 0,
                    oldest_is_lower_bound: false,
                    top_peers: Vec::new(),
                    peer_holders: Vec::new(),
                    as_of_ns: now_ns,
                    fired_at_ns: now_ns,
                    resolved_at_ns: None,
                };
                measure(&mut alert, rec, o, table, procs, now_ns);
                self.firing.insert((key, i), alert.clone());
                Some(AlertChange::Firing(alert))
            }
            (false, Some(_)) => {
                let mut alert = self.firing.remove(&(key, i))?;
                alert.resolved_at_ns = Some(now_ns);
                Some(AlertChange::Resolved(alert))
            }
            (false, None) => None,
        }
    }
}

/// Fills an alert's figures from a process's index for the alert's state.
fn measure(
    alert: &mut Alert,
    rec: &ProcRecord,
    oldest: (u64, u32),
    table: &Table,
    procs: &Registry,
    now_ns: u64,
) {
    let idx = rec.state(alert.state);
    alert.process = rec.info.clone();
    alert.count = u32::try_from(idx.len()).unwrap_or(u32::MAX);
    alert.oldest_entered_ns = oldest.0;
    alert.oldest_age_ns = now_ns.saturating_sub(oldest.0);
    alert.oldest_is_lower_bound = table.get(oldest.1).lower_bound();
    alert.top_peers = idx.top_peers();
    alert.peer_holders = peer_holders(idx.by_age.iter().map(|&(_, slot)| slot), table, procs);
    alert.as_of_ns = now_ns;
}

/// The local holders of the other ends of `slots` (at most [`PEER_LOOKUPS`] of them).
fn peer_holders(
    slots: impl Iterator<Item = u32>,
    table: &Table,
    procs: &Registry,
) -> Vec<PeerHolder> {
    let mut by_proc: BTreeMap<ProcessKey, PeerHolder> = BTreeMap::new();
    for slot in slots.take(PEER_LOOKUPS) {
        let t = table.get(slot).tuple;
        if !t.indexable() {
            continue;
        }
        let Some(other) = table.find_tuple(&t.reversed()) else {
            continue;
        };
        let state = table.get(other).state;
        for p in table.owners(other) {
            let (Some(rec), Some(state)) = (procs.get(p), state) else {
                continue;
            };
            by_proc
                .entry(rec.info.key)
                .or_insert_with(|| PeerHolder {
                    process: rec.info.clone(),
                    state,
                    count: 0,
                })
                .count += 1;
        }
    }
    let mut out: Vec<PeerHolder> = by_proc.into_values().collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.process.key.cmp(&b.process.key))
    });
    out
}
