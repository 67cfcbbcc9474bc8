//! The Prometheus endpoint: `GET /metrics` asks the state task for a fresh rendering (OpenMetrics
//! text, through the `prometheus-client` crate). The registry is built per scrape from the
//! tracker's own counters and gauges, so nothing is kept twice and nothing drifts.
//!
//! Cardinality is bounded: per-process series exist only for the states the rules watch, and
//! per state for the `top_processes` processes with the most sockets in it.
use std::sync::atomic::AtomicU64;

use super::stats::Stats;
use crate::{
    event::TcpState,
    output::escape_control,
    tracker::{Tracker, timewait::PeerWatch},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EdgeLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    pid: u32,
    comm: String,
    container: String,
    /// Kubernetes pod UID ("" outside a pod).
    pod_uid: String,
    /// Network namespace inode ("" if unreadable).
    netns: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateProcessLabels {
    state: &'static str,
    #[prometheus(flatten)]
    process: ProcessLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    sink: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// Transitions counted by (from, to), indexed by kernel state numbers.
#[derive(Clone, Debug, Default)]
pub(super) struct EdgeCounts([[u64; 13]; 13]);

impl EdgeCounts {
    /// Counts one transition.
    pub(super) fn count(&mut self, from: TcpState, to: TcpState) {
        self.0[from as usize][to as usize] += 1;
    }
}

fn counter(n: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(n);
    c
}

/// Renders every metric at `now` from the tracker and the daemon's counters.
pub(super) fn render(t: &Tracker, d: &Stats, peers: &PeerWatch, now: u64) -> String {
    let mut r = Registry::default();

    let sockets = Family::<StateLabel, Gauge>::default();
    for (i, n) in t.sockets_by_state().iter().enumerate() {
        sockets
            .get_or_create(&StateLabel {
                state: TcpState::ALL[i].label(),
            })
            .set(*n as i64);
    }
    r.register("tcpwait_sockets", "Tracked sockets by TCP state", sockets);

    let edges = Family::<EdgeLabels, Counter>::default();
    for from in TcpState::ALL {
        for to in TcpState::ALL {
            let n = d.edges.0[from as usize][to as usize];
            if n > 0 {
                edges
                    .get_or_create(&EdgeLabels {
                        from: from.label(),
                        to: to.label(),
                    })
                    .inc_by(n);
            }
        }
    }
    r.register(
        "tcpwait_transitions",
        "TCP state transitions seen, by (from, to)",
        edges,
    );

    // Per watched state, the top K processes: `tcpwait_process_sockets{state=…}`. The
    // CLOSE_WAIT series also keep their older names, which dashboards and alerting rules use.
    let count = Family::<StateProcessLabels, Gauge>::default();
    let oldest = Family::<StateProcessLabels, Gauge<f64, AtomicU64>>::default();
    let cw_count = Family::<ProcessLabels, Gauge>::default();
    let cw_oldest = Family::<ProcessLabels, Gauge<f64, AtomicU64>>::default();
    for state in t.watched_states() {
        for p in t.processes(state, now).iter().take(d.top_processes) {
            // Label values escaped like every text output: the exposition format escapes
            // only `\`, `"` and newline, and a process names itself.
            let labels = ProcessLabels {
                pid: p.process.key.pid,
                comm: escape_control(&p.process.comm).into_owned(),
                container: escape_control(p.process.container.as_deref().unwrap_or(""))
                    .into_owned(),
                pod_uid: escape_control(p.process.pod_uid.as_deref().unwrap_or("")).into_owned(),
                netns: p.process.netns.map(|n| n.to_string()).unwrap_or_default(),
            };
            let age = p.oldest_age_ns as f64 / 1e9;
            if state == TcpState::CloseWait {
                cw_count.get_or_create(&labels).set(i64::from(p.count));
                cw_oldest.get_or_create(&labels).set(age);
            }
            let labels = StateProcessLabels {
                state: state.label(),
                process: labels,
            };
            count.get_or_create(&labels).set(i64::from(p.count));
            oldest.get_or_create(&labels).set(age);
        }
    }
    r.register(
        "tcpwait_process_sockets",
        "Sockets held in a state some rule watches, for the processes holding the most",
        count,
    );
    r.register_with_unit(
        "tcpwait_process_oldest_age",
        "Age of the oldest socket held in a state some rule watches, for the processes holding \
         the most",
        Unit::Seconds,
        oldest,
    );
    r.register(
        "tcpwait_process_close_wait_sockets",
        "CLOSE_WAIT sockets held, for the processes holding the most",
        cw_count,
    );
    r.register_with_unit(
        "tcpwait_process_oldest_close_wait_age",
        "Age of the oldest CLOSE_WAIT socket held, for the processes holding the most",
        Unit::Seconds,
        cw_oldest,
    );

    let firing = Family::<RuleLabel, Gauge>::default();
    for rule in t.rules() {
        firing
            .get_or_create(&RuleLabel {
                rule: rule.name.clone(),
            })
            .set(0);
    }
    for a in t.firing() {
        firing
            .get_or_create(&RuleLabel {
                rule: a.rule.clone(),
            })
            .inc();
    }
    r.register(
        "tcpwait_alerts_firing",
        "Alerts firing now, by rule",
        firing,
    );

    let lost = Family::<ReasonLabel, Counter>::default();
    // A kernel that keeps no recursion-miss count (before 5.12) gets no `recursion_miss`
    // series: absent means unknown, where 0 would claim nothing was lost.
    for (reason, n) in [
        ("ring_full", Some(d.kernel.reserve_failed)),
        ("recursion_miss", d.kernel.recursion_misses),
        ("malformed", Some(d.malformed)),
        ("tail_backlog", Some(d.tail_missed)),
    ] {
        if let Some(n) = n {
            lost.get_or_create(&ReasonLabel { reason }).inc_by(n);
        }
    }
    r.register("tcpwait_events_lost", "Transitions lost, by reason", lost);

    let c = t.counters();
    let repairs = Family::<KindLabel, Counter>::default();
    for (kind, n) in [
        ("added", c.repairs_added),
        ("removed", c.repairs_removed),
        ("corrected", c.repairs_corrected),
    ] {
        repairs.get_or_create(&KindLabel { kind }).inc_by(n);
    }
    r.register(
        "tcpwait_reconcile_repairs",
        "Repairs of the CLOSE_WAIT table from inet_diag",
        repairs,
    );

    let tracked = Gauge::<i64>::default();
    tracked.set(t.len() as i64);
    r.register("tcpwait_tracked_sockets", "Sockets in the table", tracked);
    r.register(
        "tcpwait_duplicate_transitions",
        "Transitions delivered twice by the kernel side (a rare effect of the rescue of nested \
         transitions); ignored",
        counter(c.duplicates),
    );
    r.register(
        "tcpwait_late_transitions",
        "Transitions that reached the agent after a later one (a CPU's batch came later than \
         the agent's hold) and were applied out of time order",
        counter(d.kernel.late),
    );
    r.register(
        "tcpwait_table_overflow",
        "Sockets not tracked because the table was full",
        counter(c.overflowed),
    );

    r.register(
        "tcpwait_owner_scan_denied",
        "Processes whose /proc/<pid>/fd could not be read while looking for socket holders \
         (needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH), summed over scans",
        counter(d.scan_denied),
    );

    let namespaces = Gauge::<i64>::default();
    namespaces.set(i64::try_from(d.last_cost.namespaces).unwrap_or(i64::MAX));
    r.register(
        "tcpwait_owner_snapshot_namespaces",
        "Network namespaces the last owner snapshot dumped with inet_diag",
        namespaces,
    );
    r.register(
        "tcpwait_owner_namespace_failures",
        "Network namespace dumps that failed (could not enter the namespace, or it was gone), \
         summed over snapshots",
        counter(d.namespace_failures),
    );
    let seconds = Gauge::<f64, AtomicU64>::default();
    seconds.set(d.last_cost.seconds);
    r.register_with_unit(
        "tcpwait_owner_snapshot_duration",
        "Wall time of the last owner snapshot (namespace dumps and /proc reads)",
        Unit::Seconds,
        seconds,
    );

    let deliveries = Family::<DeliveryLabels, Counter>::default();
    for &(sink, result, n) in &d.deliveries {
        deliveries
            .get_or_create(&DeliveryLabels { sink, result })
            .inc_by(n);
    }
    r.register(
        "tcpwait_alert_deliveries",
        "Alert deliveries, by sink and result",
        deliveries,
    );

    let (dropped, failed) = (
        Family::<SinkLabel, Counter>::default(),
        Family::<SinkLabel, Counter>::default(),
    );
    for &(sink, d_n, f_n) in &d.sinks {
        dropped.get_or_create(&SinkLabel { sink }).inc_by(d_n);
        failed.get_or_create(&SinkLabel { sink }).inc_by(f_n);
    }
    r.register(
        "tcpwait_sink_dropped",
        "Output lines dropped because the sink's queue was full (the agent never waits for \
         its output), by sink",
        dropped,
    );
    r.register(
        "tcpwait_sink_failed",
        "Output lines a sink could not write (I/O error), by sink",
        failed,
    );

    let rejected = Family::<ReasonLabel, Counter>::default();
    for &(reason, n) in &d.http_rejected {
        rejected.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }
    r.register(
        "tcpwait_http_rejected",
        "Metrics connections closed without an answer: over the connection limit, no request \
         head in time, head too large",
        rejected,
    );

    super::aborts::register(&mut r, &d.resets);

    let build = Family::<VersionLabel, Gauge>::default();
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    r.register("tcpwait_build_info", "Build information", build);
    super::timewait::register(&mut r, peers);
    super::host::register(&mut r, t, now);

    let mut out = String::new();
    encode(&mut out, &r).expect("writing into a String cannot fail");
    out
}

/// OpenMetrics text → Prometheus text format 0.0.4: a counter family `x` (samples `x_total`)
/// is named `x_total` in its HELP and TYPE lines; `# UNIT` and `# EOF` lines go.
pub(super) fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_counters_units_and_eof() {
        let om = "# HELP a_seconds Age.\n# TYPE a_seconds gauge\n# UNIT a_seconds seconds\n\
                  a_seconds 1.5\n# HELP t Transitions.\n# TYPE t counter\nt_total{from=\"A\"} 3\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP a_seconds Age.\n# TYPE a_seconds gauge\na_seconds 1.5\n\
             # HELP t_total Transitions.\n# TYPE t_total counter\nt_total{from=\"A\"} 3\n"
        );
    }
}

#[cfg(test)]
mod render_tests {
    use super::*;
    use crate::daemon::report::tests::tracker;

    #[test]
    fn per_process_series_per_watched_state_bounded_by_top_processes() {
        let mut t = tracker();
        t.evaluate(1_000_000_000);
        let mut s = Stats {
            top_processes: 20,
            transitions: 3,
            ..Stats::default()
        };
        s.edges.count(TcpState::Close, TcpState::SynSent);
        let text = render(&t, &s, &PeerWatch::default(), 2_000_000_000);
        // Series of one family come in no set order.
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tcpwait_process_") || l.starts_with("tcpwait_alerts_firing"))
            .collect();
        lines.sort_unstable();
        let labels = |pid: u32| {
            format!(
                "pid=\"{pid}\",comm=\"p{pid}\",container=\"\",pod_uid=\"\",netns=\"4026531840\""
            )
        };
        assert_eq!(
            lines,
            [
                "tcpwait_alerts_firing{rule=\"close_wait_leak\"} 0".to_owned(),
                "tcpwait_alerts_firing{rule=\"syn_sent_stuck\"} 1".to_owned(),
                format!("tcpwait_process_close_wait_sockets{{{}}} 1", labels(10)),
                format!(
                    "tcpwait_process_oldest_age_seconds{{state=\"close_wait\",{}}} 2.0",
                    labels(10)
                ),
                format!(
                    "tcpwait_process_oldest_age_seconds{{state=\"syn_sent\",{}}} 2.0",
                    labels(20)
                ),
                format!(
                    "tcpwait_process_oldest_close_wait_age_seconds{{{}}} 2.0",
                    labels(10)
                ),
                format!(
                    "tcpwait_process_sockets{{state=\"close_wait\",{}}} 1",
                    labels(10)
                ),
                format!(
                    "tcpwait_process_sockets{{state=\"syn_sent\",{}}} 1",
                    labels(20)
                ),
            ]
        );
        assert!(text.contains("tcpwait_transitions_total{from=\"close\",to=\"syn_sent\"} 1\n"));
        // K = 1: one process per state; the ESTABLISHED holder (pid 40) never appears.
        s.top_processes = 1;
        assert!(!render(&t, &s, &PeerWatch::default(), 2_000_000_000).contains("pid=\"40\""));
    }
}
