//! Rules as data: "a process holds a socket in state S for at least T", "a process holds more
//! than N sockets in state S". A rule is one [`Rule`] value, end to end: the configuration
//! (`[[rules]]`, see `config::rules`) produces it, the tracker watches its state (owners are
//! resolved and reconciled for it), the alert engine evaluates it, and the sinks take its
//! alert name, severity and remedy from it. A FIN_WAIT2 age rule or a SYN_SENT age rule is
//! another value of the same type, not new code.
//!
//! Scopes: a [`Scope::Process`] rule is evaluated per process — the sockets a process owns (as
//! resolved through inet_diag + `/proc/<pid>/fd`) in the rule's state. Sockets without a known
//! owner never match one; they are listed by `Tracker::unowned`. FIN_WAIT2 sockets usually have
//! no owner any more (the process called `close()`; the kernel keeps an orphan), so a process
//! rule on them only sees sockets still held through an fd (after `shutdown(SHUT_WR)`).
//! TIME_WAIT sockets never have an owner: a [`Scope::Peer`] rule counts them per (namespace,
//! local address → remote address:port) from the kernel's own lists (`tracker::timewait`).
//! A [`Scope::Host`] rule counts the sockets in its state over the whole host, every
//! namespace, owned or not (`tracker::host`): one alert per rule, no process.
use super::{Tracker, alerts::AlertChange, table::state_index};
use crate::event::TcpState;

/// The remedy of [`Rule::time_wait_pileup`].
pub const TIME_WAIT_REMEDY: &str = "this process closes its connections to one peer first, and \
     each close leaves a TIME_WAIT socket holding a local port for 60 s: reuse connections \
     (HTTP keep-alive, a connection pool), let the server close first, or set \
     net.ipv4.tcp_tw_reuse=1 (outgoing connections may then reuse TIME_WAIT ports)";

/// Default age threshold of [`Rule::close_wait_leak`]: 60 s.
pub const DEFAULT_CLOSE_WAIT_MAX_AGE_NS: u64 = 60_000_000_000;
/// Default count threshold of [`Rule::close_wait_leak`]: more than 100 sockets.
pub const DEFAULT_CLOSE_WAIT_MAX_COUNT: u32 = 100;

/// What a rule counts sockets per.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The sockets one process holds (a socket shared by several processes counts for each).
    Process,
    /// The TIME_WAIT sockets of one (network namespace, local address → remote address:port).
    Peer,
    /// Every socket in the state, host-wide (all namespaces).
    Host,
}

impl Scope {
    /// The name in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Peer => "peer",
            Self::Host => "host",
        }
    }
}

/// States a process rule may watch: those a socket stays in while a process holds it. CLOSE is never
/// tracked; TIME_WAIT is never entered by a transition (a timewait socket takes over, see
/// DESIGN.md) and NEW_SYN_RECV is a request socket that no process holds.
pub const RULE_STATES: [TcpState; 9] = [
    TcpState::Established,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Listen,
    TcpState::Closing,
];

/// One alerting rule. A process matches when it owns a socket in `state` for at least
/// `max_age_ns`, **or** more than `max_count` sockets in `state`. A rule with neither threshold
/// never matches (the configuration refuses one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Rule name, e.g. `close_wait_leak`: the `rule` label of alerts and metrics. Unique.
    pub name: String,
    /// The TCP state the rule watches. Sockets entering it get their owners resolved, and
    /// reconciliation dumps it.
    pub state: TcpState,
    /// What sockets are counted per.
    pub scope: Scope,
    /// Matches when the oldest socket's age is `>=` this.
    pub max_age_ns: Option<u64>,
    /// Matches when the count is `>` this.
    pub max_count: Option<u32>,
    /// Peer rules: matches when the count is more than this share of the namespace's
    /// ephemeral port range, in parts per million (500000 = 50 %).
    pub max_share_ppm: Option<u32>,
    /// The Alertmanager `alertname` label, e.g. `TcpCloseWaitLeak`.
    pub alertname: String,
    /// The `severity` label, e.g. `warning`.
    pub severity: String,
    /// What to do about it: the `remedy` annotation ("" for none).
    pub remedy: String,
}

impl Rule {
    /// The alert's labels: `alertname`, `severity`, `remedy`.
    pub fn labels(&self) -> (&str, &str, &str) {
        (&self.alertname, &self.severity, &self.remedy)
    }

    /// The rules in force when the configuration names none. Watching FIN_WAIT2 puts every
    /// active close of the host through owner settling and reconciliation; the default bench
    /// measured no difference with and without it (BENCHMARKS.md, `run-fw2`).
    pub fn defaults() -> Vec<Self> {
        vec![
            Self::close_wait_leak(),
            Self::time_wait_pileup(),
            Self::fin_wait2_held(),
        ]
    }

    /// The default peer rule: one (local address → remote address:port) holds TIME_WAIT
    /// sockets on more than half of its namespace's ephemeral port range: new connections
    /// toward that peer are about to fail with EADDRNOTAVAIL.
    pub fn time_wait_pileup() -> Self {
        Self {
            name: "time_wait_pileup".to_owned(),
            state: TcpState::TimeWait,
            scope: Scope::Peer,
            max_age_ns: None,
            max_count: None,
            max_share_ppm: Some(500_000),
            alertname: "TcpTimeWaitPileup".to_owned(),
            severity: "warning".to_owned(),
            remedy: TIME_WAIT_REMEDY.to_owned(),
        }
    }

    /// The default rule: CLOSE_WAIT for 60 s or more, or more than 100 CLOSE_WAIT sockets.
    pub fn close_wait_leak() -> Self {
        Self {
            name: "close_wait_leak".to_owned(),
            state: TcpState::CloseWait,
            scope: Scope::Process,
            max_age_ns: Some(DEFAULT_CLOSE_WAIT_MAX_AGE_NS),
            max_count: Some(DEFAULT_CLOSE_WAIT_MAX_COUNT),
            max_share_ppm: None,
            alertname: "TcpCloseWaitLeak".to_owned(),
            severity: "warning".to_owned(),
            remedy: "the peer closed these connections and the process never called close(): \
                     find the code path that drops a connection after read() returns 0 or an \
                     error without closing it"
                .to_owned(),
        }
    }

    /// The default FIN_WAIT2 rule: a process holds a socket in FIN_WAIT2 for 60 s or more. It
    /// shut down its write side (`shutdown(SHUT_WR)`) and keeps the fd, and the peer never
    /// sent its FIN: the peer is the one leaking (its end sits in CLOSE_WAIT). An orphaned
    /// FIN_WAIT2 (after `close()`, bounded by `tcp_fin_timeout`) has no holder and never
    /// matches a per-process rule.
    pub fn fin_wait2_held() -> Self {
        Self {
            name: "fin_wait2_held".to_owned(),
            state: TcpState::FinWait2,
            scope: Scope::Process,
            max_age_ns: Some(DEFAULT_CLOSE_WAIT_MAX_AGE_NS),
            max_count: None,
            max_share_ppm: None,
            alertname: "TcpFinWait2Held".to_owned(),
            severity: "warning".to_owned(),
            remedy: "this process shut down its side and waits for the peer's FIN, which never \
                     comes: the peer is the one leaking (its end sits in CLOSE_WAIT); fix the \
                     peer process named in peer_processes, or the one on the peer host"
                .to_owned(),
        }
    }

    /// A per-process rule with default labels, for tests and as a starting point.
    #[cfg(test)]
    pub fn new(
        name: &str,
        state: TcpState,
        max_age_ns: Option<u64>,
        max_count: Option<u32>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            state,
            scope: Scope::Process,
            max_age_ns,
            max_count,
            max_share_ppm: None,
            alertname: default_alertname(name),
            severity: "warning".to_owned(),
            remedy: String::new(),
        }
    }

    /// The first instant at which a socket that entered the state at `entered_ns` makes the
    /// rule match by age, if the rule has an age threshold (and the sum does not overflow).
    pub fn age_deadline(&self, entered_ns: u64) -> Option<u64> {
        self.max_age_ns.and_then(|age| entered_ns.checked_add(age))
    }

    /// Whether a process with `count` sockets in the state, the oldest entered at
    /// `oldest_entered_ns`, matches at `now_ns`.
    pub fn matches(&self, count: usize, oldest_entered_ns: Option<u64>, now_ns: u64) -> bool {
        if count == 0 {
            return false;
        }
        let by_count = self
            .max_count
            .is_some_and(|max| count > usize::try_from(max).unwrap_or(usize::MAX));
        let by_age = oldest_entered_ns
            .and_then(|e| self.age_deadline(e))
            .is_some_and(|deadline| now_ns >= deadline);
        by_count || by_age
    }
}

/// The rule set as the tracker holds it.
impl Tracker {
    /// The states some rule watches, in kernel order: the states owner snapshots dump and
    /// reconcile.
    pub fn watched_states(&self) -> Vec<TcpState> {
        TcpState::ALL
            .into_iter()
            .filter(|&s| self.watched[state_index(s)])
            .collect()
    }

    /// True when some rule watches `state`.
    pub fn watches(&self, state: TcpState) -> bool {
        self.watched[state_index(state)]
    }

    /// The rule named `name`.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules().iter().find(|r| r.name == name)
    }

    /// The configured rules.
    pub fn rules(&self) -> &[Rule] {
        self.engine.rules()
    }

    /// Replaces the rule set at `now_ns` (a configuration reload): the table, the socket
    /// ages and the owners stay; firing alerts of rules still there keep firing; the alerts
    /// of rules that went are resolved and returned (process alerts, then host alerts). The
    /// next [`Tracker::evaluate`] applies the new thresholds to every process. Sockets already
    /// in a newly watched state get their holders from the next reconciliation.
    pub fn set_rules(
        &mut self,
        rules: Vec<Rule>,
        now_ns: u64,
    ) -> (Vec<AlertChange>, Vec<super::host::HostAlertChange>) {
        let host = self.set_host_rules(&rules, now_ns);
        // Peer rules live in `timewait::PeerWatch`, host rules in `host`.
        let rules: Vec<Rule> = rules
            .into_iter()
            .filter(|r| r.scope == Scope::Process)
            .collect();
        self.watched = [false; 12];
        for r in &rules {
            self.watched[state_index(r.state)] = true;
        }
        (self.engine.replace_rules(rules, &self.procs, now_ns), host)
    }
}

/// The `alertname` of a rule that names none: `Tcp` and the rule's name in CamelCase
/// (`close_wait_leak` → `TcpCloseWaitLeak`).
pub fn default_alertname(rule: &str) -> String {
    let mut out = String::from("Tcp");
    for word in rule.split(['_', '-']).filter(|w| !w.is_empty()) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rule_thresholds_are_inclusive_for_age_exclusive_for_count() {
        let r = Rule::close_wait_leak();
        assert_eq!(r.age_deadline(5), Some(60_000_000_005));
        assert!(!r.matches(1, Some(5), 60_000_000_004));
        assert!(r.matches(1, Some(5), 60_000_000_005));
        assert!(!r.matches(100, Some(5), 6));
        assert!(r.matches(101, Some(5), 6));
        assert!(!r.matches(0, None, u64::MAX));
        assert_eq!(r.age_deadline(u64::MAX), None);
    }

    #[test]
    fn alertnames_derive_from_rule_names() {
        assert_eq!(default_alertname("close_wait_leak"), "TcpCloseWaitLeak");
        assert_eq!(default_alertname("syn_sent_stuck"), "TcpSynSentStuck");
        assert_eq!(default_alertname("fin-wait2"), "TcpFinWait2");
        assert_eq!(
            Rule::close_wait_leak().alertname,
            default_alertname("close_wait_leak")
        );
    }
}
