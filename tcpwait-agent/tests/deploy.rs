//! The packaging under deploy/, each file checked by the checker its ecosystem provides:
//! promtool (rules, Prometheus config), amtool (Alertmanager config), systemd-analyze (unit),
//! a YAML parser for the DaemonSet, and the metric names the dashboard and rules use.
use std::{path::PathBuf, process::Command};

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a checker; fails with what to install when it is missing.
fn check(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd}: {e}: install the Debian packages prometheus, prometheus-alertmanager and systemd (cargo xtask test does)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

/// Every metric the agent exports (README, "Monitoring").
const METRICS: [&str; 11] = [
    "tcpwait_sockets",
    "tcpwait_transitions_total",
    "tcpwait_process_close_wait_sockets",
    "tcpwait_process_oldest_close_wait_age_seconds",
    "tcpwait_alerts_firing",
    "tcpwait_events_lost_total",
    "tcpwait_reconcile_repairs_total",
    "tcpwait_tracked_sockets",
    "tcpwait_table_overflow_total",
    "tcpwait_alert_deliveries_total",
    "tcpwait_build_info",
];

/// The `tcpwait_*` names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tcpwait_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn prometheus_rules_pass_promtool() {
    let rules = root().join("deploy/prometheus/tcpwait-rules.yml");
    let out = check(
        "promtool",
        &["check", "rules", rules.to_str().expect("utf-8")],
    );
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
    let text = std::fs::read_to_string(&rules).expect("rules");
    let doc = &YamlLoader::load_from_str(&text).expect("YAML")[0];
    for rule in doc["groups"][0]["rules"].as_vec().expect("rules") {
        let expr = rule["expr"].as_str().expect("expr");
        for name in metric_names(expr) {
            assert!(
                METRICS.contains(&name.as_str()),
                "unknown metric {name} in {expr}"
            );
        }
        assert!(
            rule["annotations"]["remedy"].as_str().is_some(),
            "every rule says what to do"
        );
    }
}

#[test]
fn prometheus_config_with_the_scrape_snippet_and_rules_passes_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snippet = std::fs::read_to_string(root().join("deploy/prometheus/scrape-config.yml"))
        .expect("snippet");
    let rules = root().join("deploy/prometheus/tcpwait-rules.yml");
    let config = format!("rule_files:\n  - {}\n{snippet}", rules.display());
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).expect("write");
    let out = check(
        "promtool",
        &["check", "config", path.to_str().expect("utf-8")],
    );
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
}

#[test]
fn alertmanager_config_passes_amtool() {
    let path = root().join("deploy/alertmanager/alertmanager.yml");
    let out = check("amtool", &["check-config", path.to_str().expect("utf-8")]);
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(out.contains(" - 2 receivers"), "{out}");
}

#[test]
fn systemd_unit_passes_verify_and_is_hardened() {
    let unit =
        std::fs::read_to_string(root().join("deploy/systemd/tcpwait.service")).expect("unit");
    for directive in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_SYS_RESOURCE",
    ] {
        assert!(unit.lines().any(|l| l == directive), "{directive} missing");
    }
    // verify checks that ExecStart exists: point it at a binary present on every machine.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tcpwait.service");
    let rewritten: String = unit
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                "ExecStart=/bin/true".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, rewritten).expect("write");
    let out = check(
        "systemd-analyze",
        &["verify", path.to_str().expect("utf-8")],
    );
    assert!(!out.contains("Unknown"), "{out}");
}

#[test]
fn daemonset_has_host_views_and_minimal_capabilities() {
    let text =
        std::fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml")).expect("yaml");
    let docs = YamlLoader::load_from_str(&text).expect("valid YAML");
    let kinds: Vec<&str> = docs
        .iter()
        .map(|d| d["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["Namespace", "ConfigMap", "DaemonSet"]);
    let ds = &docs[2];
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], Yaml::Boolean(true));
    assert_eq!(spec["hostNetwork"], Yaml::Boolean(true));
    let sc = &spec["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], Yaml::Boolean(false));
    assert_eq!(sc["readOnlyRootFilesystem"], Yaml::Boolean(true));
    let caps = |k: &str| -> Vec<String> {
        sc["capabilities"][k]
            .as_vec()
            .expect("caps")
            .iter()
            .map(|c| c.as_str().expect("cap").to_owned())
            .collect()
    };
    assert_eq!(caps("drop"), ["ALL"]);
    assert_eq!(
        caps("add"),
        [
            "BPF",
            "PERFMON",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "DAC_READ_SEARCH",
            "SYS_RESOURCE"
        ]
    );
    // The embedded configuration is one tcpwait accepts.
    let config = docs[1]["data"]["tcpwait.toml"].as_str().expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tcpwait.toml");
    std::fs::write(&path, config).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tcpwait"))
        .args(["config", "--check"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/tcpwait-dashboard.json"))
        .expect("dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = d["panels"].as_array().expect("panels");
    assert_eq!(panels.len(), 8);
    for p in panels {
        let expr = p["targets"][0]["expr"].as_str().expect("expr");
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr}");
        for name in names {
            assert!(
                METRICS.contains(&name.as_str()),
                "unknown metric {name} in {expr}"
            );
        }
    }
}
