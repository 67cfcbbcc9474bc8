//! What the agent shows: the `status` report and the alert lines it prints.
use std::sync::atomic::Ordering;

use serde_json::json;

use super::Daemon;
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
        count: u64::from(a.count),
        oldest_age_s: secs(a.oldest_age_at(now)),
        firing_for_s: secs(now.saturating_sub(a.fired_at_ns)),
        peers: peers(&a.top_peers),
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
