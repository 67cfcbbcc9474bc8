//! Rules, alerts and deadlines, plus the status views.
use super::*;

#[test]
fn age_rule_fires_exactly_at_deadline() {
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 10 * SEC, 10);
    assert_eq!(t.evaluate(10 * SEC), vec![]);
    assert_eq!(t.next_deadline(), Some(70 * SEC));
    assert_eq!(t.evaluate(70 * SEC - 1), vec![], "1 ns before the deadline");
    assert_eq!(t.next_deadline(), Some(70 * SEC));
    let changes = t.evaluate(70 * SEC);
    let [AlertChange::Firing(a)] = changes.as_slice() else {
        panic!("expected one firing alert, got {changes:?}");
    };
    assert_eq!(a.rule, "close_wait_leak");
    assert_eq!(a.state, TcpState::CloseWait);
    assert_eq!(a.process, info(10));
    assert_eq!(
        (a.count, a.oldest_entered_ns, a.oldest_age_ns),
        (1, 10 * SEC, 60 * SEC)
    );
    assert!(!a.oldest_is_lower_bound);
    assert_eq!(a.top_peers, vec![(ip("10.0.0.2"), 1)]);
    assert_eq!(
        (a.fired_at_ns, a.as_of_ns, a.resolved_at_ns),
        (70 * SEC, 70 * SEC, None)
    );
    assert_eq!(a.oldest_age_at(100 * SEC), 90 * SEC);
    assert_eq!(t.next_deadline(), None, "a firing pair has no deadline");
}

#[test]
fn count_rule_fires_on_the_socket_after_max_count() {
    let rule = Rule::new("close_wait_count", TcpState::CloseWait, None, Some(3));
    let mut t = Tracker::new(TrackerConfig {
        rules: vec![rule],
        ..TrackerConfig::default()
    });
    for n in 1..=3 {
        close_wait(&mut t, n, n * SEC, 10);
        assert_eq!(t.evaluate(n * SEC), vec![], "{n} sockets do not exceed 3");
    }
    assert_eq!(t.next_deadline(), None, "no age threshold, no deadline");
    close_wait(&mut t, 4, 4 * SEC, 10);
    let changes = t.evaluate(4 * SEC);
    let [AlertChange::Firing(a)] = changes.as_slice() else {
        panic!("expected one firing alert, got {changes:?}");
    };
    assert_eq!(
        (a.rule.as_str(), a.count, a.oldest_age_ns),
        ("close_wait_count", 4, 3 * SEC)
    );
    assert_eq!(a.top_peers, vec![(ip("10.0.0.2"), 4)]);
}

#[test]
fn a_matching_pair_fires_once() {
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 0, 10);
    assert_eq!(firing_pids(&t.evaluate(60 * SEC)), vec![("firing", 10)]);
    assert_eq!(t.evaluate(60 * SEC), vec![]);
    assert_eq!(t.evaluate(600 * SEC), vec![]);
    // More sockets: no new Firing, the figures of the firing alert follow.
    close_wait(&mut t, 2, 601 * SEC, 10);
    close_wait(&mut t, 1002, 602 * SEC, 10);
    assert_eq!(t.evaluate(603 * SEC), vec![]);
    let firing = t.firing();
    assert_eq!(firing.len(), 1);
    assert_eq!(
        (firing[0].count, firing[0].as_of_ns, firing[0].fired_at_ns),
        (3, 603 * SEC, 60 * SEC)
    );
    assert_eq!(
        firing[0].top_peers,
        vec![(ip("10.0.0.2"), 2), (ip("10.0.0.3"), 1)]
    );
}

#[test]
fn resolved_when_the_process_closes_its_sockets() {
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 0, 10);
    close_wait(&mut t, 2, 5 * SEC, 10);
    assert_eq!(firing_pids(&t.evaluate(60 * SEC)), vec![("firing", 10)]);
    // CLOSE_WAIT→LAST_ACK runs in the owner's close(): the socket leaves the state.
    t.apply(&tr(1, TcpState::CloseWait, TcpState::LastAck, 70 * SEC));
    assert_eq!(
        t.evaluate(70 * SEC),
        vec![],
        "the other socket is 65 s old: still matching"
    );
    t.apply(&tr(2, TcpState::CloseWait, TcpState::LastAck, 80 * SEC));
    let changes = t.evaluate(80 * SEC);
    let [AlertChange::Resolved(a)] = changes.as_slice() else {
        panic!("expected one resolved alert, got {changes:?}");
    };
    assert_eq!(
        (a.process.key, a.resolved_at_ns, a.fired_at_ns),
        (key(10), Some(80 * SEC), 60 * SEC)
    );
    assert_eq!(a.count, 1, "the figures last measured while firing");
    assert_eq!(t.firing(), vec![]);
    assert_eq!(t.next_deadline(), None);
    assert_eq!(t.evaluate(200 * SEC), vec![]);
}

#[test]
fn resolved_when_the_process_is_forgotten() {
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 0, 10);
    assert_eq!(firing_pids(&t.evaluate(60 * SEC)), vec![("firing", 10)]);
    assert!(t.forget_process(&key(10)));
    assert!(!t.forget_process(&key(10)));
    assert_eq!(firing_pids(&t.evaluate(61 * SEC)), vec![("resolved", 10)]);
    assert_eq!(t.owners_of(sock(1)), vec![]);
    assert_eq!(t.process_count(), 0);
    let unowned = t.unowned(TcpState::CloseWait, 61 * SEC);
    assert_eq!(unowned.len(), 1);
    assert_eq!((unowned[0].id, unowned[0].age_ns), (sock(1), 61 * SEC));
}

#[test]
fn every_owner_of_a_shared_socket_alerts() {
    let mut t = Tracker::new(TrackerConfig::default());
    t.apply(&tr(1, TcpState::Established, TcpState::CloseWait, 0));
    // Parent and child after fork() both hold the fd.
    assert!(t.set_owners(sock(1), vec![info(10), info(11), info(10)]));
    assert_eq!(t.owners_of(sock(1)), vec![key(10), key(11)]);
    assert_eq!(
        firing_pids(&t.evaluate(60 * SEC)),
        vec![("firing", 10), ("firing", 11)]
    );
    let procs = t.processes(TcpState::CloseWait, 60 * SEC);
    assert_eq!(
        procs
            .iter()
            .map(|p| (p.process.key.pid, p.count))
            .collect::<Vec<_>>(),
        vec![(10, 1), (11, 1)]
    );
    // The child exits: only the parent still alerts.
    t.forget_process(&key(11));
    assert_eq!(firing_pids(&t.evaluate(61 * SEC)), vec![("resolved", 11)]);
    assert_eq!(t.owners_of(sock(1)), vec![key(10)]);
    assert_eq!(t.firing().len(), 1);
}

#[test]
fn the_on_cpu_task_is_never_the_owner() {
    let mut t = Tracker::new(TrackerConfig::default());
    // ESTABLISHED→CLOSE_WAIT runs in softirq: on CPU is the peer (PEER_PID), not the holder.
    let a = t.apply(&tr(1, TcpState::Established, TcpState::CloseWait, 0));
    assert!(a.needs_owners);
    assert_eq!(t.owners_of(sock(1)), vec![]);
    assert_eq!(t.process_count(), 0);
    assert_eq!(t.next_deadline(), None);
    assert_eq!(
        t.evaluate(120 * SEC),
        vec![],
        "no owner, no per-process alert"
    );
    assert_eq!(t.unowned(TcpState::CloseWait, 120 * SEC).len(), 1);
    // Even in process context (the owner's close()), the task is not taken as owner.
    let mut last_ack = tr(1, TcpState::CloseWait, TcpState::LastAck, 121 * SEC);
    last_ack.task = task(10);
    assert!(!t.apply(&last_ack).needs_owners);
    assert_eq!(t.owners_of(sock(1)), vec![]);
}

#[test]
fn a_fin_wait2_age_rule_is_just_data() {
    let fin_wait2 = Rule::new("fin_wait2_stuck", TcpState::FinWait2, Some(30 * SEC), None);
    let mut t = Tracker::new(TrackerConfig {
        rules: vec![Rule::close_wait_leak(), fin_wait2],
        ..TrackerConfig::default()
    });
    // A client that shut down its write side: the peer acked the FIN but never sends its own.
    t.apply(&tr(1, TcpState::Established, TcpState::FinWait1, 4 * SEC));
    let a = t.apply(&tr(1, TcpState::FinWait1, TcpState::FinWait2, 5 * SEC));
    assert!(a.needs_owners, "FIN_WAIT2 is watched by a rule");
    t.set_owners(sock(1), vec![info(20)]);
    assert_eq!(t.next_deadline(), Some(35 * SEC));
    assert_eq!(t.evaluate(35 * SEC - 1), vec![]);
    let changes = t.evaluate(35 * SEC);
    let [AlertChange::Firing(a)] = changes.as_slice() else {
        panic!("expected one firing alert, got {changes:?}");
    };
    assert_eq!(
        (a.rule.as_str(), a.state, a.oldest_age_ns),
        ("fin_wait2_stuck", TcpState::FinWait2, 30 * SEC)
    );
    assert_eq!(t.processes(TcpState::FinWait2, 35 * SEC)[0].count, 1);
}

#[test]
fn next_deadline_follows_the_oldest_socket_of_each_process() {
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 10 * SEC, 10);
    close_wait(&mut t, 2, 20 * SEC, 10);
    close_wait(&mut t, 3, 15 * SEC, 11);
    assert_eq!(t.next_deadline(), Some(70 * SEC));
    t.apply(&tr(1, TcpState::CloseWait, TcpState::LastAck, 30 * SEC));
    assert_eq!(
        t.next_deadline(),
        Some(75 * SEC),
        "pid 11's socket is now the oldest"
    );
    assert_eq!(firing_pids(&t.evaluate(75 * SEC)), vec![("firing", 11)]);
    assert_eq!(
        t.next_deadline(),
        Some(80 * SEC),
        "pid 10's remaining socket"
    );
    assert_eq!(firing_pids(&t.evaluate(80 * SEC)), vec![("firing", 10)]);
    assert_eq!(t.next_deadline(), None);
}

#[test]
fn status_lists_processes_by_count_then_age_and_unowned_apart() {
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 10 * SEC, 10);
    close_wait(&mut t, 2, 30 * SEC, 11);
    close_wait(&mut t, 3, 20 * SEC, 11);
    close_wait(&mut t, 4, 5 * SEC, 12);
    t.apply(&tr(5, TcpState::Established, TcpState::CloseWait, SEC));
    let procs = t.processes(TcpState::CloseWait, 100 * SEC);
    let rows: Vec<(u32, u32, u64)> = procs
        .iter()
        .map(|p| (p.process.key.pid, p.count, p.oldest_age_ns))
        .collect();
    assert_eq!(
        rows,
        vec![(11, 2, 80 * SEC), (12, 1, 95 * SEC), (10, 1, 90 * SEC)]
    );
    let socks: Vec<(SocketId, u64)> = procs[0].sockets.iter().map(|s| (s.id, s.age_ns)).collect();
    assert_eq!(socks, vec![(sock(3), 80 * SEC), (sock(2), 70 * SEC)]);
    assert_eq!(procs[0].top_peers, vec![(ip("10.0.0.2"), 2)]);
    let unowned = t.unowned(TcpState::CloseWait, 100 * SEC);
    assert_eq!(
        unowned.iter().map(|s| (s.id, s.age_ns)).collect::<Vec<_>>(),
        vec![(sock(5), 99 * SEC)]
    );
    assert_eq!(t.processes(TcpState::Established, 100 * SEC), vec![]);
}

#[test]
fn a_fin_wait2_alert_names_the_local_process_holding_the_other_ends() {
    let mut t = Tracker::new(TrackerConfig {
        rules: vec![Rule::close_wait_leak(), Rule::fin_wait2_held()],
        ..TrackerConfig::default()
    });
    for n in 1..=3 {
        // Our end (pid 20) shut down its write side: FIN_WAIT2 once the peer ACKs the FIN.
        t.apply(&tr(n, TcpState::Established, TcpState::FinWait1, SEC));
        t.apply(&tr(n, TcpState::FinWait1, TcpState::FinWait2, SEC));
        t.set_owners(sock(n), vec![info(20)]);
        // The other end, same namespace, reversed tuple (pid 30): CLOSE_WAIT, never closed.
        let mut peer = tr(n, TcpState::Established, TcpState::CloseWait, SEC);
        peer.sock = sock(100 + n);
        (peer.saddr, peer.daddr) = (peer.daddr, peer.saddr);
        (peer.sport, peer.dport) = (peer.dport, peer.sport);
        t.apply(&peer);
        t.set_owners(sock(100 + n), vec![info(30)]);
    }
    // An orphaned FIN_WAIT2 (its holder called close()) matches no per-process rule.
    t.apply(&tr(4, TcpState::Established, TcpState::FinWait1, SEC));
    t.apply(&tr(4, TcpState::FinWait1, TcpState::FinWait2, SEC));
    let changes = t.evaluate(61 * SEC);
    let fired: Vec<(&str, u32, u32)> = changes
        .iter()
        .map(|c| match c {
            AlertChange::Firing(a) | AlertChange::Resolved(a) => {
                (a.rule.as_str(), a.process.key.pid, a.count)
            }
        })
        .collect();
    assert_eq!(
        fired,
        [("fin_wait2_held", 20, 3), ("close_wait_leak", 30, 3)]
    );
    let AlertChange::Firing(a) = &changes[0] else {
        panic!("firing");
    };
    let holders: Vec<(u32, TcpState, u32)> = a
        .peer_holders
        .iter()
        .map(|h| (h.process.key.pid, h.state, h.count))
        .collect();
    assert_eq!(holders, [(30, TcpState::CloseWait, 3)]);
}

#[test]
fn a_rule_reload_keeps_ages_and_firing_alerts_and_applies_the_new_thresholds() {
    // The default rule: CLOSE_WAIT at least 60 s old.
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 10 * SEC, 10);
    close_wait(&mut t, 2, 0, 20);
    assert_eq!(firing_pids(&t.evaluate(60 * SEC)), [("firing", 20)]);
    assert_eq!(t.next_deadline(), Some(70 * SEC));
    // At 61 s the age threshold drops to 30 s: pid 10's socket, tracked since 10 s, is 51 s
    // old and fires at the next evaluation; pid 20's alert keeps firing since 60 s.
    let lower = Rule::new(
        "close_wait_leak",
        TcpState::CloseWait,
        Some(30 * SEC),
        Some(100),
    );
    assert_eq!(t.set_rules(vec![lower], 61 * SEC), (vec![], vec![]));
    assert_eq!(
        t.next_deadline(),
        Some(40 * SEC),
        "10 s + 30 s, already due"
    );
    let changes = t.evaluate(61 * SEC);
    let [AlertChange::Firing(a)] = changes.as_slice() else {
        panic!("expected pid 10 to fire, got {changes:?}");
    };
    assert_eq!(
        (a.process.key.pid, a.oldest_age_ns, a.fired_at_ns),
        (10, 51 * SEC, 61 * SEC)
    );
    let since: Vec<(u32, u64)> = t
        .firing()
        .iter()
        .map(|a| (a.process.key.pid, a.fired_at_ns))
        .collect();
    assert_eq!(since, [(10, 61 * SEC), (20, 60 * SEC)]);
    // A rule set without close_wait_leak resolves its alerts at once; the table stays.
    let other = Rule::new("syn_sent_stuck", TcpState::SynSent, Some(5 * SEC), None);
    let resolved = t.set_rules(vec![other], 62 * SEC).0;
    assert_eq!(firing_pids(&resolved), [("resolved", 10), ("resolved", 20)]);
    assert!(
        resolved
            .iter()
            .all(|c| matches!(c, AlertChange::Resolved(a) if a.resolved_at_ns == Some(62 * SEC)))
    );
    assert_eq!(t.evaluate(62 * SEC), []);
    assert_eq!(
        (t.watches(TcpState::CloseWait), t.watches(TcpState::SynSent)),
        (false, true)
    );
    assert_eq!(t.len(), 2);
}
