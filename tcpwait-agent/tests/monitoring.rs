//! The agent with its real neighbours, on loopback with real CLOSE_WAIT sockets: Prometheus
//! scrapes it, Alertmanager and a webhook receive its alerts, promtool checks its metrics.
mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    alertmanager::{alertmanager, require},
    *,
};
use neighbours::{am_alerts, am_alerts_of, close_wait_query, get, prometheus, ready_alertmanager};

#[path = "monitoring/neighbours.rs"]
mod neighbours;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// `tcpwait run` serving its API on a socket of its own (`name`), with `args`.
fn run(name: &str, args: &[&str]) -> Tcpwait {
    let sock = api_socket(name);
    let mut all = vec!["run", "--socket", &sock];
    all.extend_from_slice(args);
    Tcpwait::start(&all, AGENT_READY)
}

/// [`run`] with its metrics on `metrics` ("" for none), `close_wait_leak` at 1 s, and its
/// alerts sent to Alertmanager on `am_port`.
fn alerting(name: &str, metrics: &str, am_port: u16) -> Tcpwait {
    let url = format!("http://127.0.0.1:{am_port}");
    run(
        name,
        &[
            "--metrics-listen",
            metrics,
            "--close-wait-age",
            "1",
            "--alertmanager-url",
            &url,
        ],
    )
}

#[test]
#[ignore = "needs root, the real kernel and Prometheus; run by `cargo xtask test`"]
fn prometheus_scrapes_close_wait_sockets_per_process() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = free_port();
    let _tw = run(
        "prom",
        &["--metrics-listen", &format!("127.0.0.1:{metrics}")],
    );
    let (_srv, cli) = leak("tw-prom", 5);
    let (_prom, port) = prometheus(dir.path(), metrics);
    let query = close_wait_query(port, cli.pid());
    let mut last = String::new();
    let seen = wait_until(Duration::from_secs(30), || {
        last = get(&query).unwrap_or_default();
        let v: Value = serde_json::from_str(&last).unwrap_or(Value::Null);
        v["data"]["result"][0]["value"][1] == "5"
    });
    assert!(
        seen,
        "Prometheus never read 5 CLOSE_WAIT sockets for pid {}: {last}",
        cli.pid()
    );
    let v: Value = serde_json::from_str(&last).expect("JSON");
    assert_eq!(v["data"]["result"][0]["metric"]["comm"], "tw-prom");
    assert_eq!(v["data"]["result"].as_array().expect("result").len(), 1);
}

#[test]
#[ignore = "needs root, the real kernel and Alertmanager; run by `cargo xtask test`"]
fn alertmanager_receives_the_alert_and_its_resolution() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_am, am_port) = ready_alertmanager(dir.path());
    let _tw = alerting("am", "", am_port);
    let (_srv, mut cli) = leak("tw-am", 3);
    assert!(
        wait_until(Duration::from_secs(10), || !am_alerts(am_port, cli.pid())
            .is_empty()),
        "alert not in Alertmanager"
    );
    let a = &am_alerts(am_port, cli.pid())[0];
    assert_eq!(a["labels"]["alertname"], "TcpCloseWaitLeak");
    assert_eq!(a["labels"]["comm"], "tw-am");
    assert_eq!(a["labels"]["rule"], "close_wait_leak");
    assert_eq!(a["annotations"]["count"], "3");
    assert_eq!(a["status"]["state"], "active");
    // Labels and remedy are the rule's (close_wait_leak, the default `[[rules]]` entry).
    assert_eq!(a["labels"]["severity"], "warning");
    assert_eq!(
        a["annotations"]["remedy"],
        "the peer closed these connections and the process never called close(): find the \
         code path that drops a connection after read() returns 0 or an error without closing it"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(a["labels"]["instance"], host.trim());

    cli.send("close");
    cli.expect_line("closed");
    let resolved = wait_until(Duration::from_secs(10), || {
        am_alerts(am_port, cli.pid()).is_empty()
    });
    assert!(
        resolved,
        "still active in Alertmanager: {:?}",
        am_alerts(am_port, cli.pid())
    );
}

#[test]
#[ignore = "needs root, the real kernel, Prometheus and Alertmanager; run by `cargo xtask test`"]
fn the_alert_instance_is_the_scraped_targets_instance() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_am, am_port) = ready_alertmanager(dir.path());
    let metrics = free_port();
    let _tw = alerting("instance", &format!("127.0.0.1:{metrics}"), am_port);
    let (_srv, cli) = leak("tw-inst", 1);
    let (_prom, port) = prometheus(dir.path(), metrics);
    let query = close_wait_query(port, cli.pid());
    let mut scraped = Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let v: Value =
                serde_json::from_str(&get(&query).unwrap_or_default()).unwrap_or(Value::Null);
            scraped = v["data"]["result"][0]["metric"]["instance"].clone();
            !scraped.is_null()
        }),
        "Prometheus never scraped pid {}",
        cli.pid()
    );
    assert!(
        wait_until(Duration::from_secs(10), || !am_alerts(am_port, cli.pid())
            .is_empty()),
        "alert not in Alertmanager"
    );
    let alert = &am_alerts(am_port, cli.pid())[0];
    assert_eq!(alert["labels"]["instance"], scraped);
    assert_eq!(scraped, format!("127.0.0.1:{metrics}").as_str());
}

#[test]
#[ignore = "needs root, the real kernel and Alertmanager; run by `cargo xtask test`"]
fn an_alert_raised_while_alertmanager_is_down_arrives_when_it_starts() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let am_port = free_port();
    let metrics = free_port();
    let _tw = alerting("amdown", &format!("127.0.0.1:{metrics}"), am_port);
    let (_srv, cli) = leak("tw-amdown", 2);
    let deliveries = |result: &str| -> u64 {
        let text = get(&format!("http://127.0.0.1:{metrics}/metrics")).unwrap_or_default();
        let prefix =
            format!("tcpwait_alert_deliveries_total{{sink=\"alertmanager\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(5), || deliveries("failed") > 0),
        "no failed delivery counted"
    );
    // The scenario itself: Alertmanager comes up 10 s after the alert fired.
    std::thread::sleep(Duration::from_secs(10));
    let started = Instant::now();
    let _am = alertmanager(dir.path(), am_port, None);
    let arrived = wait_until(Duration::from_secs(30), || {
        !am_alerts(am_port, cli.pid()).is_empty()
    });
    assert!(arrived, "the alert never reached Alertmanager");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(deliveries("failed") >= 2, "retries counted");
    assert!(deliveries("sent") >= 1);
    assert_eq!(deliveries("dropped"), 0, "nothing lost");
}

#[test]
#[ignore = "needs root, the real kernel and promtool; run by `cargo xtask test`"]
fn promtool_accepts_the_metrics() {
    require_root();
    require("promtool");
    let metrics = free_port();
    let _tw = run(
        "promtool",
        &["--metrics-listen", &format!("127.0.0.1:{metrics}")],
    );
    let (_srv, cli) = leak("tw-promtool", 2);
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            text = get(&url).unwrap_or_default();
            text.contains(&format!(
                "tcpwait_process_close_wait_sockets{{pid=\"{}\",comm=\"tw-promtool\",container=\"\",\
                 pod_uid=\"\",netns=\"{}\"}} 2",
                cli.pid(),
                netns::own_inode()
            ))
        }),
        "{text}"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), text.as_bytes())
        .expect("write");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "tcpwait_sockets{state=\"close_wait\"}",
        "tcpwait_transitions_total{",
        "tcpwait_process_oldest_close_wait_age_seconds{",
        "tcpwait_alerts_firing{rule=\"close_wait_leak\"} ",
        "tcpwait_events_lost_total{reason=\"recursion_miss\"}",
        "tcpwait_reconcile_repairs_total{kind=\"added\"}",
        "tcpwait_tracked_sockets ",
        "tcpwait_table_overflow_total 0",
        "tcpwait_duplicate_transitions_total 0",
        "tcpwait_late_transitions_total 0",
        "tcpwait_owner_scan_denied_total 0",
        "tcpwait_owner_namespace_failures_total 0",
        "tcpwait_owner_snapshot_namespaces ",
        "tcpwait_owner_snapshot_duration_seconds ",
        "tcpwait_build_info{version=",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn webhook_receives_firing_and_resolved_alerts() {
    require_root();
    let (port, bodies) = common::webhook::receiver();
    let _tw = run(
        "webhook",
        &[
            "--metrics-listen",
            "",
            "--close-wait-age",
            "1",
            "--webhook-url",
            &format!("http://127.0.0.1:{port}/hook"),
        ],
    );
    let (_srv, mut cli) = leak("tw-hooked", 2);
    let pid = cli.pid();
    let mut got: Vec<Value> = Vec::new();
    let mut wait_for = |status: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(b) = bodies.recv_timeout(Duration::from_millis(200)) {
                got.push(serde_json::from_str(&b).expect("webhook body is JSON"));
            }
            if got.iter().any(|a| a["alert"] == status && a["pid"] == pid) {
                return got.clone();
            }
        }
        panic!("no {status} alert on the webhook: {got:?}");
    };
    let firing = wait_for("firing");
    // The agent sees every process of the machine: take this test's client's alert.
    let a = firing
        .iter()
        .find(|a| a["alert"] == "firing" && a["pid"] == pid)
        .expect("firing");
    assert_eq!(
        (&a["comm"], &a["count"], &a["rule"]),
        (&"tw-hooked".into(), &2.into(), &"close_wait_leak".into())
    );
    // The body is the versioned alert JSON, placed in time.
    let offset = realtime_offset_ns();
    assert_eq!(a["schema_version"], 1);
    assert_wall_time("webhook", &a["now_ns"], &a["time"], offset);
    assert_wall_time("webhook", &a["fired_at_ns"], &a["fired_at"], offset);
    cli.send("close");
    cli.expect_line("closed");
    let all = wait_for("resolved");
    assert_eq!(
        all.iter().filter(|a| a["pid"] == pid).count(),
        2,
        "one firing, one resolved: {all:?}"
    );
}

/// Each rule's own alertname, severity and remedy arrive in Alertmanager: a held FIN_WAIT2
/// (process scope) and a TIME_WAIT pile-up (peer scope), each from this test's namespace.
#[test]
#[ignore = "needs root, the real kernel and Alertmanager; run by `cargo xtask test`"]
fn alertmanager_receives_each_rules_alertname_and_remedy() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_am, am_port) = ready_alertmanager(dir.path());
    let config = dir.path().join("tcpwait.toml");
    std::fs::write(
        &config,
        r#"
[[rules]]
name = "fin_wait2_held"
state = "FIN_WAIT2"
age = "1s"
alertname = "TcpFinWait2Held"
severity = "critical"
remedy = "the peer never closes: fix the peer"

[[rules]]
name = "time_wait_pileup"
state = "TIME_WAIT"
scope = "peer"
count = 50
alertname = "TcpTimeWaitPileup"
severity = "warning"
remedy = "reuse connections toward this peer"
"#,
    )
    .expect("write config");
    let _tw = run(
        "am-rules",
        &[
            "--metrics-listen",
            "",
            "--config",
            config.to_str().expect("utf-8"),
            "--alertmanager-url",
            &format!("http://127.0.0.1:{am_port}"),
        ],
    );
    let ns = common::netns::NetNs::new("amrules");
    // TIME_WAIT sockets ignore RSTs (see the pile-up test in timewait.rs).
    ns.sysctl("net/ipv4/tcp_rfc1337", "1");
    let inode = ns.inode();
    // FIN_WAIT2 held: 2 sockets shut down for writing toward a server that never closes.
    let mut hold = ns.spawn(
        "server_hold",
        "tw-hold",
        &["127.0.0.1:0".into(), "2".into()],
    );
    let port: u16 = hold.expect_line("port").parse().expect("port");
    let mut half = ns.spawn(
        "half_close",
        "tw-am-half",
        &[format!("127.0.0.1:{port}"), "2".into()],
    );
    half.expect_line("half-closed");
    // TIME_WAIT pile-up: 100 client-closed connections from 127.0.0.2 toward one port.
    let mut eof = ns.spawn("eof_server", "tw-eof", &["127.0.0.1:0".into()]);
    let eof_port: u16 = eof.expect_line("port").parse().expect("port");
    let mut closer = ns.spawn(
        "short_client",
        "tw-am-closer",
        &[
            format!("127.0.0.1:{eof_port}"),
            "127.0.0.2".into(),
            "100".into(),
        ],
    );
    closer.expect_line("closed");

    let mut fw2 = Vec::new();
    let mut tw2 = Vec::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            fw2 = am_alerts(am_port, half.pid());
            tw2 = am_alerts_of(am_port, "time_wait_pileup", inode);
            fw2.len() == 1 && tw2.len() == 1
        }),
        "FIN_WAIT2 {fw2:?}, TIME_WAIT {tw2:?}"
    );
    let f = &fw2[0];
    assert_eq!(
        (
            &f["labels"]["alertname"],
            &f["labels"]["rule"],
            &f["labels"]["severity"],
            &f["annotations"]["remedy"]
        ),
        (
            &"TcpFinWait2Held".into(),
            &"fin_wait2_held".into(),
            &"critical".into(),
            &"the peer never closes: fix the peer".into()
        )
    );
    let t = &tw2[0];
    assert_eq!(
        (
            &t["labels"]["alertname"],
            &t["labels"]["severity"],
            &t["labels"]["local"],
            &t["labels"]["remote"],
            &t["annotations"]["remedy"],
        ),
        (
            &"TcpTimeWaitPileup".into(),
            &"warning".into(),
            &"127.0.0.2".into(),
            &format!("127.0.0.1:{eof_port}").into(),
            &"reuse connections toward this peer".into(),
        )
    );
    // The figures of the census that fired it: one may land while the client still connects.
    let count: u64 = t["annotations"]["count"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .expect("count");
    assert!((51..=100).contains(&count), "{t}");
    let closers = t["annotations"]["closers"].as_str().unwrap_or_default();
    assert!(
        closers.starts_with(&format!("tw-am-closer (pid {}) ", closer.pid()))
            && closers.ends_with(" closes"),
        "{t}"
    );

    // Both resolve: the server closes its ends, the TIME_WAIT sockets are destroyed.
    hold.send("close");
    hold.expect_line("closed");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-K", "state", "time-wait"])
        .output()
        .expect("ss -K");
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(20), || am_alerts(am_port, half.pid())
            .is_empty()
            && am_alerts_of(am_port, "time_wait_pileup", inode).is_empty()),
        "still active: {:?} {:?}",
        am_alerts(am_port, half.pid()),
        am_alerts_of(am_port, "time_wait_pileup", inode)
    );
    drop((eof, closer));
}
