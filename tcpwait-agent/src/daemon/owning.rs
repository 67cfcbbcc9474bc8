//! Owner resolution, seen from the state task: when to ask the resolver thread for an
//! inet_diag + /proc snapshot, and how its answer reconciles the table and its holders.
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{Daemon, resolver::Snapshot};
use crate::event::TcpState;

/// Owner snapshots are taken at most this often while sockets wait for their owner.
pub(super) const MIN_RESOLVE_INTERVAL: Duration = Duration::from_millis(200);

/// The states reconciled with inet_diag and attributed to processes.
const RECONCILED: [TcpState; 1] = [TcpState::CloseWait];

impl Daemon {
    pub(super) fn maybe_request(&mut self) {
        if self.in_flight {
            return;
        }
        let now = Instant::now();
        if self
            .last_request
            .is_some_and(|t| now < t + MIN_RESOLVE_INTERVAL)
            && now < self.next_reconcile
        {
            return;
        }
        let now_ns = self.now_ns();
        if self.settling.due(&self.tracker, now_ns) || now >= self.next_reconcile {
            self.request_snapshot();
        }
    }

    pub(super) fn request_snapshot(&mut self) {
        self.settling.clear();
        self.in_flight = true;
        self.last_request = Some(Instant::now());
        self.next_reconcile = Instant::now() + self.config.agent.reconcile_interval.0;
        self.resolver
            .request(RECONCILED.to_vec(), self.tracker.process_keys());
    }

    pub(super) fn on_snapshot(&mut self, snapshot: Snapshot) {
        self.in_flight = false;
        self.scan_denied += snapshot.scan.denied;
        if snapshot.scan.denied > 0 && !self.warned_denied {
            self.warned_denied = true;
            warn!(
                processes = snapshot.scan.denied,
                "cannot read /proc/<pid>/fd of some processes: the sockets they hold stay \
                 \"holder unknown\"; run tcpwait as root or grant CAP_SYS_PTRACE and \
                 CAP_DAC_READ_SEARCH"
            );
        }
        // A loss not yet noticed would make reconcile date missing sockets from agent start.
        self.on_tick();
        if let Some(e) = &snapshot.error {
            warn!(error = %e, "owner snapshot failed");
            self.left_during_snapshot.clear();
            self.tracker.forget_processes(&snapshot.gone);
            return;
        }
        let left = std::mem::take(&mut self.left_during_snapshot);
        let truth: Vec<_> = snapshot
            .sockets
            .into_iter()
            .filter(|(d, _)| left.get(&d.tuple).is_none_or(|&at| at < snapshot.taken_ns))
            .collect();
        let report = self.tracker.apply_snapshot(
            &truth,
            &snapshot.states,
            snapshot.taken_ns,
            self.complete_since_ns.max(self.started_ns),
            &snapshot.gone,
        );
        if report.added + report.removed + report.corrected > 0 {
            info!(
                added = report.added,
                removed = report.removed,
                corrected = report.corrected,
                "reconciled the CLOSE_WAIT table with inet_diag"
            );
        }
    }
}
