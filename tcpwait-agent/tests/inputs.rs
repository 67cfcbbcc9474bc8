//! Unbounded inputs, bounded: the configuration file (a FIFO, a device, a huge file), the API
//! request line, and `status`/`tail` against an agent that does not answer.
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// Runs `tcpwait <args>`, killed if it takes over 10 s: (exit code, stderr, time taken).
fn bounded(args: &[&str]) -> (i32, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(TCPWAIT)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tcpwait");
    let stderr = Lines::default();
    stderr.spawn_reader(child.stderr.take().expect("stderr"));
    let mut code = None;
    wait_until(Duration::from_secs(10), || {
        code = child
            .try_wait()
            .expect("wait")
            .map(|s| s.code().unwrap_or(-1));
        code.is_some()
    });
    let took = started.elapsed();
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tcpwait {args:?} hung");
    }
    std::thread::sleep(Duration::from_millis(50));
    (code.expect("exited"), stderr.snapshot().join("\n"), took)
}

#[test]
fn a_config_that_is_not_a_small_regular_file_is_refused_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "#".repeat(2 << 20)).expect("write");
    for (path, why) in [
        (
            fifo.to_str().expect("utf-8"),
            "not a regular file: give the path of a TOML file".to_owned(),
        ),
        (
            "/dev/zero",
            "not a regular file: give the path of a TOML file".to_owned(),
        ),
        (
            big.to_str().expect("utf-8"),
            "2097152 bytes is over the 1048576-byte limit of a configuration file".to_owned(),
        ),
    ] {
        for args in [
            &["config", "--check", path][..],
            &["run", "--config", path][..],
        ] {
            let (code, stderr, _) = bounded(args);
            assert_eq!(code, 2, "{args:?}: {stderr}");
            assert_eq!(
                stderr,
                format!("tcpwait: {path}: cannot read: {why}"),
                "{args:?}"
            );
        }
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn status_and_tail_give_up_on_a_stopped_agent_with_one_line() {
    require_root();
    let sock = api_socket("stopped");
    let tw = daemon(&sock, &[]);
    let pid = tw.child.id() as i32;
    // SAFETY: signals to the agent we started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let results: Vec<_> = [
        &["status", "--timeout", "1s", "--socket", &sock][..],
        &["tail", "--timeout", "1s", "--socket", &sock][..],
    ]
    .iter()
    .map(|args| bounded(args))
    .collect();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for (code, stderr, took) in results {
        assert_eq!(code, 1, "{stderr}");
        assert_eq!(
            stderr,
            format!(
                "tcpwait: the tcpwait daemon at {sock} did not answer within 1s: it may be \
                 stopped (SIGSTOP) or overloaded; check it with `systemctl status tcpwait` or \
                 pass a longer --timeout"
            )
        );
        assert!(took < Duration::from_secs(3), "gave up after {took:?}");
    }
    assert!(
        status(&sock)["processes"].is_array(),
        "answers once resumed"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_huge_request_line_is_refused_without_being_read_whole() {
    require_root();
    let sock = api_socket("hugereq");
    let tw = daemon(&sock, &[]);
    let before = rss_kib(tw.child.id());
    let stream = UnixStream::connect(&sock).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let writer = {
        let mut w = stream.try_clone().expect("clone");
        std::thread::spawn(move || {
            let chunk = vec![b'a'; 1 << 20];
            let mut sent = 0usize;
            // 200 MiB, no newline; the agent stops reading and closes long before.
            for _ in 0..200 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        })
    };
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .expect("an answer");
    let sent = writer.join().expect("writer");
    let after = rss_kib(tw.child.id());
    eprintln!("hugereq: {sent} bytes sent before the agent closed, RSS {before} -> {after} KiB");
    assert_eq!(answer, "{\"error\":\"request line over 65536 bytes\"}\n");
    assert!(sent < 200 << 20, "the agent closed the connection early");
    assert!(
        after < before + 4096,
        "RSS grew from {before} to {after} KiB"
    );
    assert!(status(&sock)["processes"].is_array());
}

#[test]
fn config_check_refuses_a_bad_url_and_a_directory_as_the_alert_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, line) in [
        (
            "[webhook]\nurl = \"http://exa mple\"\n".to_owned(),
            "webhook.url: \"http://exa mple\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable".to_owned(),
        ),
        (
            format!("[alert_file]\npath = {:?}\n", dir.path().to_str().expect("utf-8")),
            format!(
                "alert_file.path: \"{}\" is a directory: give the path of a file",
                dir.path().display()
            ),
        ),
    ] {
        let path = dir.path().join("tcpwait.toml");
        std::fs::write(&path, &text).expect("write");
        let p = path.to_str().expect("utf-8");
        let (code, stderr, _) = bounded(&["config", "--check", p]);
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr, format!("tcpwait: {p}: {line}"));
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn status_clients_that_never_read_pin_bounded_memory_and_are_dropped() {
    require_root();
    const SOCKETS: usize = 3_000;
    const CLIENTS: usize = 300;
    let sock = api_socket("noread");
    let tw = daemon(&sock, &[]);
    let (_srv, cli) = leak("tw-noread", SOCKETS);
    assert!(
        wait_until(Duration::from_secs(10), || process_in(
            &status(&sock),
            cli.pid()
        )
        .is_some_and(|p| p["count"] == SOCKETS)),
        "the {SOCKETS} sockets are listed"
    );
    let answer = Command::new(TCPWAIT)
        .args(["status", "--json", "--socket", &sock])
        .output()
        .expect("status")
        .stdout
        .len();
    let before = rss_kib(tw.child.id());
    // Clients that ask for the (large) status answer and never read it.
    let idle: Vec<UnixStream> = (0..CLIENTS)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).expect("connect");
            s.write_all(b"\"status\"\n").expect("request");
            s
        })
        .collect();
    let mut peak = before;
    wait_until(Duration::from_secs(4), || {
        peak = peak.max(rss_kib(tw.child.id()));
        false
    });
    // The write timeout (10 s) drops them; then status answers at once again.
    std::thread::sleep(Duration::from_secs(9));
    let started = Instant::now();
    let ok = wait_until(Duration::from_secs(5), || {
        Command::new(TCPWAIT)
            .args(["status", "--json", "--socket", &sock])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let recovered = started.elapsed();
    drop(idle);
    eprintln!(
        "noread: answer {answer} bytes, RSS {before} KiB, peak {peak} KiB with {CLIENTS} \
         non-reading clients, status again after {recovered:?}"
    );
    assert!(ok, "status answers once the non-readers are dropped");
    // At most 32 answers (STATUS_IN_FLIGHT) pinned, plus slack; 300 would be ~135 MB here.
    let bound_kib = 32 * (answer as u64 / 1024) * 2 + 16 * 1024;
    assert!(
        peak < before + bound_kib,
        "RSS grew from {before} to {peak} KiB (bound {bound_kib} KiB over)"
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_refused_request_is_reported_in_the_agents_words() {
    require_root();
    let sock = api_socket("refused");
    let _tw = daemon(&sock, &[]);
    // Fill every API slot with clients that send nothing (each times out after 5 s).
    let idle: Vec<UnixStream> = (0..256)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    let (code, stderr, _) = bounded(&["status", "--socket", &sock]);
    drop(idle);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "tcpwait: the tcpwait daemon at {sock} refused the request: too many clients (256); \
             try again"
        )
    );
}
