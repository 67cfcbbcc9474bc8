//! Tracker unit tests: hand-made transitions with exact timestamps, following the kernel
//! sequences measured in DESIGN.md (an accepted socket goes LISTEN→SYN_RECV→ESTABLISHED→
//! CLOSE_WAIT→LAST_ACK→CLOSE; a client CLOSE→SYN_SENT→ESTABLISHED→FIN_WAIT1→FIN_WAIT2→CLOSE).
use std::net::IpAddr;

use super::{
    alerts::AlertChange,
    reconcile::{ACK_CLOCK_MARGIN_NS, ReconcileReport, is_synthetic, synthetic_id},
    rules::Rule,
    *,
};
use crate::{
    event::{Comm, Task},
    model::{DiagSocket, Tuple},
};

mod alerts;
mod reconcile;
mod table;

pub(crate) const SEC: u64 = 1_000_000_000;
/// The server side of every test connection.
const SERVER: (&str, u16) = ("10.0.0.1", 8080);
/// The pid that is on CPU in softirq when the peer's FIN arrives: the peer, never the owner.
const PEER_PID: u32 = 999;
/// The network namespace of every test socket unless a test says otherwise (the inode the
/// initial namespace has on most hosts).
pub(crate) const NS: u32 = 4_026_531_840;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address literal")
}

/// A kernel-looking socket address (x86_64 direct map).
pub(crate) fn sock(n: u64) -> SocketId {
    SocketId(0xffff_8880_0000_0000 + n * 0x800)
}

/// Client `n`: 10.0.0.<2 + n / 1000>, port 40000 + n % 1000.
fn client(n: u64) -> (String, u16) {
    (
        format!("10.0.0.{}", 2 + n / 1000),
        40000 + (n % 1000) as u16,
    )
}

fn task(pid: u32) -> Task {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"peer");
    Task {
        pid,
        tid: pid,
        comm: Comm(comm),
    }
}

/// A transition of the accepted socket `n` (local = SERVER, remote = client(n)).
pub(crate) fn tr(n: u64, old: TcpState, new: TcpState, ts_ns: u64) -> Transition {
    let (caddr, cport) = client(n);
    Transition {
        ts_ns,
        sock: sock(n),
        saddr: ip(SERVER.0),
        sport: SERVER.1,
        daddr: ip(&caddr),
        dport: cport,
        old,
        new,
        task: task(PEER_PID),
        netns: NS,
    }
}

fn tuple(n: u64) -> Tuple {
    let (caddr, cport) = client(n);
    Tuple {
        saddr: ip(SERVER.0),
        sport: SERVER.1,
        daddr: ip(&caddr),
        dport: cport,
    }
}

fn info(pid: u32) -> ProcessInfo {
    ProcessInfo {
        key: key(pid),
        comm: format!("srv{pid}"),
        cmdline: format!("/usr/bin/srv{pid} --port 8080"),
        cgroup: Some(format!("/system.slice/srv{pid}.service")),
        container: None,
        pod_uid: None,
        runtime: None,
        netns: Some(NS),
    }
}

fn key(pid: u32) -> ProcessKey {
    ProcessKey {
        pid,
        start_ticks: u64::from(pid) * 100,
    }
}

/// Socket `n` enters CLOSE_WAIT at `ts` (the peer's FIN) and `owner` is resolved for it.
fn close_wait(t: &mut Tracker, n: u64, ts: u64, owner: u32) {
    t.apply(&tr(n, TcpState::Established, TcpState::CloseWait, ts));
    assert!(t.set_owners(sock(n), vec![info(owner)]));
}

fn diag(n: u64, state: TcpState, last_ack_recv_ms: Option<u32>) -> DiagSocket {
    DiagSocket {
        netns: NS,
        tuple: tuple(n),
        state,
        inode: 50_000 + n,
        uid: 1000,
        recv_q: n as u32 * 10,
        send_q: 0,
        cookie: 7_000 + n,
        last_ack_recv_ms,
        expires_ms: 0,
    }
}

fn firing_pids(changes: &[AlertChange]) -> Vec<(&'static str, u32)> {
    changes
        .iter()
        .map(|c| match c {
            AlertChange::Firing(a) => ("firing", a.process.key.pid),
            AlertChange::Resolved(a) => ("resolved", a.process.key.pid),
        })
        .collect()
}
