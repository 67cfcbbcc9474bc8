//! The tallies and the abort rule, with exact timestamps.
use std::net::IpAddr;

use tcpwait_common::reset::{KIND_ABORT, KIND_RESET_RECEIVED, flag};

use super::*;
use crate::event::reset::{decode, tests::wire};

fn abort_at(ts: u64, pid: u32, peer: &str, unsent: u32) -> Reset {
    let mut r = decode(&wire(KIND_ABORT, 2, 14, flag::IN_TASK | flag::LINGER_ZERO)).expect("ok");
    r.ts_ns = ts;
    r.pid = pid;
    r.daddr = peer.parse::<IpAddr>().expect("literal");
    r.unsent = Some(unsent);
    r.unread = Some(0);
    r
}

fn rule(count: u32, window_ns: u64) -> AbortRule {
    AbortRule {
        count,
        window_ns,
        ..AbortRule::discard_on_close()
    }
}

#[test]
fn tallies_reasons_bytes_peers_and_last_time() {
    let mut t = Tally::new(rule(10, 1_000));
    t.add(&abort_at(5, 7, "10.0.0.2", 100), "linger_0", None);
    t.add(&abort_at(9, 7, "10.0.0.3", 50), "linger_0", None);
    t.add(&abort_at(8, 7, "10.0.0.2", 1), "unread_data", None);
    let p = t.processes();
    assert_eq!(p.len(), 1);
    let p = p[0];
    assert_eq!((p.pid, p.comm.as_str(), p.total()), (7, "login-srv", 3));
    assert_eq!(p.by_reason["linger_0"], 2);
    assert_eq!(p.by_reason["unread_data"], 1);
    assert_eq!(p.unsent_bytes, 151);
    assert_eq!(p.last_ns, 9);
    assert_eq!(p.top_peers(1), [("10.0.0.2".to_owned(), 2)]);
    assert_eq!((t.unsent_bytes, t.by_reason["linger_0"]), (151, 2));
}

#[test]
fn fires_above_the_count_within_the_window_and_resolves_exactly() {
    let mut t = Tally::new(rule(2, 1_000));
    for ts in [100, 200] {
        t.add(&abort_at(ts, 7, "10.0.0.2", 1), "linger_0", None);
    }
    assert_eq!(t.evaluate(300), []);
    t.add(&abort_at(300, 7, "10.0.0.2", 1), "linger_0", None);
    let fired = t.evaluate(300);
    assert_eq!(fired.len(), 1);
    assert!(fired[0].firing);
    assert_eq!((fired[0].pid, fired[0].count), (7, 3));
    assert!(t.firing(&Aborter {
        pid: 7,
        comm: "login-srv".into()
    }));
    // The abort at 100 counts until 1_100, not 1 ns longer.
    assert_eq!(t.next_deadline(), Some(1_100));
    assert_eq!(t.evaluate(1_099), []);
    let resolved = t.evaluate(1_100);
    assert_eq!(resolved.len(), 1);
    assert!(!resolved[0].firing);
    assert_eq!(resolved[0].count, 2);
    assert_eq!(t.next_deadline(), None);
}

#[test]
fn only_the_rules_reasons_count() {
    let mut t = Tally::new(AbortRule {
        reasons: vec!["unread_data".into()],
        ..rule(0, 1_000)
    });
    t.add(&abort_at(1, 7, "10.0.0.2", 1), "linger_0", None);
    assert_eq!(t.evaluate(2), []);
    t.add(&abort_at(2, 7, "10.0.0.2", 1), "unread_data", None);
    assert_eq!(t.evaluate(2).len(), 1);
}

#[test]
fn a_softirq_abort_is_not_pinned_on_the_on_cpu_task() {
    let mut t = Tally::new(rule(10, 1_000));
    let mut r = abort_at(1, 7, "10.0.0.2", 9);
    r.in_task = false;
    t.add(&r, "tcp_keepalive_timeout", None);
    assert_eq!((t.processes().len(), t.unattributed), (0, 1));
    // The holder, when the agent knows it, takes it.
    t.add(
        &r,
        "tcp_keepalive_timeout",
        Some(Aborter {
            pid: 9,
            comm: "db".into(),
        }),
    );
    assert_eq!(t.processes()[0].pid, 9);
}

#[test]
fn received_resets_count_per_owner_and_peer() {
    let mut t = Tally::new(rule(10, 1_000));
    let r = decode(&wire(KIND_RESET_RECEIVED, 2, 0xff, 0)).expect("ok");
    let client = Aborter {
        pid: 11,
        comm: "client".into(),
    };
    t.add(&r, "", Some(client.clone()));
    t.add(&r, "", Some(client.clone()));
    t.add(&r, "", None);
    let peer: IpAddr = "10.0.0.2".parse().expect("literal");
    assert_eq!(t.received[&(Some(client), peer)], 2);
    assert_eq!(t.received[&(None, peer)], 1);
    assert_eq!(t.received_total, 3);
    assert!(t.by_reason.is_empty());
}

#[test]
fn processes_and_peers_are_bounded() {
    let mut t = Tally::new(rule(1_000_000, 1_000));
    for pid in 0..(MAX_PROCESSES as u32 + 5) {
        t.add(
            &abort_at(u64::from(pid), pid, "10.0.0.2", 1),
            "linger_0",
            None,
        );
    }
    assert_eq!((t.processes().len(), t.evicted), (MAX_PROCESSES, 5));
    // The oldest went first.
    assert!(t.processes().iter().all(|p| p.pid >= 5));
    let mut t = Tally::new(rule(1_000_000, 1_000));
    for i in 0..(MAX_PEERS + 3) {
        let peer = format!("10.1.{}.{}", i / 256, i % 256);
        t.add(&abort_at(1, 7, &peer, 1), "linger_0", None);
    }
    let p = t.processes()[0];
    assert_eq!((p.peers.len(), p.peers[OTHER_PEERS]), (MAX_PEERS + 1, 3));
}
