//! Rules as data: "a process holds a socket in state S for at least T", "a process holds more
//! than N sockets in state S". The CLOSE_WAIT leak is one [`Rule`] value; a FIN_WAIT2 age rule
//! or a TIME_WAIT count rule is another value of the same type, not new code.
//!
//! Scope: every rule is evaluated **per process** — the sockets a process owns (as resolved
//! through inet_diag + `/proc/<pid>/fd`) in the rule's state. Sockets without a known owner never
//! match a rule; they are listed by `Tracker::unowned`. Note that FIN_WAIT2 and TIME_WAIT
//! sockets usually have no owner any more (the process called `close()`; the kernel keeps an
//! orphan or a timewait socket), so a rule on them only sees sockets still held through an fd
//! (e.g. after `shutdown(SHUT_WR)`). A host-wide or per-peer scope would be a field added here.
use crate::event::TcpState;

/// Default age threshold of [`Rule::close_wait_leak`]: 60 s.
pub const DEFAULT_CLOSE_WAIT_MAX_AGE_NS: u64 = 60_000_000_000;
/// Default count threshold of [`Rule::close_wait_leak`]: more than 100 sockets.
pub const DEFAULT_CLOSE_WAIT_MAX_COUNT: u32 = 100;

/// One alerting rule. A process matches when it owns a socket in `state` for at least
/// `max_age_ns`, **or** more than `max_count` sockets in `state`. A rule with neither threshold
/// never matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Alert name, e.g. `close_wait_leak`; becomes the Alertmanager `alertname`.
    pub name: String,
    /// The TCP state the rule watches. Sockets entering it get their owners resolved.
    pub state: TcpState,
    /// Matches when the oldest socket's age is `>=` this.
    pub max_age_ns: Option<u64>,
    /// Matches when the count is `>` this.
    pub max_count: Option<u32>,
}

impl Rule {
    /// The default rule: CLOSE_WAIT for 60 s or more, or more than 100 CLOSE_WAIT sockets.
    pub fn close_wait_leak() -> Self {
        Self {
            name: "close_wait_leak".to_owned(),
            state: TcpState::CloseWait,
            max_age_ns: Some(DEFAULT_CLOSE_WAIT_MAX_AGE_NS),
            max_count: Some(DEFAULT_CLOSE_WAIT_MAX_COUNT),
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
}
