//! What the daemon counts outside the tracker, gathered into one value for the sinks: `status`
//! and `/metrics` render from a [`Stats`] and the `Tracker`, never from the daemon's private
//! fields, so each is unit-tested with hand-made values.
use std::sync::atomic::Ordering;

use super::{Daemon, metrics::EdgeCounts, resolver::Cost};
use crate::probe::KernelCounters;

/// The daemon's own counters as of one request.
#[derive(Clone, Debug)]
pub(super) struct Stats {
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Transitions decoded.
    pub transitions: u64,
    /// The kernel side's loss counters.
    pub kernel: KernelCounters,
    /// Records that could not be decoded.
    pub malformed: u64,
    /// Transitions `tail` clients missed.
    pub tail_missed: u64,
    /// Processes whose fd table could not be read, summed over scans.
    pub scan_denied: u64,
    /// Full reconciliations applied.
    pub reconciliations: u64,
    /// Namespace dumps that failed.
    pub namespace_failures: u64,
    /// What the last owner snapshot cost.
    pub last_cost: Cost,
    /// Transitions by (from, to).
    pub edges: EdgeCounts,
    /// Alert deliveries: (sink, result, count).
    pub deliveries: Vec<(&'static str, &'static str, u64)>,
    /// Output sinks' lost lines: (sink, dropped because the queue was full, failed to write).
    pub sinks: Vec<(&'static str, u64, u64)>,
    /// Metrics connections closed without an answer: (reason, count).
    pub http_rejected: [(&'static str, u64); 3],
    /// Per-process metric series are exported for this many processes per watched state.
    pub top_processes: usize,
    /// Aborts and resets received.
    pub resets: super::aborts::ResetMetrics,
}

impl Daemon {
    /// The counters as of now.
    pub(super) fn stats(&self) -> Stats {
        Stats {
            uptime_s: self.started.elapsed().as_secs_f64(),
            transitions: self.transitions,
            kernel: self.kernel,
            malformed: self.malformed.total(),
            tail_missed: self.tail_missed.load(Ordering::Relaxed),
            scan_denied: self.scan_denied,
            reconciliations: self.reconciliations,
            namespace_failures: self.namespace_failures,
            last_cost: self.last_cost,
            edges: self.edges.clone(),
            deliveries: self.delivery.counts(),
            sinks: self.sinks.counts(),
            http_rejected: [
                ("limit", super::http::REJECTED_LIMIT.load(Ordering::Relaxed)),
                (
                    "timeout",
                    super::http::REJECTED_TIMEOUT.load(Ordering::Relaxed),
                ),
                (
                    "too_large",
                    super::http::REJECTED_TOO_LARGE.load(Ordering::Relaxed),
                ),
            ],
            top_processes: self.config.metrics.top_processes as usize,
            resets: self
                .aborts
                .metrics(self.config.metrics.top_processes as usize),
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            uptime_s: 0.0,
            transitions: 0,
            kernel: KernelCounters::default(),
            malformed: 0,
            tail_missed: 0,
            scan_denied: 0,
            reconciliations: 0,
            namespace_failures: 0,
            last_cost: Cost::default(),
            edges: EdgeCounts::default(),
            deliveries: Vec::new(),
            sinks: Vec::new(),
            http_rejected: [("limit", 0), ("timeout", 0), ("too_large", 0)],
            top_processes: 20,
            resets: Default::default(),
        }
    }
}
