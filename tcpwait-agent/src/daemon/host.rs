//! Host-scope rules seen from the state task: their alert changes go to the same sinks as
//! process alerts (one alert per rule, with no pid label: the host is the subject), `status`
//! gets one line per host rule, `/metrics` a firing gauge per host rule.
use std::collections::BTreeMap;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde_json::json;

use super::{Daemon, delivery::AlertMessage};
use crate::{
    api::host::HostRuleReport,
    output::Clock,
    tracker::{
        Tracker,
        host::{HostAlert, HostAlertChange},
        rules::Rule,
    },
};

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Daemon {
    /// Evaluates the host rules at `now` and announces what changed.
    pub(super) fn evaluate_host(&mut self, now: u64) {
        let changes = self.tracker.evaluate_host(now);
        self.announce_host(&changes, now, &[]);
    }

    /// Prints and delivers host alert changes; a rule is looked up in `gone` (rules a reload
    /// replaced), then in the tracker's.
    pub(super) fn announce_host(&mut self, changes: &[HostAlertChange], now: u64, gone: &[Rule]) {
        for change in changes {
            let a = match change {
                HostAlertChange::Firing(a) | HostAlertChange::Resolved(a) => a,
            };
            let Some(rule) = gone
                .iter()
                .chain(self.tracker.host_rules())
                .find(|r| r.name == a.rule)
            else {
                continue;
            };
            self.announce_one(
                alert_line(change, rule, now, &self.clock, self.args.json),
                &alert_message(change, rule, now, &self.clock, &self.instance),
            );
        }
    }
}

fn parts(change: &HostAlertChange) -> (&'static str, &HostAlert) {
    match change {
        HostAlertChange::Firing(a) => ("firing", a),
        HostAlertChange::Resolved(a) => ("resolved", a),
    }
}

fn summary(a: &HostAlert) -> String {
    let oldest = a.oldest_entered_ns.map_or_else(String::new, |e| {
        format!(
            ", oldest {}{:.0}s",
            if a.oldest_is_lower_bound { ">=" } else { "" },
            secs(a.as_of_ns.saturating_sub(e))
        )
    });
    format!(
        "{} {} sockets on this host (all network namespaces){oldest}",
        a.count,
        a.state.name()
    )
}

/// One line for a host alert that fired or resolved: text, or a JSON object.
pub(super) fn alert_line(
    change: &HostAlertChange,
    rule: &Rule,
    now: u64,
    clock: &Clock,
    as_json: bool,
) -> String {
    let (status, a) = parts(change);
    let age = a
        .oldest_entered_ns
        .map(|e| secs(a.as_of_ns.saturating_sub(e)));
    if as_json {
        let line = super::report::alert_json(
            status,
            &a.rule,
            rule.labels(),
            [
                json!({"state": a.state.name(), "scope": "host"}),
                super::report::threshold_figures(a.count, (age, a.oldest_is_lower_bound)),
                super::report::alert_times(a.fired_at_ns, a.resolved_at_ns, now, clock),
            ],
        )
        .to_string();
        return crate::output::escape_json(&line).into_owned();
    }
    format!(
        "alert={status} rule={} scope=host state={} count={} oldest={}",
        a.rule,
        a.state.name(),
        a.count,
        age.map_or_else(
            || "-".to_owned(),
            |s| format!("{}{s:.1}s", if a.oldest_is_lower_bound { ">=" } else { "" })
        )
    )
}

/// The change as the delivery sinks take it.
pub(super) fn alert_message(
    change: &HostAlertChange,
    rule: &Rule,
    now: u64,
    clock: &Clock,
    instance: &str,
) -> AlertMessage {
    let (status, a) = parts(change);
    let labels = BTreeMap::from([
        ("alertname".to_owned(), rule.alertname.clone()),
        ("rule".to_owned(), a.rule.clone()),
        ("instance".to_owned(), instance.to_owned()),
        ("severity".to_owned(), rule.severity.clone()),
        ("state".to_owned(), a.state.name().to_owned()),
    ]);
    let mut annotations = BTreeMap::from([
        ("summary".to_owned(), summary(a)),
        ("count".to_owned(), a.count.to_string()),
    ]);
    if let Some(e) = a.oldest_entered_ns {
        annotations.insert(
            "oldest_age_seconds".to_owned(),
            format!("{:.1}", secs(a.as_of_ns.saturating_sub(e))),
        );
    }
    if !rule.remedy.is_empty() {
        annotations.insert("remedy".to_owned(), rule.remedy.clone());
    }
    AlertMessage {
        key: format!("{}/host", a.rule),
        firing: status == "firing",
        starts_at: clock.wall(a.fired_at_ns).system_time(),
        labels,
        annotations,
        json: serde_json::from_str(&alert_line(change, rule, now, clock, true))
            .expect("alert_line renders JSON"),
    }
}

/// The host rules' section of `status` at `now`.
pub(super) fn report(t: &Tracker, now: u64) -> Vec<HostRuleReport> {
    t.host_views(now)
        .into_iter()
        .map(|v| HostRuleReport {
            rule: v.rule.name.clone(),
            state: v.rule.state.name().to_owned(),
            count: v.count,
            max_count: v.rule.max_count,
            oldest_age_s: v.oldest_age_ns.map(secs),
            oldest_age_is_lower_bound: v.oldest_is_lower_bound,
            max_age_s: v.rule.max_age_ns.map(secs),
            firing: v.firing,
        })
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
    state: String,
}

/// Registers the host rules' series into `r`: whether each fires (a zero series per rule, so
/// the absence of alerts is visible). The counts themselves are `tcpwait_sockets{state}`.
pub(super) fn register(r: &mut Registry, t: &Tracker, now: u64) {
    let firing = Family::<RuleLabels, Gauge>::default();
    for v in t.host_views(now) {
        firing
            .get_or_create(&RuleLabels {
                rule: v.rule.name.clone(),
                state: v.rule.state.name().to_owned(),
            })
            .set(i64::from(v.firing));
    }
    r.register(
        "tcpwait_host_alerts_firing",
        "Host alerts (scope = \"host\" rules) firing, by rule: 1 firing, 0 not",
        firing,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{event::TcpState, tracker::rules::Scope};

    fn rule() -> Rule {
        Rule {
            name: "syn_sent_host".into(),
            state: TcpState::SynSent,
            scope: Scope::Host,
            max_age_ns: Some(1_000_000_000),
            max_count: Some(20),
            max_share_ppm: None,
            alertname: "TcpSynSentHost".into(),
            severity: "critical".into(),
            remedy: "check the route".into(),
        }
    }

    fn alert(resolved: Option<u64>) -> HostAlert {
        HostAlert {
            rule: "syn_sent_host".into(),
            state: TcpState::SynSent,
            count: 25,
            oldest_entered_ns: Some(1_000_000_000),
            oldest_is_lower_bound: false,
            as_of_ns: 3_500_000_000,
            fired_at_ns: 3_000_000_000,
            resolved_at_ns: resolved,
        }
    }

    #[test]
    fn host_alerts_carry_the_rule_and_no_process() {
        let clock = Clock::with_offset(0);
        let firing = HostAlertChange::Firing(alert(None));
        assert_eq!(
            alert_line(&firing, &rule(), 4_000_000_000, &clock, false),
            "alert=firing rule=syn_sent_host scope=host state=SYN_SENT count=25 oldest=2.5s"
        );
        let m = alert_message(&firing, &rule(), 4_000_000_000, &clock, "host-a");
        assert_eq!(
            m.labels.keys().collect::<Vec<_>>(),
            ["alertname", "instance", "rule", "severity", "state"]
        );
        assert_eq!(m.labels["alertname"], "TcpSynSentHost");
        assert_eq!(m.annotations["remedy"], "check the route");
        assert_eq!(
            m.annotations["summary"],
            "25 SYN_SENT sockets on this host (all network namespaces), oldest 2s"
        );
        assert!(m.firing);
        let resolved = HostAlertChange::Resolved(alert(Some(5_000_000_000)));
        let m = alert_message(&resolved, &rule(), 5_000_000_000, &clock, "host-a");
        assert!(!m.firing);
        assert_eq!(m.json["alert"], "resolved");
        assert_eq!(m.json["scope"], "host");
        assert_eq!(m.json["pid"], serde_json::Value::Null);
        // Every alert JSON carries the schema version (README, "JSON schemas").
        assert_eq!(
            m.json["schema_version"],
            serde_json::json!(super::super::report::ALERT_SCHEMA_VERSION)
        );
        assert_eq!(m.json["alertname"], "TcpSynSentHost");
        // The same figures and times as a process alert (`report::threshold_figures`,
        // `report::alert_times`).
        assert_eq!(m.json["resolved_at_ns"], 5_000_000_000u64);
        assert_eq!(
            m.json["resolved_at"],
            serde_json::json!(clock.wall(5_000_000_000))
        );
    }
}
