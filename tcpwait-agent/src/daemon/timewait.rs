//! TIME_WAIT pile-ups and "who holds port P", seen from the state task: each census from the
//! census thread goes to the pure `PeerWatch` and its peer alerts to the same sinks as the
//! process alerts; `status` gets its TIME_WAIT section and `status --port P` its answer;
//! `/metrics` gets per-peer series for the top [`TOP_PEERS_METRICS`] peers only (bounded
//! cardinality: a host can hold 100,000 TIME_WAIT sockets toward as many peers).
use std::{collections::BTreeMap, sync::atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde_json::json;

use super::{Daemon, delivery::AlertMessage};
use crate::{
    api::timewait::{
        CloserReport, ListenerReport, PortReport, PortSocket, TimeWaitPeer, TimeWaitReport,
    },
    event::TcpState,
    output::{Clock, endpoint, escape_control},
    tracker::{
        Tracker,
        rules::Rule,
        timewait::{Census, Closer, PeerAlertChange, PeerGroup, PeerWatch},
    },
};

/// Peers listed in `status` at most (most TIME_WAIT sockets first).
pub const TOP_PEERS_SHOWN: usize = 20;
/// Peers with per-peer metric series at most.
pub const TOP_PEERS_METRICS: usize = 20;

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn netns_opt(ns: u32) -> Option<u32> {
    (ns != 0).then_some(ns)
}

fn closers(c: &[Closer]) -> Vec<CloserReport> {
    c.iter()
        .map(|c| CloserReport {
            pid: c.pid,
            comm: c.comm.clone(),
            closes: c.closes,
        })
        .collect()
}

impl Daemon {
    /// Takes in one census: new counts, and the peer alerts that changed.
    pub(super) fn on_census(&mut self, census: Census) {
        let now = census.taken_ns;
        let changes = self.timewait.apply_census(census);
        let rules = self.timewait.rules().to_vec();
        self.announce_peer(&changes, &rules, now);
    }

    /// A configuration reload: the new peer rules; alerts of peer rules that went resolve.
    pub(super) fn set_peer_rules(&mut self, rules: &[Rule], now: u64) {
        let old = self.timewait.rules().to_vec();
        let resolved = self.timewait.set_rules(rules, now);
        self.announce_peer(&resolved, &old, now);
    }

    fn announce_peer(&mut self, changes: &[PeerAlertChange], rules: &[Rule], now: u64) {
        for change in changes {
            let a = match change {
                PeerAlertChange::Firing(a) | PeerAlertChange::Resolved(a) => a,
            };
            let Some(rule) = rules.iter().find(|r| r.name == a.rule) else {
                continue;
            };
            self.announce_one(
                alert_line(change, rule, now, &self.clock, self.args.json),
                &alert_message(change, rule, now, &self.clock, &self.instance),
            );
        }
    }
}

fn peer(g: &PeerGroup, now: u64, alerts: Vec<String>) -> TimeWaitPeer {
    TimeWaitPeer {
        netns: netns_opt(g.key.netns),
        local: g.key.local.to_string(),
        remote: g.key.remote.to_string(),
        port: g.key.port,
        count: u64::from(g.count),
        port_range: [g.range.0, g.range.1],
        share: g.share,
        rate_per_s: g.rate_per_s,
        closers: closers(&g.closers),
        first_expiry_s: secs(g.first_expiry_ns.saturating_sub(now)),
        alerts,
    }
}

/// The TIME_WAIT section of `status` at `now`.
pub(super) fn report(w: &PeerWatch, now: u64) -> TimeWaitReport {
    let firing: Vec<_> = w.firing().collect();
    TimeWaitReport {
        census_age_s: w.last.map(|(t, _, _)| secs(now.saturating_sub(t))),
        census_seconds: w.last.map_or(0.0, |(_, s, _)| s),
        census_failed_namespaces: w.last.map_or(0, |(_, _, f)| f as u64),
        sockets: w.socket_count() as u64,
        peers_total: w.peers_total as u64,
        peers: w
            .groups()
            .iter()
            .take(TOP_PEERS_SHOWN)
            .map(|g| {
                let alerts = firing
                    .iter()
                    .filter(|a| a.group.key == g.key)
                    .map(|a| a.rule.clone())
                    .collect();
                peer(g, now, alerts)
            })
            .collect(),
        closes_unrecorded: w.close_overflow,
    }
}

/// `status --port P` at `now`: tracked sockets on P, its TIME_WAIT sockets, its listeners.
pub(super) fn port_report(t: &Tracker, w: &PeerWatch, port: u16, now: u64) -> PortReport {
    let view = t.on_port(port, now);
    let mut sockets: Vec<PortSocket> = view
        .sockets
        .iter()
        .map(|(s, holders)| PortSocket {
            netns: netns_opt(s.netns),
            state: s.state.name().to_owned(),
            local: endpoint(s.tuple.saddr, s.tuple.sport),
            remote: endpoint(s.tuple.daddr, s.tuple.dport),
            age_s: Some(secs(s.age_ns)),
            age_is_lower_bound: s.age_is_lower_bound,
            seconds_left: None,
            holders: holders
                .iter()
                .map(|p| CloserReport {
                    pid: p.key.pid,
                    comm: p.comm.clone(),
                    closes: 0,
                })
                .collect(),
        })
        .collect();
    let tw = w.on_port(port, now);
    let free_at = tw.iter().map(|s| s.expires_ns).max();
    sockets.extend(tw.iter().map(|s| PortSocket {
        netns: netns_opt(s.netns),
        state: TcpState::TimeWait.name().to_owned(),
        local: endpoint(s.tuple.saddr, s.tuple.sport),
        remote: endpoint(s.tuple.daddr, s.tuple.dport),
        age_s: None,
        age_is_lower_bound: false,
        seconds_left: Some(secs(s.expires_ns - now)),
        holders: Vec::new(),
    }));
    let mut listeners: Vec<ListenerReport> = view
        .listening
        .iter()
        .map(|(ns, l)| ListenerReport {
            netns: netns_opt(*ns),
            pid: l.pid,
            comm: l.comm.clone(),
            open: true,
            listened_s: secs(now.saturating_sub(l.since_ns)),
            closed_ago_s: None,
        })
        .collect();
    listeners.extend(view.closed.iter().map(|c| ListenerReport {
        netns: netns_opt(c.netns),
        pid: c.listener.pid,
        comm: c.listener.comm.clone(),
        open: false,
        listened_s: secs(c.closed_ns.saturating_sub(c.listener.since_ns)),
        closed_ago_s: Some(secs(now.saturating_sub(c.closed_ns))),
    }));
    // A port number belongs to one network namespace: what holds it in one does not stop a
    // bind in another. Each namespace gets its own sentences, named when there are several.
    let mut namespaces: Vec<u32> = view
        .listening
        .iter()
        .map(|(ns, _)| *ns)
        .chain(view.sockets.iter().map(|(s, _)| s.netns))
        .chain(tw.iter().map(|s| s.netns))
        .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut explanation = Vec::new();
    for &ns in &namespaces {
        let prefix = if namespaces.len() > 1 {
            format!("in network namespace {ns}: ")
        } else {
            String::new()
        };
        if let Some((_, l)) = view.listening.iter().find(|(n, _)| *n == ns) {
            explanation.push(format!(
                "{prefix}port {port} is listened on by pid {} ({}): a second listener fails \
                 with EADDRINUSE unless both set SO_REUSEPORT",
                l.pid,
                escape_control(&l.comm)
            ));
        }
        let others = view
            .sockets
            .iter()
            .filter(|(s, _)| s.netns == ns && s.state != TcpState::Listen)
            .count();
        if others > 0 {
            explanation.push(format!(
                "{prefix}{others} connection(s) still use port {port} (states above): a new \
                 listener binds only with SO_REUSEADDR, and only if their old listener set it too"
            ));
        }
        let held: Vec<_> = tw.iter().filter(|s| s.netns == ns).collect();
        if let Some(at) = held.iter().map(|s| s.expires_ns).max() {
            explanation.push(format!(
                "{prefix}{} TIME_WAIT socket(s) hold port {port} for {:.1} s more: a new \
                 listener that sets SO_REUSEADDR binds now if the old one set it too (the kernel \
                 needs both; most servers set it); without it bind() fails with EADDRINUSE until \
                 then",
                held.len(),
                secs(at - now)
            ));
        }
    }
    if explanation.is_empty() {
        explanation.push(format!(
            "nothing tracked holds port {port}: bind() should succeed"
        ));
    }
    PortReport {
        port,
        sockets,
        listeners,
        time_wait_free_in_s: free_at.map(|at| secs(at - now)),
        explanation,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    netns: String,
    local: String,
    remote: String,
    port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloserLabels {
    netns: String,
    local: String,
    remote: String,
    port: u16,
    pid: u32,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

/// Registers the TIME_WAIT series into `r`.
pub(super) fn register(r: &mut Registry, w: &PeerWatch) {
    let total = Gauge::<i64>::default();
    total.set(w.socket_count() as i64);
    r.register(
        "tcpwait_timewait_sockets",
        "TIME_WAIT sockets in every network namespace, as of the last census",
        total,
    );
    let cost = Gauge::<f64, AtomicU64>::default();
    cost.set(w.last.map_or(0.0, |(_, s, _)| s));
    r.register(
        "tcpwait_timewait_census_duration_seconds",
        "Wall time of the last TIME_WAIT census (every namespace dumped)",
        cost,
    );
    let count = Family::<PeerLabels, Gauge>::default();
    let share = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    let rate = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    let closes = Family::<CloserLabels, Gauge>::default();
    for g in w.groups().iter().take(TOP_PEERS_METRICS) {
        let labels = PeerLabels {
            netns: netns_opt(g.key.netns).map_or_else(String::new, |n| n.to_string()),
            local: g.key.local.to_string(),
            remote: g.key.remote.to_string(),
            port: g.key.port,
        };
        count.get_or_create(&labels).set(i64::from(g.count));
        share.get_or_create(&labels).set(g.share);
        if let Some(x) = g.rate_per_s {
            rate.get_or_create(&labels).set(x);
        }
        for c in &g.closers {
            closes
                .get_or_create(&CloserLabels {
                    netns: labels.netns.clone(),
                    local: labels.local.clone(),
                    remote: labels.remote.clone(),
                    port: labels.port,
                    pid: c.pid,
                    comm: escape_control(&c.comm).into_owned(),
                })
                .set(i64::try_from(c.closes).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "tcpwait_peer_timewait_sockets",
        "TIME_WAIT sockets per (netns, local address -> remote address:port), top peers only",
        count,
    );
    r.register(
        "tcpwait_peer_timewait_port_share",
        "A peer's TIME_WAIT sockets / ports in its namespace's ip_local_port_range (0..1)",
        share,
    );
    r.register(
        "tcpwait_peer_timewait_closes_per_second",
        "Active closes toward the peer per second over the last census interval",
        rate,
    );
    r.register(
        "tcpwait_peer_timewait_closer_closes",
        "Active closes toward the peer by each closing process (ESTABLISHED -> FIN_WAIT1)",
        closes,
    );
    let firing = Family::<RuleLabel, Gauge>::default();
    for rule in w.rules() {
        // A zero series per peer rule, so the absence of alerts is visible.
        firing
            .get_or_create(&RuleLabel {
                rule: rule.name.clone(),
            })
            .set(0);
    }
    for a in w.firing() {
        firing
            .get_or_create(&RuleLabel {
                rule: a.rule.clone(),
            })
            .inc();
    }
    r.register(
        "tcpwait_peer_alerts_firing",
        "Peer alerts (scope = \"peer\" rules) firing, by rule",
        firing,
    );
}

fn summary(g: &PeerGroup) -> String {
    let who: Vec<String> = g
        .closers
        .iter()
        .map(|c| format!("{} (pid {})", c.comm, c.pid))
        .collect();
    format!(
        "{} -> {} holds {} TIME_WAIT sockets, {:.1} % of ports {}-{}; closed by {}",
        g.key.local,
        endpoint(g.key.remote, g.key.port),
        g.count,
        g.share * 100.0,
        g.range.0,
        g.range.1,
        if who.is_empty() {
            "unknown".to_owned()
        } else {
            who.join(", ")
        }
    )
}

/// One line for a peer alert that fired or resolved: text, or a JSON object.
pub(super) fn alert_line(
    change: &PeerAlertChange,
    rule: &Rule,
    now: u64,
    clock: &Clock,
    as_json: bool,
) -> String {
    let (status, a) = match change {
        PeerAlertChange::Firing(a) => ("firing", a),
        PeerAlertChange::Resolved(a) => ("resolved", a),
    };
    let g = &a.group;
    if as_json {
        let line = super::report::alert_json(
            status,
            &a.rule,
            rule.labels(),
            [
                json!({
                "state": TcpState::TimeWait.name(),
                "scope": "peer",
                "netns": netns_opt(g.key.netns),
                "local": g.key.local.to_string(),
                "remote": g.key.remote.to_string(),
                "port": g.key.port,
                "count": g.count,
                "share": g.share,
                "port_range": [g.range.0, g.range.1],
                "rate_per_s": g.rate_per_s,
                "closers": closers(&g.closers),
                }),
                super::report::alert_times(a.fired_at_ns, a.resolved_at_ns, now, clock),
            ],
        )
        .to_string();
        return crate::output::escape_json(&line).into_owned();
    }
    format!(
        "alert={status} rule={} state=TIME_WAIT netns={} peer={} count={} share={:.4} \
         closers=\"{}\"",
        a.rule,
        g.key.netns,
        endpoint(g.key.remote, g.key.port),
        g.count,
        g.share,
        escape_control(&summary(g)).replace('"', "\\\"")
    )
}

/// The change as the delivery sinks take it.
pub(super) fn alert_message(
    change: &PeerAlertChange,
    rule: &Rule,
    now: u64,
    clock: &Clock,
    instance: &str,
) -> AlertMessage {
    let (firing, a) = match change {
        PeerAlertChange::Firing(a) => (true, a),
        PeerAlertChange::Resolved(a) => (false, a),
    };
    let g = &a.group;
    let mut labels = BTreeMap::from([
        ("alertname".to_owned(), rule.alertname.clone()),
        ("rule".to_owned(), a.rule.clone()),
        ("instance".to_owned(), instance.to_owned()),
        ("severity".to_owned(), rule.severity.clone()),
        ("local".to_owned(), g.key.local.to_string()),
        ("remote".to_owned(), endpoint(g.key.remote, g.key.port)),
    ]);
    if let Some(ns) = netns_opt(g.key.netns) {
        labels.insert("netns".into(), ns.to_string());
    }
    let mut annotations = BTreeMap::from([
        ("summary".to_owned(), summary(g)),
        ("count".to_owned(), g.count.to_string()),
        ("share".to_owned(), format!("{:.4}", g.share)),
        (
            "closers".to_owned(),
            g.closers
                .iter()
                .map(|c| format!("{} (pid {}) {} closes", c.comm, c.pid, c.closes))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ]);
    if !rule.remedy.is_empty() {
        annotations.insert("remedy".to_owned(), rule.remedy.clone());
    }
    AlertMessage {
        key: format!(
            "{}/{}/{}/{}",
            a.rule,
            g.key.netns,
            g.key.local,
            endpoint(g.key.remote, g.key.port)
        ),
        firing,
        starts_at: clock.wall(a.fired_at_ns).system_time(),
        labels,
        annotations,
        json: serde_json::from_str(&alert_line(change, rule, now, clock, true))
            .expect("alert_line renders JSON"),
    }
}

#[cfg(test)]
mod tests;
