//! The daemon's side of resets: each decoded reset is tallied (`resets::tally`) with its owner
//! as the agent knows it, handed to `tail` and the transition log as its own record kind, and
//! the abort rule's alerts go to the same sinks as the others. `status` and `/metrics` render
//! from the values built here.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::{Registry, Unit},
};

use super::delivery::AlertMessage;
use crate::{
    event::reset::Reset,
    model::ProcessKey,
    output::{Clock, OwnerView, WallTime, clock_ns, escape_control},
    owners::procs::start_ticks_before,
    probe::{Probe, resets::ResetCounters},
    resets::{
        ResetRecord,
        report::AbortsReport,
        tally::{AbortAlert, AbortRule, Aborter, Tally},
    },
    tracker::Tracker,
};

/// What the daemon keeps about resets.
pub(super) struct Aborts {
    pub tally: Tally,
    /// The kernel's `enum sk_rst_reason`.
    reasons: Vec<(String, u32)>,
    /// Where aborts are seen, or why not.
    source: String,
    /// The reset programs' counters as of the last tick.
    pub counters: ResetCounters,
    /// The unit of process start times (`sysconf(_SC_CLK_TCK)`).
    ticks_per_second: u64,
}

impl Aborts {
    pub(super) fn new(rule: AbortRule, probe: &Probe) -> Self {
        let resets = probe.resets();
        Self {
            tally: Tally::new(rule),
            reasons: resets.reasons.clone(),
            source: match &resets.aborts {
                Ok(p) => p.name().to_owned(),
                Err(e) => format!("not recorded: {e}"),
            },
            counters: ResetCounters::default(),
            ticks_per_second: procfs::ticks_per_second(),
        }
    }

    /// Tallies `r`; returns its record for `tail` and the transition log. The owner: the
    /// socket's holder if the agent resolved it, else the caller of an abort that ran in its
    /// context (the closing process holds the socket until close() returns), else the process
    /// that called connect() or listen() for it (not confirmed in its fd table: the socket is
    /// already gone when a reset is seen). Each process is keyed on its pid and start time:
    /// the holder's as the owner scan read it, else `/proc/<pid>/stat` read now, if that
    /// process started before the reset (0 if it is gone or started later).
    pub(super) fn on_reset(
        &mut self,
        r: &Reset,
        tracker: &Tracker,
        time: WallTime,
    ) -> ResetRecord<'static> {
        // The reset's time on the clock of process start times.
        let boot_ns = r.ts_ns.saturating_add(
            clock_ns(libc::CLOCK_BOOTTIME).saturating_sub(clock_ns(libc::CLOCK_MONOTONIC)),
        );
        let tps = self.ticks_per_second;
        let key = |pid: u32| ProcessKey {
            pid,
            start_ticks: start_ticks_before(std::path::Path::new("/proc"), pid, boot_ns, tps)
                .unwrap_or(0),
        };
        let known = tracker
            .first_owner(r.sock)
            .and_then(|k| tracker.process_info(&k));
        let caller = r.caller().map(|(pid, comm)| Aborter {
            key: known
                .map(|p| p.key)
                .filter(|k| k.pid == pid)
                .unwrap_or_else(|| key(pid)),
            comm: comm.to_string_lossy().into_owned(),
        });
        let view = |a: &Aborter| OwnerView {
            pid: a.key.pid,
            comm: a.comm.clone(),
            ..Default::default()
        };
        let owner = known
            .map(|p| {
                let view = OwnerView {
                    pid: p.key.pid,
                    comm: p.comm.clone(),
                    container: p.container.clone(),
                    pod_uid: p.pod_uid.clone(),
                };
                (
                    view,
                    Aborter {
                        key: p.key,
                        comm: p.comm.clone(),
                    },
                )
            })
            .or_else(|| caller.clone().map(|a| (view(&a), a)))
            .or_else(|| {
                let pid = *tracker.owner_query(r.sock)?.candidates.first()?;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                let a = Aborter {
                    key: key(pid),
                    comm: comm.trim_end().to_owned(),
                };
                Some((view(&a), a))
            });
        let record = ResetRecord::new(r, &self.reasons, owner.as_ref().map(|o| &o.0), time);
        let reason = record.reason.clone().unwrap_or_default();
        self.tally.add(r, &reason, caller, owner.map(|o| o.1));
        record
    }

    /// The `aborts` section of `status` at `now_ns`.
    pub(super) fn report(&self, now_ns: u64) -> AbortsReport {
        AbortsReport::new(&self.tally, &self.source, &self.counters, now_ns)
    }

    /// What `/metrics` shows, as of now.
    pub(super) fn metrics(&self, top: usize) -> ResetMetrics {
        let processes = self
            .tally
            .processes()
            .into_iter()
            .take(top)
            .flat_map(|p| {
                p.by_reason
                    .iter()
                    .map(|(reason, n)| (p.pid, p.comm.clone(), reason.clone(), *n))
                    .collect::<Vec<_>>()
            })
            .collect();
        ResetMetrics {
            by_reason: self.tally.by_reason.clone().into_iter().collect(),
            unsent_bytes: self.tally.unsent_bytes,
            unread_bytes: self.tally.unread_bytes,
            received: self.tally.received_total,
            processes,
            counters: self.counters,
        }
    }
}

/// The abort alert as an alert line (JSON or text) and a message for the delivery sinks.
pub(super) fn alert(
    a: &AbortAlert,
    rule: &AbortRule,
    instance: &str,
    (now, clock): (u64, &Clock),
    as_json: bool,
) -> (String, AlertMessage) {
    let status = if a.firing { "firing" } else { "resolved" };
    let peers: Vec<String> = a
        .aborts
        .top_peers(5)
        .iter()
        .map(|(p, n)| format!("{p} ({n})"))
        .collect();
    let discarded = a.aborts.unsent_bytes + a.aborts.unread_bytes;
    let labels = (
        rule.alertname.as_str(),
        rule.severity.as_str(),
        rule.remedy.as_str(),
    );
    let json = super::report::alert_json(
        status,
        &rule.name,
        labels,
        [
            serde_json::json!({
                "pid": a.key.pid,
                "comm": a.comm,
                "count": a.count,
                "window_s": rule.window_ns / 1_000_000_000,
                "aborts_by_reason": a.aborts.by_reason,
                "unsent_bytes": a.aborts.unsent_bytes,
                "unread_bytes": a.aborts.unread_bytes,
                "discarded_bytes": discarded,
                // As in the other alerts (README, "JSON schemas").
                "peers": a.aborts.top_peers(5).iter()
                    .map(|(addr, count)| serde_json::json!({"addr": addr, "count": count}))
                    .collect::<Vec<_>>(),
            }),
            super::report::alert_times(a.fired_at_ns, a.resolved_at_ns, now, clock),
        ],
    );
    let line = if as_json {
        json.to_string()
    } else {
        format!(
            "alert={status} rule={} pid={} comm={} aborts={} window={}s discarded_bytes={discarded} \
             peers={} remedy={:?}",
            rule.name,
            a.key.pid,
            escape_control(&a.comm),
            a.count,
            rule.window_ns / 1_000_000_000,
            peers.join(","),
            rule.remedy
        )
    };
    let labels = [
        ("alertname", rule.alertname.clone()),
        ("rule", rule.name.clone()),
        ("pid", a.key.pid.to_string()),
        ("comm", a.comm.clone()),
        ("instance", instance.to_owned()),
        ("severity", rule.severity.clone()),
    ];
    let annotations = [
        (
            "summary",
            format!(
                "{} (pid {}) aborted {} connections in {}s, throwing away {discarded} bytes",
                a.comm,
                a.key.pid,
                a.count,
                rule.window_ns / 1_000_000_000
            ),
        ),
        ("remedy", rule.remedy.clone()),
        ("peers", peers.join(", ")),
    ];
    let msg = AlertMessage {
        // One alert per process, as for the other rules: a reused pid is another process.
        key: format!("{}/{}/{}", rule.name, a.key.pid, a.key.start_ticks),
        firing: a.firing,
        starts_at: clock.wall(a.fired_at_ns).system_time(),
        labels: labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        annotations: annotations
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        json,
    };
    (line, msg)
}

/// Reset figures for `/metrics`.
#[derive(Clone, Debug, Default)]
pub(super) struct ResetMetrics {
    pub by_reason: Vec<(String, u64)>,
    pub unsent_bytes: u64,
    pub unread_bytes: u64,
    pub received: u64,
    /// `(pid, comm, reason, aborts)` of the top processes.
    pub processes: Vec<(u32, String, String, u64)>,
    pub counters: ResetCounters,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Queue {
    queue: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessReason {
    pid: u32,
    comm: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostReason {
    reason: &'static str,
}

/// Registers the reset metrics. Per-process series exist for the `top_processes` processes
/// with the most aborts only (like the per-state ones).
pub(super) fn register(r: &mut Registry, m: &ResetMetrics) {
    let aborts = Family::<Reason, Counter>::default();
    for (reason, n) in &m.by_reason {
        aborts
            .get_or_create(&Reason {
                reason: escape_control(reason).into_owned(),
            })
            .inc_by(*n);
    }
    r.register(
        "tcpwait_aborts",
        "Connections reset by their own socket on close (SO_LINGER 0, unread data, ...), by \
         reason",
        aborts,
    );
    let bytes = Family::<Queue, Counter>::default();
    bytes
        .get_or_create(&Queue { queue: "unsent" })
        .inc_by(m.unsent_bytes);
    bytes
        .get_or_create(&Queue { queue: "unread" })
        .inc_by(m.unread_bytes);
    r.register_with_unit(
        "tcpwait_abort_discarded",
        "Data thrown away by aborts: written and never acknowledged (unsent), received and \
         never read (unread)",
        Unit::Bytes,
        bytes,
    );
    let per_process = Family::<ProcessReason, Counter>::default();
    for (pid, comm, reason, n) in &m.processes {
        per_process
            .get_or_create(&ProcessReason {
                pid: *pid,
                comm: escape_control(comm).into_owned(),
                reason: escape_control(reason).into_owned(),
            })
            .inc_by(*n);
    }
    r.register(
        "tcpwait_process_aborts",
        "Aborts by process and reason, for the processes with the most aborts",
        per_process,
    );
    let received = Counter::<u64>::default();
    received.inc_by(m.received);
    r.register(
        "tcpwait_resets_received",
        "Resets received from peers",
        received,
    );
    let lost = Family::<LostReason, Counter>::default();
    let c = &m.counters;
    lost.get_or_create(&LostReason {
        reason: "ring_full",
    })
    .inc_by(c.aborts_ring_full + c.received_ring_full);
    // Absent where the kernel does not count them: unknown, never 0.
    if let Some(n) = c.recursion_misses {
        lost.get_or_create(&LostReason {
            reason: "recursion_miss",
        })
        .inc_by(n);
    }
    r.register(
        "tcpwait_resets_lost",
        "Resets (aborts and received) lost in the kernel, by reason; malformed records count in \
         tcpwait_events_lost_total{reason=\"malformed\"}",
        lost,
    );
}

impl super::Daemon {
    /// Applies the abort rule at `now`: each change becomes an alert line on stdout and a
    /// message for the delivery sinks, as the other rules' alerts do.
    pub(super) fn evaluate_aborts(&mut self, now: u64) {
        let changes = self.aborts.tally.evaluate(now);
        for a in &changes {
            let rule = self.aborts.tally.rule();
            let (line, msg) = alert(a, rule, &self.instance, (now, &self.clock), self.args.json);
            let line = if self.args.json {
                crate::output::escape_json(&line).into_owned()
            } else {
                line
            };
            if a.firing {
                tracing::info!(pid = a.key.pid, rule = %rule.name, count = a.count, "alert firing");
            }
            self.announce_one(line, &msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resets::tally::ProcessAborts;

    /// The delivery sinks track an alert by its key: two processes that had the same pid (and
    /// task name) one after the other are two alerts, as for the other per-process rules.
    #[test]
    fn an_abort_alert_is_keyed_on_pid_and_start_time() {
        let rule = AbortRule::discard_on_close();
        let alert_of = |start_ticks| AbortAlert {
            firing: true,
            key: ProcessKey {
                pid: 7,
                start_ticks,
            },
            comm: "login-srv".into(),
            count: 11,
            aborts: ProcessAborts::default(),
            fired_at_ns: 3 * SEC,
            resolved_at_ns: None,
        };
        let clock = Clock::with_offset(0);
        let (_, first) = alert(&alert_of(500), &rule, "h1:9977", (5 * SEC, &clock), true);
        let (_, second) = alert(&alert_of(900), &rule, "h1:9977", (5 * SEC, &clock), true);
        assert_eq!(first.key, "discard_on_close/7/500");
        assert_eq!(second.key, "discard_on_close/7/900");
        assert_eq!(first.labels["pid"], "7");
    }

    const SEC: u64 = 1_000_000_000;

    /// Abort alerts carry their times as the other rules' alerts do (README, "JSON schemas"):
    /// each `*_ns` with its wall-clock form, and `startsAt` when the alert fired, not when the
    /// message was made.
    #[test]
    fn an_abort_alert_says_when_it_fired_and_resolved() {
        let rule = AbortRule::discard_on_close();
        let clock = Clock::with_offset(1_796_508_435_000_000_000);
        let resolved = AbortAlert {
            firing: false,
            key: ProcessKey {
                pid: 7,
                start_ticks: 1,
            },
            comm: "login-srv".into(),
            count: 0,
            aborts: ProcessAborts::default(),
            fired_at_ns: 3 * SEC,
            resolved_at_ns: Some(65 * SEC),
        };
        let (line, msg) = alert(&resolved, &rule, "h1:9977", (66 * SEC, &clock), true);
        let j: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(j["alert"], "resolved");
        assert_eq!(j["fired_at_ns"], 3 * SEC);
        assert_eq!(j["fired_at"], serde_json::json!(clock.wall(3 * SEC)));
        assert_eq!(j["resolved_at_ns"], 65 * SEC);
        assert_eq!(j["resolved_at"], serde_json::json!(clock.wall(65 * SEC)));
        assert_eq!(j["now_ns"], 66 * SEC);
        assert_eq!(j["time"], serde_json::json!(clock.wall(66 * SEC)));
        assert_eq!(msg.json, j);
        assert_eq!(j["peers"], serde_json::json!([]));
        assert_eq!(msg.starts_at, clock.wall(3 * SEC).system_time());
    }
}
