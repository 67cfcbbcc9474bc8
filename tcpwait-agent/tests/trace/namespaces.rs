//! Each transition's network namespace: read from the socket in every namespace at once, and
//! `null` (said at start-up) where the kernel's BTF gives no offsets for it.
use std::time::Duration;

use super::{READY, common::*, compared_programs};

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn every_transition_carries_its_sockets_network_namespace() {
    // The namespace of a socket is `sk->__sk_common.skc_net.net->ns.inum` (DESIGN.md): the
    // inode number of /proc/<pid>/ns/net of a process inside it. One connection runs inside a
    // fresh namespace, one in the host's, at the same time, both on 127.0.0.1 (each namespace
    // has its own loopback).
    require_root();
    let ns = NetNs::new("trace");
    let inside = ns.inode();
    let host = netns_inode("/proc/self/ns/net");
    assert_ne!(inside, host, "a fresh namespace");
    let mut tw = Tcpwait::start(&["trace", "--json"], READY);
    let ns_path = ns.path().to_string_lossy().into_owned();
    let mut only_ns = Tcpwait::start(&["trace", "--json", "--netns", &ns_path], READY);

    let (mut srv_ns, port_ns) = server_in(Some(&ns), "tw-ns-server", "127.0.0.1:0", 1);
    assert_eq!(
        netns_inode(&format!("/proc/{}/ns/net", srv_ns.pid())),
        inside,
        "the server peer runs inside the namespace"
    );
    let (mut cli_ns, cports) = client_in(Some(&ns), "tw-ns-client", loopback(port_ns), 1);
    let cport_ns = cports[0];
    let (mut srv_host, port_host) = server("tw-server", "127.0.0.1:0", 1);
    let (mut cli_host, cports) = client("tw-client", loopback(port_host), 1);
    let cport_host = cports[0];
    for (srv, cli) in [(&mut srv_ns, &mut cli_ns), (&mut srv_host, &mut cli_host)] {
        srv.expect_line("accepted");
        cli.send("close");
        cli.expect_line("closed");
        srv.send("exit"); // the listener closes
        let _ = srv.child.wait();
    }
    // 10 per connection, 2 for its listener.
    let whole = |all: &[Value]| {
        of_connection(all, port_ns, cport_ns).len() == 12
            && of_connection(all, port_host, cport_host).len() == 12
    };
    let seen = wait_until(Duration::from_secs(5), || {
        whole(&tw.json()) && only_ns.stdout.snapshot().len() >= 12
    });
    assert_eq!(tw.stop(libc::SIGINT), 0);
    assert_eq!(only_ns.stop(libc::SIGINT), 0);
    let all = tw.json();
    assert!(seen, "not every transition seen: {all:?}");

    let in_ns = of_connection(&all, port_ns, cport_ns);
    assert_eq!(in_ns.len(), 12, "{in_ns:?}");
    for r in &in_ns {
        assert_eq!(r["netns"], inside, "a socket of the namespace: {r}");
    }
    let in_host = of_connection(&all, port_host, cport_host);
    assert_eq!(in_host.len(), 12, "{in_host:?}");
    for r in &in_host {
        assert_eq!(r["netns"], host, "a socket of the host: {r}");
    }
    // --netns keeps exactly the fresh namespace's transitions: nothing else runs there.
    let filtered = only_ns.json();
    let keys = |rs: &[Value]| {
        let mut k: Vec<String> = rs.iter().map(Value::to_string).collect();
        k.sort();
        k
    };
    // Each trace's program takes its own timestamp.
    let strip = |rs: Vec<Value>| -> Vec<Value> { rs.iter().map(untimed).collect() };
    assert_eq!(keys(&strip(filtered)), keys(&strip(in_ns)));
    for t in [&tw, &only_ns] {
        let summary = t.stderr.snapshot().join("\n");
        assert!(
            summary.contains(" 0 lost (") && !summary.contains("namespaces are unknown"),
            "{summary}"
        );
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn without_namespace_offsets_every_netns_is_null_and_the_start_says_so() {
    // A kernel whose BTF gives no offsets for `struct net` (or no BTF at all: the classic
    // program alone) cannot tell namespaces apart. No program may then send a value that
    // passes for a namespace, and the agent says so once, before it starts tracing. With
    // --test-compare the BTF, classic and rescue programs all run without the offsets.
    require_root();
    let mut tw = Tcpwait::start(
        &["trace", "--json", "--test-no-netns", "--test-compare"],
        READY,
    );
    let (port, cports) = loopback_connections(0, 1);
    // 10 transitions and 2 for the listener, each from every program compared.
    let copies = compared_programs(&tw);
    let seen = wait_until(Duration::from_secs(5), || {
        of_connection(&tw.json(), port, cports[0]).len() >= copies * 12
    });
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let ours = of_connection(&tw.json(), port, cports[0]);
    assert!(seen, "{ours:?}");
    for r in &ours {
        assert_eq!(r.get("netns"), Some(&Value::Null), "{r}");
    }
    let stderr = tw.stderr.snapshot();
    let said: Vec<usize> = (0..stderr.len())
        .filter(|&i| stderr[i].contains("socket network namespaces are unknown"))
        .collect();
    let ready = stderr
        .iter()
        .position(|l| l.contains(READY))
        .expect("ready line");
    assert!(said.len() == 1 && said[0] < ready, "{stderr:?}");
}
