//! The monitoring packaging under deploy/: Prometheus rules and scrape config (promtool),
//! Alertmanager routing (amtool), and the Grafana dashboard's queries. No root needed.
#[path = "common/packaging.rs"]
mod packaging;

use std::collections::BTreeSet;

use packaging::*;

#[derive(PartialEq, Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// Every metric the agent exports (README, "Monitoring"), with its type.
const METRICS: [(&str, Kind); 31] = [
    ("tcpwait_sockets", Kind::Gauge),
    ("tcpwait_transitions_total", Kind::Counter),
    ("tcpwait_process_sockets", Kind::Gauge),
    ("tcpwait_process_oldest_age_seconds", Kind::Gauge),
    ("tcpwait_process_close_wait_sockets", Kind::Gauge),
    ("tcpwait_process_oldest_close_wait_age_seconds", Kind::Gauge),
    ("tcpwait_alerts_firing", Kind::Gauge),
    ("tcpwait_events_lost_total", Kind::Counter),
    ("tcpwait_reconcile_repairs_total", Kind::Counter),
    ("tcpwait_tracked_sockets", Kind::Gauge),
    ("tcpwait_table_overflow_total", Kind::Counter),
    ("tcpwait_duplicate_transitions_total", Kind::Counter),
    ("tcpwait_late_transitions_total", Kind::Counter),
    ("tcpwait_owner_scan_denied_total", Kind::Counter),
    ("tcpwait_owner_snapshot_namespaces", Kind::Gauge),
    ("tcpwait_owner_snapshot_duration_seconds", Kind::Gauge),
    ("tcpwait_owner_namespace_failures_total", Kind::Counter),
    ("tcpwait_alert_deliveries_total", Kind::Counter),
    ("tcpwait_build_info", Kind::Gauge),
    ("tcpwait_timewait_sockets", Kind::Gauge),
    ("tcpwait_timewait_census_duration_seconds", Kind::Gauge),
    ("tcpwait_peer_timewait_sockets", Kind::Gauge),
    ("tcpwait_peer_timewait_port_share", Kind::Gauge),
    ("tcpwait_peer_timewait_closes_per_second", Kind::Gauge),
    ("tcpwait_peer_timewait_closer_closes", Kind::Gauge),
    ("tcpwait_peer_alerts_firing", Kind::Gauge),
    ("tcpwait_aborts_total", Kind::Counter),
    ("tcpwait_abort_discarded_bytes_total", Kind::Counter),
    ("tcpwait_process_aborts_total", Kind::Counter),
    ("tcpwait_resets_received_total", Kind::Counter),
    ("tcpwait_resets_lost_total", Kind::Counter),
];

/// The `tcpwait_*` names an expression uses, with the byte offset of each.
fn metric_uses(expr: &str) -> Vec<(usize, String)> {
    let mut uses = Vec::new();
    let mut from = 0;
    while let Some(i) = expr[from..].find("tcpwait_") {
        let start = from + i;
        let preceded_by_ident = expr[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if !preceded_by_ident {
            uses.push((start, expr[start..end].to_owned()));
        }
        from = end;
    }
    uses
}

/// Whether the counter `name` at byte `at` of `expr` is one side of `C unless C offset D`
/// (`C` the same selector): a series that was absent `D` ago, counted with its whole value.
/// increase() never counts what a series held at its first sample (a per-process series
/// appears with the aborts its process made before the first scrape).
fn is_new_series_idiom(expr: &str, at: usize, name: &str) -> bool {
    let rest = &expr[at + name.len()..];
    let selector_len = if rest.starts_with('{') {
        rest.find('}').map_or(0, |e| e + 1)
    } else {
        0
    };
    let selector = &expr[at..at + name.len() + selector_len];
    let after = &expr[at + selector.len()..];
    after.starts_with(&format!(" unless {selector} offset "))
        || (expr[..at].ends_with(&format!("{selector} unless ")) && after.starts_with(" offset "))
}

/// Every metric an expression names is exported, gauges are never rated, and counters are
/// only used through rate() or increase(), or in the new-series idiom (`is_new_series_idiom`).
fn assert_metrics_used_right(expr: &str) -> Vec<String> {
    let uses = metric_uses(expr);
    assert!(!uses.is_empty(), "no tcpwait metric in {expr:?}");
    for (at, name) in &uses {
        let kind = METRICS
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{expr:?} uses {name}, which tcpwait does not export"))
            .1;
        let before = expr[..*at].trim_end();
        let rated = before.ends_with("rate(") || before.ends_with("increase(");
        match kind {
            Kind::Gauge => assert!(!rated, "{expr:?}: rate/increase of the gauge {name}"),
            Kind::Counter => assert!(
                rated || is_new_series_idiom(expr, *at, name),
                "{expr:?}: the counter {name} used without rate/increase"
            ),
        }
    }
    uses.into_iter().map(|(_, n)| n).collect()
}

// ---- Prometheus ------------------------------------------------------------------------

const RULES: [&str; 7] = [
    "TcpwaitCloseWaitLeak",
    "TcpwaitCloseWaitPileUp",
    "TcpwaitTimeWaitPileUp",
    "TcpwaitDiscardOnClose",
    "TcpwaitEventsLost",
    "TcpwaitTableOverflow",
    "TcpwaitDown",
];

#[test]
#[ignore = "needs promtool (Debian package prometheus); run by `cargo xtask test`, which installs it"]
fn prometheus_rules_pass_promtool() {
    let path = deploy("prometheus/tcpwait-rules.yml");
    let out = check("promtool", &["check", "rules", utf8(&path)]);
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");

    let doc = &yaml(&path)[0];
    let rules = doc["groups"][0]["rules"].as_vec().expect("groups[0].rules");
    let names: Vec<&str> = rules
        .iter()
        .map(|r| r["alert"].as_str().expect("alert"))
        .collect();
    assert_eq!(names, RULES);
    for rule in rules {
        let name = rule["alert"].as_str().expect("alert");
        let expr = rule["expr"].as_str().expect("expr");
        assert!(
            rule["labels"]["severity"].as_str().is_some(),
            "{name}: no severity label"
        );
        for key in ["summary", "description", "runbook"] {
            let text = rule["annotations"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no {key} annotation"));
            assert!(
                !text.trim().is_empty() && !text.contains('\n'),
                "{name}.{key}: {text:?}"
            );
        }
        if name != "TcpwaitDown" {
            assert_metrics_used_right(expr);
        }
    }
    let by_name = |n: &str| &rules[RULES.iter().position(|r| *r == n).expect("rule")];
    let leak = by_name("TcpwaitCloseWaitLeak");
    assert_eq!(
        leak["expr"].as_str(),
        Some("tcpwait_process_oldest_close_wait_age_seconds > 300")
    );
    assert_eq!(leak["for"].as_str(), Some("1m"));
    assert!(
        leak["annotations"]["runbook"]
            .as_str()
            .is_some_and(|r| r.contains("close()") && r.contains("read() returns 0")),
        "the leak runbook names the remedy"
    );
    assert_eq!(
        by_name("TcpwaitCloseWaitPileUp")["expr"].as_str(),
        Some("tcpwait_process_close_wait_sockets > 100")
    );
    assert_eq!(
        by_name("TcpwaitTimeWaitPileUp")["expr"].as_str(),
        Some("tcpwait_peer_timewait_port_share > 0.5")
    );
    // Data thrown away on close, per process: aborts for linger_0 and unread_data, summed
    // over reasons; a new process's series counts whole (see is_new_series_idiom).
    let discard = by_name("TcpwaitDiscardOnClose");
    let aborts = r#"tcpwait_process_aborts_total{reason=~"linger_0|unread_data"}"#;
    assert_eq!(
        discard["expr"].as_str(),
        Some(
            format!(
                "sum without (reason) (({aborts} unless {aborts} offset 5m) or \
                 increase({aborts}[5m])) > 10"
            )
            .as_str()
        )
    );
    assert!(
        discard["for"].is_badvalue(),
        "fires at once, like the agent"
    );
    assert!(
        discard["annotations"]["runbook"].as_str().is_some_and(|r| r
            .contains("shutdown(SHUT_WR), read until EOF, then close()")
            && r.contains("timeout above 0")),
        "the discard runbook names the remedy"
    );
    assert_eq!(
        by_name("TcpwaitEventsLost")["expr"].as_str(),
        Some("increase(tcpwait_events_lost_total[5m]) > 0")
    );
    assert_eq!(
        by_name("TcpwaitDown")["expr"].as_str(),
        Some(r#"up{job="tcpwait"} == 0"#)
    );
}

/// Each alert fires when it should and not before, with the annotations it renders
/// (deploy/prometheus/tcpwait-rules.test.yml).
#[test]
#[ignore = "needs promtool (Debian package prometheus); run by `cargo xtask test`, which installs it"]
fn prometheus_rules_unit_tests_pass_promtool() {
    let path = deploy("prometheus/tcpwait-rules.test.yml");
    let out = check("promtool", &["test", "rules", utf8(&path)]);
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
#[ignore = "needs promtool (Debian package prometheus); run by `cargo xtask test`, which installs it"]
fn prometheus_config_with_the_scrape_snippet_and_rules_passes_promtool() {
    let snippet_path = deploy("prometheus/scrape-config.yml");
    let snippet = read(&snippet_path);
    let job = &yaml(&snippet_path)[0]["scrape_configs"][0];
    assert_eq!(
        job["job_name"].as_str(),
        Some("tcpwait"),
        "TcpwaitDown watches job=\"tcpwait\""
    );
    assert_eq!(
        strs(&job["static_configs"][0]["targets"]),
        ["127.0.0.1:9977"]
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let rules = deploy("prometheus/tcpwait-rules.yml");
    let config = format!(
        "global:\n  scrape_interval: 15s\nrule_files:\n  - {}\n{snippet}",
        rules.display()
    );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).expect("write");
    let out = check("promtool", &["check", "config", utf8(&path)]);
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
    assert!(
        out.contains("is valid prometheus config file syntax"),
        "{out}"
    );
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
}

// ---- Alertmanager ----------------------------------------------------------------------

#[test]
#[ignore = "needs amtool (Debian package prometheus-alertmanager); run by `cargo xtask test`, which installs it"]
fn alertmanager_config_passes_amtool_and_routes_the_leak_alerts() {
    let path = deploy("alertmanager/alertmanager.yml");
    let out = check("amtool", &["check-config", utf8(&path)]);
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(out.contains(" - 2 receivers"), "{out}");

    let config = format!("--config.file={}", utf8(&path));
    let route = |alertname: &str| -> String {
        let label = format!("alertname={alertname}");
        let out = check("amtool", &["config", "routes", "test", &config, &label]);
        // amtool also prints "Warning: --config.file flag overrides --alertmanager.url".
        out.lines()
            .filter(|l| !l.starts_with("Warning"))
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_owned()
    };
    // The agent's own alert, and the Prometheus rules' CLOSE_WAIT alerts, reach the team.
    for alertname in [
        "TcpCloseWaitLeak",
        "TcpFinWait2Held",
        "TcpTimeWaitPileup",
        "TcpDiscardOnClose",
        "TcpwaitCloseWaitLeak",
        "TcpwaitCloseWaitPileUp",
        "TcpwaitTimeWaitPileUp",
        "TcpwaitDiscardOnClose",
    ] {
        assert_eq!(route(alertname), "sockets-team", "{alertname}");
    }
    for alertname in ["TcpwaitDown", "TcpwaitEventsLost", "SomethingElse"] {
        assert_eq!(route(alertname), "default", "{alertname}");
    }
}

// ---- Grafana ---------------------------------------------------------------------------

/// Every query of the dashboard, with the panel title.
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> =
        d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        // Rows may nest panels.
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("title").to_owned();
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{title}: datasource"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{title}: target datasource"
            );
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: no expr"));
            queries.push((title.clone(), expr.to_owned()));
        }
    }
    queries
}

#[test]
fn dashboard_is_importable_and_queries_only_exported_metrics() {
    let text = read(&deploy("grafana/tcpwait-dashboard.json"));
    let d: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");

    // Importable with a datasource chosen at import time.
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(
        d["__inputs"].as_array().expect("__inputs").iter().any(|i| {
            i["name"] == "DS_PROMETHEUS"
                && i["type"] == "datasource"
                && i["pluginId"] == "prometheus"
        }),
        "no DS_PROMETHEUS input"
    );
    assert!(d["uid"].as_str().is_some() && d["title"].as_str().is_some());
    let ids: Vec<u64> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["id"].as_u64().expect("panel id"))
        .collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "panel ids unique"
    );

    let queries = dashboard_queries(&d);
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        for name in assert_metrics_used_right(expr) {
            used.insert(name);
        }
        // Only the dashboard's own variable and Grafana's built-ins.
        for var in expr.split('$').skip(1) {
            let name: String = var
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                ["instance", "__rate_interval", "__range", "__interval"].contains(&name.as_str()),
                "{title}: unknown variable ${name}"
            );
        }
    }
    // State label values are spelled as the agent exports them, lowercase like node_exporter.
    for (title, expr) in &queries {
        for value in expr.split("state=\"").skip(1) {
            let value = value.split('"').next().expect("split yields one");
            assert_eq!(
                value,
                value.to_ascii_lowercase(),
                "{title}: state=\"{value}\""
            );
        }
    }
    assert!(
        queries
            .iter()
            .any(|(_, e)| e
                .contains("tcpwait_sockets{instance=~\"$instance\",state=\"close_wait\"}")),
        "CLOSE_WAIT sockets, by the lowercase label"
    );
    // The panels the dashboard is for.
    let has = |needle: &str| queries.iter().any(|(_, e)| e.contains(needle));
    assert!(
        has("topk(10, tcpwait_process_close_wait_sockets"),
        "CLOSE_WAIT by process"
    );
    assert!(
        has("tcpwait_process_oldest_close_wait_age_seconds"),
        "oldest age by process"
    );
    assert!(has("sum by (state) (tcpwait_sockets"), "sockets by state");
    assert!(
        has("sum by (from, to) (rate(tcpwait_transitions_total"),
        "transitions by (from, to)"
    );
    assert!(
        has("sum by (reason) (rate(tcpwait_events_lost_total"),
        "events lost by reason"
    );
    assert!(has("tcpwait_alerts_firing"), "alerts firing");
    assert!(has("tcpwait_reconcile_repairs_total"), "reconcile repairs");
    assert!(
        has("topk(10, tcpwait_peer_timewait_sockets"),
        "TIME_WAIT per peer"
    );
    assert!(
        has("tcpwait_peer_timewait_port_share"),
        "port range share per peer"
    );
    assert!(
        has("sum by (reason) (rate(tcpwait_aborts_total"),
        "aborts by reason"
    );
    assert!(
        has("sum by (queue) (rate(tcpwait_abort_discarded_bytes_total"),
        "bytes discarded by queue"
    );
    assert!(
        has(
            r#"topk(10, sum without (reason) ((tcpwait_process_aborts_total{instance=~"$instance",reason=~"linger_0|unread_data"} unless"#
        ),
        "aborts that discard data by process, new processes counted whole"
    );

    // The template variable queries an exported metric.
    for v in d["templating"]["list"].as_array().expect("templating") {
        let q = v["definition"].as_str().expect("definition");
        for (_, name) in metric_uses(q) {
            assert!(
                METRICS.iter().any(|(n, _)| *n == name),
                "variable uses {name}"
            );
        }
    }

    // Every query is valid PromQL: promtool checks them as recording rules, with Grafana's
    // variables replaced by values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        let concrete = expr
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete).expect("quote")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, rules).expect("write");
    let out = check("promtool", &["check", "rules", utf8(&path)]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}
