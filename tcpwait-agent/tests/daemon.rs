//! `tcpwait run` and `status`, on the real kernel with real processes.
//!
//! Kernel behaviour exercised (DESIGN.md, "attribution trap"): ESTABLISHED→CLOSE_WAIT runs in
//! softirq — on loopback in the *peer's* close() — so the on-CPU task is never the owner; the
//! owner comes from inet_diag (inode) and /proc/<pid>/fd.
mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn close_wait_leak_fires_for_the_holder_and_resolves() {
    require_root();
    let sock = api_socket("leak");
    let mut tw = daemon(&sock, &["--close-wait-age", "2"]);
    let (mut srv, port) = server("tw-server", "127.0.0.1:0", 5);
    let (mut cli, _) = client(
        "tw-leaky",
        format!("127.0.0.1:{port}").parse().expect("addr"),
        5,
    );
    srv.expect_line("accepted");
    let closed_at = Instant::now();

    let fired = wait_until(Duration::from_secs(5), || !alerts(&tw).is_empty());
    let fired_after = closed_at.elapsed();
    assert!(
        fired,
        "no alert; stdout {:?} stderr {:?}",
        tw.stdout.snapshot(),
        tw.stderr.snapshot()
    );
    assert!(
        fired_after >= Duration::from_secs(2) && fired_after <= Duration::from_secs(3),
        "fired {fired_after:?} after the server closed"
    );
    let a = &alerts(&tw)[0];
    assert_eq!(a["alert"], "firing");
    assert_eq!(a["rule"], "close_wait_leak");
    assert_eq!(a["pid"], cli.pid());
    assert_eq!(a["comm"], "tw-leaky");
    assert_eq!(a["count"], 5);
    assert_eq!(a["peers"][0]["addr"], "127.0.0.1");
    assert_eq!(a["peers"][0]["count"], 5);
    let age = a["oldest_age_s"].as_f64().expect("age");
    assert!((2.0..2.5).contains(&age), "oldest age at fire {age}");

    let st = status(&sock);
    let p = process_in(&st, cli.pid()).expect("client listed");
    assert_eq!(p["count"], 5);
    assert_eq!(p["comm"], "tw-leaky");
    assert_eq!(p["oldest_age_is_lower_bound"], false);
    assert_eq!(p["sockets"].as_array().expect("sockets").len(), 5);
    for s in p["sockets"].as_array().expect("sockets") {
        assert_eq!(s["remote"], format!("127.0.0.1:{port}"));
        // The peer's FIN takes one sequence number: Recv-Q is 1 until the owner reads EOF,
        // which a leaking client never does.
        assert_eq!(s["recv_q"], 1);
    }
    assert!(
        process_in(&st, srv.pid()).is_none(),
        "the server is never blamed"
    );
    let mine: Vec<&Value> = st["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter(|a| is_mine(a))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");

    cli.send("close");
    cli.expect_line("closed");
    let closed = Instant::now();
    let resolved = wait_until(Duration::from_secs(2), || alerts(&tw).len() >= 2);
    let resolved_after = closed.elapsed();
    assert!(resolved, "not resolved: {:?}", tw.stdout.snapshot());
    assert!(
        resolved_after <= Duration::from_secs(1),
        "resolved after {resolved_after:?}"
    );
    let all = alerts(&tw);
    assert_eq!(all.len(), 2, "exactly one firing, one resolved: {all:?}");
    assert_eq!(
        (all[1]["alert"].as_str(), &all[1]["pid"]),
        (Some("resolved"), &cli.pid().into())
    );
    assert!(all.iter().all(|a| a["pid"] != srv.pid()));
    assert!(process_in(&status(&sock), cli.pid()).is_none());
    assert_eq!(tw.stop(libc::SIGTERM), 0);
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn count_rule_fires_before_the_age_threshold() {
    require_root();
    let sock = api_socket("count");
    let tw = daemon(
        &sock,
        &["--close-wait-count", "10", "--close-wait-age", "60"],
    );
    let (_srv, cli) = leak("tw-many", 20);
    let closed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || !alerts(&tw).is_empty()),
        "no alert"
    );
    assert!(closed_at.elapsed() < Duration::from_secs(5));
    let a = &alerts(&tw)[0];
    assert_eq!(
        (&a["alert"], &a["pid"]),
        (&"firing".into(), &cli.pid().into())
    );
    assert!(a["count"].as_u64().expect("count") > 10, "{a}");
    assert!(a["oldest_age_s"].as_f64().expect("age") < 60.0);
    assert!(wait_until(Duration::from_secs(3), || {
        process_in(&status(&sock), cli.pid()).is_some_and(|p| p["count"] == 20)
    }));
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn sockets_that_predate_the_agent_are_listed_with_an_age_bound() {
    require_root();
    // Before the sockets exist: their real age is at most the time since this instant.
    let created = Instant::now();
    let (mut srv, port) = server("tw-server", "127.0.0.1:0", 3);
    let (cli, _) = client(
        "tw-old",
        format!("127.0.0.1:{port}").parse().expect("addr"),
        3,
    );
    srv.expect_line("accepted");
    // The CLOSE_WAIT sockets exist before the agent starts.
    assert!(wait_until(Duration::from_secs(2), || ss_close_wait_to(
        port
    ) == 3));
    let sock = api_socket("pre");
    let started = Instant::now();
    let _tw = daemon(&sock, &[]);
    // The agent started before this: the bound it reports is at least the time since then.
    let ready = Instant::now();
    let listed = wait_until(Duration::from_secs(3), || {
        process_in(&status(&sock), cli.pid()).is_some_and(|p| p["count"] == 3)
    });
    assert!(listed, "not listed within 3 s: {}", status(&sock));
    // Start-up (BTF parsed, programs loaded) takes seconds under the kernel matrix's software
    // emulation (`tcpwait.vm` on the guest's command line).
    let bound = Duration::from_secs(if under_emulation() { 30 } else { 4 });
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    let asked = ready.elapsed().as_secs_f64();
    let p = process_in(&status(&sock), cli.pid()).expect("listed");
    let real_at_most = created.elapsed().as_secs_f64();
    assert_eq!(p["comm"], "tw-old");
    assert_eq!(p["oldest_age_is_lower_bound"], true);
    // Ages are printed with millisecond precision.
    const MS: f64 = 0.001;
    for s in p["sockets"].as_array().expect("sockets") {
        assert_eq!(s["age_is_lower_bound"], true);
        let age = s["age_s"].as_f64().expect("age");
        assert!(
            age + MS >= asked,
            "bound {age} s below the agent's uptime {asked} s"
        );
        assert!(
            age <= real_at_most + MS,
            "bound {age} s above the real age (at most {real_at_most} s)"
        );
    }
}

/// CLOSE_WAIT sockets towards `port`, as `ss` sees them.
fn ss_close_wait_to(port: u16) -> usize {
    ss_close_wait()
        .iter()
        .filter(|(_, remote)| remote.ends_with(&format!(":{port}")))
        .count()
}

/// (local, remote) of every CLOSE_WAIT socket, from `ss -Htan state close-wait`.
fn ss_close_wait() -> Vec<(String, String)> {
    let out = std::process::Command::new("ss")
        .args(["-Htan", "state", "close-wait"])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[2].to_owned(), f[3].to_owned()))
        })
        .collect()
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_socket_inherited_across_fork_lists_both_holders() {
    require_root();
    let sock = api_socket("fork");
    // Reconcile every second: a holder's exit makes no transition while another process still
    // holds the socket, so only a snapshot can notice it.
    let _tw = daemon(&sock, &["--reconcile-interval", "1"]);
    let (mut srv, port) = server("tw-server", "127.0.0.1:0", 1);
    let mut forker = Peer::spawn("forker", "tw-forker", &[format!("127.0.0.1:{port}")]);
    let line = forker.expect_line("connected");
    let child: u32 = line
        .split_whitespace()
        .nth(2)
        .expect("child pid")
        .parse()
        .expect("pid");
    srv.expect_line("accepted");
    let both = wait_until(Duration::from_secs(3), || {
        let st = status(&sock);
        process_in(&st, forker.pid()).is_some_and(|p| p["count"] == 1)
            && process_in(&st, child).is_some_and(|p| p["count"] == 1)
    });
    assert!(both, "both holders expected: {}", status(&sock));
    let st = status(&sock);
    let (a, b) = (
        process_in(&st, forker.pid()).expect("parent"),
        process_in(&st, child).expect("child"),
    );
    assert_eq!(a["sockets"][0]["local"], b["sockets"][0]["local"]);
    assert_eq!(a["sockets"][0]["remote"], format!("127.0.0.1:{port}"));
    // The child exits (a zombie until the parent reaps it: it holds no fd either way); the
    // socket stays in CLOSE_WAIT, held by the parent alone.
    // SAFETY: kill with a pid this test's peer created.
    assert_eq!(unsafe { libc::kill(child as i32, libc::SIGKILL) }, 0);
    // Eight reconciliations: once (in some hundred runs) four were not enough, cause not
    // found; a slow /proc pass under load is the likeliest.
    let parent_only = wait_until(Duration::from_secs(8), || {
        let st = status(&sock);
        process_in(&st, forker.pid()).is_some_and(|p| p["count"] == 1)
            && process_in(&st, child).is_none()
    });
    assert!(
        parent_only,
        "the exited child is still listed: {}",
        status(&sock)
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn reconciliation_repairs_a_table_that_missed_every_event() {
    require_root();
    let sock = api_socket("reconcile");
    let _tw = daemon(
        &sock,
        &["--test-withhold-events", "--reconcile-interval", "1"],
    );
    let (mut srv, port) = server("tw-server", "127.0.0.1:0", 4);
    let (mut cli, _) = client(
        "tw-unseen",
        format!("127.0.0.1:{port}").parse().expect("addr"),
        4,
    );
    srv.expect_line("accepted");
    // ss sees this (the host's) network namespace; the agent sees every namespace.
    let host = netns::own_inode();
    let tracked = |st: &Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = st["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .flat_map(|p| p["sockets"].as_array().expect("sockets").clone())
            .chain(st["unowned"].as_array().expect("unowned").iter().cloned())
            // The default rules also watch FIN_WAIT2: the server's closed ends are listed.
            .filter(|s| s["netns"] == host && s["state"] == "CLOSE_WAIT")
            .map(|s| {
                (
                    s["local"].as_str().expect("local").to_owned(),
                    s["remote"].as_str().expect("remote").to_owned(),
                )
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let matches = wait_until(Duration::from_secs(5), || {
        let mut truth = ss_close_wait();
        truth.sort();
        ss_close_wait_to(port) == 4 && tracked(&status(&sock)) == truth
    });
    assert!(
        matches,
        "table {:?} vs ss {:?}",
        tracked(&status(&sock)),
        ss_close_wait()
    );
    let st = status(&sock);
    assert_eq!(
        st["counters"]["transitions"].as_u64().map(|n| n > 0),
        Some(true)
    );
    assert!(st["counters"]["reconcile_added"].as_u64().expect("added") >= 4);
    assert_eq!(process_in(&st, cli.pid()).expect("owner found")["count"], 4);

    cli.send("close");
    cli.expect_line("closed");
    let gone = wait_until(Duration::from_secs(5), || {
        process_in(&status(&sock), cli.pid()).is_none()
    });
    assert!(gone, "closed sockets still tracked: {}", status(&sock));
    assert!(
        status(&sock)["counters"]["reconcile_removed"]
            .as_u64()
            .expect("removed")
            >= 4
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_burst_of_2000_close_wait_sockets_is_tracked_and_attributed() {
    require_root();
    const N: usize = 2000;
    let sock = api_socket("burst");
    let _tw = daemon(&sock, &[]);
    let (_srv, cli) = leak("tw-burst", N);
    let all = wait_until(Duration::from_secs(10), || {
        process_in(&status(&sock), cli.pid()).is_some_and(|p| p["count"] == N)
    });
    assert!(all, "{}", status(&sock)["processes"]);
    let st = status(&sock);
    let c = &st["counters"];
    assert_eq!(
        (&c["lost_ring_full"], &c["malformed"], &c["table_overflow"]),
        (&0.into(), &0.into(), &0.into())
    );
    // The classic tracepoint's kernel guard can skip a transition that nests inside the
    // program on the same CPU (recursion miss, issue 5). Such a loss is counted, and the
    // socket comes back through reconciliation with a lower-bound age; none goes unseen.
    // (Counted host-wide: the agent also bootstraps whatever else holds CLOSE_WAIT sockets
    // on this machine, in any namespace, so the test looks at its own client's sockets.)
    let misses = c["lost_recursion_misses"].as_u64();
    // Unknown (null), not 0, exactly where the kernel keeps no count (before 5.12).
    assert_eq!(misses.is_some(), kernel_counts_recursion(), "{c}");
    let added = c["reconcile_added"].as_u64().expect("repairs")
        + c["reconcile_corrected"].as_u64().expect("repairs");
    let p = process_in(&st, cli.pid()).expect("listed");
    assert_eq!(p["sockets"].as_array().expect("sockets").len(), N);
    let bounded = p["sockets"]
        .as_array()
        .expect("sockets")
        .iter()
        .filter(|s| s["age_is_lower_bound"] == true)
        .count() as u64;
    eprintln!(
        "burst: {misses:?} recursion misses, {added} sockets added or corrected by \
         reconciliation host-wide, {bounded} of the client's with a lower-bound age"
    );
    if misses == Some(0) {
        assert_eq!(bounded, 0, "every socket came from its own transition");
    }
    assert!(
        bounded <= added,
        "only repaired sockets have a lower-bound age"
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_loss_count_the_kernel_cannot_give_is_unknown_not_0() {
    // `recursion_misses` in a BPF program's fdinfo exists from Linux 5.12. Before, `status`
    // says `unknown` (`null` in JSON) and /metrics has no `recursion_miss` series; from 5.12 on
    // they are numbers like the other loss counts.
    require_root();
    let sock = api_socket("unknown");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // `daemon()` turns metrics off; this one serves them, on a port of its own.
    let _tw = Tcpwait::start(
        &[
            "run",
            "--json",
            "--socket",
            &sock,
            "--metrics-listen",
            &listen,
        ],
        AGENT_READY,
    );
    let counts = kernel_counts_recursion();
    let c = &status(&sock)["counters"];
    assert_eq!(c["lost_recursion_misses"].is_u64(), counts, "{c}");
    assert_eq!(c["lost_recursion_misses"].is_null(), !counts, "{c}");
    let text = std::process::Command::new(TCPWAIT)
        .args(["status", "--socket", &sock])
        .output()
        .expect("run tcpwait status");
    let first = String::from_utf8_lossy(&text.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let expected = if counts {
        " recursion 0 "
    } else {
        " recursion unknown "
    };
    assert!(first.contains(expected), "{first}");
    let mut conn = std::net::TcpStream::connect(&listen).expect("metrics endpoint");
    use std::io::{Read as _, Write as _};
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut body = String::new();
    conn.read_to_string(&mut body).expect("response");
    let series = "tcpwait_events_lost_total{reason=\"recursion_miss\"}";
    assert_eq!(body.contains(series), counts, "{body}");
    assert!(
        body.contains("tcpwait_events_lost_total{reason=\"ring_full\"} 0"),
        "{body}"
    );
}
