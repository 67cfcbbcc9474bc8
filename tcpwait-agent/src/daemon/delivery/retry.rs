//! What a sink still owes: the latest state of every alert, each with its own retry schedule.
//! A change that keeps failing never blocks another alert's change (issue 13: one failing
//! webhook change held every change behind it, 0 sent). A newer change of the same alert
//! replaces the one not yet delivered (the receiver needs the latest state, not the history);
//! the replaced one is counted as superseded. Pure: time is an argument.
use std::time::{Duration, Instant};

use super::AlertMessage;

/// First wait after a failure; it doubles up to the sink's `max_backoff`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

struct Entry {
    msg: AlertMessage,
    due: Instant,
    backoff: Duration,
}

/// The changes a sink holds, one per alert key, in arrival order.
pub struct Owed {
    entries: Vec<Entry>,
    max_backoff: Duration,
}

/// What became of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Failed, will be retried.
    Retry,
    /// Failed for good (or at shutdown): no more attempts.
    GiveUp,
}

impl Owed {
    /// Nothing owed yet.
    pub fn new(max_backoff: Duration) -> Self {
        Self {
            entries: Vec::new(),
            max_backoff,
        }
    }

    /// Takes a change, due at once; returns true when it replaced an undelivered change of
    /// the same alert.
    pub fn add(&mut self, msg: AlertMessage, now: Instant) -> bool {
        if let Some(e) = self.entries.iter_mut().find(|e| e.msg.key == msg.key) {
            *e = Entry {
                msg,
                due: now,
                backoff: FIRST_BACKOFF,
            };
            return true;
        }
        self.entries.push(Entry {
            msg,
            due: now,
            backoff: FIRST_BACKOFF,
        });
        false
    }

    /// Changes owed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is owed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the next attempt is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.due).min()
    }

    /// Attempts every change due at `now` (every change when `all`), in arrival order, each
    /// independently; `attempt` says whether it was delivered. Returns (sent, failed attempts,
    /// given up).
    pub fn attempt(
        &mut self,
        now: Instant,
        all: bool,
        mut attempt: impl FnMut(&AlertMessage) -> Outcome,
    ) -> (u64, u64, u64) {
        let (mut sent, mut failed, mut gave_up) = (0, 0, 0);
        let max = self.max_backoff;
        self.entries.retain_mut(|e| {
            if !all && e.due > now {
                return true;
            }
            match attempt(&e.msg) {
                Outcome::Sent => {
                    sent += 1;
                    false
                }
                Outcome::GiveUp => {
                    failed += 1;
                    gave_up += 1;
                    false
                }
                Outcome::Retry => {
                    failed += 1;
                    e.due = now + e.backoff;
                    e.backoff = (e.backoff * 2).min(max);
                    true
                }
            }
        });
        (sent, failed, gave_up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: &str, firing: bool) -> AlertMessage {
        AlertMessage {
            key: key.into(),
            firing,
            starts_at: std::time::UNIX_EPOCH,
            labels: Default::default(),
            annotations: Default::default(),
            json: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_failing_change_never_blocks_another() {
        let t0 = Instant::now();
        let mut owed = Owed::new(Duration::from_secs(10));
        owed.add(msg("bad", true), t0);
        owed.add(msg("good", true), t0);
        let deliver = |m: &AlertMessage| {
            if m.key == "bad" {
                Outcome::Retry
            } else {
                Outcome::Sent
            }
        };
        assert_eq!(owed.attempt(t0, false, deliver), (1, 1, 0));
        assert_eq!(owed.len(), 1);
        // The failed one is due again after its own backoff: 100 ms, then 200 ms.
        assert_eq!(owed.next_due(), Some(t0 + FIRST_BACKOFF));
        owed.add(msg("later", true), t0 + Duration::from_millis(50));
        assert_eq!(
            owed.attempt(t0 + Duration::from_millis(50), false, deliver),
            (1, 0, 0),
            "only the new change is due; it goes at once"
        );
        let t1 = t0 + FIRST_BACKOFF;
        assert_eq!(owed.attempt(t1, false, deliver), (0, 1, 0));
        assert_eq!(owed.next_due(), Some(t1 + 2 * FIRST_BACKOFF));
    }

    #[test]
    fn the_latest_state_of_an_alert_replaces_the_undelivered_one() {
        let t0 = Instant::now();
        let mut owed = Owed::new(Duration::from_secs(10));
        assert!(!owed.add(msg("a", true), t0));
        assert!(owed.add(msg("a", false), t0), "superseded");
        let mut seen = Vec::new();
        owed.attempt(t0, false, |m| {
            seen.push(m.firing);
            Outcome::Sent
        });
        assert_eq!(seen, vec![false], "only the resolved state is sent");
    }

    #[test]
    fn backoff_is_capped_and_all_forces_a_last_attempt() {
        let t0 = Instant::now();
        let mut owed = Owed::new(Duration::from_millis(300));
        owed.add(msg("a", true), t0);
        let mut t = t0;
        for expected in [100, 200, 300, 300] {
            owed.attempt(t, false, |_| Outcome::Retry);
            let due = owed.next_due().expect("owed");
            assert_eq!(due - t, Duration::from_millis(expected));
            t = due;
        }
        assert_eq!(owed.attempt(t0, true, |_| Outcome::GiveUp), (0, 1, 1));
        assert!(owed.is_empty());
    }
}
