//! Peer counting, closers, share arithmetic and peer rules, with exact values.
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::{
    event::{Comm, SocketId, Task},
    tracker::rules::Rule,
};

const SEC: u64 = 1_000_000_000;
const NS: u32 = 4_026_532_000;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn task(pid: u32, name: &str) -> Task {
    let mut comm = [0u8; 16];
    comm[..name.len()].copy_from_slice(name.as_bytes());
    Task {
        pid,
        tid: pid,
        comm: Comm(comm),
    }
}

/// The client's active close of the connection from 127.0.0.2:`sport` to 127.0.0.1:8080.
fn close(sport: u16, pid: u32, ts_ns: u64) -> Transition {
    Transition {
        ts_ns,
        sock: SocketId(u64::from(sport)),
        netns: NS,
        saddr: ip(2),
        sport,
        daddr: ip(1),
        dport: 8080,
        old: TcpState::Established,
        new: TcpState::FinWait1,
        task: task(pid, "client"),
    }
}

fn tw(sport: u16, expires_ns: u64) -> TwSocket {
    TwSocket {
        netns: NS,
        tuple: Tuple {
            saddr: ip(2),
            sport,
            daddr: ip(1),
            dport: 8080,
        },
        expires_ns,
    }
}

fn census(taken_ns: u64, range: (u16, u16), sockets: Vec<TwSocket>) -> Census {
    Census {
        taken_ns,
        seconds: 0.25,
        namespaces: vec![NsCensus {
            netns: NS,
            port_range: Some(range),
            sockets,
        }],
        failed: Vec::new(),
    }
}

fn rule(count: Option<u32>, share_ppm: Option<u32>) -> Rule {
    Rule {
        max_count: count,
        max_share_ppm: share_ppm,
        ..Rule::time_wait_pileup()
    }
}

#[test]
fn counts_share_closers_and_rate_per_peer() {
    let mut w = PeerWatch::new(&[rule(None, Some(500_000))]);
    // 40000..40010: 11 ports; pid 7 closes 6 connections, pid 8 closes 2.
    let range = (40000, 40010);
    assert!(w.apply_census(census(SEC, range, vec![])).is_empty());
    for p in 40000..40006 {
        w.note_close(&close(p, 7, 2 * SEC));
    }
    for p in 40006..40008 {
        w.note_close(&close(p, 8, 2 * SEC));
    }
    // An accepted socket's close (local port 8080, outside the range) is not a closer.
    let mut server = close(8080, 9, 2 * SEC);
    server.dport = 40001;
    w.note_close(&server);
    let sockets = (40000..40006)
        .map(|p| tw(p, 61 * SEC + u64::from(p)))
        .collect();
    let changes = w.apply_census(census(5 * SEC, range, sockets));
    let [PeerAlertChange::Firing(a)] = changes.as_slice() else {
        panic!("6 of 11 ports is more than half: {changes:?}");
    };
    let g = &w.groups()[0];
    assert_eq!(w.groups().len(), 1);
    assert_eq!(a.group, *g);
    assert_eq!(
        g.key,
        PeerKey {
            netns: NS,
            local: ip(2),
            remote: ip(1),
            port: 8080
        }
    );
    assert_eq!((g.count, g.range, g.share), (6, range, 6.0 / 11.0));
    assert_eq!(g.rate_per_s, Some(8.0 / 4.0), "8 closes in 4 s");
    assert_eq!(g.first_expiry_ns, 61 * SEC + 40000);
    let c: Vec<(u32, u64)> = g.closers.iter().map(|c| (c.pid, c.closes)).collect();
    assert_eq!(c, [(7, 6), (8, 2)]);
    assert_eq!(w.groups()[0].closers[0].comm, "client");
    assert_eq!(w.socket_count(), 6);
    // Port queries: the local port, not yet expired.
    assert_eq!(
        w.on_port(40003, 10 * SEC),
        vec![tw(40003, 61 * SEC + 40003)]
    );
    assert!(w.on_port(40003, 61 * SEC + 40003).is_empty());
    assert!(w.on_port(8080, 10 * SEC).is_empty());

    // The sockets are killed or expire: the next census resolves the alert, and the peer's
    // closes are forgotten once it has no socket and no new close.
    let changes = w.apply_census(census(10 * SEC, range, vec![]));
    let [PeerAlertChange::Resolved(r)] = changes.as_slice() else {
        panic!("{changes:?}");
    };
    assert_eq!(
        (r.resolved_at_ns, r.fired_at_ns, r.group.count),
        (Some(10 * SEC), 5 * SEC, 6)
    );
    assert!(w.groups().is_empty() && w.firing().next().is_none());
    assert_eq!(w.closes.len(), 0);
}

#[test]
fn share_and_count_thresholds_are_exclusive_and_exact() {
    let g = |count: u32| PeerGroup {
        key: PeerKey {
            netns: NS,
            local: ip(2),
            remote: ip(1),
            port: 80,
        },
        count,
        range: (1, 10),
        share: f64::from(count) / 10.0,
        rate_per_s: None,
        closers: Vec::new(),
        first_expiry_ns: 0,
    };
    let half = rule(None, Some(500_000));
    assert!(!matches(&half, &g(5)), "exactly half is not more than half");
    assert!(matches(&half, &g(6)));
    let count = rule(Some(5), None);
    assert!(!matches(&count, &g(5)));
    assert!(matches(&count, &g(6)));
    assert!(!matches(&rule(None, None), &g(10)));
}

#[test]
fn a_namespace_not_dumped_keeps_its_unexpired_sockets() {
    let mut w = PeerWatch::new(&[rule(Some(1), None)]);
    let range = (40000, 40010);
    w.apply_census(census(
        SEC,
        range,
        vec![tw(40000, 30 * SEC), tw(40001, 3 * SEC)],
    ));
    assert_eq!(w.firing().count(), 1, "2 sockets: more than 1");
    let changes = w.apply_census(Census {
        taken_ns: 5 * SEC,
        seconds: 0.1,
        namespaces: Vec::new(),
        failed: vec![NS],
    });
    assert!(
        matches!(changes.as_slice(), [PeerAlertChange::Resolved(_)]),
        "the expired one is gone, the other kept: 1 is not more than 1: {changes:?}"
    );
    assert_eq!(w.socket_count(), 1);
    assert_eq!(w.groups()[0].range, range, "its port range is kept too");
}

#[test]
fn closers_are_bounded_per_peer_and_peers_overall() {
    let mut w = PeerWatch::new(&[]);
    for pid in 1..=6 {
        w.note_close(&close(40000, pid, SEC));
    }
    let rec = &w.closes[&PeerKey {
        netns: NS,
        local: ip(2),
        remote: ip(1),
        port: 8080,
    }];
    assert_eq!(
        (rec.closers.len(), rec.others, rec.total),
        (MAX_CLOSERS, 2, 6)
    );
    for port in 0..MAX_CLOSE_PEERS as u32 {
        let mut t = close(40000, 1, SEC);
        t.dport = (port % 60000) as u16;
        t.daddr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + port / 60000));
        w.note_close(&t);
    }
    assert_eq!(w.closes.len(), MAX_CLOSE_PEERS);
    assert_eq!(
        w.close_overflow, 1,
        "the 65,537th peer is counted, not kept"
    );
    // Only active closes count.
    let mut passive = close(40000, 1, SEC);
    passive.old = TcpState::CloseWait;
    passive.new = TcpState::LastAck;
    w.note_close(&passive);
    assert_eq!(w.close_overflow, 1);
}

#[test]
fn many_one_socket_peers_keep_only_the_top_figures() {
    // A server that closes first: one TIME_WAIT socket per client port (here 100 peers),
    // and one client-closed peer with 10.
    let mut w = PeerWatch::new(&[rule(Some(5), None)]);
    let mut sockets: Vec<TwSocket> = (0..100u16)
        .map(|i| TwSocket {
            netns: NS,
            tuple: Tuple {
                saddr: ip(1),
                sport: 8080,
                daddr: ip(2),
                dport: 50000 + i,
            },
            expires_ns: 60 * SEC,
        })
        .collect();
    sockets.extend((40000..40010).map(|p| tw(p, 60 * SEC)));
    let changes = w.apply_census(census(SEC, DEFAULT_PORT_RANGE, sockets));
    assert_eq!((w.peers_total, w.groups().len()), (101, KEPT_PEERS));
    assert_eq!((w.groups()[0].key.port, w.groups()[0].count), (8080, 10));
    assert!(w.groups()[1..].iter().all(|g| g.count == 1));
    let [PeerAlertChange::Firing(a)] = changes.as_slice() else {
        panic!("{changes:?}");
    };
    assert_eq!((a.group.count, a.group.key.port), (10, 8080));
    assert_eq!(w.socket_count(), 110);
}
