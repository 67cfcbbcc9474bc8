//! The alert lines the agent prints and the messages it hands the delivery sinks, for every
//! kind of alert (process, host, peer, abort): labels, annotations, times, the JSON.
use std::collections::BTreeMap;

use serde_json::json;

use super::{peers, secs};
use crate::{
    daemon::delivery::AlertMessage,
    output::{Clock, escape_control},
    tracker::{alerts::AlertChange, rules::Rule},
};

/// The change as the delivery sinks take it; `rule` (the alert's) gives its `alertname`,
/// `severity` and `remedy`.
pub(in crate::daemon) fn alert_message(
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
pub(in crate::daemon) fn instance(
    configured: &str,
    metrics: Option<std::net::SocketAddr>,
) -> String {
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
pub(in crate::daemon) fn threshold_figures(
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
pub(in crate::daemon) fn alert_times(
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
pub(in crate::daemon) fn alert_line(
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
mod tests {
    use super::super::tests::tracker;
    use super::*;
    use crate::{output::Clock, tracker::alerts::AlertChange, tracker::rules::Rule};

    const SEC: u64 = 1_000_000_000;

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
