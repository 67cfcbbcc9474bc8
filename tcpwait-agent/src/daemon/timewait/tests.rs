//! `status --port`, the TIME_WAIT section and peer alert messages, rendered from hand-made
//! values with exact results.
use super::*;
use crate::{
    model::Tuple,
    tracker::{
        TrackerConfig,
        tests::{NS, tr},
        timewait::{NsCensus, PeerAlert, TwSocket},
    },
};

const SEC: u64 = 1_000_000_000;

fn tw(sport: u16, dport: u16, expires_ns: u64) -> TwSocket {
    TwSocket {
        netns: NS,
        tuple: Tuple {
            saddr: "10.0.0.1".parse().expect("ip"),
            sport,
            daddr: "10.0.0.2".parse().expect("ip"),
            dport,
        },
        expires_ns,
    }
}

#[test]
fn port_report_names_the_dead_listener_and_the_time_left() {
    let mut t = Tracker::new(TrackerConfig::default());
    // A listener on 8080 opens at 1 s (listen() by the on-CPU task, pid 999 "peer") and
    // closes at 4 s.
    let mut open = tr(1, TcpState::Close, TcpState::Listen, SEC);
    open.dport = 0;
    t.apply(&open);
    let mut close = tr(1, TcpState::Listen, TcpState::Close, 4 * SEC);
    close.dport = 0;
    t.apply(&close);
    let mut w = PeerWatch::new(&[]);
    w.apply_census(Census {
        taken_ns: 5 * SEC,
        seconds: 0.1,
        namespaces: vec![NsCensus {
            netns: NS,
            port_range: None,
            sockets: vec![
                tw(8080, 40001, 60 * SEC),
                tw(8080, 40000, 50 * SEC),
                tw(9090, 1, 60 * SEC),
            ],
        }],
        failed: Vec::new(),
    });
    let r = port_report(&t, &w, 8080, 10 * SEC);
    let socks: Vec<(&str, &str, Option<f64>)> = r
        .sockets
        .iter()
        .map(|s| (s.state.as_str(), s.remote.as_str(), s.seconds_left))
        .collect();
    assert_eq!(
        socks,
        [
            ("TIME_WAIT", "10.0.0.2:40000", Some(40.0)),
            ("TIME_WAIT", "10.0.0.2:40001", Some(50.0)),
        ]
    );
    assert_eq!(r.listeners.len(), 1);
    let l = &r.listeners[0];
    assert_eq!(
        (
            l.pid,
            l.comm.as_str(),
            l.open,
            l.listened_s,
            l.closed_ago_s,
            l.netns
        ),
        (999, "peer", false, 3.0, Some(6.0), Some(NS))
    );
    assert_eq!(r.time_wait_free_in_s, Some(50.0));
    assert_eq!(
        r.explanation,
        [
            "2 TIME_WAIT socket(s) hold port 8080 for 50.0 s more: a new listener that sets \
          SO_REUSEADDR binds now if the old one set it too (the kernel needs both; most servers \
          set it); without it bind() fails with EADDRINUSE until then"
        ]
    );
    let free = port_report(&t, &w, 7070, 10 * SEC);
    assert_eq!(
        free.explanation,
        ["nothing tracked holds port 7070: bind() should succeed"]
    );
}

#[test]
fn port_report_explains_each_namespace_on_its_own() {
    let t = Tracker::new(TrackerConfig::default());
    let mut w = PeerWatch::new(&[]);
    let other = NS + 1;
    let mut theirs = tw(8080, 40002, 30 * SEC);
    theirs.netns = other;
    w.apply_census(Census {
        taken_ns: 5 * SEC,
        seconds: 0.1,
        namespaces: vec![
            NsCensus {
                netns: NS,
                port_range: None,
                sockets: vec![tw(8080, 40001, 60 * SEC), tw(8080, 40000, 50 * SEC)],
            },
            NsCensus {
                netns: other,
                port_range: None,
                sockets: vec![theirs],
            },
        ],
        failed: Vec::new(),
    });
    let r = port_report(&t, &w, 8080, 10 * SEC);
    assert_eq!(r.time_wait_free_in_s, Some(50.0));
    let tail = "a new listener that sets SO_REUSEADDR binds now if the old one set it too (the \
                kernel needs both; most servers set it); without it bind() fails with \
                EADDRINUSE until then";
    assert_eq!(
        r.explanation,
        [
            format!(
                "in network namespace {NS}: 2 TIME_WAIT socket(s) hold port 8080 for 50.0 s \
                 more: {tail}"
            ),
            format!(
                "in network namespace {other}: 1 TIME_WAIT socket(s) hold port 8080 for 20.0 s \
                 more: {tail}"
            ),
        ]
    );
}

#[test]
fn peer_alerts_carry_the_rules_labels_and_the_closers() {
    let rule = Rule::time_wait_pileup();
    let mut w = PeerWatch::new(std::slice::from_ref(&rule));
    let sockets = (0..20).map(|i| tw(40000 + i, 443, 60 * SEC)).collect();
    let changes = w.apply_census(Census {
        taken_ns: 5 * SEC,
        seconds: 0.1,
        namespaces: vec![NsCensus {
            netns: NS,
            port_range: Some((40000, 40029)),
            sockets,
        }],
        failed: Vec::new(),
    });
    let [change @ PeerAlertChange::Firing(PeerAlert { group, .. })] = changes.as_slice() else {
        panic!("20 of 30 ports: {changes:?}");
    };
    assert_eq!(group.count, 20);
    let clock = Clock::with_offset(0);
    let m = alert_message(change, &rule, 5 * SEC, &clock, "h1");
    assert_eq!(
        m.key,
        format!("time_wait_pileup/{NS}/10.0.0.1/10.0.0.2:443")
    );
    let labels: Vec<(&str, &str)> = m
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let ns = NS.to_string();
    assert_eq!(
        labels,
        [
            ("alertname", "TcpTimeWaitPileup"),
            ("instance", "h1"),
            ("local", "10.0.0.1"),
            ("netns", ns.as_str()),
            ("remote", "10.0.0.2:443"),
            ("rule", "time_wait_pileup"),
            ("severity", "warning"),
        ]
    );
    assert_eq!(
        m.annotations["summary"],
        "10.0.0.1 -> 10.0.0.2:443 holds 20 TIME_WAIT sockets, 66.7 % of ports 40000-40029; \
         closed by unknown"
    );
    assert_eq!(m.annotations["remedy"], rule.remedy);
    assert_eq!(m.json["scope"], "peer");
    assert_eq!(m.json["count"], 20);
    // Every time with its wall-clock form, as in process and host alerts (README).
    assert_eq!(
        (&m.json["fired_at_ns"], &m.json["fired_at"], &m.json["time"]),
        (
            &serde_json::json!(5 * SEC),
            &serde_json::json!(clock.wall(5 * SEC)),
            &serde_json::json!(clock.wall(5 * SEC))
        )
    );
    assert_eq!(
        (&m.json["resolved_at_ns"], &m.json["resolved_at"]),
        (&serde_json::Value::Null, &serde_json::Value::Null)
    );
    assert_eq!(m.starts_at, clock.wall(5 * SEC).system_time());
    let r = report(&w, 6 * SEC);
    assert_eq!(
        (r.sockets, r.peers_total, r.census_age_s),
        (20, 1, Some(1.0))
    );
    assert_eq!(r.peers[0].alerts, ["time_wait_pileup"]);
    assert_eq!(r.peers[0].first_expiry_s, 54.0);
}
