//! The agent's files: the configuration it validates, the alert file it still writes when
//! stopped under load, and the transition log it rotates; real CLOSE_WAIT sockets throughout.
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn sigterm_under_load_delivers_what_is_owed_and_exits_within_2s() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("alerts.jsonl");
    let sock = api_socket("sigterm");
    let mut tw = Tcpwait::start(
        &[
            "run",
            "--json",
            "--socket",
            &sock,
            "--metrics-listen",
            "",
            "--close-wait-count",
            "1",
            "--alert-file",
            file.to_str().expect("utf-8"),
        ],
        AGENT_READY,
    );
    // Load: a thread opening and closing loopback connections as fast as it can.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = std::net::TcpStream::connect(addr).expect("connect");
                let (s, _) = l.accept().expect("accept");
                drop((c, s));
                n += 1;
            }
            n
        })
    };
    let (_srv, cli) = leak("tw-term", 2);
    assert!(wait_until(Duration::from_secs(5), || tw
        .json()
        .iter()
        .any(|a| a["alert"] == "firing" && a["pid"] == cli.pid())));
    let sent = Instant::now();
    let code = tw.stop(libc::SIGTERM);
    let took = sent.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let connections = load.join().expect("load thread");
    assert!(connections > 100, "load ran ({connections} connections)");
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    let delivered = std::fs::read_to_string(&file).expect("alert file written");
    let lines: Vec<Value> = delivered
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|a| a["alert"] == "firing" && a["pid"] == cli.pid()),
        "{delivered}"
    );
    assert!(
        tw.stderr
            .snapshot()
            .iter()
            .any(|l| l.starts_with("tcpwait: stopped;"))
    );
}

/// Runs `tcpwait run --config <file>` with `text` as the file.
fn run_with_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tcpwait.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(TCPWAIT)
        .args(["config", "--check", path.to_str().expect("utf-8")])
        .output()
        .expect("run tcpwait");
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(path.to_str().expect("utf-8"), "FILE");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn every_config_key_is_validated_with_one_line_and_exit_2() {
    for (text, line) in [
        (
            "[agent]\nmax_sockets = 0",
            "tcpwait: FILE: agent.max_sockets: 0 is out of range: allowed 1 ..= 100000000",
        ),
        (
            "[agent]\nsocket = 3",
            "tcpwait: FILE: agent.socket: invalid type: integer `3`, expected path string",
        ),
        (
            "[agent]\nreconcile_interval = \"2h\"",
            "tcpwait: FILE: agent.reconcile_interval: 2h is out of range: allowed 1s ..= 1h",
        ),
        (
            "[rules]\nclose_wait_age = \"later\"",
            "tcpwait: FILE: rules.close_wait_age: invalid duration \"later\" (expected number at 0): expected e.g. 60, \"90s\", \"5m\"",
        ),
        (
            "[rules]\nclose_wait_age = 1e30",
            "tcpwait: FILE: rules.close_wait_age: invalid duration 1000000000000000000000000000000: expected a positive number of seconds or a string like \"90s\"",
        ),
        (
            "[rules]\nclose_wait_count = 0",
            "tcpwait: FILE: rules.close_wait_count: 0 is out of range: allowed 1 ..= 10000000",
        ),
        (
            "[metrics]\nlisten = \"9977\"",
            "tcpwait: FILE: metrics.listen: \"9977\" is not an address: allowed \"IP:PORT\" (e.g. \"127.0.0.1:9977\") or \"\" to disable",
        ),
        (
            "[metrics]\ntop_processes = 100000",
            "tcpwait: FILE: metrics.top_processes: 100000 is out of range: allowed 1 ..= 10000",
        ),
        (
            "[alertmanager]\nurl = \"am:9093\"",
            "tcpwait: FILE: alertmanager.url: \"am:9093\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable",
        ),
        (
            "[alertmanager]\nresend_interval = 0",
            "tcpwait: FILE: alertmanager.resend_interval: invalid duration 0: expected a positive number of seconds or a string like \"90s\"",
        ),
        (
            "[alertmanager]\ninstance = []",
            "tcpwait: FILE: alertmanager.instance: invalid type: sequence, expected a string",
        ),
        (
            "[webhook]\nurl = \"ftp://hook\"",
            "tcpwait: FILE: webhook.url: \"ftp://hook\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable",
        ),
        (
            "[alert_file]\npath = false",
            "tcpwait: FILE: alert_file.path: invalid type: boolean `false`, expected a string",
        ),
        (
            "[delivery]\nqueue_size = 2000000",
            "tcpwait: FILE: delivery.queue_size: 2000000 is out of range: allowed 1 ..= 1000000",
        ),
        (
            "[delivery]\nmax_backoff = \"2h\"",
            "tcpwait: FILE: delivery.max_backoff: 2h is out of range: allowed 100ms ..= 1h",
        ),
        (
            "[transition_log]\nmax_bytes = 100",
            "tcpwait: FILE: transition_log.max_bytes: 100 is out of range: allowed 4096 ..= 1099511627776",
        ),
        (
            "[transition_log]\nkeep = 1000",
            "tcpwait: FILE: transition_log.keep: 1000 is out of range: allowed 1 ..= 100",
        ),
        (
            "[transition_log]\npath = 1",
            "tcpwait: FILE: transition_log.path: invalid type: integer `1`, expected a string",
        ),
        (
            "[agent]\nsockett = \"/x\"",
            "tcpwait: FILE: agent.sockett: unknown field `sockett`, expected one of `socket`, `max_sockets`, `reconcile_interval`",
        ),
    ] {
        let (code, stderr) = run_with_config(text);
        assert_eq!(code, 2, "{text}: {stderr}");
        assert_eq!(stderr.trim_end(), line, "{text}");
    }
}

#[test]
fn print_default_is_a_valid_config() {
    let out = Command::new(TCPWAIT)
        .args(["config", "--print-default"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    for line in [
        "[[rules]]",
        "name = \"close_wait_leak\"",
        "state = \"CLOSE_WAIT\"",
        "age = \"60s\"",
        "count = 100",
        "alertname = \"TcpCloseWaitLeak\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}");
    }
    // The printed file is accepted as is.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tcpwait.toml");
    std::fs::write(&path, &text).expect("write");
    let out = Command::new(TCPWAIT)
        .args(["config", "--check"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn transition_log_rotates_by_size_and_keeps_the_tail_schema() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("transitions.jsonl");
    let config = dir.path().join("tcpwait.toml");
    std::fs::write(
        &config,
        format!(
            "[metrics]\nlisten = \"\"\n[transition_log]\npath = \"{}\"\nmax_bytes = 65536\nkeep = 2\n",
            log.display()
        ),
    )
    .expect("write config");
    let sock = api_socket("translog");
    let mut tw = Tcpwait::start(
        &[
            "run",
            "--socket",
            &sock,
            "--config",
            config.to_str().expect("utf-8"),
        ],
        AGENT_READY,
    );
    let (_srv, mut cli) = leak("tw-logged", 300);
    // Owners are resolved within a few hundred ms; close once they are known.
    assert!(wait_until(Duration::from_secs(5), || {
        process_in(&status(&sock), cli.pid()).is_some_and(|p| p["count"] == 300)
    }));
    cli.send("close");
    cli.expect_line("closed");
    let rotated = dir.path().join("transitions.jsonl.2");
    assert!(
        wait_until(Duration::from_secs(10), || rotated.exists()),
        "no rotation"
    );
    assert_eq!(tw.stop(libc::SIGTERM), 0);
    assert!(!dir.path().join("transitions.jsonl.3").exists(), "keep = 2");
    for path in [log.clone(), dir.path().join("transitions.jsonl.1"), rotated] {
        let text = std::fs::read_to_string(&path).expect("read log");
        assert!(
            text.len() <= 65536,
            "{} is {} bytes",
            path.display(),
            text.len()
        );
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("JSON line");
            for key in [
                "ts_ns", "skaddr", "pid", "comm", "family", "saddr", "sport", "daddr", "dport",
                "old", "new",
            ] {
                assert!(v.get(key).is_some(), "{key} missing: {line}");
            }
        }
    }
    let all: String = [dir.path().join("transitions.jsonl.1"), log]
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read"))
        .collect();
    let owned = all
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["old"] == "CLOSE_WAIT"
                && v["owner_pid"] == cli.pid()
                && v["owner_comm"] == "tw-logged"
        })
        .count();
    assert!(owned > 0, "CLOSE_WAIT→LAST_ACK lines carry the owner");
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_full_disk_loses_transition_log_lines_only_counted() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    // A 64 KiB file system: a few hundred lines fit, the rest meet ENOSPC.
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tcpwait-test"])
        .arg(dir.path())
        .status()
        .expect("mount");
    assert!(ok.success(), "mount a small tmpfs");
    let _mount = Mount(dir.path().into());
    let log = dir.path().join("t.jsonl");
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        format!(
            "[transition_log]\npath = {:?}\n",
            log.to_str().expect("utf-8")
        ),
    )
    .expect("write config");
    let sock = api_socket("fulldisk");
    let _tw = daemon(&sock, &["--config", config.path().to_str().expect("utf-8")]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    for _ in 0..2_000 {
        let c = std::net::TcpStream::connect(addr).expect("connect");
        let (s, _) = l.accept().expect("accept");
        drop((c, s));
    }
    drop(l);
    let mut last = (0, 0, 0, 0);
    let exact = wait_until(Duration::from_secs(10), || {
        let c = status(&sock)["counters"].clone();
        let text = std::fs::read_to_string(&log).expect("read log");
        for line in text.lines() {
            serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        }
        last = (
            text.lines().count() as u64,
            c["sink_failed"]["transition_log"].as_u64().expect("failed"),
            c["sink_dropped"]["transition_log"]
                .as_u64()
                .expect("dropped"),
            c["transitions"].as_u64().expect("transitions"),
        );
        last.0 + last.1 + last.2 == last.3
    });
    let (lines, failed, dropped, transitions) = last;
    eprintln!(
        "fulldisk: {transitions} transitions: {lines} lines in the log, {failed} failed, \
         {dropped} dropped"
    );
    assert!(exact, "lines + failed + dropped == transitions: {last:?}");
    assert!(failed > 0 && lines > 0, "{last:?}");
    assert!(transitions >= 20_000, "{last:?}");
}
