//! `[[rules]]`: the alerting rules as the file writes them, their validation, and the
//! [`Rule`] values they become. The rule set is data end to end: the embedded defaults are
//! [`Rule::defaults`], a file's `[[rules]]` list replaces them, and the older form
//! `[rules] close_wait_age / close_wait_count` (and `--close-wait-age` / `--close-wait-count`)
//! sets the thresholds of the rule named [`CLOSE_WAIT_RULE`].
use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use super::Dur;
use crate::{
    event::TcpState,
    tracker::rules::{RULE_STATES, Rule, Scope, default_alertname},
};

/// The rule that the older `[rules]` keys and the `--close-wait-*` flags set.
pub const CLOSE_WAIT_RULE: &str = "close_wait_leak";

const AGE_MIN: Duration = Duration::from_millis(100);
const AGE_MAX: Duration = Duration::from_secs(30 * 86400);
const AGE_ALLOWED: &str = "100ms ..= 30d";
const COUNT_MAX: u32 = 10_000_000;

/// One `[[rules]]` table.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique; the `rule` label.
    pub name: String,
    /// A TCP state name, case-insensitive (checked by `validate`).
    pub state: String,
    /// `process`, `peer` (TIME_WAIT only) or `host`.
    #[serde(default = "default_scope")]
    pub scope: String,
    /// Age threshold (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age: Option<Dur>,
    /// Count threshold (exclusive: more than this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Peer rules: share of the ephemeral port range (exclusive: more than this), 0 < x <= 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
    /// The `alertname` label; "" derives it from the name.
    #[serde(default)]
    pub alertname: String,
    /// The `severity` label.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// The `remedy` annotation; "" for none.
    #[serde(default)]
    pub remedy: String,
}

fn default_scope() -> String {
    Scope::Process.name().to_owned()
}

fn parse_scope(s: &str) -> Option<Scope> {
    [Scope::Process, Scope::Peer, Scope::Host]
        .into_iter()
        .find(|sc| sc.name() == s)
}

/// The states a rule of `scope` may watch.
fn allowed_states(scope: Scope) -> &'static [TcpState] {
    match scope {
        Scope::Process => &RULE_STATES,
        Scope::Peer => &[TcpState::TimeWait],
        // The states reconciliation dumps in every namespace: the table counts them all,
        // sockets that predate the agent included.
        Scope::Host => &TcpState::TRACKED,
    }
}

fn default_severity() -> String {
    "warning".to_owned()
}

impl From<&Rule> for RuleConfig {
    fn from(r: &Rule) -> Self {
        let dur = |ns: u64| Dur(Duration::from_nanos(ns));
        Self {
            name: r.name.clone(),
            state: r.state.name().to_owned(),
            scope: r.scope.name().to_owned(),
            age: r.max_age_ns.map(dur),
            count: r.max_count,
            share: r.max_share_ppm.map(|p| f64::from(p) / 1e6),
            alertname: r.alertname.clone(),
            severity: r.severity.clone(),
            remedy: r.remedy.clone(),
        }
    }
}

impl RuleConfig {
    /// The rule this entry configures; `None` if it does not validate.
    pub fn to_rule(&self) -> Option<Rule> {
        let scope = parse_scope(&self.scope)?;
        let state =
            TcpState::from_name(&self.state).filter(|s| allowed_states(scope).contains(s))?;
        Some(Rule {
            name: self.name.clone(),
            state,
            scope,
            max_age_ns: self
                .age
                .map(|d| u64::try_from(d.0.as_nanos()).unwrap_or(u64::MAX)),
            max_count: self.count,
            // Checked to be within (0, 1]: at most 10⁶ ppm.
            max_share_ppm: self.share.map(|x| (x * 1e6).round() as u32),
            alertname: if self.alertname.is_empty() {
                default_alertname(&self.name)
            } else {
                self.alertname.clone()
            },
            severity: self.severity.clone(),
            remedy: self.remedy.clone(),
        })
    }

    /// What is wrong with this entry, as (key suffix, message); `key` is `rules[i]`.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let valid_name = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err((
                ".name",
                format!(
                    "{:?} is not a rule name: allowed letters, digits, '_' and '-'",
                    self.name
                ),
            ));
        }
        let Some(scope) = parse_scope(&self.scope) else {
            return Err((
                ".scope",
                format!(
                    "{:?} is not a scope: allowed \"process\", \"peer\" or \"host\"",
                    self.scope
                ),
            ));
        };
        let allowed = allowed_states(scope);
        let states = || {
            allowed
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match TcpState::from_name(&self.state) {
            Some(s) if allowed.contains(&s) => {}
            Some(s) => {
                let why = match (scope, s) {
                    (Scope::Process, TcpState::TimeWait) => {
                        "no process holds a TIME_WAIT socket: use scope = \"peer\""
                    }
                    (Scope::Peer, _) => "a peer rule counts TIME_WAIT sockets only",
                    (Scope::Host, TcpState::TimeWait) => {
                        "the host-wide TIME_WAIT count is tcpwait_timewait_sockets; a rule on \
                         TIME_WAIT uses scope = \"peer\""
                    }
                    (Scope::Host, _) => {
                        "its sockets that predate the agent are not reconciled, so a host-wide \
                         count would be short"
                    }
                    _ => "no process holds a socket in it",
                };
                return Err((
                    ".state",
                    format!(
                        "\"{}\" cannot be watched ({why}): allowed {}",
                        s.name(),
                        states()
                    ),
                ));
            }
            None => {
                return Err((
                    ".state",
                    format!("{:?} is not a TCP state: allowed {}", self.state, states()),
                ));
            }
        }
        if scope == Scope::Peer && self.age.is_some() {
            return Err((
                ".age",
                "is not a peer threshold (TIME_WAIT lasts 60 s): use count or share".to_owned(),
            ));
        }
        if let Some(x) = self.share {
            if scope != Scope::Peer {
                return Err((
                    ".share",
                    "is a peer threshold: allowed only with scope = \"peer\"".to_owned(),
                ));
            }
            if !(x > 0.0 && x <= 1.0) {
                return Err((
                    ".share",
                    format!("{x} is out of range: allowed more than 0, at most 1 (0.5 = 50 %)"),
                ));
            }
        }
        if let Some(d) = self.age
            && !(AGE_MIN..=AGE_MAX).contains(&d.0)
        {
            return Err((
                ".age",
                format!(
                    "{} is out of range: allowed {AGE_ALLOWED}",
                    humantime::format_duration(d.0)
                ),
            ));
        }
        if let Some(n) = self.count
            && !(1..=COUNT_MAX).contains(&n)
        {
            return Err((
                ".count",
                format!("{n} is out of range: allowed 1 ..= {COUNT_MAX}"),
            ));
        }
        if self.age.is_none() && self.count.is_none() && self.share.is_none() {
            let which = match scope {
                Scope::Process | Scope::Host => "age, count or both",
                Scope::Peer => "count, share or both",
            };
            return Err(("", format!("has no threshold: set {which}")));
        }
        if self.severity.is_empty() {
            return Err((
                ".severity",
                "\"\" is not a severity: allowed any non-empty text, e.g. \"warning\"".to_owned(),
            ));
        }
        Ok(())
    }
}

/// The rule set: `[[rules]]` tables, or the older `[rules]` table applied to the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSet(pub Vec<RuleConfig>);

impl Default for RuleSet {
    fn default() -> Self {
        Self(Rule::defaults().iter().map(RuleConfig::from).collect())
    }
}

impl Serialize for RuleSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// The older `[rules]` table: the thresholds of [`CLOSE_WAIT_RULE`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Legacy {
    #[serde(default, deserialize_with = "legacy_age")]
    close_wait_age: Option<Dur>,
    #[serde(default, deserialize_with = "legacy_count")]
    close_wait_count: Option<u32>,
}

// Range errors are raised while the key is being read, so they name it (`rules.close_wait_age`)
// as they did before `[[rules]]` existed.
fn legacy_age<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Dur>, D::Error> {
    let v = Dur::deserialize(d)?;
    if !(AGE_MIN..=AGE_MAX).contains(&v.0) {
        return Err(serde::de::Error::custom(format!(
            "{} is out of range: allowed {AGE_ALLOWED}",
            humantime::format_duration(v.0)
        )));
    }
    Ok(Some(v))
}

fn legacy_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = u32::deserialize(d)?;
    if !(1..=COUNT_MAX).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "{v} is out of range: allowed 1 ..= {COUNT_MAX}"
        )));
    }
    Ok(Some(v))
}

impl<'de> Deserialize<'de> for RuleSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RuleSet;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "[[rules]] tables, or a [rules] table with close_wait_age / close_wait_count",
                )
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<RuleSet, A::Error> {
                Vec::<RuleConfig>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(RuleSet)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RuleSet, A::Error> {
                let legacy =
                    Legacy::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let mut set = RuleSet::default();
                set.set_close_wait(legacy.close_wait_age, legacy.close_wait_count)
                    .map_err(serde::de::Error::custom)?;
                Ok(set)
            }
        }
        d.deserialize_any(V)
    }
}

impl RuleSet {
    /// Sets the thresholds of [`CLOSE_WAIT_RULE`] (the older keys and the flags); an error if
    /// the rule set has no such rule.
    pub fn set_close_wait(&mut self, age: Option<Dur>, count: Option<u32>) -> Result<(), String> {
        if age.is_none() && count.is_none() {
            return Ok(());
        }
        let rule = self
            .0
            .iter_mut()
            .find(|r| r.name == CLOSE_WAIT_RULE)
            .ok_or_else(|| {
                format!(
                    "no rule named {CLOSE_WAIT_RULE} is configured: add it under [[rules]] or set the thresholds there"
                )
            })?;
        if age.is_some() {
            rule.age = age;
        }
        if count.is_some() {
            rule.count = count;
        }
        Ok(())
    }

    /// Checks every entry and their names' uniqueness: `(key, message)` of the first problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (i, r) in self.0.iter().enumerate() {
            r.check().map_err(|(k, m)| (format!("rules[{i}]{k}"), m))?;
            if let Some(j) = self.0[..i].iter().position(|o| o.name == r.name) {
                return Err((
                    format!("rules[{i}].name"),
                    format!(
                        "\"{}\" is already the name of rules[{j}]: allowed a name no other rule has",
                        r.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The rules, after `check` passed.
    pub fn rules(&self) -> Vec<Rule> {
        self.0
            .iter()
            .map(|r| r.to_rule().expect("validated by Config::validate"))
            .collect()
    }
}
