//! The agent never waits for its output: `tcpwait run --json` whose stdout is a pipe nobody
//! reads keeps tracking, answering `status` and alerting under a churn of loopback
//! connections, and counts exactly the alert lines it had to drop.
mod common;

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// A pipe: (read end, write end), with the pipe's buffer shrunk to one page so that a few
/// alert lines fill it.
fn small_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into a 2-element array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own.
    let size = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    assert_eq!(size, 4096, "pipe buffer of one page");
    (r, w)
}

/// Asks the agent for its status over the API socket (in process: the time measured is the
/// agent's, not a client process's start-up) and returns the report and how long it took.
fn timed_status(sock: &str) -> (Value, Duration) {
    use std::io::{BufRead as _, Write as _};
    let t = Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.write_all(b"\"status\"\n").expect("request");
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .expect("answer");
    let took = t.elapsed();
    (serde_json::from_str(&line).expect("status JSON"), took)
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn stalled_stdout_never_stalls_the_agent_and_drops_are_counted_exactly() {
    require_root();
    const LEAKERS: usize = 30;
    const CHURN: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let alert_file = dir.path().join("alerts.jsonl");
    let sock = api_socket("stall");
    let (pipe_r, pipe_w) = small_pipe();
    let pipe_r = std::fs::File::from(pipe_r);
    let mut child = Command::new(TCPWAIT)
        .args([
            "run",
            "--json",
            "--socket",
            &sock,
            "--metrics-listen",
            "",
            "--close-wait-age",
            "1s",
            "--close-wait-count",
            "1000",
            "--alert-file",
            alert_file.to_str().expect("utf-8"),
            // Two or three alert lines fit in the queue.
            "--test-stdout-queue-bytes",
            "2048",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::from(pipe_w))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpwait");
    let stderr = Lines::default();
    stderr.spawn_reader(child.stderr.take().expect("piped stderr"));
    let _kill = KillOnDrop(child.id());
    assert!(
        stderr.wait_for(AGENT_READY, Duration::from_secs(20)),
        "{:?}",
        stderr.snapshot()
    );

    // Churn: connections opened and closed as fast as one thread can.
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, made) = (stop.clone(), made.clone());
        std::thread::spawn(move || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            while made.load(Ordering::Relaxed) < CHURN && !stop.load(Ordering::Relaxed) {
                let c = std::net::TcpStream::connect(addr).expect("connect");
                let (s, _) = l.accept().expect("accept");
                drop((c, s));
                made.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Status answers within 1 s throughout, sampled every 50 ms from another thread.
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let sampler = {
        let (stop, slowest, sock) = (stop.clone(), slowest.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let (_, took) = timed_status(&sock);
                let mut s = slowest.lock().expect("lock");
                *s = (*s).max(took);
                n += 1;
                drop(s);
                std::thread::sleep(Duration::from_millis(50));
            }
            n
        })
    };

    // 30 processes each leak one socket while the churn runs: each fires once (1 s), then
    // each resolves once when it closes: 60 alert lines for a stdout nobody reads.
    assert!(wait_until(Duration::from_secs(10), || made
        .load(Ordering::Relaxed)
        > 5_000));
    let (mut srv, port) = server("tw-stall-srv", "127.0.0.1:0", LEAKERS);
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut leakers: Vec<Peer> = (0..LEAKERS)
        .map(|i| client(&format!("tw-stall{i}"), addr, 1).0)
        .collect();
    srv.expect_line("accepted");
    let leaked = Instant::now();
    let pids: Vec<u32> = leakers.iter().map(Peer::pid).collect();
    let firing = |v: &Value| {
        v["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| pids.iter().any(|p| a["pid"] == *p))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(3), || firing(&status(&sock)) == LEAKERS),
        "all {LEAKERS} alerts firing in status: {}",
        status(&sock)
    );
    let fired_after = leaked.elapsed();
    assert!(
        fired_after < Duration::from_millis(2500),
        "1 s alerts shown after {fired_after:?}"
    );
    for p in &mut leakers {
        p.send("close");
    }
    for p in &mut leakers {
        p.expect_line("closed");
    }
    assert!(
        wait_until(Duration::from_secs(5), || firing(&status(&sock)) == 0),
        "all resolved in status"
    );
    assert!(
        churn.join().is_ok(),
        "churn thread ran to {CHURN} connections"
    );
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler");
    let slowest = *slowest.lock().expect("lock");
    assert!(
        slowest < Duration::from_secs(1),
        "status took {slowest:?} at worst"
    );

    let end = status(&sock);
    let c = &end["counters"];
    let lost =
        ["lost_ring_full", "lost_recursion_misses", "malformed"].map(|k| c[k].as_u64().expect(k));
    let dropped = c["sink_dropped"]["stdout"].as_u64().expect("stdout drops");
    let transitions = c["transitions"].as_u64().expect("transitions");
    eprintln!(
        "stall: {} connections, {transitions} transitions, lost {lost:?}, {samples} status calls, \
         slowest {slowest:?}, alerts shown {fired_after:?} after the leak, {dropped} of {} \
         alert lines dropped",
        made.load(Ordering::Relaxed),
        2 * LEAKERS
    );
    assert_eq!(lost, [0, 0, 0], "transitions lost");
    assert!(
        transitions >= CHURN * 10,
        "{transitions} transitions seen for {CHURN} connections"
    );
    assert_eq!(c["sink_failed"]["stdout"], 0);

    assert!(dropped > 0, "the stalled pipe made the agent drop lines");

    // Now read what reached the pipe: with the drops, it is every alert change the agent
    // made, which the alert file (a sink with room to spare) holds. The agent watches the
    // whole host: other processes' alerts count too, on both sides.
    let printed = Lines::default();
    printed.spawn_reader(pipe_r);
    let mut last = (0, 0, 0);
    let exact = wait_until(Duration::from_secs(10), || {
        let dropped = status(&sock)["counters"]["sink_dropped"]["stdout"]
            .as_u64()
            .expect("stdout drops");
        let filed = std::fs::read_to_string(&alert_file)
            .expect("alert file")
            .lines()
            .count() as u64;
        last = (printed.snapshot().len() as u64, dropped, filed);
        last.0 + last.1 == last.2
    });
    assert!(
        exact,
        "printed + dropped = every alert change: (printed, dropped, filed) = {last:?}"
    );
    for l in printed.snapshot() {
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["alert"] == "firing" || v["alert"] == "resolved", "{l}");
    }
    // Our 30 leakers: each fired once and resolved once.
    let filed: Vec<(u64, String)> = std::fs::read_to_string(&alert_file)
        .expect("alert file")
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).expect("JSON");
            // A peer-scope alert (the churn's own TIME_WAIT pile-up) names no process.
            Some((v["pid"].as_u64()?, v["alert"].to_string()))
        })
        .filter(|(pid, _)| pids.iter().any(|p| u64::from(*p) == *pid))
        .collect();
    for pid in &pids {
        let mine: Vec<&str> = filed
            .iter()
            .filter(|(p, _)| *p == u64::from(*pid))
            .map(|(_, a)| a.as_str())
            .collect();
        assert_eq!(mine, ["\"firing\"", "\"resolved\""], "pid {pid}");
    }
    // SAFETY: SIGTERM to the child we started.
    unsafe { libc::kill(_kill.0 as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait tcpwait");
    assert_eq!(status.code(), Some(0), "{:?}", stderr.snapshot());
}

/// Kills the process on drop (a failed assertion must not leave the agent running).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill a pid we started; harmless if it already exited and was reaped by
        // `wait` (the test's last step), as no other process of ours reuses it this soon.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn stalled_stderr_never_stalls_the_agent_nor_its_exit() {
    require_root();
    let sock = api_socket("stall-stderr");
    let (_pipe_r, pipe_w) = small_pipe();
    let mut child = Command::new(TCPWAIT)
        .args(["run", "--json", "--socket", &sock, "--metrics-listen", ""])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(pipe_w))
        .spawn()
        .expect("start tcpwait");
    let kill = KillOnDrop(child.id());
    let answers = || {
        Command::new(TCPWAIT)
            .args(["status", "--json", "--timeout", "1s", "--socket", &sock])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(wait_until(Duration::from_secs(20), answers), "agent up");
    // Every SIGHUP logs a warning: a few fill the one-page pipe, the queue takes 1,024 more,
    // the rest are dropped and counted. The agent answers throughout.
    let mut slowest = Duration::ZERO;
    for i in 0..3_000 {
        // SAFETY: a signal to the agent we started.
        unsafe { libc::kill(kill.0 as i32, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(1));
        if i % 250 == 0 {
            let (_, took) = timed_status(&sock);
            slowest = slowest.max(took);
        }
    }
    let (v, took) = timed_status(&sock);
    slowest = slowest.max(took);
    let dropped = v["counters"]["sink_dropped"]["stderr"]
        .as_u64()
        .expect("stderr drops");
    let sent = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(kill.0 as i32, libc::SIGTERM) };
    let code = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s.code();
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "no exit with stderr stalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let exit_took = sent.elapsed();
    eprintln!(
        "stall-stderr: {dropped} log lines dropped, slowest status {slowest:?}, exit in \
         {exit_took:?}"
    );
    assert_eq!(code, Some(0));
    assert!(dropped > 0, "log lines dropped and counted");
    assert!(slowest < Duration::from_secs(1), "status took {slowest:?}");
    assert!(
        exit_took < Duration::from_secs(3),
        "exit took {exit_took:?}"
    );
}
