//! Which sockets need their owners resolved, and when. A socket that enters a watched state
//! (CLOSE_WAIT) without a known owner is resolved only if it is still there after a settle
//! time: almost every socket passes through CLOSE_WAIT in microseconds (the application reads
//! EOF and closes), and an inet_diag dump walks every socket of the host, TIME_WAIT ones
//! included. Dumping for each passing socket was measured at 52 % of the agent's CPU at 14k
//! connections/s. Pure: time is an argument, the tracker answers whether a socket still waits.
use std::{collections::VecDeque, time::Duration};

use crate::{event::SocketId, tracker::Tracker};

/// Default settle time; the daemon uses half the age threshold when that is shorter.
pub(super) const OWNER_SETTLE: Duration = Duration::from_millis(500);

/// The settle time for `rules`: [`OWNER_SETTLE`], or half the shortest age threshold when that
/// is shorter (the owner must be known before the alert).
pub(super) fn settle_time(rules: &[crate::tracker::rules::Rule]) -> Duration {
    rules
        .iter()
        .filter_map(|r| r.max_age_ns)
        .map(|ns| Duration::from_nanos(ns / 2))
        .fold(OWNER_SETTLE, Duration::min)
}

/// Sockets waiting to settle are remembered up to this many; past it a full reconciliation is
/// taken as soon as the rate limit allows (it covers them all) and the queue starts over.
const MAX_SETTLING: usize = 65_536;

/// Sockets waiting for their settle time, oldest first.
pub(super) struct Settling {
    queue: VecDeque<(SocketId, u64)>,
    /// The queue overflowed: resolve at the next chance, settled or not.
    overflowed: bool,
    settle_ns: u64,
}

impl Settling {
    pub(super) fn new(settle: Duration) -> Self {
        Self {
            queue: VecDeque::new(),
            overflowed: false,
            settle_ns: u64::try_from(settle.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Changes the settle time (a rule reload); sockets already waiting keep their order.
    pub(super) fn set_settle(&mut self, settle: Duration) {
        self.settle_ns = u64::try_from(settle.as_nanos()).unwrap_or(u64::MAX);
    }

    /// `sock` entered a watched state at `entered_ns` with no owner known.
    pub(super) fn push(&mut self, sock: SocketId, entered_ns: u64) {
        if self.queue.len() < MAX_SETTLING {
            self.queue.push_back((sock, entered_ns));
        } else {
            self.overflowed = true;
        }
    }

    /// When the oldest waiting socket settles (CLOCK_MONOTONIC ns), if any waits.
    pub(super) fn next_due_ns(&self) -> Option<u64> {
        self.queue
            .front()
            .map(|&(_, entered)| entered.saturating_add(self.settle_ns))
    }

    /// The sockets that settled by `now_ns` and still await their owner (sockets that left the
    /// state or got an owner meanwhile are dropped on the way), oldest first, at most `max`;
    /// sockets not settled yet stay queued.
    pub(super) fn take_due(&mut self, tracker: &Tracker, now_ns: u64, max: usize) -> Vec<SocketId> {
        let settled_before = now_ns.saturating_sub(self.settle_ns);
        let mut due = Vec::new();
        while due.len() < max
            && let Some(&(sock, entered)) = self.queue.front()
            && entered <= settled_before
        {
            self.queue.pop_front();
            if tracker.awaits_owner(sock, entered) {
                due.push(sock);
            }
        }
        due
    }

    /// True once the queue has overflowed: some sockets were not remembered, so only a full
    /// reconciliation finds them.
    pub(super) fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// A full reconciliation was requested: it sees every socket in the watched states now.
    pub(super) fn clear(&mut self) {
        self.queue.clear();
        self.overflowed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::TcpState,
        tracker::{
            TrackerConfig,
            tests::{sock, tr},
        },
    };

    const MS: u64 = 1_000_000;

    fn enter(t: &mut Tracker, n: u64, old: TcpState, new: TcpState, ts_ns: u64) {
        t.apply(&tr(n, old, new, ts_ns));
    }

    #[test]
    fn only_a_socket_still_waiting_after_the_settle_time_asks_for_a_snapshot() {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut s = Settling::new(Duration::from_millis(500));
        // Socket 1 passes through CLOSE_WAIT in 1 ms; socket 2 stays.
        enter(&mut t, 1, TcpState::Established, TcpState::CloseWait, 0);
        s.push(sock(1), 0);
        enter(
            &mut t,
            2,
            TcpState::Established,
            TcpState::CloseWait,
            100 * MS,
        );
        s.push(sock(2), 100 * MS);
        enter(&mut t, 1, TcpState::CloseWait, TcpState::LastAck, MS);
        assert_eq!(s.next_due_ns(), Some(500 * MS));
        assert_eq!(s.take_due(&t, 499 * MS, 100), [], "nothing settled yet");
        assert_eq!(
            s.take_due(&t, 550 * MS, 100),
            [],
            "socket 1 left CLOSE_WAIT"
        );
        assert_eq!(s.next_due_ns(), Some(600 * MS));
        assert_eq!(
            s.take_due(&t, 600 * MS, 100),
            [sock(2)],
            "socket 2 settled without an owner"
        );
        assert_eq!(s.next_due_ns(), None);
        assert_eq!(s.take_due(&t, 10_000 * MS, 100), []);
    }

    #[test]
    fn sockets_not_settled_stay_queued_and_max_bounds_a_batch() {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut s = Settling::new(Duration::from_millis(500));
        for n in 0..3 {
            enter(
                &mut t,
                n,
                TcpState::Established,
                TcpState::CloseWait,
                n * 100 * MS,
            );
            s.push(sock(n), n * 100 * MS);
        }
        assert_eq!(s.take_due(&t, 650 * MS, 1), [sock(0)], "max 1");
        assert_eq!(
            s.take_due(&t, 650 * MS, 10),
            [sock(1)],
            "socket 2 settles at 700 ms"
        );
        assert_eq!(s.next_due_ns(), Some(700 * MS));
        assert_eq!(s.take_due(&t, 700 * MS, 10), [sock(2)]);
    }

    #[test]
    fn an_overflowing_queue_asks_at_once_and_starts_over() {
        let t = Tracker::new(TrackerConfig::default());
        let mut s = Settling::new(Duration::from_millis(500));
        for n in 0..=MAX_SETTLING as u64 {
            s.push(sock(n), 0);
        }
        assert!(s.overflowed());
        s.clear();
        assert!(!s.overflowed());
        assert_eq!(s.take_due(&t, 0, 10), []);
    }
}
