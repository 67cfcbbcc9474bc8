//! `[abort_rule]`: the rule on connections a process aborts on close (data, like `[[rules]]`),
//! as the file writes it, its validation, and the `AbortRule` it becomes.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Dur;
use crate::resets::tally::AbortRule;

const COUNT_MAX: u32 = 10_000_000;
const WINDOW_MIN: Duration = Duration::from_secs(1);
const WINDOW_MAX: Duration = Duration::from_secs(86_400);

/// `[abort_rule]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbortRuleConfig {
    /// The `rule` label.
    pub name: String,
    /// Reasons that count: `linger_0`, `unread_data`, or a kernel reason in lower case
    /// (`tcp_keepalive_timeout`, ...); empty: every abort.
    pub reasons: Vec<String>,
    /// Fires when a process aborts more than this many connections within `window`.
    pub count: u32,
    pub window: Dur,
    /// Alertmanager labels.
    pub alertname: String,
    pub severity: String,
    /// The `remedy` annotation.
    pub remedy: String,
}

impl Default for AbortRuleConfig {
    fn default() -> Self {
        let r = AbortRule::discard_on_close();
        Self {
            name: r.name,
            reasons: r.reasons,
            count: r.count,
            window: Dur(Duration::from_nanos(r.window_ns)),
            alertname: r.alertname,
            severity: r.severity,
            remedy: r.remedy,
        }
    }
}

impl AbortRuleConfig {
    /// The rule this section configures (once validated).
    pub fn to_rule(&self) -> AbortRule {
        AbortRule {
            name: self.name.clone(),
            reasons: self.reasons.clone(),
            count: self.count,
            window_ns: u64::try_from(self.window.0.as_nanos()).unwrap_or(u64::MAX),
            alertname: self.alertname.clone(),
            severity: self.severity.clone(),
            remedy: self.remedy.clone(),
        }
    }

    /// What is wrong, as (key under `abort_rule`, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !name_ok(&self.name) {
            return Err((
                "name",
                format!(
                    "{:?} is not a rule name: allowed letters, digits, '_' and '-'",
                    self.name
                ),
            ));
        }
        if let Some(r) = self.reasons.iter().find(|r| !name_ok(r)) {
            return Err((
                "reasons",
                format!(
                    "{r:?} is not a reason: linger_0, unread_data, or a kernel reason such as \
                     tcp_keepalive_timeout"
                ),
            ));
        }
        if self.count > COUNT_MAX {
            return Err((
                "count",
                format!("{} is out of range: allowed 0 ..= {COUNT_MAX}", self.count),
            ));
        }
        if self.window.0 < WINDOW_MIN || self.window.0 > WINDOW_MAX {
            return Err((
                "window",
                format!(
                    "{} is out of range: allowed 1s ..= 1d",
                    humantime::format_duration(self.window.0)
                ),
            ));
        }
        if self.alertname.is_empty() {
            return Err(("alertname", "\"\" is not an alert name".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_embedded_rule_and_valid() {
        let c = AbortRuleConfig::default();
        assert_eq!(c.to_rule(), AbortRule::discard_on_close());
        assert_eq!(c.check(), Ok(()));
    }

    #[test]
    fn a_file_sets_it_and_bad_values_name_their_key() {
        let c: AbortRuleConfig =
            toml::from_str("count = 3\nwindow = \"10s\"\nreasons = [\"linger_0\"]").expect("valid");
        let r = c.to_rule();
        assert_eq!(
            (r.count, r.window_ns, r.reasons),
            (3, 10_000_000_000, vec!["linger_0".to_owned()])
        );
        assert_eq!(r.name, "discard_on_close");
        let bad = |text: &str| {
            toml::from_str::<AbortRuleConfig>(text)
                .expect("parses")
                .check()
                .expect_err("refused")
                .0
        };
        assert_eq!(bad("window = \"0.5s\""), "window");
        assert_eq!(bad("count = 20000000"), "count");
        assert_eq!(bad("name = \"a b\""), "name");
        assert_eq!(bad("reasons = [\"x y\"]"), "reasons");
        assert!(
            toml::from_str::<AbortRuleConfig>("age = 3").is_err(),
            "unknown keys are refused"
        );
    }
}
