//! The Prometheus endpoint: `GET /metrics` asks the state task for a fresh rendering (OpenMetrics
//! text, through the `prometheus-client` crate). The registry is built per scrape from the
//! tracker's own counters and gauges, so nothing is kept twice and nothing drifts.
//!
//! Cardinality is bounded: per-process series exist only for the `top_processes` processes with
//! the most CLOSE_WAIT sockets.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio::sync::{mpsc, oneshot};

use super::Daemon;
use crate::{api::Command, event::TcpState};

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
struct VersionLabel {
    version: &'static str,
}

/// Transitions counted by (from, to), indexed by kernel state numbers.
#[derive(Default)]
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

/// Renders every metric as of now.
pub(super) fn render(d: &Daemon) -> String {
    let mut r = Registry::default();
    let now = d.now_ns();
    let t = &d.tracker;

    let sockets = Family::<StateLabel, Gauge>::default();
    for (i, n) in t.sockets_by_state().iter().enumerate() {
        sockets
            .get_or_create(&StateLabel {
                state: TcpState::ALL[i].name(),
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
                        from: from.name(),
                        to: to.name(),
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

    let count = Family::<ProcessLabels, Gauge>::default();
    let oldest = Family::<ProcessLabels, Gauge<f64, AtomicU64>>::default();
    for p in t
        .processes(TcpState::CloseWait, now)
        .iter()
        .take(d.config.metrics.top_processes as usize)
    {
        let labels = ProcessLabels {
            pid: p.process.key.pid,
            comm: p.process.comm.clone(),
            container: p.process.container.clone().unwrap_or_default(),
        };
        count.get_or_create(&labels).set(i64::from(p.count));
        oldest
            .get_or_create(&labels)
            .set(p.oldest_age_ns as f64 / 1e9);
    }
    r.register(
        "tcpwait_process_close_wait_sockets",
        "CLOSE_WAIT sockets held, for the processes holding the most",
        count,
    );
    r.register_with_unit(
        "tcpwait_process_oldest_close_wait_age",
        "Age of the oldest CLOSE_WAIT socket held, for the processes holding the most",
        Unit::Seconds,
        oldest,
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
        ("malformed", Some(d.malformed.total())),
        ("tail_backlog", Some(d.tail_missed.load(Ordering::Relaxed))),
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

    let deliveries = Family::<DeliveryLabels, Counter>::default();
    for (sink, result, n) in d.delivery.counts() {
        deliveries
            .get_or_create(&DeliveryLabels { sink, result })
            .inc_by(n);
    }
    r.register(
        "tcpwait_alert_deliveries",
        "Alert deliveries, by sink and result",
        deliveries,
    );

    let build = Family::<VersionLabel, Gauge>::default();
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    r.register("tcpwait_build_info", "Build information", build);

    let mut out = String::new();
    encode(&mut out, &r).expect("writing into a String cannot fail");
    out
}

/// Serves `/metrics` on `listen` until the process ends.
pub(super) async fn serve(
    listen: SocketAddr,
    commands: mpsc::Sender<Command>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(|| async { "tcpwait: metrics at /metrics\n" }))
        .with_state(commands);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format
/// (0.0.4) otherwise (curl, `promtool check metrics`).
async fn metrics(
    State(commands): State<mpsc::Sender<Command>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    let body = match commands.send(Command::Metrics(tx)).await {
        Ok(()) => rx.await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_text_format(&body),
        )
    }
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
