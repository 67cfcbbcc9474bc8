//! Owner resolution, seen from the state task: when to ask the resolver thread for holders
//! (settled sockets) or for the whole truth (reconciliation), and how its answer reconciles
//! the table and its holders. The states asked for are the rules' states.
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    Daemon,
    resolver::{Ask, Snapshot},
};

/// Owner snapshots are taken at most this often while sockets wait for their owner.
pub(super) const MIN_RESOLVE_INTERVAL: Duration = Duration::from_millis(200);

/// Settled sockets resolved in one request at most; the rest wait for the next.
const MAX_QUERIES: usize = 4096;

impl Daemon {
    pub(super) fn maybe_request(&mut self) {
        if self.in_flight {
            return;
        }
        let now = Instant::now();
        if now >= self.next_reconcile || self.settling.overflowed() {
            if self
                .last_request
                .is_none_or(|t| now >= t + MIN_RESOLVE_INTERVAL)
                || now >= self.next_reconcile
            {
                self.request_snapshot();
            }
            return;
        }
        if self
            .last_request
            .is_some_and(|t| now < t + MIN_RESOLVE_INTERVAL)
        {
            return;
        }
        let now_ns = self.now_ns();
        let due = self.settling.take_due(&self.tracker, now_ns, MAX_QUERIES);
        let queries: Vec<_> = due
            .into_iter()
            .filter_map(|s| self.tracker.owner_query(s))
            .collect();
        if queries.is_empty() {
            return;
        }
        self.send(Ask::Resolve(queries));
    }

    /// Asks for the whole truth: every namespace, every holder.
    pub(super) fn request_snapshot(&mut self) {
        self.settling.clear();
        self.next_reconcile = Instant::now() + self.config.agent.reconcile_interval.0;
        self.send(Ask::Reconcile);
    }

    fn send(&mut self, ask: Ask) {
        self.in_flight = true;
        self.last_request = Some(Instant::now());
        self.resolver.request(
            ask,
            self.tracker.watched_states(),
            self.tracker.process_keys(),
        );
    }

    pub(super) fn on_snapshot(&mut self, snapshot: Snapshot) {
        self.in_flight = false;
        self.scan_denied += snapshot.scan.denied;
        self.last_cost = snapshot.cost;
        if snapshot.scan.denied > 0 && !self.warned_denied {
            self.warned_denied = true;
            warn!(
                processes = snapshot.scan.denied,
                "cannot read /proc/<pid>/fd of some processes: the sockets they hold stay \
                 \"holder unknown\"; run tcpwait as root or grant CAP_SYS_PTRACE and \
                 CAP_DAC_READ_SEARCH"
            );
        }
        self.namespace_failures += snapshot.failed.len() as u64;
        for (inode, why) in &snapshot.failed {
            // A namespace that vanished between discovery and dump is normal churn (a pod
            // went away): its sockets leave through their own transitions.
            if !why.contains("is gone") && self.warned_namespaces.insert(*inode) {
                warn!(
                    netns = inode,
                    error = %why,
                    "cannot dump a network namespace: its sockets stay tracked from events, \
                     their holders unknown (logged once per namespace)"
                );
            }
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
            .filter(|(d, _)| {
                left.get(&(d.netns, d.tuple))
                    .is_none_or(|&at| at < snapshot.taken_ns)
            })
            .collect();
        if snapshot.reconcile {
            self.reconciliations += 1;
        }
        let report = self.tracker.apply_snapshot(
            &truth,
            &snapshot.states,
            &snapshot.namespaces,
            snapshot.taken_ns,
            self.complete_since_ns.max(self.started_ns),
            &snapshot.gone,
        );
        if report.added + report.removed + report.corrected > 0 {
            info!(
                added = report.added,
                removed = report.removed,
                corrected = report.corrected,
                namespaces = snapshot.namespaces.len(),
                "reconciled the table with inet_diag"
            );
        }
    }
}
