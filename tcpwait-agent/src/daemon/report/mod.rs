//! What the agent shows: the `status` report, and (`alert`) the alert lines it prints and
//! the messages it delivers.
mod alert;

#[cfg(test)]
pub(crate) use alert::ALERT_SCHEMA_VERSION;
pub(crate) use alert::alert_json;
pub(super) use alert::{alert_line, alert_message, alert_times, instance, threshold_figures};

use super::stats::Stats;
use crate::{
    api::{
        AlertReport, Counters, PeerReport, ProcessReport, STATUS_SCHEMA_VERSION, SocketReport,
        StatusReport,
    },
    output::{Clock, endpoint},
    tracker::{Tracker, alerts::Alert, snapshot::SocketDetail},
};

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn peers(top: &[(std::net::IpAddr, u32)]) -> Vec<PeerReport> {
    top.iter()
        .map(|(a, n)| PeerReport {
            addr: a.to_string(),
            count: u64::from(*n),
        })
        .collect()
}

pub(super) fn socket(s: &SocketDetail) -> SocketReport {
    SocketReport {
        state: s.state.name().to_owned(),
        netns: (s.netns != 0).then_some(s.netns),
        local: endpoint(s.tuple.saddr, s.tuple.sport),
        remote: endpoint(s.tuple.daddr, s.tuple.dport),
        age_s: secs(s.age_ns),
        age_is_lower_bound: s.age_is_lower_bound,
        recv_q: s.recv_q,
    }
}

/// The `status` answer at `now`: every watched state's holders (kernel order), the sockets of
/// those states whose holder is not known, the firing alerts, and the counters.
pub(super) fn status(t: &Tracker, s: &Stats, now: u64, clock: &Clock) -> StatusReport {
    let c = t.counters();
    let states = t.watched_states();
    StatusReport {
        schema_version: STATUS_SCHEMA_VERSION,
        now_ns: now,
        time: Some(clock.wall(now)),
        uptime_s: s.uptime_s,
        tracked_sockets: t.len() as u64,
        watched_states: states.iter().map(|st| st.name().to_owned()).collect(),
        processes: states
            .iter()
            .flat_map(|&st| t.processes(st, now))
            .map(|p| ProcessReport {
                state: p.state.name().to_owned(),
                pid: p.process.key.pid,
                comm: p.process.comm.clone(),
                cmdline: p.process.cmdline.clone(),
                cgroup: p.process.cgroup.clone(),
                container: p.process.container.clone(),
                pod_uid: p.process.pod_uid.clone(),
                runtime: p.process.runtime.map(str::to_owned),
                netns: p.process.netns,
                count: u64::from(p.count),
                oldest_age_s: secs(p.oldest_age_ns),
                oldest_age_is_lower_bound: p.oldest_is_lower_bound,
                peers: peers(&p.top_peers),
                sockets: p.sockets.iter().map(socket).collect(),
            })
            .collect(),
        unowned: states
            .iter()
            .flat_map(|&st| t.unowned(st, now))
            .map(|d| socket(&d))
            .collect(),
        alerts: t.firing().iter().map(|a| alert_report(a, now)).collect(),
        counters: Counters {
            transitions: s.transitions,
            lost_ring_full: s.kernel.reserve_failed,
            lost_recursion_misses: s.kernel.recursion_misses,
            malformed: s.malformed,
            tail_missed: s.tail_missed,
            table_overflow: c.overflowed,
            reconcile_added: c.repairs_added,
            reconcile_removed: c.repairs_removed,
            reconcile_corrected: c.repairs_corrected,
            duplicates: c.duplicates,
            late: s.kernel.late,
            reconciliations: s.reconciliations,
            namespaces_dumped: s.last_cost.namespaces,
            namespace_failures: s.namespace_failures,
            sink_dropped: s
                .sinks
                .iter()
                .map(|(name, n, _)| ((*name).to_owned(), *n))
                .collect(),
            sink_failed: s
                .sinks
                .iter()
                .map(|(name, _, n)| ((*name).to_owned(), *n))
                .collect(),
            tail_clients: s.tail_clients.clone(),
        },
        // Filled by the daemon, which owns the abort tallies.
        aborts: None,
        timewait: None,
        port: None,
        host_rules: Vec::new(),
    }
}

fn alert_report(a: &Alert, now: u64) -> AlertReport {
    AlertReport {
        rule: a.rule.clone(),
        state: a.state.name().to_owned(),
        pid: a.process.key.pid,
        comm: a.process.comm.clone(),
        cmdline: a.process.cmdline.clone(),
        cgroup: a.process.cgroup.clone(),
        container: a.process.container.clone(),
        pod_uid: a.process.pod_uid.clone(),
        netns: a.process.netns,
        count: u64::from(a.count),
        oldest_age_s: secs(a.oldest_age_at(now)),
        firing_for_s: secs(now.saturating_sub(a.fired_at_ns)),
        peers: peers(&a.top_peers),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{
        event::TcpState,
        model::{ProcessInfo, ProcessKey},
        tracker::{
            TrackerConfig,
            rules::Rule,
            tests::{NS, sock, tr},
        },
    };

    const SEC: u64 = 1_000_000_000;

    pub(in crate::daemon) fn process(pid: u32) -> ProcessInfo {
        ProcessInfo {
            key: ProcessKey {
                pid,
                start_ticks: 1,
            },
            comm: format!("p{pid}"),
            cmdline: format!("/bin/p{pid}"),
            cgroup: None,
            container: None,
            pod_uid: None,
            runtime: None,
            netns: Some(NS),
        }
    }

    /// close_wait_leak plus a SYN_SENT rule given only as data, with its own labels.
    pub(in crate::daemon) fn tracker() -> Tracker {
        let syn_sent = Rule {
            alertname: "TcpConnectStuck".into(),
            severity: "critical".into(),
            remedy: "check the route to the peer".into(),
            ..Rule::new("syn_sent_stuck", TcpState::SynSent, Some(SEC), None)
        };
        let mut t = Tracker::new(TrackerConfig {
            rules: vec![Rule::close_wait_leak(), syn_sent],
            ..TrackerConfig::default()
        });
        // Socket 1: CLOSE_WAIT held by pid 10; 2: SYN_SENT held by pid 20; 3: CLOSE_WAIT, holder
        // unknown; 4: ESTABLISHED, watched by no rule.
        t.apply(&tr(1, TcpState::Established, TcpState::CloseWait, 0));
        t.set_owners(sock(1), vec![process(10)]);
        t.apply(&tr(2, TcpState::Close, TcpState::SynSent, 0));
        t.set_owners(sock(2), vec![process(20)]);
        t.apply(&tr(3, TcpState::Established, TcpState::CloseWait, SEC / 2));
        t.apply(&tr(4, TcpState::SynRecv, TcpState::Established, 0));
        t.set_owners(sock(4), vec![process(40)]);
        t
    }

    #[test]
    fn status_has_a_section_per_watched_state() {
        let t = tracker();
        let s = Stats {
            transitions: 7,
            ..Stats::default()
        };
        let r = status(&t, &s, 2 * SEC, &Clock::with_offset(0));
        assert_eq!(r.watched_states, ["SYN_SENT", "CLOSE_WAIT"]);
        let procs: Vec<(&str, u32, u64, f64)> = r
            .processes
            .iter()
            .map(|p| (p.state.as_str(), p.pid, p.count, p.oldest_age_s))
            .collect();
        assert_eq!(
            procs,
            [("SYN_SENT", 20, 1, 2.0), ("CLOSE_WAIT", 10, 1, 2.0)]
        );
        let unowned: Vec<(&str, &str, f64)> = r
            .unowned
            .iter()
            .map(|s| (s.state.as_str(), s.remote.as_str(), s.age_s))
            .collect();
        assert_eq!(unowned, [("CLOSE_WAIT", "10.0.0.2:40003", 1.5)]);
        assert_eq!((r.tracked_sockets, r.counters.transitions), (4, 7));
    }
}
