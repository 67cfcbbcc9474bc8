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

/// Sockets waiting to settle are remembered up to this many; past it the next snapshot is taken
/// as soon as the rate limit allows (it covers them all) and the queue starts over.
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

    /// True if a snapshot is needed now: a socket settled and still awaits its owner (sockets
    /// that left the state or got an owner meanwhile are dropped on the way), or the queue
    /// overflowed.
    pub(super) fn due(&mut self, tracker: &Tracker, now_ns: u64) -> bool {
        let settled_before = now_ns.saturating_sub(self.settle_ns);
        while !self.overflowed
            && let Some(&(sock, entered)) = self.queue.front()
            && entered <= settled_before
        {
            self.queue.pop_front();
            if tracker.awaits_owner(sock, entered) {
                return true;
            }
        }
        self.overflowed
    }

    /// A snapshot was requested: it sees every socket in the watched states now.
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
        assert!(!s.due(&t, 499 * MS), "nothing settled yet");
        assert!(!s.due(&t, 550 * MS), "socket 1 left CLOSE_WAIT");
        assert_eq!(s.next_due_ns(), Some(600 * MS));
        assert!(s.due(&t, 600 * MS), "socket 2 settled without an owner");
        s.clear();
        assert_eq!(s.next_due_ns(), None);
        assert!(!s.due(&t, 10_000 * MS));
    }

    #[test]
    fn an_overflowing_queue_asks_at_once_and_starts_over() {
        let t = Tracker::new(TrackerConfig::default());
        let mut s = Settling::new(Duration::from_millis(500));
        for n in 0..=MAX_SETTLING as u64 {
            s.push(sock(n), 0);
        }
        assert!(s.due(&t, 0), "overflowed");
        s.clear();
        assert!(!s.due(&t, 0));
    }
}
