//! Connections a process aborts on close, from real processes on the real kernel, each test in
//! its own network namespace (what it asserts is scoped to that namespace, its ports and its
//! pids): `SO_LINGER {1, 0}` throws away what the peer has not acknowledged (the send queue,
//! `SIOCOUTQ`), a close with unread data throws that away (`SIOCINQ`, RFC 2525 §2.17), and a
//! graceful close aborts nothing. The kernel program reads the queues from the socket as the
//! reset goes out (`tcp:tcp_send_reset` from 6.10, `tcp_send_active_reset` before), so each
//! abort's bytes must equal what the closing process read with the ioctl just before close().
mod common;

use std::time::Duration;

use common::{NetNs, Tcpwait, Value, require_root, wait_until};

#[path = "aborts/roles.rs"]
mod roles;

#[test]
fn common_role_entry() {
    roles::role_main();
}

/// Logins the seed's server answers and aborts.
const LOGINS: usize = 20;

/// Starts `tcpwait trace --json` on `ns`'s namespace only; `None` (with the reason printed)
/// where this kernel cannot see aborts.
fn trace_in(ns: &NetNs) -> Option<Tcpwait> {
    let path = ns.path().to_string_lossy().into_owned();
    let tw = Tcpwait::start(
        &["trace", "--json", "--netns", &path],
        "tracing TCP state transitions",
    );
    let started = tw.stderr.snapshot().join("\n");
    if started.contains("aborts not recorded") {
        println!("SKIPPED: this kernel cannot record aborts: {started}");
        return None;
    }
    Some(tw)
}

/// Records of `kind` among `tw`'s output.
fn of_kind(tw: &Tcpwait, kind: &str) -> Vec<Value> {
    tw.json()
        .into_iter()
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// The seed's example: a server that answers a login with more than the client's receive
/// window holds, sets `SO_LINGER {1, 0}` and closes, 20 times.
#[test]
#[ignore = "needs root and the real kernel"]
fn linger_zero_aborts_are_attributed_with_the_bytes_they_threw_away() {
    require_root();
    let ns = NetNs::new("rst-linger");
    let Some(mut tw) = trace_in(&ns) else {
        return;
    };
    let mut server = ns.spawn("rst_login_server", "login-srv", &[LOGINS.to_string()]);
    let port: u16 = server.expect_line("port").parse().expect("port");
    let mut client = ns.spawn("rst_login_client", "login-cli", &[port.to_string()]);
    let mut expected = Vec::new();
    for i in 0..LOGINS {
        client.send("login");
        let cport: u16 = client.expect_line("sent").parse().expect("client port");
        // "closed <written> <SIOCOUTQ just before close()> <peer port>"
        let line = server.expect_line("closed");
        let f: Vec<u64> = line
            .split(' ')
            .map(|x| x.parse().expect("number"))
            .collect();
        let (written, outq, peer) = (f[0], f[1], f[2]);
        assert_eq!(
            peer,
            u64::from(cport),
            "login {i}: the server's peer is the client"
        );
        client.send("read");
        let got: u64 = client.expect_line("got").parse().expect("bytes");
        // The loss is real: the client never got what sat in the server's send queue.
        assert!(outq > 0, "login {i}: the answer was still queued ({line})");
        assert!(got < written, "login {i}: got {got} of {written} bytes");
        expected.push((cport, outq));
    }
    let aborts_of_server = |tw: &Tcpwait| {
        of_kind(tw, "abort")
            .into_iter()
            .filter(|v| v["sport"] == port)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || aborts_of_server(&tw) >= LOGINS),
        "20 aborts; got {:?}",
        of_kind(&tw, "abort")
    );
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let aborts = of_kind(&tw, "abort");
    assert_eq!(aborts.len(), LOGINS, "only the server aborts: {aborts:?}");
    for (v, (cport, outq)) in aborts.iter().zip(&expected) {
        assert_eq!(v["pid"], server.pid(), "{v}");
        assert_eq!(v["comm"], "login-srv", "{v}");
        assert_eq!(v["reason"], "linger_0", "{v}");
        assert_eq!(
            (v["sport"].clone(), v["dport"].clone()),
            (port.into(), (*cport).into()),
            "{v}"
        );
        assert_eq!(v["daddr"], "127.0.0.1", "{v}");
        assert_eq!(v["unsent_bytes"], *outq, "{v}");
        assert_eq!(v["unread_bytes"], 0, "{v}");
        assert_eq!(v["discarded_bytes"], *outq, "{v}");
        assert_eq!(v["netns"], ns.inode(), "{v}");
    }
    // The client's side: each reset received, on the client's socket.
    let received = of_kind(&tw, "reset_received");
    let mut rx_ports: Vec<u64> = received
        .iter()
        .map(|v| v["sport"].as_u64().expect("port"))
        .collect();
    rx_ports.sort_unstable();
    let mut cports: Vec<u64> = expected.iter().map(|e| u64::from(e.0)).collect();
    cports.sort_unstable();
    assert_eq!(rx_ports, cports, "{received:?}");
    let summary = tw.stderr.snapshot().join("\n");
    assert!(
        summary.contains(&format!(
            "{LOGINS} aborts and {LOGINS} resets received seen"
        )),
        "{summary}"
    );
    client.send("exit");
    server.send("exit");
}

/// A server that closes without reading a 10,000-byte request.
#[test]
#[ignore = "needs root and the real kernel"]
fn closing_with_unread_data_is_an_abort_of_those_bytes() {
    require_root();
    let ns = NetNs::new("rst-unread");
    let Some(mut tw) = trace_in(&ns) else {
        return;
    };
    let mut server = ns.spawn("rst_request_server", "unread-srv", &["unread".to_owned()]);
    let port: u16 = server.expect_line("port").parse().expect("port");
    let mut client = ns.spawn("rst_request_client", "request-cli", &[port.to_string()]);
    let cport: u16 = client.expect_line("sent").parse().expect("client port");
    let inq: u64 = server.expect_line("closed").parse().expect("SIOCINQ");
    assert_eq!(inq, 10_000, "the whole request sat unread");
    assert!(wait_until(Duration::from_secs(10), || !of_kind(
        &tw, "abort"
    )
    .is_empty()));
    assert_eq!(tw.stop(libc::SIGINT), 0);
    let aborts = of_kind(&tw, "abort");
    assert_eq!(aborts.len(), 1, "{aborts:?}");
    let v = &aborts[0];
    assert_eq!(v["pid"], server.pid(), "{v}");
    assert_eq!(v["comm"], "unread-srv", "{v}");
    assert_eq!(v["reason"], "unread_data", "{v}");
    assert_eq!(
        (v["sport"].clone(), v["dport"].clone()),
        (port.into(), cport.into()),
        "{v}"
    );
    assert_eq!(v["unread_bytes"], inq, "{v}");
    assert_eq!(v["unsent_bytes"], 0, "{v}");
    assert_eq!(v["discarded_bytes"], inq, "{v}");
    client.send("exit");
}

/// A graceful close (default linger, everything read) aborts nothing, on either side.
#[test]
#[ignore = "needs root and the real kernel"]
fn a_graceful_close_aborts_nothing() {
    require_root();
    let ns = NetNs::new("rst-graceful");
    let Some(mut tw) = trace_in(&ns) else {
        return;
    };
    let mut server = ns.spawn("rst_request_server", "graceful-srv", &["read".to_owned()]);
    let port: u16 = server.expect_line("port").parse().expect("port");
    let mut client = ns.spawn("rst_request_client", "request-cli", &[port.to_string()]);
    let cport: u16 = client.expect_line("sent").parse().expect("client port");
    assert_eq!(server.expect_line("closed"), "0", "nothing left unread");
    client.send("close");
    client.expect_line("closed");
    // Both sockets' last transitions (to CLOSE) have been seen: nothing is still in flight.
    let closed = |tw: &Tcpwait| {
        tw.json()
            .iter()
            .filter(|v| v["new"] == "CLOSE" && (v["sport"] == port || v["sport"] == cport))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || closed(&tw) >= 2),
        "{:?}",
        tw.json()
    );
    assert_eq!(tw.stop(libc::SIGINT), 0);
    assert_eq!(of_kind(&tw, "abort").len(), 0, "{:?}", tw.json());
    assert_eq!(of_kind(&tw, "reset_received").len(), 0);
    let summary = tw.stderr.snapshot().join("\n");
    assert!(
        summary.contains("0 aborts and 0 resets received seen"),
        "{summary}"
    );
}
