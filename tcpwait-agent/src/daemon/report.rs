//! What the agent shows: the `status` report and the alert lines it prints.
use std::{collections::BTreeMap, sync::atomic::Ordering};

use serde_json::json;

use super::{Daemon, delivery::AlertMessage};
use crate::{
    api::{AlertReport, Counters, PeerReport, ProcessReport, SocketReport, StatusReport},
    event::TcpState,
    output::{endpoint, escape_control},
    tracker::{
        alerts::{Alert, AlertChange},
        snapshot::SocketDetail,
    },
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

fn socket(s: &SocketDetail) -> SocketReport {
    SocketReport {
        netns: (s.netns != 0).then_some(s.netns),
        local: endpoint(s.tuple.saddr, s.tuple.sport),
        remote: endpoint(s.tuple.daddr, s.tuple.dport),
        age_s: secs(s.age_ns),
        age_is_lower_bound: s.age_is_lower_bound,
        recv_q: s.recv_q,
    }
}

/// The `status` answer, as of now.
pub(super) fn status(d: &Daemon) -> StatusReport {
    let now = d.now_ns();
    let t = &d.tracker;
    let c = t.counters();
    StatusReport {
        uptime_s: d.started.elapsed().as_secs_f64(),
        tracked_sockets: t.len() as u64,
        processes: t
            .processes(TcpState::CloseWait, now)
            .into_iter()
            .map(|p| ProcessReport {
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
        unowned: t
            .unowned(TcpState::CloseWait, now)
            .iter()
            .map(socket)
            .collect(),
        alerts: t.firing().iter().map(|a| alert_report(a, now)).collect(),
        counters: Counters {
            transitions: d.transitions,
            lost_ring_full: d.kernel.reserve_failed,
            lost_recursion_misses: d.kernel.recursion_misses,
            malformed: d.malformed.total(),
            tail_missed: d.tail_missed.load(Ordering::Relaxed),
            table_overflow: c.overflowed,
            reconcile_added: c.repairs_added,
            reconcile_removed: c.repairs_removed,
            reconcile_corrected: c.repairs_corrected,
            duplicates: c.duplicates,
            late: d.kernel.late,
            reconciliations: d.reconciliations,
            namespaces_dumped: d.last_cost.namespaces,
            namespace_failures: d.namespace_failures,
            sink_dropped: d
                .sinks
                .counts()
                .iter()
                .map(|(s, n, _)| ((*s).to_owned(), *n))
                .collect(),
            sink_failed: d
                .sinks
                .counts()
                .iter()
                .map(|(s, _, n)| ((*s).to_owned(), *n))
                .collect(),
        },
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

/// The change as the delivery sinks take it.
pub(super) fn alert_message(change: &AlertChange, now: u64, instance: &str) -> AlertMessage {
    let (firing, a) = match change {
        AlertChange::Firing(a) => (true, a),
        AlertChange::Resolved(a) => (false, a),
    };
    let mono_to_wall = |ns: u64| {
        let wall = i128::from(ns)
            + (crate::output::clock_ns(libc::CLOCK_REALTIME) as i128 - i128::from(now));
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(u64::try_from(wall).unwrap_or(0))
    };
    let peers: Vec<String> = a
        .top_peers
        .iter()
        .map(|(addr, n)| format!("{addr} ({n})"))
        .collect();
    let mut labels = BTreeMap::from([
        ("alertname".to_owned(), "TcpCloseWaitLeak".to_owned()),
        ("rule".to_owned(), a.rule.clone()),
        ("pid".to_owned(), a.process.key.pid.to_string()),
        ("comm".to_owned(), a.process.comm.clone()),
        ("instance".to_owned(), instance.to_owned()),
        ("severity".to_owned(), "warning".to_owned()),
    ]);
    if let Some(c) = &a.process.container {
        labels.insert("container".into(), c.clone());
    }
    if let Some(uid) = &a.process.pod_uid {
        labels.insert("pod_uid".into(), uid.clone());
    }
    if let Some(ns) = a.process.netns {
        labels.insert("netns".into(), ns.to_string());
    }
    let annotations = BTreeMap::from([
        ("summary".to_owned(), format!(
            "{} (pid {}) holds {} {} sockets, oldest {}{:.0}s",
            a.process.comm, a.process.key.pid, a.count, a.state.name(),
            if a.oldest_is_lower_bound { ">=" } else { "" }, secs(a.oldest_age_ns)
        )),
        ("count".to_owned(), a.count.to_string()),
        ("oldest_age_seconds".to_owned(), format!("{:.1}", secs(a.oldest_age_ns))),
        ("peers".to_owned(), peers.join(", ")),
        ("cmdline".to_owned(), a.process.cmdline.clone()),
        ("cgroup".to_owned(), a.process.cgroup.clone().unwrap_or_default()),
        ("remedy".to_owned(), "the peer closed these connections and the process never called close(): find the code path that drops a connection after read() returns 0 or an error without closing it".to_owned()),
    ]);
    AlertMessage {
        key: format!(
            "{}/{}/{}",
            a.rule, a.process.key.pid, a.process.key.start_ticks
        ),
        firing,
        starts_at: mono_to_wall(a.fired_at_ns),
        labels,
        annotations,
        json: serde_json::from_str(&alert_line(change, now, true))
            .expect("alert_line renders JSON"),
    }
}

/// One line for an alert that fired or resolved: logfmt-like text, or a JSON object.
pub(super) fn alert_line(change: &AlertChange, now: u64, as_json: bool) -> String {
    let (status, a) = match change {
        AlertChange::Firing(a) => ("firing", a),
        AlertChange::Resolved(a) => ("resolved", a),
    };
    let age = secs(a.oldest_age_ns);
    if as_json {
        return json!({
            "alert": status,
            "rule": a.rule,
            "state": a.state.name(),
            "pid": a.process.key.pid,
            "comm": a.process.comm,
            "cmdline": a.process.cmdline,
            "cgroup": a.process.cgroup,
            "container": a.process.container,
            "pod_uid": a.process.pod_uid,
            "netns": a.process.netns,
            "count": a.count,
            "oldest_age_s": age,
            "oldest_age_is_lower_bound": a.oldest_is_lower_bound,
            "fired_at_ns": a.fired_at_ns,
            "resolved_at_ns": a.resolved_at_ns,
            "now_ns": now,
            "peers": peers(&a.top_peers),
        })
        .to_string();
    }
    let peer_list: Vec<String> = a
        .top_peers
        .iter()
        .map(|(addr, n)| format!("{addr}x{n}"))
        .collect();
    format!(
        "alert={status} rule={} state={} pid={} comm=\"{}\" count={} oldest={}{age:.1}s peers={} cgroup=\"{}\" cmdline=\"{}\"",
        a.rule,
        a.state.name(),
        a.process.key.pid,
        escape_control(&a.process.comm).replace('"', "\\\""),
        a.count,
        if a.oldest_is_lower_bound { ">=" } else { "" },
        peer_list.join(","),
        escape_control(a.process.cgroup.as_deref().unwrap_or("")).replace('"', "\\\""),
        escape_control(&a.process.cmdline).replace('"', "\\\""),
    )
}
