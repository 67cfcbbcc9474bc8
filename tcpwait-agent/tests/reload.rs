//! SIGHUP: the agent reloads its configuration file and reopens its transition log without a
//! restart, keeping what a restart loses — the ages of sockets it saw enter their state, the
//! alerts firing. Real daemon, real kernel, real CLOSE_WAIT sockets on loopback.
mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

fn hup(tw: &Tcpwait) {
    // SAFETY: kill with a valid pid and signal number.
    unsafe { libc::kill(tw.child.id() as i32, libc::SIGHUP) };
}

/// stderr lines of `tw` that contain `needle`.
fn logged(tw: &Tcpwait, needle: &str) -> Vec<String> {
    tw.stderr
        .snapshot()
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect()
}

fn rules(age: &str) -> String {
    format!("[[rules]]\nname = \"close_wait_leak\"\nstate = \"CLOSE_WAIT\"\nage = \"{age}\"\n")
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn sighup_applies_a_new_threshold_to_tracked_ages_reopens_the_log_and_refuses_a_bad_file() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tcpwait.toml");
    let log = dir.path().join("transitions.jsonl");
    let rotated = dir.path().join("transitions.jsonl.rotated");
    let log_section = format!(
        "[transition_log]\npath = {:?}\n",
        log.to_str().expect("utf-8")
    );
    std::fs::write(&config, rules("1h") + &log_section).expect("write config");
    let sock = api_socket("reload");
    let tw = daemon(&sock, &["--config", config.to_str().expect("utf-8")]);
    let (_srv, mut cli) = leak("tw-hup", 2);
    let pid = cli.pid();
    // Both sockets tracked from their entry into CLOSE_WAIT (exact ages), and at least 1.5 s old.
    let mut entry = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            entry = process_in(&status(&sock), pid).unwrap_or(Value::Null);
            entry["count"] == 2 && entry["oldest_age_s"].as_f64().is_some_and(|a| a >= 1.5)
        }),
        "pid {pid} not listed with 2 sockets 1.5 s old: {entry}"
    );
    assert_eq!(entry["oldest_age_is_lower_bound"], false);
    assert!(alerts(&tw).is_empty(), "1 h not reached: {:?}", alerts(&tw));

    // A broken file: one error line, the old rules stay in force. A 1 s threshold would fire
    // at once; `status` answers after the reload's own evaluation, so its alerts tell.
    std::fs::write(
        &config,
        rules("1s").replace("CLOSE_WAIT", "CLOSE_WAT") + &log_section,
    )
    .expect("write broken config");
    hup(&tw);
    assert!(
        wait_until(Duration::from_secs(5), || !logged(
            &tw,
            "configuration refused"
        )
        .is_empty()),
        "no refusal logged: {:?}",
        tw.stderr.snapshot()
    );
    let refused = logged(&tw, "configuration refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains(&format!(
            "{}: rules[0].state: \"CLOSE_WAT\" is not a TCP state",
            config.display()
        )),
        "{}",
        refused[0]
    );
    let report = status(&sock);
    assert!(
        report["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .all(|a| a["pid"] != pid),
        "the refused file's threshold applied: {report}"
    );
    assert!(alerts(&tw).is_empty());

    // logrotate: rename the log, then a good file with a 1 s threshold, then SIGHUP.
    let before = std::fs::read_to_string(&log).expect("log");
    std::fs::rename(&log, &rotated).expect("rotate");
    std::fs::write(&config, rules("1s") + &log_section).expect("write config");
    let reloaded_at = Instant::now();
    hup(&tw);
    assert!(
        wait_until(Duration::from_secs(5), || alerts(&tw)
            .iter()
            .any(|a| a["pid"] == pid)),
        "the new 1 s threshold did not fire on the tracked sockets; stderr {:?}",
        tw.stderr.snapshot()
    );
    let fired = alerts(&tw);
    assert_eq!(fired.len(), 1, "{fired:?}");
    let a = &fired[0];
    assert_eq!(
        (
            &a["alert"],
            &a["rule"],
            &a["count"],
            &a["oldest_age_is_lower_bound"]
        ),
        (
            &"firing".into(),
            &"close_wait_leak".into(),
            &2.into(),
            &false.into()
        )
    );
    // The age counts from the entry into CLOSE_WAIT, before the reload.
    let age = a["oldest_age_s"].as_f64().expect("age");
    assert!(
        age >= 1.5 && age > reloaded_at.elapsed().as_secs_f64(),
        "age {age}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || logged(
            &tw,
            "configuration reloaded"
        )
        .len()
            == 1),
        "{:?}",
        tw.stderr.snapshot()
    );

    // The log was reopened: the closing transitions go to a new file at the old path; the
    // earlier ones stay in the renamed file.
    // Reopened at each SIGHUP, the refused one included (logrotate's must not wait for a fix).
    assert!(
        wait_until(Duration::from_secs(5), || logged(&tw, "reopened").len()
            == 2),
        "{:?}",
        tw.stderr.snapshot()
    );
    cli.send("close");
    cli.expect_line("closed");
    let mine = |text: &str, edge: &str| {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("JSON line"))
            .filter(|r| r["owner_pid"] == pid && format!("{}>{}", r["old"], r["new"]) == edge)
            .count()
    };
    let last_ack = "\"CLOSE_WAIT\">\"LAST_ACK\"";
    assert!(
        wait_until(Duration::from_secs(5), || mine(
            &std::fs::read_to_string(&log).unwrap_or_default(),
            last_ack
        ) == 2),
        "no CLOSE_WAIT→LAST_ACK of pid {pid} in the reopened log"
    );
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    assert!(old.starts_with(&before), "the renamed file kept its lines");
    assert_eq!(mine(&old, last_ack), 0);

    // The alert resolves, as any other.
    assert!(wait_until(Duration::from_secs(5), || alerts(&tw)
        .iter()
        .any(|a| a["alert"] == "resolved")));
}
