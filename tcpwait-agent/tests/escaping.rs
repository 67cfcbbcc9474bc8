//! A process can name itself with escape sequences, bidi overrides and line separators; no
//! output of the agent shows them raw: the status text, status JSON, alert lines and metric
//! label values all carry them escaped.
mod common;

use std::{
    io::{Read as _, Write as _},
    process::Command,
    time::Duration,
};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// ESC [31m, BEL, a, RIGHT-TO-LEFT OVERRIDE, b, LINE SEPARATOR: 14 bytes, under the 15 of a
/// comm.
const EVIL: &str = "\u{1b}[31m\u{7}a\u{202e}b\u{2028}";
const ESCAPED: &str = "\\x1b[31m\\x07a\\u{202e}b\\u{2028}";

fn raw_bad(s: &str) -> Vec<char> {
    s.chars()
        .filter(|c| {
            (c.is_control() && *c != '\n') || matches!(c, '\u{202e}' | '\u{2028}' | '\u{7}')
        })
        .collect()
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_hostile_process_name_is_escaped_in_every_output() {
    require_root();
    let sock = api_socket("escaping");
    let tw = Tcpwait::start(
        &[
            "run",
            "--socket",
            &sock,
            "--metrics-listen",
            "127.0.0.1:0",
            "--close-wait-count",
            "1",
        ],
        AGENT_READY,
    );
    let ready = tw
        .stderr
        .snapshot()
        .into_iter()
        .find(|l| l.contains(AGENT_READY))
        .expect("ready line");
    let port: u16 = ready
        .split("metrics at http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("metrics port");
    let (_srv, cli) = leak(EVIL, 2);
    assert!(
        wait_until(Duration::from_secs(5), || tw
            .stdout
            .snapshot()
            .iter()
            .any(|l| l.contains(&format!("pid={}", cli.pid())))),
        "alert line"
    );

    // Alert line (text).
    let alert = tw
        .stdout
        .snapshot()
        .into_iter()
        .find(|l| l.contains(&format!("pid={}", cli.pid())))
        .expect("alert");
    assert!(alert.contains(&format!("comm=\"{ESCAPED}\"")), "{alert}");
    assert_eq!(raw_bad(&alert), vec![], "{alert:?}");

    // Status, text and JSON.
    let text = Command::new(TCPWAIT)
        .args(["status", "--socket", &sock])
        .output()
        .expect("status");
    let text = String::from_utf8(text.stdout).expect("utf-8");
    assert!(text.contains(ESCAPED), "{text}");
    assert_eq!(raw_bad(&text), vec![], "{text:?}");
    let json = Command::new(TCPWAIT)
        .args(["status", "--json", "--socket", &sock])
        .output()
        .expect("status --json");
    let json = String::from_utf8(json.stdout).expect("utf-8");
    assert_eq!(raw_bad(&json), vec![], "{json:?}");
    assert!(
        json.contains("\\u202e") && json.contains("\\u2028"),
        "{json}"
    );
    let v: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(process_in(&v, cli.pid()).expect("listed")["comm"], EVIL);

    // Metric label values.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics");
    write!(s, "GET /metrics HTTP/1.1\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let body = answer.split_once("\r\n\r\n").expect("HTTP head").1;
    let series = body
        .lines()
        .find(|l| {
            l.starts_with("tcpwait_process_close_wait_sockets{")
                && l.contains(&format!("pid=\"{}\"", cli.pid()))
        })
        .unwrap_or_else(|| panic!("no series for the leaker in\n{body}"));
    // The exposition escapes the backslashes of the escaped text once more.
    assert!(
        series.contains("comm=\"\\\\x1b[31m\\\\x07a\\\\u{202e}b\\\\u{2028}\""),
        "{series}"
    );
    assert_eq!(raw_bad(body), vec![], "{series:?}");
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn log_lines_to_a_pipe_carry_no_colour_codes() {
    // Colour is for a person at a terminal; a log file, a pipe or a container runtime's log
    // (`kubectl logs`) would keep the escape codes raw. stderr is a pipe here.
    require_root();
    let sock = api_socket("escaping-log");
    let mut tw = Tcpwait::start_with_env(
        &["run", "--socket", &sock, "--metrics-listen", ""],
        &[("TCPWAIT_LOG", "info")],
        AGENT_READY,
    );
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let log = tw.stderr.snapshot();
    // The structured line that tracing writes at a stop, plain.
    let stopping = log
        .iter()
        .find(|l| l.contains("stopping"))
        .unwrap_or_else(|| panic!("no log line at the stop in {log:?}"));
    assert!(
        stopping.contains(" INFO stopping signal=\"SIGINT\""),
        "{stopping:?}"
    );
    let raw: Vec<&String> = log.iter().filter(|l| !raw_bad(l).is_empty()).collect();
    assert_eq!(raw, Vec::<&String>::new());
}
