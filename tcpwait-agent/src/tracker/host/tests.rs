//! Host rules over hand-made transitions: counts and ages are the table's, every namespace,
//! owned or not; one alert per rule; exact instants.
use super::*;
use crate::tracker::{
    TrackerConfig,
    tests::{SEC, tr},
};
use TcpState::*;

fn host_rule(max_age_ns: Option<u64>, max_count: Option<u32>) -> Rule {
    Rule {
        scope: Scope::Host,
        ..Rule::new("syn_sent_host", SynSent, max_age_ns, max_count)
    }
}

fn tracker(rule: Rule) -> Tracker {
    Tracker::new(TrackerConfig {
        rules: vec![Rule::close_wait_leak(), rule],
        ..TrackerConfig::default()
    })
}

#[test]
fn a_host_count_rule_fires_above_its_count_and_resolves_below_it() {
    let mut t = tracker(host_rule(None, Some(2)));
    // Not watched: a host rule needs no owners.
    assert_eq!(t.watched_states(), [CloseWait]);
    for n in 1..=2 {
        assert!(!t.apply(&tr(n, Close, SynSent, n * SEC)).needs_owners);
    }
    assert_eq!(t.evaluate_host(3 * SEC), []);
    t.apply(&tr(3, Close, SynSent, 3 * SEC));
    let fired = t.evaluate_host(4 * SEC);
    let a = HostAlert {
        rule: "syn_sent_host".into(),
        state: SynSent,
        count: 3,
        oldest_entered_ns: None,
        oldest_is_lower_bound: false,
        as_of_ns: 4 * SEC,
        fired_at_ns: 4 * SEC,
        resolved_at_ns: None,
    };
    assert_eq!(fired, [HostAlertChange::Firing(a.clone())]);
    assert_eq!(t.evaluate_host(5 * SEC), [], "fires once");
    assert!(t.host_views(5 * SEC)[0].firing);
    t.apply(&tr(2, SynSent, Established, 6 * SEC));
    let resolved = t.evaluate_host(7 * SEC);
    // As a process alert does, it keeps the figures last measured while it fired.
    assert_eq!(
        resolved,
        [HostAlertChange::Resolved(HostAlert {
            as_of_ns: 5 * SEC,
            resolved_at_ns: Some(7 * SEC),
            ..a
        })]
    );
    assert_eq!(t.next_host_deadline(), None, "no age threshold");
}

#[test]
fn a_host_age_rule_fires_at_the_oldest_sockets_deadline_not_1_ns_before() {
    let mut t = tracker(host_rule(Some(2 * SEC), None));
    t.apply(&tr(1, Close, SynSent, 10 * SEC));
    t.apply(&tr(2, Close, SynSent, 11 * SEC));
    assert_eq!(t.next_host_deadline(), Some(12 * SEC));
    assert_eq!(t.evaluate_host(12 * SEC - 1), []);
    let fired = t.evaluate_host(12 * SEC);
    assert!(
        matches!(&fired[..], [HostAlertChange::Firing(a)] if a.count == 2 && a.oldest_entered_ns == Some(10 * SEC)),
        "{fired:?}"
    );
    assert_eq!(t.next_host_deadline(), None, "firing: no deadline");
    let view = &t.host_views(13 * SEC)[0];
    assert_eq!(
        (view.count, view.oldest_age_ns, view.firing),
        (2, Some(3 * SEC), true)
    );
    // The oldest leaves (CLOSE removes it): the next one is 2 s old at 13 s, still matching.
    t.apply(&tr(1, SynSent, Close, 13 * SEC));
    assert_eq!(t.evaluate_host(13 * SEC), []);
    t.apply(&tr(2, SynSent, Established, 14 * SEC));
    let resolved = t.evaluate_host(14 * SEC);
    assert!(
        matches!(&resolved[..], [HostAlertChange::Resolved(a)]
            if (a.count, a.oldest_entered_ns, a.resolved_at_ns) == (1, Some(11 * SEC), Some(14 * SEC))),
        "{resolved:?}"
    );
}

#[test]
fn the_age_index_follows_the_rules_across_a_reload() {
    let mut t = tracker(host_rule(None, Some(100)));
    t.apply(&tr(1, Close, SynSent, SEC));
    assert_eq!(t.host_views(2 * SEC)[0].oldest_age_ns, None);
    // A reload adds an age threshold: the index is built from the table.
    let (process, host) = t.set_rules(vec![host_rule(Some(SEC), None)], 2 * SEC);
    assert_eq!((process, host), (vec![], vec![]));
    assert_eq!(t.next_host_deadline(), Some(2 * SEC));
    assert_eq!(t.host_views(3 * SEC)[0].oldest_age_ns, Some(2 * SEC));
    assert_eq!(t.evaluate_host(3 * SEC).len(), 1);
    // A reload without it resolves the alert.
    let (_, host) = t.set_rules(vec![Rule::close_wait_leak()], 4 * SEC);
    assert!(
        matches!(&host[..], [HostAlertChange::Resolved(a)] if a.resolved_at_ns == Some(4 * SEC)),
        "{host:?}"
    );
    assert!(t.host_rules().is_empty());
}
