//! What the agent shows: the `status` report and the alert lines it prints.
use std::collections::BTreeMap;

use serde_json::json;

use super::{delivery::AlertMessage, stats::Stats};
use crate::{
    api::{
        AlertReport, Counters, PeerReport, ProcessReport, STATUS_SCHEMA_VERSION, SocketReport,
        StatusReport,
    },
    output::{Clock, endpoint, escape_control},
    tracker::{
        Tracker,
        alerts::{Alert, AlertChange},
        rules::Rule,
        snapshot::SocketDetail,
    },
};

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn peers(top: &[(std::net::IpAddr, u32)]) -> Vec<PeerReport> {
    top.iter()
        .map(|(a, n)| PeerReport {
            addr: a.to_string(),
            count: u64::from(*n),
        })
        .collect()
}

pub(super) fn socket(s: &SocketDetail) -> SocketReport {
    SocketReport {
        state: s.state.name().to_owned(),
        netns: (s.netns != 0).then_some(s.netns),
        local: endpoint(s.tuple.saddr, s.tuple.sport),
        remote: endpoint(s.tuple.daddr, s.tuple.dport),
        age_s: secs(s.age_ns),
        age_is_lower_bound: s.age_is_lower_bound,
        recv_q: s.recv_q,
    }
}

/// The `status` answer at `now`: every watched state's holders (kernel order), the sockets of
/// those states whose holder is not known, the firing alerts, and the counters.
pub(super) fn status(t: &Tracker, s: &Stats, now: u64, clock: &Clock) -> StatusReport {
    let c = t.counters();
    let states = t.watched_states();
    StatusReport {
        schema_version: STATUS_SCHEMA_VERSION,
        now_ns: now,
        time: Some(clock.wall(now)),
        uptime_s: s.uptime_s,
        tracked_sockets: t.len() as u64,
        watched_states: states.iter().map(|st| st.name().to_owned()).collect(),
        processes: states
            .iter()
            .flat_map(|&st| t.processes(st, now))
            .map(|p| ProcessReport {
                state: p.state.name().to_owned(),
                pid: p.process.key.pid,
                comm: p.process.comm.clone(),
                cmdline: p.process.cmdline.clone(),
                cgroup: p.process.cgroup.clone(),
                container: p.process.container.clone(),
                pod_uid: p.process.pod_uid.clone(),
                runtime: p.process.runtime.map(str::to_owned),
                netns: p.process.netns,
                count: u64::from(p.count),
                oldest_age_s: secs(p.oldest_age_ns),
                oldest_age_is_lower_bound: p.oldest_is_lower_bound,
                peers: peers(&p.top_peers),
                sockets: p.sockets.iter().map(socket).collect(),
            })
            .collect(),
        unowned: states
            .iter()
            .flat_map(|&st| t.unowned(st, now))
            .map(|d| socket(&d))
            .collect(),
        alerts: t.firing().iter().map(|a| alert_report(a, now)).collect(),
        counters: Counters {
            transitions: s.transitions,
            lost_ring_full: s.kernel.reserve_failed,
            lost_recursion_misses: s.kernel.recursion_misses,
            malformed: s.malformed,
            tail_missed: s.tail_missed,
            table_overflow: c.overflowed,
            reconcile_added: c.repairs_added,
            reconcile_removed: c.repairs_removed,
            reconcile_corrected: c.repairs_corrected,
            duplicates: c.duplicates,
            late: s.kernel.late,
            reconciliations: s.reconciliations,
            namespaces_dumped: s.last_cost.namespaces,
            namespace_failures: s.namespace_failures,
            sink_dropped: s
                .sinks
                .iter()
                .map(|(name, n, _)| ((*name).to_owned(), *n))
                .collect(),
            sink_failed: s
                .sinks
                .iter()
                .map(|(name, _, n)| ((*name).to_owned(), *n))
                .collect(),
            tail_clients: s.tail_clients.clone(),
        },
        // Filled by the daemon, which owns the abort tallies.
        aborts: None,
        timewait: None,
        port: None,
        host_rules: Vec::new(),
    }
}

fn alert_report(a: &Alert, now: u64) -> AlertReport {
    AlertReport {
        rule: a.rule.clone(),
        state: a.state.name().to_owned(),
        pid: a.process.key.pid,
        comm: a.process.comm.clone(),
        cmdline: a.process.cmdline.clone(),
        cgroup: a.process.cgroup.clone(),
        container: a.process.container.clone(),
        pod_uid: a.process.pod_uid.clone(),
        netns: a.process.netns,
        count: u64::from(a.count),
        oldest_age_s: secs(a.oldest_age_at(now)),
        firing_for_s: secs(now.saturating_sub(a.fired_at_ns)),
        peers: peers(&a.top_peers),
    }
}

/// The change as the delivery sinks take it; `rule` (the alert's) gives its `alertname`,
/// `severity` and `remedy`.
pub(super) fn alert_message(
    change: &AlertChange,
    rule: &Rule,
    now: u64,
    clock: &Clock,
    instance: &str,
) -> AlertMessage {
    let (firing, a) = match change {
        AlertChange::Firing(a) => (true, a),
        AlertChange::Resolved(a) => (false, a),
    };
    let peers: Vec<String> = a
        .top_peers
        .iter()
        .map(|(addr, n)| format!("{addr} ({n})"))
        .collect();
    let mut labels = BTreeMap::from([
        ("alertname".to_owned(), rule.alertname.clone()),
        ("rule".to_owned(), a.rule.clone()),
        ("pid".to_owned(), a.process.key.pid.to_string()),
        ("comm".to_owned(), a.process.comm.clone()),
        ("instance".to_owned(), instance.to_owned()),
        ("severity".to_owned(), rule.severity.clone()),
    ]);
    if let Some(c) = &a.process.container {
        labels.insert("container".into(), c.clone());
    }
    if let Some(uid) = &a.process.pod_uid {
        labels.insert("pod_uid".into(), uid.clone());
    }
    if let Some(ns) = a.process.netns {
        labels.insert("netns".into(), ns.to_string());
    }
    let mut annotations = BTreeMap::from([
        (
            "summary".to_owned(),
            format!(
                "{} (pid {}) holds {} {} sockets, oldest {}{:.0}s",
                a.process.comm,
                a.process.key.pid,
                a.count,
                a.state.name(),
                if a.oldest_is_lower_bound { ">=" } else { "" },
                secs(a.oldest_age_ns)
            ),
        ),
        ("count".to_owned(), a.count.to_string()),
        (
            "oldest_age_seconds".to_owned(),
            format!("{:.1}", secs(a.oldest_age_ns)),
        ),
        ("peers".to_owned(), peers.join(", ")),
        ("cmdline".to_owned(), a.process.cmdline.clone()),
        (
            "cgroup".to_owned(),
            a.process.cgroup.clone().unwrap_or_default(),
        ),
    ]);
    if !rule.remedy.is_empty() {
        annotations.insert("remedy".to_owned(), rule.remedy.clone());
    }
    if !a.peer_holders.is_empty() {
        let holders: Vec<String> = a
            .peer_holders
            .iter()
            .map(|h| {
                format!(
                    "{} (pid {}) holds {} {}",
                    h.process.comm,
                    h.process.key.pid,
                    h.count,
                    h.state.name()
                )
            })
            .collect();
        annotations.insert("peer_processes".to_owned(), holders.join(", "));
    }
    AlertMessage {
        key: format!(
            "{}/{}/{}",
            a.rule, a.process.key.pid, a.process.key.start_ticks
        ),
        firing,
        starts_at: clock.wall(a.fired_at_ns).system_time(),
        labels,
        annotations,
        json: serde_json::from_str(&alert_line(change, rule, now, clock, true))
            .expect("alert_line renders JSON"),
    }
}

/// The `instance` label of delivered alerts: `configured` when set, else what Prometheus
/// names the agent's series with the bundled scrape configuration — the metrics listener's
/// `host:port` (`127.0.0.1:9977` by default), so an alert and the scraped series join on it.
/// A listener on every address (`0.0.0.0`, `::`) is scraped by the host's name or address,
/// which the agent cannot know: the host name, with the port. Without metrics: the host name.
pub(super) fn instance(configured: &str, metrics: Option<std::net::SocketAddr>) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into())
    };
    match metrics {
        None => host(),
        Some(a) if a.ip().is_unspecified() => format!("{}:{}", host(), a.port()),
        Some(a) => a.to_string(),
    }
}

/// The version of the alert JSON schema (the `run --json` alert line, the webhook payload, the
/// alert file): raised when a key changes meaning or goes; new keys keep it.
pub const ALERT_SCHEMA_VERSION: u32 = 1;

/// An alert change as JSON, whatever the rule's scope (process, peer, host, aborts): the keys
/// every one carries (README, "JSON schemas": `schema_version`, `alert`, `rule` and its
/// `alertname`, `severity`, `remedy`), then `rest`, the scope's own keys (objects, merged).
pub(crate) fn alert_json(
    status: &str,
    rule: &str,
    (alertname, severity, remedy): (&str, &str, &str),
    rest: impl IntoIterator<Item = serde_json::Value>,
) -> serde_json::Value {
    let mut v = json!({
        "schema_version": ALERT_SCHEMA_VERSION,
        "alert": status,
        "rule": rule,
        "alertname": alertname,
        "severity": severity,
        "remedy": remedy,
    });
    if let Some(head) = v.as_object_mut() {
        for part in rest {
            if let serde_json::Value::Object(part) = part {
                head.extend(part);
            }
        }
    }
    v
}

/// The figures of a threshold alert (process or host scope): its count and oldest age.
pub(super) fn threshold_figures(
    count: u64,
    (oldest_age_s, lower_bound): (Option<f64>, bool),
) -> serde_json::Value {
    json!({
        "count": count,
        "oldest_age_s": oldest_age_s,
        "oldest_age_is_lower_bound": lower_bound,
    })
}

/// When an alert fired and resolved, and when this change was reported: every `*_ns` with its
/// wall-clock time by `clock` (README, "JSON schemas"). Process, host and peer alerts alike.
pub(super) fn alert_times(
    fired_at_ns: u64,
    resolved_at_ns: Option<u64>,
    now: u64,
    clock: &Clock,
) -> serde_json::Value {
    json!({
        "fired_at_ns": fired_at_ns,
        "fired_at": clock.wall(fired_at_ns),
        "resolved_at_ns": resolved_at_ns,
        "resolved_at": resolved_at_ns.map(|ns| clock.wall(ns)),
        "now_ns": now,
        "time": clock.wall(now),
    })
}

/// One line for an alert that fired or resolved: logfmt-like text, or a JSON object (which
/// also names the rule's `alertname`, `severity` and `remedy`, and the wall-clock times of
/// `now`, the firing and the resolution by `clock`).
pub(super) fn alert_line(
    change: &AlertChange,
    rule: &Rule,
    now: u64,
    clock: &Clock,
    as_json: bool,
) -> String {
    let (status, a) = match change {
        AlertChange::Firing(a) => ("firing", a),
        AlertChange::Resolved(a) => ("resolved", a),
    };
    let age = secs(a.oldest_age_ns);
    if as_json {
        return alert_json(
            status,
            &a.rule,
            rule.labels(),
            [
                json!({
                    "state": a.state.name(),
                    "pid": a.process.key.pid,
                    "comm": a.process.comm,
                    "cmdline": a.process.cmdline,
                    "cgroup": a.process.cgroup,
                    "container": a.process.container,
                    "pod_uid": a.process.pod_uid,
                    "netns": a.process.netns,
                    "peers": peers(&a.top_peers),
                    "peer_processes": a.peer_holders.iter().map(|h| json!({
                        "pid": h.process.key.pid,
                        "comm": h.process.comm,
                        "state": h.state.name(),
                        "sockets": h.count,
                    })).collect::<Vec<_>>(),
                }),
                threshold_figures(a.count.into(), (Some(age), a.oldest_is_lower_bound)),
                alert_times(a.fired_at_ns, a.resolved_at_ns, now, clock),
            ],
        )
        .to_string();
    }
    let peer_list: Vec<String> = a
        .top_peers
        .iter()
        .map(|(addr, n)| format!("{addr}x{n}"))
        .collect();
    format!(
        "alert={status} rule={} state={} pid={} comm=\"{}\" count={} oldest={}{age:.1}s peers={} cgroup=\"{}\" cmdline=\"{}\"",
        a.rule,
        a.state.name(),
        a.process.key.pid,
        escape_control(&a.process.comm).replace('"', "\\\""),
        a.count,
        if a.oldest_is_lower_bound { ">=" } else { "" },
        peer_list.join(","),
        escape_control(a.process.cgroup.as_deref().unwrap_or("")).replace('"', "\\\""),
        escape_control(&a.process.cmdline).replace('"', "\\\""),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{
        event::TcpState,
        model::{ProcessInfo, ProcessKey},
        tracker::{
            TrackerConfig,
            tests::{NS, sock, tr},
        },
    };

    const SEC: u64 = 1_000_000_000;

    pub(in crate::daemon) fn process(pid: u32) -> ProcessInfo {
        ProcessInfo {
            key: ProcessKey {
                pid,
                start_ticks: 1,
            },
            comm: format!("p{pid}"),
            cmdline: format!("/bin/p{pid}"),
            cgroup: None,
            container: None,
            pod_uid: None,
            runtime: None,
            netns: Some(NS),
        }
    }

    /// close_wait_leak plus a SYN_SENT rule given only as data, with its own labels.
    pub(in crate::daemon) fn tracker() -> Tracker {
        let syn_sent = Rule {
            alertname: "TcpConnectStuck".into(),
            severity: "critical".into(),
            remedy: "check the route to the peer".into(),
            ..Rule::new("syn_sent_stuck", TcpState::SynSent, Some(SEC), None)
        };
        let mut t = Tracker::new(TrackerConfig {
            rules: vec![Rule::close_wait_leak(), syn_sent],
            ..TrackerConfig::default()
        });
        // Socket 1: CLOSE_WAIT held by pid 10; 2: SYN_SENT held by pid 20; 3: CLOSE_WAIT, holder
        // unknown; 4: ESTABLISHED, watched by no rule.
        t.apply(&tr(1, TcpState::Established, TcpState::CloseWait, 0));
        t.set_owners(sock(1), vec![process(10)]);
        t.apply(&tr(2, TcpState::Close, TcpState::SynSent, 0));
        t.set_owners(sock(2), vec![process(20)]);
        t.apply(&tr(3, TcpState::Established, TcpState::CloseWait, SEC / 2));
        t.apply(&tr(4, TcpState::SynRecv, TcpState::Established, 0));
        t.set_owners(sock(4), vec![process(40)]);
        t
    }

    #[test]
    fn status_has_a_section_per_watched_state() {
        let t = tracker();
        let s = Stats {
            transitions: 7,
            ..Stats::default()
        };
        let r = status(&t, &s, 2 * SEC, &Clock::with_offset(0));
        assert_eq!(r.watched_states, ["SYN_SENT", "CLOSE_WAIT"]);
        let procs: Vec<(&str, u32, u64, f64)> = r
            .processes
            .iter()
            .map(|p| (p.state.as_str(), p.pid, p.count, p.oldest_age_s))
            .collect();
        assert_eq!(
            procs,
            [("SYN_SENT", 20, 1, 2.0), ("CLOSE_WAIT", 10, 1, 2.0)]
        );
        let unowned: Vec<(&str, &str, f64)> = r
            .unowned
            .iter()
            .map(|s| (s.state.as_str(), s.remote.as_str(), s.age_s))
            .collect();
        assert_eq!(unowned, [("CLOSE_WAIT", "10.0.0.2:40003", 1.5)]);
        assert_eq!((r.tracked_sockets, r.counters.transitions), (4, 7));
    }

    #[test]
    fn instance_is_the_scrape_target_unless_configured() {
        let at = |s: &str| Some(s.parse().expect("literal"));
        assert_eq!(instance("", at("127.0.0.1:9977")), "127.0.0.1:9977");
        assert_eq!(instance("", at("[::1]:9977")), "[::1]:9977");
        assert_eq!(instance("web-1", at("127.0.0.1:9977")), "web-1");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        assert_eq!(instance("", None), host.trim());
        assert_eq!(
            instance("", at("0.0.0.0:9977")),
            format!("{}:9977", host.trim())
        );
    }

    #[test]
    fn alert_labels_and_remedy_come_from_the_rule() {
        let mut t = tracker();
        let changes = t.evaluate(SEC);
        let [AlertChange::Firing(a)] = changes.as_slice() else {
            panic!("expected the SYN_SENT alert alone, got {changes:?}");
        };
        let rule = t.rule(&a.rule).expect("its rule");
        let m = alert_message(&changes[0], rule, SEC, &Clock::with_offset(0), "h1");
        let label = |k: &str| m.labels.get(k).map(String::as_str);
        assert_eq!(
            [
                label("alertname"),
                label("rule"),
                label("severity"),
                label("pid")
            ],
            [
                Some("TcpConnectStuck"),
                Some("syn_sent_stuck"),
                Some("critical"),
                Some("20")
            ]
        );
        assert_eq!(
            m.annotations.get("remedy").map(String::as_str),
            Some("check the route to the peer")
        );
        assert_eq!(
            m.annotations.get("summary").map(String::as_str),
            Some("p20 (pid 20) holds 1 SYN_SENT sockets, oldest 1s")
        );
        assert_eq!(m.key, "syn_sent_stuck/20/1");
        // The JSON (webhook, alert file, `run --json`) is versioned and placed in time:
        // CLOCK_MONOTONIC 1 s is 2026-12-05T22:07:16Z by this clock.
        let clock = Clock::with_offset(1_796_508_435_000_000_000);
        let json = alert_message(&changes[0], rule, SEC, &clock, "h1").json;
        assert_eq!(
            [
                &json["schema_version"],
                &json["now_ns"],
                &json["time"],
                &json["fired_at"],
                &json["resolved_at"]
            ],
            [
                &serde_json::json!(ALERT_SCHEMA_VERSION),
                &serde_json::json!(SEC),
                &serde_json::json!("2026-12-05T22:07:16.000000Z"),
                &serde_json::json!("2026-12-05T22:07:16.000000Z"),
                &serde_json::Value::Null
            ]
        );
        assert_eq!(
            m.starts_at,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1)
        );
        // A rule without a remedy sends none; close_wait_leak keeps today's labels.
        let mut bare = rule.clone();
        bare.remedy.clear();
        assert!(
            !alert_message(&changes[0], &bare, SEC, &Clock::with_offset(0), "h1")
                .annotations
                .contains_key("remedy")
        );
        let cw = Rule::close_wait_leak();
        let m = alert_message(&changes[0], &cw, SEC, &Clock::with_offset(0), "h1");
        assert_eq!(m.labels["alertname"], "TcpCloseWaitLeak");
        assert_eq!(m.labels["severity"], "warning");
        assert!(m.annotations["remedy"].starts_with("the peer closed these connections"));
    }
}
