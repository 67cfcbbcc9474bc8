//! The sockets that left the table lately (their CLOSE transition), by tuple and time, so that
//! a reconciliation whose inet_diag snapshot started before a socket closed does not add it
//! back as a phantom ("shown, not tracked": the snapshot is older than the table there). Seen
//! in a test: two ESTABLISHED entries, aged "at least 15 s", beside the TIME_WAIT sockets the
//! same connections had become.
//!
//! Bounded: the last [`CAPACITY`] closes. A snapshot applied after more closes than that
//! since it started can still add a phantom, which the next reconciliation of its namespace
//! removes (the kernel no longer shows it), as before this existed.
use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;

use super::table::CompactTuple;

/// Closes remembered. A dump takes milliseconds to a fraction of a second; at 100,000 closes
/// per second this covers 0.16 s, far more on any ordinary host. About 60 bytes each.
pub(super) const CAPACITY: usize = 16_384;

#[derive(Default)]
pub(super) struct Closed {
    /// Tuple → when it last closed.
    at: HashMap<CompactTuple, u64, RandomState>,
    /// Closes in order, for eviction (a tuple may appear more than once: reused).
    order: VecDeque<(CompactTuple, u64)>,
}

impl Closed {
    /// Notes that the socket of `tuple` closed at `ts_ns`.
    pub(super) fn note(&mut self, tuple: CompactTuple, ts_ns: u64) {
        if !tuple.indexable() {
            return;
        }
        if self.order.len() >= CAPACITY
            && let Some((old, ts)) = self.order.pop_front()
            && self.at.get(&old) == Some(&ts)
        {
            self.at.remove(&old);
        }
        self.at.insert(tuple, ts_ns);
        self.order.push_back((tuple, ts_ns));
    }

    /// Whether the socket of `tuple` closed at or after `since_ns`.
    pub(super) fn since(&self, tuple: &CompactTuple, since_ns: u64) -> bool {
        self.at.get(tuple).is_some_and(|&ts| ts >= since_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(port: u16) -> CompactTuple {
        CompactTuple::new(
            1,
            "127.0.0.1".parse().expect("ip"),
            port,
            "127.0.0.2".parse().expect("ip"),
            80,
        )
    }

    #[test]
    fn remembers_the_last_closes_only() {
        let mut c = Closed::default();
        c.note(t(1), 100);
        assert!(c.since(&t(1), 100));
        assert!(!c.since(&t(1), 101));
        assert!(!c.since(&t(2), 0));
        for p in 0..CAPACITY as u16 {
            c.note(t(1000 + p), 200);
        }
        assert!(!c.since(&t(1), 0), "evicted");
        assert!(c.since(&t(1000 + CAPACITY as u16 - 1), 200));
        assert_eq!(c.at.len(), CAPACITY);
    }
}
