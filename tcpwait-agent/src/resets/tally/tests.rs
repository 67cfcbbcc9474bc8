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

/// The caller of an abort by `abort_at` as the daemon names it: `pid` started at tick 500.
fn caller(r: &Reset) -> Option<Aborter> {
    caller_started(r, 500)
}

fn caller_started(r: &Reset, start_ticks: u64) -> Option<Aborter> {
    r.caller().map(|(pid, comm)| Aborter {
        key: ProcessKey { pid, start_ticks },
        comm: comm.to_string_lossy().into_owned(),
    })
}

/// Whether the process (`pid`, `start_ticks`) has an abort alert firing.
fn firing(t: &Tally, pid: u32, start_ticks: u64) -> bool {
    t.processes()
        .iter()
        .any(|p| (p.pid, p.start_ticks) == (pid, start_ticks) && p.is_firing())
}

/// Counts `r` as the daemon does when it knows no holder.
fn add(t: &mut Tally, r: &Reset, reason: &str) {
    t.add(r, reason, caller(r), None);
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
    add(&mut t, &abort_at(5, 7, "10.0.0.2", 100), "linger_0");
    add(&mut t, &abort_at(9, 7, "10.0.0.3", 50), "linger_0");
    add(&mut t, &abort_at(8, 7, "10.0.0.2", 1), "unread_data");
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
        add(&mut t, &abort_at(ts, 7, "10.0.0.2", 1), "linger_0");
    }
    assert_eq!(t.evaluate(300), []);
    add(&mut t, &abort_at(300, 7, "10.0.0.2", 1), "linger_0");
    let fired = t.evaluate(300);
    assert_eq!(fired.len(), 1);
    assert!(fired[0].firing);
    assert_eq!((fired[0].key.pid, fired[0].count), (7, 3));
    assert_eq!((fired[0].fired_at_ns, fired[0].resolved_at_ns), (300, None));
    assert!(firing(&t, 7, 500));
    // The abort at 100 counts until 1_100, not 1 ns longer.
    assert_eq!(t.next_deadline(), Some(1_100));
    assert_eq!(t.evaluate(1_099), []);
    let resolved = t.evaluate(1_100);
    assert_eq!(resolved.len(), 1);
    assert!(!resolved[0].firing);
    assert_eq!(resolved[0].count, 2);
    assert_eq!(
        (resolved[0].fired_at_ns, resolved[0].resolved_at_ns),
        (300, Some(1_100))
    );
    assert_eq!(t.next_deadline(), None);
}

#[test]
fn only_the_rules_reasons_count() {
    let mut t = Tally::new(AbortRule {
        reasons: vec!["unread_data".into()],
        ..rule(0, 1_000)
    });
    add(&mut t, &abort_at(1, 7, "10.0.0.2", 1), "linger_0");
    assert_eq!(t.evaluate(2), []);
    add(&mut t, &abort_at(2, 7, "10.0.0.2", 1), "unread_data");
    assert_eq!(t.evaluate(2).len(), 1);
}

#[test]
fn a_softirq_abort_is_not_pinned_on_the_on_cpu_task() {
    let mut t = Tally::new(rule(10, 1_000));
    let mut r = abort_at(1, 7, "10.0.0.2", 9);
    r.in_task = false;
    add(&mut t, &r, "tcp_keepalive_timeout");
    assert_eq!((t.processes().len(), t.unattributed), (0, 1));
    // The holder, when the agent knows it, takes it.
    t.add(
        &r,
        "tcp_keepalive_timeout",
        None,
        Some(Aborter {
            key: ProcessKey {
                pid: 9,
                start_ticks: 40,
            },
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
        key: ProcessKey {
            pid: 11,
            start_ticks: 40,
        },
        comm: "client".into(),
    };
    t.add(&r, "", None, Some(client.clone()));
    t.add(&r, "", None, Some(client.clone()));
    t.add(&r, "", None, None);
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
        add(
            &mut t,
            &abort_at(u64::from(pid), pid, "10.0.0.2", 1),
            "linger_0",
        );
    }
    assert_eq!((t.processes().len(), t.evicted), (MAX_PROCESSES, 5));
    // The oldest went first.
    assert!(t.processes().iter().all(|p| p.pid >= 5));
    let mut t = Tally::new(rule(1_000_000, 1_000));
    for i in 0..(MAX_PEERS + 3) {
        let peer = format!("10.1.{}.{}", i / 256, i % 256);
        add(&mut t, &abort_at(1, 7, &peer, 1), "linger_0");
    }
    let p = t.processes()[0];
    assert_eq!((p.peers.len(), p.peers[OTHER_PEERS]), (MAX_PEERS + 1, 3));
}

/// pid reuse: a process that gets the pid of one that aborted is another process, with its
/// own tally and its own alert (keyed on pid and start time, like the other per-process
/// alerts), even under the same task name. Keyed on (pid, comm), the two processes' aborts
/// would add up to 4 and fire.
#[test]
fn a_reused_pid_is_another_process() {
    let mut t = Tally::new(rule(2, 1_000));
    for ts in [100, 200] {
        let r = abort_at(ts, 7, "10.0.0.2", 1);
        t.add(&r, "linger_0", caller_started(&r, 500), None);
    }
    for ts in [300, 400] {
        let r = abort_at(ts, 7, "10.0.0.2", 1);
        t.add(&r, "linger_0", caller_started(&r, 900), None);
    }
    assert_eq!(t.evaluate(400), []);
    let p = t.processes();
    let keys: Vec<_> = p
        .iter()
        .map(|p| (p.pid, p.start_ticks, p.total()))
        .collect();
    assert_eq!(keys, [(7, 500, 2), (7, 900, 2)]);
    // The later one fires alone.
    let r = abort_at(450, 7, "10.0.0.2", 1);
    t.add(&r, "linger_0", caller_started(&r, 900), None);
    let fired = t.evaluate(450);
    assert_eq!(fired.len(), 1);
    assert_eq!(
        (fired[0].key, fired[0].count),
        (
            ProcessKey {
                pid: 7,
                start_ticks: 900
            },
            3
        )
    );
    assert!(!firing(&t, 7, 500));
}
