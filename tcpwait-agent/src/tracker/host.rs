//! Host-scope rules: "more than N sockets in state S on this host", "a socket has been in
//! state S for at least T somewhere on this host", counted over every network namespace. One
//! alert per rule, with no process: the figures are the table's own (`Table::by_state`, kept on
//! every transition) and the oldest entry of an index by entry time that the table keeps only
//! for the states a host rule ages ([`AgeIndex`]).
//!
//! Why the table is the host's truth for these states: every transition of every namespace
//! reaches it, and reconciliation dumps every tracked state of every namespace
//! (`daemon::resolver`), so sockets that predate the agent or a lost event are counted too
//! (with a lower-bound age). No owner is needed, so a host rule does not make its state
//! watched (no owner resolution per socket entering it).
use std::collections::{BTreeMap, BTreeSet};

use super::{
    Tracker,
    rules::{Rule, Scope},
    table::state_index,
};
use crate::event::TcpState;

/// Per state, `(entered_ns, slot)` of every socket in it, for the enabled states only: the
/// oldest socket of a state in O(log n). Disabled states cost one branch per table change.
#[derive(Debug, Default)]
pub(super) struct AgeIndex {
    by_state: [Option<BTreeSet<(u64, u32)>>; 12],
}

impl AgeIndex {
    pub(super) fn add(&mut self, state: TcpState, entered_ns: u64, slot: u32) {
        if let Some(set) = &mut self.by_state[state_index(state)] {
            set.insert((entered_ns, slot));
        }
    }

    pub(super) fn remove(&mut self, state: TcpState, entered_ns: u64, slot: u32) {
        if let Some(set) = &mut self.by_state[state_index(state)] {
            set.remove(&(entered_ns, slot));
        }
    }

    /// The oldest `(entered_ns, slot)` in `state`, if the state is indexed and not empty.
    pub(super) fn oldest(&self, state: TcpState) -> Option<(u64, u32)> {
        self.by_state[state_index(state)].as_ref()?.first().copied()
    }

    fn enabled(&self, state: TcpState) -> bool {
        self.by_state[state_index(state)].is_some()
    }
}

/// One host rule that matches or matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAlert {
    /// [`Rule::name`].
    pub rule: String,
    /// [`Rule::state`].
    pub state: TcpState,
    /// Sockets in `state` host-wide, as of `as_of_ns`.
    pub count: u64,
    /// When the oldest of them entered `state`, if the rule ages them.
    pub oldest_entered_ns: Option<u64>,
    /// True when that is only a bound (the socket predates the agent or a lost event).
    pub oldest_is_lower_bound: bool,
    /// When the figures were measured (the last evaluation while it fired).
    pub as_of_ns: u64,
    /// The evaluation that started the alert.
    pub fired_at_ns: u64,
    /// The evaluation that ended it; `None` while firing.
    pub resolved_at_ns: Option<u64>,
}

/// What [`Tracker::evaluate_host`] reports: each host rule fires once, then resolves once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostAlertChange {
    Firing(HostAlert),
    Resolved(HostAlert),
}

/// A host rule and its figures now (`status`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostView<'a> {
    pub rule: &'a Rule,
    pub count: u64,
    /// Age of the oldest socket in the state, if the rule has an age threshold.
    pub oldest_age_ns: Option<u64>,
    pub oldest_is_lower_bound: bool,
    pub firing: bool,
}

/// The host rules and which of them fire.
#[derive(Debug, Default)]
pub(super) struct HostRules {
    rules: Vec<Rule>,
    firing: BTreeMap<usize, HostAlert>,
}

impl HostRules {
    /// The rules of `rules` with [`Scope::Host`].
    pub(super) fn new(rules: &[Rule]) -> Self {
        Self {
            rules: rules
                .iter()
                .filter(|r| r.scope == Scope::Host)
                .cloned()
                .collect(),
            firing: BTreeMap::new(),
        }
    }

    /// The states whose sockets must be indexed by age.
    pub(super) fn aged_states(&self) -> [bool; 12] {
        let mut on = [false; 12];
        for r in self.rules.iter().filter(|r| r.max_age_ns.is_some()) {
            on[state_index(r.state)] = true;
        }
        on
    }
}

impl Tracker {
    /// The host rules.
    pub fn host_rules(&self) -> &[Rule] {
        &self.host.rules
    }

    /// Host alert changes at `now_ns`: a rule fires when more than `count` sockets are in its
    /// state host-wide or the oldest has been in it for `age` or more; it resolves when
    /// neither holds. O(host rules × log n).
    pub fn evaluate_host(&mut self, now_ns: u64) -> Vec<HostAlertChange> {
        let mut changes = Vec::new();
        for i in 0..self.host.rules.len() {
            let rule = &self.host.rules[i];
            let count = self.table.by_state()[state_index(rule.state)];
            let oldest = self.table.ages.oldest(rule.state);
            let matching = rule.matches(
                usize::try_from(count).unwrap_or(usize::MAX),
                oldest.map(|(e, _)| e),
                now_ns,
            );
            let lower_bound = oldest.is_some_and(|(_, s)| self.table.get(s).lower_bound());
            match (matching, self.host.firing.get_mut(&i)) {
                (true, Some(a)) => {
                    a.count = count;
                    a.oldest_entered_ns = oldest.map(|(e, _)| e);
                    a.oldest_is_lower_bound = lower_bound;
                    a.as_of_ns = now_ns;
                }
                (true, None) => {
                    let a = HostAlert {
                        rule: rule.name.clone(),
                        state: rule.state,
                        count,
                        oldest_entered_ns: oldest.map(|(e, _)| e),
                        oldest_is_lower_bound: lower_bound,
                        as_of_ns: now_ns,
                        fired_at_ns: now_ns,
                        resolved_at_ns: None,
                    };
                    self.host.firing.insert(i, a.clone());
                    changes.push(HostAlertChange::Firing(a));
                }
                (false, Some(_)) => {
                    let mut a = self.host.firing.remove(&i).expect("just found");
                    a.resolved_at_ns = Some(now_ns);
                    changes.push(HostAlertChange::Resolved(a));
                }
                (false, None) => {}
            }
        }
        changes
    }

    /// The earliest instant at which a host rule that does not fire matches by age alone.
    pub fn next_host_deadline(&self) -> Option<u64> {
        self.host
            .rules
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.host.firing.contains_key(i))
            .filter_map(|(_, r)| r.age_deadline(self.table.ages.oldest(r.state)?.0))
            .min()
    }

    /// Every host rule with its figures at `now_ns`.
    pub fn host_views(&self, now_ns: u64) -> Vec<HostView<'_>> {
        self.host
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let oldest = rule
                    .max_age_ns
                    .and_then(|_| self.table.ages.oldest(rule.state));
                HostView {
                    rule,
                    count: self.table.by_state()[state_index(rule.state)],
                    oldest_age_ns: oldest.map(|(e, _)| now_ns.saturating_sub(e)),
                    oldest_is_lower_bound: oldest
                        .is_some_and(|(_, s)| self.table.get(s).lower_bound()),
                    firing: self.host.firing.contains_key(&i),
                }
            })
            .collect()
    }

    /// Replaces the host rules (a reload) at `now_ns`: alerts of rules still there (same name
    /// and state) keep firing; the others resolve and are returned. The age index follows.
    pub(super) fn set_host_rules(&mut self, rules: &[Rule], now_ns: u64) -> Vec<HostAlertChange> {
        let old = std::mem::replace(&mut self.host, HostRules::new(rules));
        let mut gone = Vec::new();
        for (i, mut a) in old.firing {
            let same = |r: &Rule| r.name == old.rules[i].name && r.state == old.rules[i].state;
            match self.host.rules.iter().position(same) {
                Some(j) => {
                    self.host.firing.insert(j, a);
                }
                None => {
                    a.resolved_at_ns = Some(now_ns);
                    gone.push(HostAlertChange::Resolved(a));
                }
            }
        }
        self.index_ages();
        gone
    }

    /// Makes the table index by age exactly the states the host rules age.
    pub(super) fn index_ages(&mut self) {
        let on = self.host.aged_states();
        for state in TcpState::ALL {
            let want = on[state_index(state)];
            if want == self.table.ages.enabled(state) {
                continue;
            }
            let set = want.then(|| {
                self.table
                    .iter()
                    .filter(|(_, s)| s.state == Some(state))
                    .map(|(slot, s)| (s.entered_ns, slot))
                    .collect()
            });
            self.table.ages.by_state[state_index(state)] = set;
        }
    }
}

#[cfg(test)]
mod tests;
