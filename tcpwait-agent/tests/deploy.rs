//! The packaging under deploy/, each file checked by the checker its ecosystem provides —
//! promtool (rules, rule unit tests, Prometheus config), amtool (Alertmanager config and
//! routing), systemd-analyze (unit verify and security exposure) — plus structural checks:
//! the DaemonSet's host views and capabilities (YAML), the embedded agent configuration
//! (`tcpwait config --check`), and the metric names every query uses (rules, dashboard).
//!
//! No root needed. A missing checker fails the test, naming the Debian package to install
//! (`cargo xtask test` installs them).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs a checker and returns (success, stdout + stderr). A missing checker fails the test
/// with the package to install: these tests must not pass by skipping.
fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let package = match cmd {
        "promtool" => "prometheus",
        "amtool" => "prometheus-alertmanager",
        "systemd-analyze" => "systemd",
        _ => "?",
    };
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {cmd}: {e}. Install the Debian package `{package}` \
             (apt-get install prometheus prometheus-alertmanager systemd; \
             `cargo xtask test` does it)"
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a checker that must succeed.
fn check(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = run(cmd, args);
    assert!(ok, "{cmd} {args:?} failed:\n{text}");
    text
}

fn yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap_or_else(|| panic!("not a list: {y:?}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v:?}"))
                .to_owned()
        })
        .collect()
}

#[derive(PartialEq, Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// Every metric the agent exports (README, "Monitoring"), with its type.
const METRICS: [(&str, Kind); 14] = [
    ("tcpwait_sockets", Kind::Gauge),
    ("tcpwait_transitions_total", Kind::Counter),
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
    ("tcpwait_alert_deliveries_total", Kind::Counter),
    ("tcpwait_build_info", Kind::Gauge),
];

/// The capabilities the agent needs, as systemd spells them.
const CAPS: [&str; 6] = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYS_ADMIN",
    "CAP_SYS_PTRACE",
    "CAP_DAC_READ_SEARCH",
    "CAP_SYS_RESOURCE",
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

/// Every metric an expression names is exported, gauges are never rated, and counters are
/// only used through rate() or increase().
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
                rated,
                "{expr:?}: the counter {name} used without rate/increase"
            ),
        }
    }
    uses.into_iter().map(|(_, n)| n).collect()
}

// ---- Prometheus ------------------------------------------------------------------------

const RULES: [&str; 5] = [
    "TcpwaitCloseWaitLeak",
    "TcpwaitCloseWaitPileUp",
    "TcpwaitEventsLost",
    "TcpwaitTableOverflow",
    "TcpwaitDown",
];

#[test]
#[ignore = "needs promtool (Debian package prometheus); run by `cargo xtask test`, which installs it"]
fn prometheus_rules_pass_promtool() {
    let path = deploy("prometheus/tcpwait-rules.yml");
    let out = check("promtool", &["check", "rules", utf8(&path)]);
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");

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
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
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
        "TcpwaitCloseWaitLeak",
        "TcpwaitCloseWaitPileUp",
    ] {
        assert_eq!(route(alertname), "sockets-team", "{alertname}");
    }
    for alertname in ["TcpwaitDown", "TcpwaitEventsLost", "SomethingElse"] {
        assert_eq!(route(alertname), "default", "{alertname}");
    }
}

// ---- systemd ---------------------------------------------------------------------------

const UNIT: &str = "systemd/tcpwait.service";

/// The value of every `Key=` line of the unit.
fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

/// Writes the unit into a temporary directory with `ExecStart`'s binary replaced, so that
/// `systemd-analyze verify` (which requires an executable ExecStart) checks everything else.
fn unit_with_binary(unit: &str, binary: &str, dir: &Path) -> PathBuf {
    let rewritten: String = unit
        .lines()
        .map(
            |l| match l.strip_prefix("ExecStart=/usr/local/bin/tcpwait") {
                Some(args) => format!("ExecStart={binary}{args}\n"),
                None => format!("{l}\n"),
            },
        )
        .collect();
    assert!(
        rewritten.contains(&format!("ExecStart={binary} run")),
        "ExecStart rewritten"
    );
    let path = dir.join("tcpwait.service");
    std::fs::write(&path, rewritten).expect("write");
    path
}

/// Lines of systemd-analyze output that are diagnostics about our unit.
fn unit_diagnostics(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.contains("tcpwait.service"))
        .collect()
}

#[test]
fn systemd_unit_is_hardened_as_documented() {
    let unit = read(&deploy(UNIT));
    assert_eq!(
        directive(&unit, "ExecStart"),
        ["/usr/local/bin/tcpwait run"]
    );
    for (key, value) in [
        ("Type", "simple"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RuntimeDirectory", "tcpwait"),
        ("RuntimeDirectoryMode", "0700"),
        ("StateDirectory", "tcpwait"),
        ("LimitMEMLOCK", "infinity"),
        ("MemoryMax", "512M"),
    ] {
        assert_eq!(directive(&unit, key), [value], "{key}");
    }
    // Must stay unset: the agent needs every process's /proc/<pid>/fd, the host's sockets,
    // and capabilities in the initial user namespace.
    for key in [
        "ProtectProc",
        "ProcSubset",
        "PrivateNetwork",
        "PrivateUsers",
        "User",
        "DynamicUser",
    ] {
        assert!(
            directive(&unit, key).is_empty(),
            "{key} would blind or break the agent"
        );
    }
    // Exactly the needed capabilities; never CAP_NET_ADMIN.
    let caps: Vec<String> = CAPS.iter().map(|c| c.to_string()).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let values = directive(&unit, key);
        assert_eq!(values.len(), 1, "{key} once");
        let set: Vec<String> = values[0].split_whitespace().map(str::to_owned).collect();
        assert_eq!(set, caps, "{key}");
    }
    assert!(
        unit.contains("runs as root") || unit.contains("Runs as root"),
        "says it runs as root"
    );
    // The system-call allow list contains what the probe needs beyond @system-service.
    let filter = directive(&unit, "SystemCallFilter");
    assert_eq!(filter.len(), 1);
    for call in ["@system-service", "bpf", "perf_event_open", "mount"] {
        assert!(
            filter[0].split_whitespace().any(|c| c == call),
            "SystemCallFilter lacks {call}"
        );
    }
    // The directives that could break the tracefs mount or BPF say why they are safe.
    for key in [
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "ProtectKernelModules",
    ] {
        let i = unit
            .lines()
            .position(|l| l.starts_with(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} not set"));
        let above = unit.lines().nth(i - 1).expect("line above");
        assert!(above.starts_with('#'), "{key} has no comment explaining it");
    }
}

#[test]
#[ignore = "needs systemd-analyze (Debian package systemd); run by `cargo xtask test`, which installs it"]
fn systemd_unit_passes_verify() {
    let unit = read(&deploy(UNIT));
    let dir = tempfile::tempdir().expect("tempdir");

    // With ExecStart pointing at the tcpwait binary this test run built: no diagnostics.
    let path = unit_with_binary(&unit, env!("CARGO_BIN_EXE_tcpwait"), dir.path());
    let out = check("systemd-analyze", &["verify", utf8(&path)]);
    let diags = unit_diagnostics(&out);
    assert!(diags.is_empty(), "systemd-analyze verify complains:\n{out}");

    // verify exits 0 on unknown keys and bad values (it only prints them): make sure it does
    // print them here, so that the silence above means something.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).expect("mkdir");
    let typo = unit
        .replace("ProtectHome=yes", "ProtectHomme=yes")
        .replace(" perf_event_open", " perf_event_opne");
    let path = unit_with_binary(&typo, env!("CARGO_BIN_EXE_tcpwait"), &broken);
    let (_, out) = run("systemd-analyze", &["verify", utf8(&path)]);
    assert!(
        out.contains("Unknown key") && out.contains("ProtectHomme"),
        "{out}"
    );
    assert!(out.contains("perf_event_opne"), "{out}");

    // The unit as shipped: its only possible complaint is a tcpwait not installed yet.
    let shipped = dir.path().join("shipped");
    std::fs::create_dir(&shipped).expect("mkdir");
    let path = shipped.join("tcpwait.service");
    std::fs::write(&path, &unit).expect("write");
    let (ok, out) = run("systemd-analyze", &["verify", utf8(&path)]);
    if Path::new("/usr/local/bin/tcpwait").exists() {
        assert!(ok && unit_diagnostics(&out).is_empty(), "{out}");
    } else {
        assert!(!ok, "verify accepts a missing ExecStart binary?\n{out}");
        let diags = unit_diagnostics(&out);
        assert!(
            diags.len() == 1 && diags[0].contains("/usr/local/bin/tcpwait is not executable"),
            "unexpected diagnostics:\n{out}"
        );
    }
}

/// `systemd-analyze security` rates the sandbox; the agent needs root-level capabilities and
/// the host's network and processes, so "OK" (below 4.0 on systemd 252's scale) is the goal.
#[test]
#[ignore = "needs systemd-analyze (Debian package systemd); run by `cargo xtask test`, which installs it"]
fn systemd_unit_security_exposure_is_ok() {
    let unit = read(&deploy(UNIT));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = unit_with_binary(&unit, env!("CARGO_BIN_EXE_tcpwait"), dir.path());
    let args = ["security", "--offline=yes", "--no-pager", utf8(&path)];
    let (_, out) = run("systemd-analyze", &args);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for tcpwait.service:"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    assert!(level < 4.0, "exposure {level} (want < 4.0):\n{out}");

    // Item by item, in JSON (the text form's check marks depend on the locale).
    let (_, json) = run(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--no-pager",
            "--json=short",
            utf8(&path),
        ],
    );
    let items: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let set = |name: &str| -> bool {
        items
            .as_array()
            .expect("array")
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("systemd-analyze security does not rate {name}"))["set"]
            == true
    };
    for name in [
        "NoNewPrivileges=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "ProtectKernelModules=",
        "ProtectKernelTunables=",
        "ProtectKernelLogs=",
        "ProtectControlGroups=",
        "CapabilityBoundingSet=~CAP_NET_ADMIN",
        "CapabilityBoundingSet=~CAP_SYS_MODULE",
        "CapabilityBoundingSet=~CAP_SYS_RAWIO",
        "SystemCallFilter=~@reboot",
        "SystemCallFilter=~@module",
        "RestrictNamespaces=~user",
    ] {
        assert!(set(name), "{name} not satisfied:\n{out}");
    }
}

// ---- Kubernetes ------------------------------------------------------------------------

#[test]
fn daemonset_has_host_views_and_minimal_capabilities() {
    let docs = yaml(&deploy("kubernetes/daemonset.yaml"));
    let kinds: Vec<&str> = docs
        .iter()
        .map(|d| d["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["Namespace", "ConfigMap", "DaemonSet"]);
    assert_eq!(docs[0]["metadata"]["name"].as_str(), Some("tcpwait"));
    for d in &docs[1..] {
        assert_eq!(d["metadata"]["namespace"].as_str(), Some("tcpwait"));
    }

    let ds = &docs[2];
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    let template = &ds["spec"]["template"];
    let spec = &template["spec"];
    assert_eq!(spec["hostPID"], Yaml::Boolean(true));
    assert_eq!(spec["hostNetwork"], Yaml::Boolean(true));
    assert_eq!(spec["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    // Tolerates every taint: a toleration with operator Exists and no key.
    assert!(
        spec["tolerations"]
            .as_vec()
            .expect("tolerations")
            .iter()
            .any(|t| {
                t["operator"].as_str() == Some("Exists")
                    && t["key"].is_badvalue()
                    && t["effect"].is_badvalue()
            }),
        "no toleration for all taints"
    );

    let containers = spec["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"].as_str(), Some("ghcr.io/example/tcpwait:latest"));
    let mut cmd = strs(&c["command"]);
    cmd.extend(strs(&c["args"]));
    assert_eq!(
        cmd,
        [
            "/usr/local/bin/tcpwait",
            "run",
            "--config",
            "/etc/tcpwait/tcpwait.toml"
        ]
    );

    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], Yaml::Boolean(false));
    assert_eq!(sc["readOnlyRootFilesystem"], Yaml::Boolean(true));
    assert_eq!(sc["allowPrivilegeEscalation"], Yaml::Boolean(false));
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    // Exactly the systemd unit's set, as Kubernetes spells it.
    let want: Vec<String> = CAPS
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(strs(&sc["capabilities"]["add"]), want);
    assert!(!want.iter().any(|c| c == "NET_ADMIN"));

    let res = &c["resources"];
    assert_eq!(res["requests"]["cpu"].as_str(), Some("50m"));
    assert_eq!(res["limits"]["cpu"].as_str(), Some("500m"));
    assert_eq!(res["requests"]["memory"].as_str(), Some("64Mi"));
    assert_eq!(res["limits"]["memory"].as_str(), Some("512Mi"));

    // Volumes: tracefs from the host at the same path, a writable /run/tcpwait, the config.
    let volumes = spec["volumes"].as_vec().expect("volumes");
    let volume = |name: &str| -> &Yaml {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
    let mount_of = |path: &str| -> &Yaml {
        mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
    };
    let tracefs = mount_of("/sys/kernel/tracing");
    assert_eq!(
        volume(tracefs["name"].as_str().expect("name"))["hostPath"]["path"].as_str(),
        Some("/sys/kernel/tracing")
    );
    assert!(
        tracefs["readOnly"].as_bool() != Some(true),
        "tracefs must be mountable"
    );
    let run_dir = mount_of("/run/tcpwait");
    let run_vol = volume(run_dir["name"].as_str().expect("name"));
    assert!(!run_vol["emptyDir"].is_badvalue() || !run_vol["hostPath"].is_badvalue());
    let config_mount = mount_of("/etc/tcpwait");
    assert_eq!(
        volume(config_mount["name"].as_str().expect("name"))["configMap"]["name"].as_str(),
        docs[1]["metadata"]["name"].as_str()
    );
    // /proc comes from hostPID, never from a hostPath volume.
    assert!(
        mounts
            .iter()
            .all(|m| m["mountPath"].as_str() != Some("/proc"))
    );

    // The embedded configuration is one tcpwait accepts, and Prometheus finds its port.
    let config = docs[1]["data"]["tcpwait.toml"]
        .as_str()
        .expect("tcpwait.toml");
    for line in [
        "[metrics]",
        r#"listen = "0.0.0.0:9977""#,
        "[rules]",
        r#"close_wait_age = "60s""#,
        "close_wait_count = 100",
    ] {
        assert!(
            config.lines().any(|l| l.trim() == line),
            "config lacks {line:?}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tcpwait.toml");
    std::fs::write(&path, config).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tcpwait"))
        .args(["config", "--check"])
        .arg(&path)
        .output()
        .expect("run tcpwait");
    assert!(
        out.status.success(),
        "tcpwait config --check refuses the ConfigMap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ann = &template["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(ann["prometheus.io/port"].as_str(), Some("9977"));
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"));
    assert_eq!(c["ports"][0]["containerPort"].as_i64(), Some(9977));
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
