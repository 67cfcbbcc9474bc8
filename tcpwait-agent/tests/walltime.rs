//! Wall-clock time in every JSON record the agent writes: `trace --json`, `tail --json`, the
//! transition log, `status --json`, the alert JSON (the `run --json` line and the alert file;
//! the webhook body is the same object, checked in `monitoring.rs`). Each `time` is compared
//! with what this machine's CLOCK_REALTIME said at the record's CLOCK_MONOTONIC stamp, within
//! 50 ms; real daemon, real kernel, real CLOSE_WAIT sockets on loopback.
mod common;

use std::time::Duration;

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// The records of `lines` (JSON) about sockets on `port`.
fn on_port(lines: &[Value], port: u16) -> Vec<Value> {
    lines
        .iter()
        .filter(|r| r["sport"] == port || r["dport"] == port)
        .cloned()
        .collect()
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn every_json_record_has_its_wall_clock_time() {
    require_root();
    let offset = realtime_offset_ns();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("transitions.jsonl");
    let alert_file = dir.path().join("alerts.jsonl");
    let config = dir.path().join("tcpwait.toml");
    std::fs::write(
        &config,
        format!(
            "[transition_log]\npath = {:?}\n",
            log.to_str().expect("utf-8")
        ),
    )
    .expect("write config");
    let sock = api_socket("walltime");
    let tw = daemon(
        &sock,
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--close-wait-age",
            "1",
            "--alert-file",
            alert_file.to_str().expect("utf-8"),
        ],
    );
    let port = free_port();
    let port_s = port.to_string();
    let tail = Tcpwait::start(
        &["tail", "--json", "--port", &port_s, "--socket", &sock],
        "following",
    );
    let trace = Tcpwait::start(
        &["trace", "--json", "--port", &port_s],
        "tracing TCP state transitions",
    );
    let (mut srv, _) = server("tw-server", &format!("127.0.0.1:{port}"), 2);
    let (cli, _) = client(
        "tw-walltime",
        format!("127.0.0.1:{port}").parse().expect("addr"),
        2,
    );
    srv.expect_line("accepted");
    // The alert fires 1 s after the peer closed: by then every kind of record exists.
    assert!(
        wait_until(Duration::from_secs(10), || alerts(&tw)
            .iter()
            .any(|a| a["pid"] == cli.pid())),
        "no alert for pid {}; stdout {:?}",
        cli.pid(),
        tw.stdout.snapshot()
    );
    // At least 15 transitions in each stream: CLOSE→LISTEN, then per connection the client's
    // 3 (to SYN_SENT, ESTABLISHED, CLOSE_WAIT) and the accepted socket's 4 (to SYN_RECV,
    // ESTABLISHED, FIN_WAIT1, FIN_WAIT2; its FIN_WAIT2→CLOSE may follow).
    let read_log = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log line is JSON"))
            .collect::<Vec<Value>>()
    };
    assert!(wait_until(Duration::from_secs(5), || {
        [
            on_port(&tail.json(), port).len(),
            on_port(&trace.json(), port).len(),
            on_port(&read_log(), port).len(),
        ]
        .iter()
        .all(|&n| n >= 15)
    }));
    let mut checked = Vec::new();
    let mut worst = 0i128;
    for (kind, records) in [
        ("trace --json", on_port(&trace.json(), port)),
        ("tail --json", on_port(&tail.json(), port)),
        ("transition log", on_port(&read_log(), port)),
    ] {
        for r in &records {
            worst = worst.max(assert_wall_time(kind, &r["ts_ns"], &r["time"], offset).abs());
        }
        checked.push((kind, records.len()));
    }

    let report = status(&sock);
    assert_eq!(report["schema_version"], 1);
    worst = worst
        .max(assert_wall_time("status --json", &report["now_ns"], &report["time"], offset).abs());
    checked.push(("status --json", 1));

    let line = alerts(&tw)
        .into_iter()
        .find(|a| a["pid"] == cli.pid())
        .expect("alert line");
    let from_file: Vec<Value> = std::fs::read_to_string(&alert_file)
        .expect("alert file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("alert file line is JSON"))
        .filter(|a: &Value| a["pid"] == cli.pid())
        .collect();
    assert_eq!(from_file.len(), 1, "{from_file:?}");
    for (kind, a) in [("run --json alert", &line), ("alert file", &from_file[0])] {
        assert_eq!(
            (&a["schema_version"], &a["alert"]),
            (&1.into(), &"firing".into()),
            "{kind}"
        );
        for (mono, wall) in [("now_ns", "time"), ("fired_at_ns", "fired_at")] {
            worst = worst.max(assert_wall_time(kind, &a[mono], &a[wall], offset).abs());
        }
        assert_eq!(a["resolved_at"], Value::Null, "{kind}");
        checked.push((kind, 1));
    }
    eprintln!(
        "time within 50 ms of the system clock in: {checked:?}; largest difference {} µs",
        worst / 1000
    );
}
