//! Loopback connections run to their end, for the trace tests, and the trace records
//! (`tcpwait trace --json`) that belong to them. One loopback connection makes exactly 10
//! transitions and its listener 2 (DESIGN.md).
use std::net::SocketAddr;

use serde_json::Value;

use super::{client, edges, server};

/// `n` loopback connections to a server peer (`tw-server`) on 127.0.0.1:`port` (0: any) from
/// a client peer (`tw-client`), run to their end: the server closes each accepted socket
/// first, the client closes its ends when told, then the listener closes (the server exits).
/// Returns the server's port and the client's ports.
pub fn loopback_connections(port: u16, n: usize) -> (u16, Vec<u16>) {
    let (mut srv, port) = server("tw-server", &format!("127.0.0.1:{port}"), n);
    let (mut cli, cports) = client("tw-client", loopback(port), n);
    srv.expect_line("accepted");
    cli.send("close");
    cli.expect_line("closed");
    srv.send("exit");
    let _ = srv.child.wait();
    (port, cports)
}

/// `threads` client threads of this process each make `per_thread` loopback connections to a
/// listener of this process on 127.0.0.1:`port`, as fast as they can: the listener closes each
/// accepted socket first, the client then closes its end; the listener closes last.
pub fn stress_connections(port: u16, threads: usize, per_thread: usize) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind again");
    let n = threads * per_thread;
    let acceptor = std::thread::spawn(move || {
        for _ in 0..n {
            drop(listener.accept().expect("accept"));
        }
        listener
    });
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                use std::io::Read as _;
                for _ in 0..per_thread {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
                    let mut buf = [0u8; 1];
                    // EOF: the server closed first; then this side closes.
                    assert_eq!(s.read(&mut buf).expect("read"), 0);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    drop(acceptor.join().expect("acceptor"));
}

/// 127.0.0.1:`port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `r` without what differs between two programs' (or two traces') records of one
/// transition: the timestamps each takes.
pub fn untimed(r: &Value) -> Value {
    let mut r = r.clone();
    let obj = r.as_object_mut().expect("object");
    obj.remove("ts_ns");
    obj.remove("time");
    obj.remove("ms_in_old");
    r
}

/// Records of one socket (by local port and remote port), in order.
pub fn of_socket(records: &[Value], sport: u16, dport: u16) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["sport"] == sport && r["dport"] == dport)
        .cloned()
        .collect()
}

/// Records of the socket of `r`: same address, same remote port, same local port or none yet
/// (CLOSE -> SYN_SENT). Not by address alone: once the socket is freed, a socket of another
/// process on the host (another test's, another namespace's) can get the same address.
pub fn records_of_sock(all: &[Value], r: &Value) -> Vec<Value> {
    all.iter()
        .filter(|o| {
            // A reused socket address is another socket, unless the record is the one with
            // a port not set yet: a client's before connect() picks its port, and an accepted
            // socket's LISTEN -> SYN_RECV before Linux 6.15 (no peer yet).
            o["skaddr"] == r["skaddr"]
                && (o["dport"] == r["dport"] || o["dport"] == 0)
                && (o["sport"] == r["sport"] || o["sport"] == 0)
        })
        .cloned()
        .collect()
}

/// The record of socket `sport` -> `dport` with transition `edge` (`OLD>NEW`).
pub fn find(all: &[Value], sport: u16, dport: u16, edge: &str) -> Option<Value> {
    of_socket(all, sport, dport)
        .into_iter()
        .find(|r| edges(std::slice::from_ref(r))[0] == edge)
}

/// Records of one connection to a server on `port`: the listener's (remote port 0), the
/// client's (local port `cport`, or 0 in CLOSE -> SYN_SENT, before connect() chose it) and the
/// accepted socket's. (By ports, not `skaddr`: a freed socket's address is soon reused.)
pub fn of_connection(all: &[Value], port: u16, cport: u16) -> Vec<Value> {
    all.iter()
        .filter(|r| {
            let (s, d) = (&r["sport"], &r["dport"]);
            (s == port && (d == cport || d == 0)) || ((s == cport || s == 0) && d == port)
        })
        .cloned()
        .collect()
}

/// Checks `all`, the records of `n` loopback connections and one listener (`expected` in all):
/// n of each connection edge, none lost (a loss makes an edge's count too low; a freed
/// socket's address and a client port are reused within a run, so no per-socket key
/// identifies a transition) and none twice: the rescue program records only transitions
/// whose mark the main program did not push (tcpwait-ebpf nesting.rs), so it copies none, and the
/// summary's accounting says so (no `copies`). Returns the extra records (0).
pub fn edges_exact(all: &[Value], n: usize, expected: usize, summary: &str) -> usize {
    let rescued: usize = summary
        .rsplit(" nested transitions rescued")
        .nth(1)
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the summary says how many were rescued");
    let all_edges = edges(all);
    let count = |edge: &str| all_edges.iter().filter(|e| *e == edge).count();
    // Every edge seen and how often, for the failure messages: a missing transition and an
    // extra one elsewhere both show.
    let mut histogram = std::collections::BTreeMap::<&str, usize>::new();
    for e in &all_edges {
        *histogram.entry(e.as_str()).or_default() += 1;
    }
    let summary = &format!("edges {histogram:?}; {summary}");
    let mut extra = 0;
    for edge in [
        "CLOSE>SYN_SENT",
        "SYN_SENT>ESTABLISHED",
        "ESTABLISHED>CLOSE_WAIT",
        "CLOSE_WAIT>LAST_ACK",
        "LAST_ACK>CLOSE",
        "LISTEN>SYN_RECV",
        "SYN_RECV>ESTABLISHED",
        "ESTABLISHED>FIN_WAIT1",
        "FIN_WAIT1>FIN_WAIT2",
        "FIN_WAIT2>CLOSE",
    ] {
        let c = count(edge);
        assert!(c >= n, "{edge}: {c} of {n}; {summary}");
        extra += c - n;
    }
    assert_eq!(all.len(), expected + extra, "{summary}");
    assert_eq!(extra, 0, "{rescued} rescued; {summary}");
    assert!(!summary.contains(" copies"), "{summary}");
    extra
}
