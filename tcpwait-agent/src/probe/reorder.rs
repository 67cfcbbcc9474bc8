//! Puts events back in time order. The kernel program stages events per CPU and hands them to
//! the ring buffer in batches (`tcpwait_common::Stage`), so a CPU's batch can reach the ring
//! after a later batch of another CPU, and one socket's transitions can be in both. Events are
//! held until the caller knows every earlier one has arrived (a watermark: the time of its last
//! complete flush of every CPU's stage), and handed on sorted by `ts_ns`. Pure: time is an
//! argument.
use tcpwait_common::TRANSITION_EVENT_SIZE;

/// One event's bytes, as the ring buffer carried it.
type Bytes = [u8; TRANSITION_EVENT_SIZE];

/// Events waiting for their time, and what was handed on.
pub struct Reorder {
    /// `(ts_ns, event)`: sorted up to `sorted`, then in arrival order.
    held: Vec<(u64, Bytes)>,
    sorted: usize,
    /// The smallest `ts_ns` held (`u64::MAX` if none): nothing to sort while it is not due.
    min_ts: u64,
    /// The newest `ts_ns` handed on.
    released_to: u64,
    /// Events that arrived after a later one had been handed on.
    late: u64,
}

impl Default for Reorder {
    fn default() -> Self {
        Self {
            held: Vec::new(),
            sorted: 0,
            min_ts: u64::MAX,
            released_to: 0,
            late: 0,
        }
    }
}

impl Reorder {
    /// Holds an event (exactly [`TRANSITION_EVENT_SIZE`] bytes; `ts_ns` is its first field).
    pub fn push(&mut self, event: &Bytes) {
        let ts = u64::from_ne_bytes(event[..8].try_into().expect("8 bytes"));
        self.held.push((ts, *event));
        self.min_ts = self.min_ts.min(ts);
    }

    /// Hands on, in `ts_ns` order, every held event with `ts_ns <= upto` (CLOCK_MONOTONIC ns,
    /// the clock of `bpf_ktime_get_ns`); returns how many. `u64::MAX` hands on everything.
    pub fn release(&mut self, upto: u64, mut f: impl FnMut(&[u8])) -> usize {
        if self.min_ts > upto {
            return 0;
        }
        if self.sorted < self.held.len() {
            // Stable, and quick on what is sorted runs (the rest, and one per batch).
            self.held.sort_by_key(|&(ts, _)| ts);
        }
        let n = self.held.partition_point(|&(ts, _)| ts <= upto);
        for (ts, event) in self.held.drain(..n) {
            if ts < self.released_to {
                self.late += 1;
            } else {
                self.released_to = ts;
            }
            f(&event);
        }
        self.sorted = self.held.len();
        self.min_ts = self.held.first().map_or(u64::MAX, |&(ts, _)| ts);
        n
    }

    /// Events that arrived after a later one had been handed on (handed on at once, out of
    /// order).
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Events held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: u64, tag: u8) -> Bytes {
        let mut b = [0u8; TRANSITION_EVENT_SIZE];
        b[..8].copy_from_slice(&ts.to_ne_bytes());
        b[8] = tag;
        b
    }

    fn release(r: &mut Reorder, upto: u64) -> Vec<(u64, u8)> {
        let mut out = Vec::new();
        let n = r.release(upto, |b| {
            out.push((
                u64::from_ne_bytes(b[..8].try_into().expect("8 bytes")),
                b[8],
            ))
        });
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn hands_on_in_time_order_up_to_the_watermark() {
        let mut r = Reorder::default();
        // CPU 1's batch arrives before CPU 0's older one.
        r.push(&ev(1_000, 3));
        r.push(&ev(1_500, 4));
        r.push(&ev(500, 1));
        r.push(&ev(900, 2));
        assert_eq!(release(&mut r, 1_400), [(500, 1), (900, 2), (1_000, 3)]);
        assert_eq!(r.held(), 1);
        assert_eq!(release(&mut r, 1_499), []);
        assert_eq!(release(&mut r, 1_500), [(1_500, 4)]);
        assert_eq!(r.late(), 0);
    }

    #[test]
    fn equal_times_keep_arrival_order() {
        let mut r = Reorder::default();
        r.push(&ev(7, 1));
        r.push(&ev(7, 2));
        r.push(&ev(3, 0));
        assert_eq!(release(&mut r, u64::MAX), [(3, 0), (7, 1), (7, 2)]);
    }

    #[test]
    fn a_late_event_is_handed_on_and_counted() {
        let mut r = Reorder::default();
        r.push(&ev(2_000, 2));
        assert_eq!(release(&mut r, 2_000), [(2_000, 2)]);
        r.push(&ev(1_000, 1));
        r.push(&ev(3_000, 3));
        assert_eq!(release(&mut r, 3_000), [(1_000, 1), (3_000, 3)]);
        assert_eq!(r.late(), 1);
    }

    #[test]
    fn everything_goes_at_the_end() {
        let mut r = Reorder::default();
        r.push(&ev(u64::MAX - 1, 9));
        r.push(&ev(5, 1));
        assert_eq!(release(&mut r, 0), []);
        assert_eq!(release(&mut r, u64::MAX), [(5, 1), (u64::MAX - 1, 9)]);
        assert_eq!(r.held(), 0);
    }
}
