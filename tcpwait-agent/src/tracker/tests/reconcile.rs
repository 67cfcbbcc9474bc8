//! Bootstrap and reconciliation against inet_diag, and synthetic entries meeting transitions.
use super::*;

const CW: &[TcpState] = &[TcpState::CloseWait];

#[test]
fn reconcile_adds_missing_sockets_aged_from_agent_start() {
    let mut t = Tracker::new(TrackerConfig::default());
    // At bootstrap (agent started at 900 s) a CLOSE_WAIT socket exists, ACK clock unknown.
    let truth = vec![(diag(1, TcpState::CloseWait, None), vec![info(10)])];
    let r = t.reconcile(&truth, CW, &[NS], 1000 * SEC, 900 * SEC);
    assert_eq!(
        r,
        ReconcileReport {
            added: 1,
            ..ReconcileReport::default()
        }
    );
    let id = synthetic_id(7_001);
    assert!(is_synthetic(id) && !is_synthetic(sock(1)));
    assert_eq!(t.socket_by_tuple(NS, &tuple(1)), Some(id));
    let d = t.socket(id, 1000 * SEC).expect("added");
    assert_eq!(
        (d.state, d.entered_ns, d.age_ns),
        (TcpState::CloseWait, 900 * SEC, 100 * SEC)
    );
    assert!(d.age_is_lower_bound);
    assert_eq!(d.recv_q, Some(10));
    assert_eq!(t.owners_of(id), vec![key(10)]);
    // "Age ≥ 100 s" already exceeds 60 s: the alert fires and says the age is a lower bound.
    let changes = t.evaluate(1000 * SEC);
    let [AlertChange::Firing(a)] = changes.as_slice() else {
        panic!("expected one firing alert, got {changes:?}");
    };
    assert_eq!(
        (a.oldest_age_ns, a.oldest_is_lower_bound),
        (100 * SEC, true)
    );
    assert_eq!(t.counters().repairs_added, 1);
}

#[test]
fn reconcile_takes_the_tighter_of_agent_start_and_last_ack_recv() {
    let mut t = Tracker::new(TrackerConfig::default());
    let truth = vec![
        // Last ACK (the peer's FIN) 250 s ago: older than the agent, the ACK bound is tighter.
        (diag(1, TcpState::CloseWait, Some(250_000)), vec![]),
        // 50 s ago: younger than the agent's 100 s, the agent bound is tighter.
        (diag(2, TcpState::CloseWait, Some(50_000)), vec![]),
        // ESTABLISHED is not in the reconciled states: ignored.
        (diag(3, TcpState::Established, Some(1)), vec![]),
    ];
    let r = t.reconcile(&truth, CW, &[NS], 1000 * SEC, 900 * SEC);
    assert_eq!(r.added, 2);
    let entered = |n: u64| {
        t.socket(synthetic_id(7_000 + n), 1000 * SEC)
            .map(|d| (d.entered_ns, d.age_ns))
    };
    // 1000 s − (250 s − one jiffy of margin) = 750.01 s.
    assert_eq!(
        entered(1),
        Some((
            750 * SEC + ACK_CLOCK_MARGIN_NS,
            250 * SEC - ACK_CLOCK_MARGIN_NS
        ))
    );
    assert_eq!(entered(2), Some((900 * SEC, 100 * SEC)));
    assert_eq!(entered(3), None);
    assert_eq!(t.len(), 2);
}

#[test]
fn reconcile_removes_gone_corrects_states_and_counts_repairs() {
    let mut t = Tracker::new(TrackerConfig::default());
    close_wait(&mut t, 1, 10 * SEC, 10); // CLOSE_WAIT→LAST_ACK event lost: gone from inet_diag
    close_wait(&mut t, 2, 20 * SEC, 10); // still there
    t.apply(&tr(3, TcpState::SynRecv, TcpState::Established, 30 * SEC)); // FIN event lost
    t.apply(&tr(4, TcpState::SynRecv, TcpState::Established, 40 * SEC)); // not reconciled
    let truth = vec![
        (diag(2, TcpState::CloseWait, Some(30_000)), vec![]),
        (diag(3, TcpState::CloseWait, Some(5_000)), vec![info(11)]),
    ];
    let r = t.reconcile(&truth, CW, &[NS], 50 * SEC, 0);
    assert_eq!(
        r,
        ReconcileReport {
            removed: 1,
            corrected: 1,
            ..ReconcileReport::default()
        }
    );
    assert_eq!(t.socket(sock(1), 50 * SEC), None);
    // Tracked sockets keep their exact entry; known owners stay when inet_diag gives none.
    let d2 = t.socket(sock(2), 50 * SEC).expect("kept");
    assert_eq!(
        (d2.entered_ns, d2.age_is_lower_bound, d2.recv_q),
        (20 * SEC, false, Some(20))
    );
    assert_eq!(t.owners_of(sock(2)), vec![key(10)]);
    // Corrected: entered CLOSE_WAIT no later than the ACK bound 50 − (5 − 0.01) s.
    let d3 = t.socket(sock(3), 50 * SEC).expect("corrected");
    assert_eq!(d3.state, TcpState::CloseWait);
    assert_eq!(
        (d3.entered_ns, d3.age_is_lower_bound),
        (45 * SEC + ACK_CLOCK_MARGIN_NS, true)
    );
    assert_eq!(t.owners_of(sock(3)), vec![key(11)]);
    assert_eq!(
        t.socket(sock(4), 50 * SEC).map(|d| d.state),
        Some(TcpState::Established)
    );
    let c = t.counters();
    assert_eq!(
        (c.repairs_added, c.repairs_removed, c.repairs_corrected),
        (0, 1, 1)
    );
    // The next identical snapshot repairs nothing; the cumulative counters stay.
    let r = t.reconcile(&truth, CW, &[NS], 51 * SEC, 0);
    assert_eq!(r, ReconcileReport::default());
    assert_eq!(t.counters().repairs_removed, 1);
}

#[test]
fn a_synthetic_entry_is_rekeyed_by_the_first_real_transition() {
    let mut t = Tracker::new(TrackerConfig::default());
    let truth = vec![
        (diag(1, TcpState::CloseWait, None), vec![info(10)]),
        (diag(2, TcpState::CloseWait, None), vec![info(10)]),
    ];
    t.reconcile(&truth, CW, &[NS], 1000 * SEC, 900 * SEC);
    // The owner finally closes socket 1: CLOSE_WAIT→LAST_ACK under its kernel address.
    let a = t.apply(&tr(1, TcpState::CloseWait, TcpState::LastAck, 1001 * SEC));
    assert_eq!(
        a.change,
        TableChange::Rekeyed {
            from: synthetic_id(7_001)
        }
    );
    assert_eq!(t.socket(synthetic_id(7_001), 1001 * SEC), None);
    let d = t.socket(sock(1), 1002 * SEC).expect("rekeyed");
    assert_eq!(
        (d.state, d.entered_ns, d.age_is_lower_bound),
        (TcpState::LastAck, 1001 * SEC, false)
    );
    assert_eq!(
        (d.recv_q, t.socket_by_tuple(NS, &tuple(1))),
        (Some(10), Some(sock(1)))
    );
    assert_eq!(t.owners_of(sock(1)), vec![key(10)], "owners carry over");
    assert_eq!(t.counters().rekeyed, 1);
    // A queued ESTABLISHED→CLOSE_WAIT of socket 2 (same state) gives its exact entry time.
    t.apply(&tr(
        2,
        TcpState::Established,
        TcpState::CloseWait,
        950 * SEC,
    ));
    let d = t.socket(sock(2), 1002 * SEC).expect("rekeyed");
    assert_eq!((d.entered_ns, d.age_is_lower_bound), (950 * SEC, false));
    // Its CLOSE removes it under the kernel address.
    t.apply(&tr(2, TcpState::CloseWait, TcpState::Close, 1003 * SEC));
    assert_eq!((t.len(), t.counters().close_untracked), (1, 0));
}

#[test]
fn after_an_overflow_missing_sockets_are_not_aged_from_agent_start() {
    let mut t = Tracker::new(TrackerConfig {
        max_sockets: 1,
        ..TrackerConfig::default()
    });
    t.apply(&tr(1, TcpState::SynRecv, TcpState::Established, 10 * SEC));
    // Socket 2 enters CLOSE_WAIT at 20 s while the table is full: refused.
    t.apply(&tr(2, TcpState::Established, TcpState::CloseWait, 20 * SEC));
    t.apply(&tr(1, TcpState::Established, TcpState::Close, 30 * SEC));
    let truth = vec![(diag(2, TcpState::CloseWait, None), vec![])];
    assert_eq!(t.reconcile(&truth, CW, &[NS], 40 * SEC, 0).added, 1);
    let d = t.socket(synthetic_id(7_002), 40 * SEC).expect("added");
    assert_eq!(
        (d.entered_ns, d.age_ns, d.age_is_lower_bound),
        (20 * SEC, 20 * SEC, true)
    );
}

#[test]
fn a_new_socket_does_not_inherit_a_stale_synthetic_entry() {
    let mut t = Tracker::new(TrackerConfig::default());
    let truth = vec![(diag(1, TcpState::CloseWait, None), vec![info(10)])];
    t.reconcile(&truth, CW, &[NS], 1000 * SEC, 900 * SEC);
    // The socket went away unseen; a new one with the same tuple starts from CLOSE.
    let mut syn = tr(1, TcpState::Close, TcpState::SynRecv, 1001 * SEC);
    syn.sock = sock(77);
    assert_eq!(t.apply(&syn).change, TableChange::Inserted);
    assert_eq!(t.socket(synthetic_id(7_001), 1001 * SEC), None);
    assert_eq!(t.socket_by_tuple(NS, &tuple(1)), Some(sock(77)));
    assert_eq!((t.owners_of(sock(77)), t.len()), (vec![], 1));
    assert_eq!((t.counters().reused_address, t.counters().rekeyed), (1, 0));
}

#[test]
fn a_holder_that_exited_after_the_scan_stays_gone() {
    let mut t = Tracker::new(TrackerConfig::default());
    // The scan saw pids 10 and 11 holding the socket; 11 had exited by the liveness check.
    let truth = vec![(diag(1, TcpState::CloseWait, None), vec![info(10), info(11)])];
    let r = t.apply_snapshot(&truth, CW, &[NS], 1000 * SEC, 900 * SEC, &[key(11)]);
    assert_eq!(r.added, 1);
    assert_eq!(t.owners_of(synthetic_id(7_001)), vec![key(10)]);
    assert_eq!(t.process_keys(), vec![key(10)]);
    // The next snapshot no longer lists 11: nothing changes.
    let truth = vec![(diag(1, TcpState::CloseWait, None), vec![info(10)])];
    t.apply_snapshot(&truth, CW, &[NS], 1001 * SEC, 900 * SEC, &[]);
    assert_eq!(t.owners_of(synthetic_id(7_001)), vec![key(10)]);
}

/// A second network namespace (a pod): the same 4-tuples as [`NS`] can live there at once.
const POD_NS: u32 = 4_026_532_999;

/// Socket `n`'s transition in namespace `netns` (the same tuple as `tr(n, …)`).
fn tr_in(netns: u32, n: u64, id: u64, old: TcpState, new: TcpState, ts: u64) -> Transition {
    Transition {
        netns,
        sock: sock(id),
        ..tr(n, old, new, ts)
    }
}

fn diag_in(netns: u32, n: u64) -> DiagSocket {
    DiagSocket {
        netns,
        ..diag(n, TcpState::CloseWait, None)
    }
}

#[test]
fn a_dump_of_namespace_a_leaves_the_sockets_of_namespace_b_untouched() {
    let mut t = Tracker::new(TrackerConfig::default());
    t.apply(&tr_in(
        NS,
        1,
        1,
        TcpState::Established,
        TcpState::CloseWait,
        SEC,
    ));
    t.apply(&tr_in(
        POD_NS,
        2,
        2,
        TcpState::Established,
        TcpState::CloseWait,
        SEC,
    ));
    // The pod's namespace could not be dumped: only the host's is in the snapshot, and it no
    // longer holds socket 1.
    let r = t.reconcile(&[], CW, &[NS], 10 * SEC, 0);
    assert_eq!((r.removed, r.added), (1, 0));
    assert_eq!(t.socket_by_tuple(NS, &tuple(1)), None);
    assert_eq!(t.socket_by_tuple(POD_NS, &tuple(2)), Some(sock(2)));
    // A record of namespace B (an exact lookup) in a snapshot that dumped no namespace whole:
    // applied, and B's other socket stays.
    let lookup = [(diag_in(POD_NS, 3), vec![info(30)])];
    let r = t.reconcile(&lookup, CW, &[], 11 * SEC, 0);
    assert_eq!((r.added, r.removed), (1, 0));
    assert_eq!(t.socket_by_tuple(POD_NS, &tuple(2)), Some(sock(2)));
    assert_eq!(t.owners_of(synthetic_id(7_003)), vec![key(30)]);
    // Once B is dumped whole, its truth applies to it alone.
    let r = t.reconcile(&[], CW, &[POD_NS], 12 * SEC, 0);
    assert_eq!(r.removed, 2);
    assert!(t.is_empty());
}

#[test]
fn the_same_tuple_in_two_namespaces_is_two_sockets_with_their_own_owners() {
    let mut t = Tracker::new(TrackerConfig::default());
    // Socket 1's tuple, once in the host namespace (kernel socket 1) and once in a pod's
    // (kernel socket 101).
    t.apply(&tr_in(
        NS,
        1,
        1,
        TcpState::Established,
        TcpState::CloseWait,
        SEC,
    ));
    t.apply(&tr_in(
        POD_NS,
        1,
        101,
        TcpState::Established,
        TcpState::CloseWait,
        SEC,
    ));
    assert_eq!((t.len(), t.counters().tuple_conflicts), (2, 0));
    let host = (diag_in(NS, 1), vec![info(10)]);
    let pod = (
        DiagSocket {
            inode: 90_001,
            ..diag_in(POD_NS, 1)
        },
        vec![info(20)],
    );
    let r = t.reconcile(&[host, pod], CW, &[NS, POD_NS], 2 * SEC, 0);
    assert_eq!(
        r,
        ReconcileReport::default(),
        "both matched, nothing repaired"
    );
    assert_eq!(t.owners_of(sock(1)), vec![key(10)]);
    assert_eq!(t.owners_of(sock(101)), vec![key(20)]);
    let counts: Vec<(u32, u32)> = t
        .processes(TcpState::CloseWait, 3 * SEC)
        .iter()
        .map(|p| (p.process.key.pid, p.count))
        .collect();
    assert_eq!(counts, [(10, 1), (20, 1)]);
}

#[test]
fn owner_queries_name_the_connect_and_listen_callers_of_the_same_namespace() {
    let mut t = Tracker::new(TrackerConfig::default());
    let client_task = |pid| Task {
        pid,
        tid: pid,
        comm: Comm(*b"client\0\0\0\0\0\0\0\0\0\0"),
    };
    // A client socket: connect() ran in pid 41's context.
    let mut connect = tr_in(POD_NS, 1, 1, TcpState::Close, TcpState::SynSent, SEC);
    connect.task = client_task(41);
    t.apply(&connect);
    // An accepted socket of a listener that pid 52 opened on the same port in the host
    // namespace, and one that pid 53 opened in the pod's.
    let mut listen = tr_in(NS, 2, 500, TcpState::Close, TcpState::Listen, SEC);
    listen.task = client_task(52);
    t.apply(&listen);
    let mut listen_pod = tr_in(POD_NS, 2, 501, TcpState::Close, TcpState::Listen, SEC);
    listen_pod.task = client_task(53);
    t.apply(&listen_pod);
    t.apply(&tr_in(
        POD_NS,
        2,
        2,
        TcpState::SynRecv,
        TcpState::Established,
        2 * SEC,
    ));
    t.apply(&tr_in(
        POD_NS,
        2,
        2,
        TcpState::Established,
        TcpState::CloseWait,
        3 * SEC,
    ));
    let q = t.owner_query(sock(2)).expect("tracked");
    assert_eq!(
        (q.netns, q.tuple, q.candidates),
        (POD_NS, tuple(2), vec![53])
    );
    // The client's hint (41) goes first; the listener on its local port in its namespace
    // (53, SERVER's port: every test tuple shares it) follows.
    t.apply(&tr_in(
        POD_NS,
        1,
        1,
        TcpState::SynSent,
        TcpState::Established,
        2 * SEC,
    ));
    t.apply(&tr_in(
        POD_NS,
        1,
        1,
        TcpState::Established,
        TcpState::CloseWait,
        3 * SEC,
    ));
    let q = t.owner_query(sock(1)).expect("tracked");
    assert_eq!(q.candidates, vec![41, 53]);
    // A hint is never an owner.
    assert_eq!(t.owners_of(sock(1)), vec![]);
    assert!(t.awaits_owner(sock(1), 3 * SEC));
    // Known owners replace it; the pod's listener closing drops it as a candidate.
    assert!(t.set_owners(sock(1), vec![info(41)]));
    assert_eq!(t.owners_of(sock(1)), vec![key(41)]);
    t.apply(&tr_in(
        POD_NS,
        2,
        501,
        TcpState::Listen,
        TcpState::Close,
        4 * SEC,
    ));
    assert_eq!(
        t.owner_query(sock(2)).expect("tracked").candidates,
        Vec::<u32>::new()
    );
}

#[test]
fn a_connecting_socket_tracked_without_its_port_takes_the_dumped_tuple() {
    let rule = Rule::new("connect_stuck", TcpState::SynSent, Some(SEC), None);
    let mut t = Tracker::new(TrackerConfig {
        rules: vec![rule],
        ..TrackerConfig::default()
    });
    // CLOSE→SYN_SENT runs before inet_hash_connect picks the port: the event has sport 0.
    let mut syn = tr(1, TcpState::Close, TcpState::SynSent, 5 * SEC);
    syn.sport = 0;
    assert!(t.apply(&syn).needs_owners);
    let mut gone = tr(2, TcpState::Close, TcpState::SynSent, 5 * SEC);
    gone.sport = 0;
    gone.dport = 9;
    t.apply(&gone);
    let q = t.owner_query(sock(1)).expect("tracked");
    assert_eq!(q.tuple.sport, 0);
    // A lookup-only snapshot (no namespace dumped whole) shows it with its port.
    let truth = vec![(diag(1, TcpState::SynSent, None), vec![info(10)])];
    let r = t.reconcile(&truth, &[TcpState::SynSent], &[], 6 * SEC, 0);
    assert_eq!(r, ReconcileReport::default(), "matched, not added");
    assert_eq!(t.socket_by_tuple(NS, &tuple(1)), Some(sock(1)));
    let d = t.socket(sock(1), 6 * SEC).expect("tracked");
    assert_eq!((d.entered_ns, d.age_is_lower_bound), (5 * SEC, false));
    assert_eq!(t.owners_of(sock(1)), vec![key(10)]);
    assert_eq!(firing_pids(&t.evaluate(6 * SEC)), [("firing", 10)]);
    // A full dump of the namespace that lacks the other portless socket: it is gone.
    let r = t.reconcile(&truth, &[TcpState::SynSent], &[NS], 7 * SEC, 0);
    assert_eq!((r.removed, r.added), (1, 0));
    assert!(t.socket(sock(2), 7 * SEC).is_none());
    assert_eq!(t.len(), 1);
}

#[test]
fn an_accepted_socket_tracked_with_its_peer_unset_is_repaired() {
    use TcpState::*;
    let mut t = Tracker::new(TrackerConfig::default());
    // Before Linux 6.15, LISTEN → SYN_RECV of an accepted socket carries the peer unset; its
    // SYN_RECV → ESTABLISHED (which would set the tuple) was lost.
    let mut syn = tr(1, Listen, SynRecv, 10 * SEC);
    syn.dport = 0;
    syn.daddr = ip("0.0.0.0");
    t.apply(&syn);
    assert_eq!(t.len(), 1);
    // The dump shows the socket ESTABLISHED under its full tuple.
    let truth = vec![(diag(1, Established, None), vec![])];
    let r = t.reconcile_all(&truth, CW, &TcpState::TRACKED, &[NS], 100 * SEC, 0);
    assert_eq!((r.added, r.removed, r.corrected), (1, 1, 0));
    assert_eq!(t.len(), 1);
    assert_eq!(t.socket_by_tuple(NS, &tuple(1)), Some(synthetic_id(7_001)));
    assert!(t.socket(sock(1), 100 * SEC).is_none());
}

#[test]
fn reconcile_all_repairs_phantoms_in_every_state_in_one_pass() {
    use TcpState::*;
    let mut t = Tracker::new(TrackerConfig::default());
    // Entries whose later transitions were lost, in states no rule watches.
    t.apply(&tr(1, Established, FinWait1, 10 * SEC)); // FIN_WAIT2 and CLOSE lost: gone
    t.apply(&tr(2, SynRecv, Established, 10 * SEC)); // closed, every event lost: gone
    t.apply(&tr(3, CloseWait, LastAck, 10 * SEC)); // LAST_ACK → CLOSE lost: gone
    t.apply(&tr(4, SynRecv, Established, 10 * SEC)); // still ESTABLISHED
    t.apply(&tr(5, SynRecv, Established, 10 * SEC)); // FIN_WAIT1 lost: now FIN_WAIT2
    let truth = vec![
        (diag(4, Established, None), vec![]),
        (diag(5, FinWait2, Some(1_000)), vec![]),
        // Not tracked (every event of it lost): added, under a synthetic id.
        (diag(6, Established, None), vec![]),
    ];
    let r = t.reconcile_all(&truth, CW, &TcpState::TRACKED, &[NS], 100 * SEC, 0);
    assert_eq!((r.added, r.removed, r.corrected), (1, 3, 1));
    assert_eq!(t.len(), 3);
    assert_eq!(t.socket_by_tuple(NS, &tuple(6)), Some(synthetic_id(7_006)));
    let state = |n: u64| t.socket(sock(n), 100 * SEC).map(|d| d.state);
    assert_eq!(
        [1, 2, 3, 4, 5, 6].map(state),
        [None, None, None, Some(Established), Some(FinWait2), None]
    );
    // Watched only (the narrower `reconcile`): the same phantoms would have stayed.
    let mut t = Tracker::new(TrackerConfig::default());
    t.apply(&tr(1, Established, FinWait1, 10 * SEC));
    let r = t.reconcile(&[], CW, &[NS], 100 * SEC, 0);
    assert_eq!((r.removed, t.len()), (0, 1));
}
