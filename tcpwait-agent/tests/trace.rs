//! `tcpwait trace` on the real kernel, with real processes holding real sockets.
//!
//! Kernel behaviour exercised (DESIGN.md): one loopback connection makes exactly 10
//! transitions — client CLOSE→SYN_SENT→ESTABLISHED→CLOSE_WAIT→LAST_ACK→CLOSE when the server
//! closes first, accepted socket LISTEN→SYN_RECV→ESTABLISHED→FIN_WAIT1→FIN_WAIT2→CLOSE — plus 2
//! per listener (CLOSE→LISTEN→CLOSE). TIME_WAIT is never a transition.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

const READY: &str = "tracing TCP state transitions";

#[path = "trace/namespaces.rs"]
mod namespaces;

/// A server closes first; a separate client process keeps its socket open in CLOSE_WAIT, then
/// closes it.
fn close_wait_lifecycle(ip: &str, family: u64) {
    require_root();
    // Only this test's port: on a shared host another socket can take a freed socket's
    // address during the test, and records are grouped by address below.
    let port = free_port();
    let mut tw = Tcpwait::start(&["trace", "--json", "--port", &port.to_string()], READY);
    let (mut srv, got) = server("tw-server", &format!("{ip}:{port}"), 1);
    assert_eq!(got, port);
    let addr: SocketAddr = format!("{ip}:{port}")
        .replace("::1:", "[::1]:")
        .parse()
        .expect("addr");
    let (mut cli, cports) = client("tw-client", addr, 1);
    let cport = cports[0];
    srv.expect_line("accepted");

    let both = wait_until(Duration::from_secs(5), || {
        let all = tw.json();
        find(&all, cport, port, "ESTABLISHED>CLOSE_WAIT").is_some()
            && find(&all, port, cport, "FIN_WAIT1>FIN_WAIT2").is_some()
    });
    assert!(
        both,
        "no CLOSE_WAIT / FIN_WAIT2 transitions: {:?}",
        tw.stdout.snapshot()
    );

    cli.send("close");
    cli.expect_line("closed");
    let closed = wait_until(Duration::from_secs(5), || {
        find(&tw.json(), cport, port, "LAST_ACK>CLOSE").is_some()
            && find(&tw.json(), port, cport, "FIN_WAIT2>CLOSE").is_some()
    });
    assert!(closed, "client close not seen: {:?}", tw.stdout.snapshot());
    assert_eq!(tw.stop(libc::SIGINT), 0);

    let all = tw.json();
    let cw = find(&all, cport, port, "ESTABLISHED>CLOSE_WAIT").expect("seen above");
    let client_sock = records_of_sock(&all, &cw);
    assert_eq!(
        edges(&client_sock),
        [
            "CLOSE>SYN_SENT",
            "SYN_SENT>ESTABLISHED",
            "ESTABLISHED>CLOSE_WAIT",
            "CLOSE_WAIT>LAST_ACK",
            "LAST_ACK>CLOSE"
        ]
    );
    for r in &client_sock[1..] {
        assert_eq!(
            (r["saddr"].as_str(), r["daddr"].as_str()),
            (Some(ip), Some(ip))
        );
        assert_eq!(
            (&r["sport"], &r["dport"], &r["family"]),
            (&cport.into(), &port.into(), &family.into())
        );
    }
    // connect() and close() run in the owner's context; the entry into CLOSE_WAIT does not.
    let last_ack = &client_sock[3];
    assert_eq!(last_ack["pid"], cli.pid());
    assert_eq!(last_ack["comm"], "tw-client");
    assert_eq!(client_sock[0]["pid"], cli.pid());
    // Time in CLOSE_WAIT is measured from the socket's entry into it.
    assert!(last_ack["ms_in_old"].as_f64().expect("entry seen") > 0.0);

    let fw2 = find(&all, port, cport, "FIN_WAIT1>FIN_WAIT2").expect("seen above");
    let server_sock = records_of_sock(&all, &fw2);
    assert_eq!(
        edges(&server_sock),
        [
            "LISTEN>SYN_RECV",
            "SYN_RECV>ESTABLISHED",
            "ESTABLISHED>FIN_WAIT1",
            "FIN_WAIT1>FIN_WAIT2",
            "FIN_WAIT2>CLOSE"
        ]
    );
    for (i, r) in server_sock.iter().enumerate() {
        // Before Linux 6.15 (a3a128f611a9, "inet: consolidate inet_csk_clone_lock()") the
        // kernel moves the new socket to SYN_RECV before it copies the peer's address and port
        // into it: that one transition carries the listener's tuple, peer unset.
        let (peer, peer_port) = if i == 0 && !kernel_sets_peer_before_syn_recv() {
            (if family == 4 { "0.0.0.0" } else { "::" }, 0)
        } else {
            (ip, cport)
        };
        assert_eq!(
            (r["saddr"].as_str(), r["daddr"].as_str()),
            (Some(ip), Some(peer)),
            "{r}"
        );
        assert_eq!(
            (&r["sport"], &r["dport"], &r["family"]),
            (&port.into(), &peer_port.into(), &family.into())
        );
    }
    let summary = tw.stderr.snapshot().join("\n");
    assert!(summary.contains(no_loss_summary()), "{summary}");
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn close_wait_lifecycle_ipv4() {
    close_wait_lifecycle("127.0.0.1", 4);
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn close_wait_lifecycle_ipv6() {
    close_wait_lifecycle("::1", 6);
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn every_transition_of_n_connections_is_captured() {
    require_root();
    const N: usize = 200;
    let port = free_port();
    let mut tw = Tcpwait::start(&["trace", "--json", "--port", &port.to_string()], READY);
    assert_eq!(loopback_connections(port, N).0, port);
    let expected = 10 * N + 2;
    let all_seen = wait_until(Duration::from_secs(10), || {
        tw.stdout.snapshot().len() >= expected
    });
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let summary = tw.stderr.snapshot().join("\n");
    // Every kernel of the matrix (5.10 and later) has BTF and tp_btf: the main program must
    // not have fallen back.
    assert!(summary.contains(expected_programs()), "{summary}");
    assert!(
        all_seen,
        "saw {} of {expected}; {summary}",
        tw.stdout.snapshot().len()
    );

    let all = tw.json();
    // Exactly 10 per connection + 2 for the listener, but for the rescue program's known
    // duplicate (an exact copy, counted in the summary's rescues).
    edges_exact(&all, N, expected, &summary);
    let count = |edge: &str| edges(&all).iter().filter(|e| *e == edge).count();
    assert_eq!((count("CLOSE>LISTEN"), count("LISTEN>CLOSE")), (1, 1));
    assert!(
        summary.contains(&format!(", {expected} printed,{}", no_loss_summary())),
        "{summary}"
    );
    // Batched per CPU and put back in time order, none late.
    assert!(
        summary.contains(", 0 out of order; accounting: "),
        "{summary}"
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn the_btf_and_rescue_programs_decode_struct_sock_like_the_classic_tracepoint() {
    // The BTF-tracepoint (main) and raw-tracepoint (rescue) programs read `struct sock` at
    // offsets from the running kernel's BTF; the classic tracepoint's record is the kernel's
    // own rendering of the same fields. With --test-compare all three (two where the kernel
    // has no rescue program) record every transition: each must appear that many times,
    // identical.
    require_root();
    const N: usize = 20;
    let mut tw = Tcpwait::start(&["trace", "--json", "--test-compare"], READY);
    let mut ports = Vec::new();
    for ip in ["127.0.0.1", "::1"] {
        let (mut srv, port) = server("tw-server", &format!("{ip}:0"), N);
        ports.push(serde_json::Value::from(port));
        let addr: SocketAddr = format!("{ip}:{port}")
            .replace("::1:", "[::1]:")
            .parse()
            .expect("addr");
        let (mut cli, _) = client("tw-client", addr, N);
        srv.expect_line("accepted");
        cli.send("close");
        cli.expect_line("closed");
    }
    let copies = compared_programs(&tw);
    // Not asserted: a nested transition reaches only the rescue program, so one short of
    // `copies` each is legitimate (the counts below decide); it only costs the wait.
    let _ = wait_until(Duration::from_secs(5), || {
        tw.stdout.snapshot().len() >= copies * 2 * 10 * N
    });
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let key = |r: &Value| untimed(r).to_string();
    // Every program reads the namespace (the classic one from `skaddr`, through the helper):
    // all of this test's sockets are in the host's, so a wrong or unread one cannot pass as
    // a match of three nulls.
    let host = netns_inode("/proc/self/ns/net");
    let all = tw.json();
    let of_ours: Vec<&Value> = all
        .iter()
        .filter(|r| ports.contains(&r["sport"]) || ports.contains(&r["dport"]))
        .collect();
    // At least one copy of each transition (the triples are counted below).
    assert!(of_ours.len() >= 2 * 10 * N, "{}", of_ours.len());
    for r in of_ours {
        assert_eq!(r["netns"], host, "{r}");
    }
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for r in tw.json() {
        // This test's connections only: on a shared host, others' transitions in flight when
        // the trace stops reach one program and not the others.
        if ports.contains(&r["sport"]) || ports.contains(&r["dport"]) {
            *counts.entry(key(&r)).or_default() += 1;
        }
    }
    let ours: Vec<(&String, &usize)> = counts
        .iter()
        .filter(|(k, _)| k.contains("\"family\":4") || k.contains("\"family\":6"))
        .collect();
    // Before Linux 6.15 an accepted socket's LISTEN → SYN_RECV carries no peer (see
    // `kernel_sets_peer_before_syn_recv`): two of them at one reused socket address make the
    // same key, so such a key stands for n / `copies` transitions.
    let merged = |k: &str| {
        !kernel_sets_peer_before_syn_recv()
            && k.contains("\"old\":\"LISTEN\"")
            && k.contains("\"dport\":0")
    };
    let (mut transitions, mut triples) = (0, 0);
    let mut over = Vec::new();
    // Keys short of `copies`, by what the tracepoint's arguments give every program alike
    // (socket address, old and new state).
    let mut short = std::collections::HashMap::<String, Vec<(&String, usize)>>::new();
    for (k, n) in &ours {
        if merged(k) {
            transitions += n.div_ceil(copies);
            triples += *n / copies;
        } else {
            transitions += 1;
            triples += usize::from(**n == copies);
            if **n > copies {
                over.push((k, n));
            }
            if **n < copies {
                let r: Value = serde_json::from_str(k).expect("a key is a record");
                let args = format!("{} {} {}", r["skaddr"], r["old"], r["new"]);
                short.entry(args).or_default().push((k, **n));
            }
        }
    }
    assert!(
        over.is_empty(),
        "no transition recorded more than {copies} times: {over:?}"
    );
    assert!(
        transitions >= 2 * 10 * N,
        "{transitions} distinct transitions"
    );
    // A transition can be missing from a program: a nested one the kernel skipped it for
    // (the rescue program records it alone), common under emulation (CI saw 24 of 404 on
    // 6.12 under TCG, where the slow classic program is often interrupted). A decoding
    // difference looks different: one transition under two keys, with the same socket
    // address and states, its copies shared between them.
    let split: Vec<_> = short
        .values()
        .filter(|keys| keys.len() > 1 && keys.iter().map(|(_, n)| n).sum::<usize>() <= copies)
        .collect();
    assert!(
        split.is_empty(),
        "decoded differently by the programs: {split:?} ({triples} triples of {transitions} \
         transitions)"
    );
    // Skips are rare even so; a program that dropped a whole kind of transition (a family,
    // a state) leaves short keys and no split, and this catches it.
    assert!(
        triples * 10 >= transitions * 9,
        "{triples} triples of {transitions} transitions: more short than nesting explains"
    );
    eprintln!(
        "compare: {triples} of {transitions} transitions recorded by all {copies} programs, \
         the others by fewer (skipped as nested)"
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_loopback_stress_loses_nothing_and_duplicates_nothing() {
    // Four client threads connect and close as fast as they can against one listener that
    // closes first, so transitions run in softirq while the program already runs on the same
    // CPU (nested transitions: the main program skipped for them and the rescue program
    // recording them, or, on kernels without the per-program guard, the main program nested in
    // itself). Whatever the kernel does, every transition must be printed exactly once.
    require_root();
    const THREADS: usize = 4;
    const PER_THREAD: usize = 1000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let mut tw = Tcpwait::start(&["trace", "--json", "--port", &port.to_string()], READY);
    let n = THREADS * PER_THREAD;
    stress_connections(port, THREADS, PER_THREAD);
    let expected = 10 * n + 2;
    let all_seen = wait_until(Duration::from_secs(20), || {
        tw.stdout.snapshot().len() >= expected
    });
    // Anything late or duplicated would arrive in this second.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let summary = tw.stderr.snapshot().join("\n");
    assert!(all_seen, "saw {}; {summary}", tw.stdout.snapshot().len());
    let all = tw.json();
    // n of each edge: none lost, none twice (the rescue program records only skipped ones).
    let extra = edges_exact(&all, n, expected, &summary);
    let printed = expected + extra;
    assert!(
        summary.contains(&format!(", {printed} printed,{}", no_loss_summary())),
        "{summary}"
    );
    eprintln!(
        "stress: {extra} duplicates; {}",
        summary.lines().last().unwrap_or_default()
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn without_kernel_btf_the_classic_tracepoint_captures_every_transition() {
    // A kernel built without BTF (no /sys/kernel/btf/vmlinux): the main program falls back to
    // the classic tracepoint, which reads the kernel's own trace record; no rescue program
    // (it reads `struct sock` at BTF offsets) and no batching (the flush program stages for
    // the BTF program only). Every kernel of the matrix has BTF, so the test takes it away.
    require_root();
    const N: usize = 100;
    let port = free_port();
    let mut tw = Tcpwait::start_with_env(
        &["trace", "--json", "--port", &port.to_string()],
        &[("TCPWAIT_KERNEL_BTF", "/nonexistent/vmlinux")],
        READY,
    );
    assert_eq!(loopback_connections(port, N).0, port);
    let expected = 10 * N + 2;
    let all_seen = wait_until(Duration::from_secs(10), || {
        tw.stdout.snapshot().len() >= expected
    });
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let summary = tw.stderr.snapshot().join("\n");
    assert!(
        summary.contains(
            "(sock:inet_sock_set_state, classic tracepoint, no rescue of nested transitions; \
             aborts not recorded)"
        ),
        "{summary}"
    );
    assert!(
        summary.contains("no kernel BTF: transitions the kernel skips as nested are "),
        "{summary}"
    );
    // The classic tracepoint's guard counts what it skips from Linux 6.7 (dd8657894c11):
    // before, the count is unknown, not 0. Without the rescue program a transition nested in
    // the program on its CPU is skipped (rarely on the host, often under emulation): counted,
    // printed + counted == expected exactly (host 6.18 and 6.12 in the matrix).
    let counted = kernel_version() >= (6, 7);
    let printed = tw.json().len();
    if !counted {
        // Skipped and uncounted: CI saw 24 and 22 of 1,002 on 5.10 and 6.1 under emulation
        // with three guests side by side, and none on their own. Before 6.7 the classic
        // tracepoint also skips its program while any BPF syscall on that CPU holds the
        // kernel's `bpf_prog_active` (the agent's own reads of its counters among them). What is printed is what the
        // agent saw, nothing is printed twice or beyond the workload's, and the summary says
        // that nested transitions go uncounted; a fallback that dropped whole kinds of
        // transitions (a family, a state) would still fail the bound.
        assert!(
            printed <= expected && printed * 10 >= expected * 9,
            "printed {printed} of {expected}; {summary}"
        );
        assert!(
            summary.contains(&format!(
                "tcpwait: {printed} transitions seen, {printed} printed, at least 0 lost \
                 (ring buffer full: 0, kernel recursion misses: unknown, malformed: 0)"
            )) && summary.contains("nested transitions lost uncounted"),
            "{summary}"
        );
        return;
    }
    // The transitions' line (the resets' line before it has counts of its own).
    let misses: usize = summary
        .lines()
        .find(|l| l.contains(" transitions seen"))
        .and_then(|l| l.split("kernel recursion misses: ").nth(1))
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("the summary counts recursion misses");
    assert!(
        all_seen || misses > 0,
        "saw {}; {summary}",
        tw.stdout.snapshot().len()
    );
    assert_eq!(printed + misses, expected, "{summary}");
    if misses == 0 {
        assert!(
            summary.contains(&format!(
                ", {expected} printed,{}",
                no_loss_summary_counted(counted)
            )),
            "{summary}"
        );
    } else {
        assert!(
            summary.contains(&format!(
                ", {printed} printed, {misses} lost (ring buffer full: 0, kernel recursion \
                 misses: {misses}, malformed: 0)"
            )),
            "{summary}"
        );
    }
}

/// How many programs record each transition under `--test-compare`: the BTF, the classic
/// and the rescue program, or two where the kernel has no rescue program (before 5.11; the
/// start-up line says "no rescue").
fn compared_programs(tw: &Tcpwait) -> usize {
    if tw.stderr.snapshot().iter().any(|l| l.contains("no rescue")) {
        2
    } else {
        3
    }
}
