//! The configuration file (TOML): defaults embedded, every key documented in
//! [`DEFAULT_CONFIG`], unknown keys and bad values refused with one line that names the key, the
//! value and what is allowed. Command-line flags override the file (see `cli::RunArgs`).
use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use self::rules::RuleSet;
pub use input::file_mode;
use input::{DEFAULT_FILE_MODE, check_output_file, read_capped};

pub mod aborts;
pub mod http;
mod rules;

/// Where `tcpwait run` looks when `--config` is not given; absent means embedded defaults.
pub const DEFAULT_PATH: &str = "/etc/tcpwait/tcpwait.toml";

/// The documented default file, printed by `tcpwait config --print-default`. Parsing it gives
/// exactly `Config::default()` (a unit test holds this).
pub const DEFAULT_CONFIG: &str = include_str!("config/default.toml");

/// A duration in the file: seconds, or a string with units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        let parsed = match Raw::deserialize(d)? {
            // try_from: a huge value (1e30) is refused, not a panic.
            Raw::Secs(s) if s > 0.0 && Duration::try_from_secs_f64(s).is_ok() => {
                Duration::from_secs_f64(s)
            }
            Raw::Secs(s) => {
                return Err(serde::de::Error::custom(format!(
                    "invalid duration {s}: expected a positive number of seconds or a string like \"90s\""
                )));
            }
            Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration \"{t}\" ({e}): expected e.g. 60, \"90s\", \"5m\""
                ))
            })?,
        };
        Ok(Dur(parsed))
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: Agent,
    pub rules: RuleSet,
    pub metrics: Metrics,
    pub alertmanager: Alertmanager,
    pub webhook: Webhook,
    pub alert_file: AlertFile,
    pub delivery: Delivery,
    pub transition_log: TransitionLogConfig,
    pub abort_rule: aborts::AbortRuleConfig,
}

/// `[transition_log]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransitionLogConfig {
    pub path: String,
    pub max_bytes: u64,
    pub keep: u32,
    /// Octal mode of the files created, e.g. "0600".
    pub mode: String,
}

impl Default for TransitionLogConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            max_bytes: 100 << 20,
            keep: 5,
            mode: DEFAULT_FILE_MODE.into(),
        }
    }
}

/// `[agent]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    pub socket: PathBuf,
    pub max_sockets: u64,
    pub reconcile_interval: Dur,
}

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    pub listen: String,
    pub top_processes: u32,
}

/// `[alertmanager]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Alertmanager {
    pub url: String,
    pub resend_interval: Dur,
    pub instance: String,
    /// PEM file of extra CA certificates (https).
    pub ca_file: String,
    pub basic_auth_username: String,
    /// File holding the basic auth password.
    pub basic_auth_password_file: String,
    /// File holding a bearer token.
    pub bearer_token_file: String,
    /// The alerts' `generatorURL`; "" for none.
    pub generator_url: String,
}

/// `[webhook]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Webhook {
    pub url: String,
    /// PEM file of extra CA certificates (https).
    pub ca_file: String,
    pub basic_auth_username: String,
    /// File holding the basic auth password.
    pub basic_auth_password_file: String,
    /// File holding a bearer token.
    pub bearer_token_file: String,
}

impl Alertmanager {
    /// Its HTTP settings.
    pub fn receiver(&self) -> http::Receiver<'_> {
        http::Receiver {
            table: "alertmanager",
            url: &self.url,
            ca_file: &self.ca_file,
            basic_auth_username: &self.basic_auth_username,
            basic_auth_password_file: &self.basic_auth_password_file,
            bearer_token_file: &self.bearer_token_file,
        }
    }
}

impl Webhook {
    /// Its HTTP settings.
    pub fn receiver(&self) -> http::Receiver<'_> {
        http::Receiver {
            table: "webhook",
            url: &self.url,
            ca_file: &self.ca_file,
            basic_auth_username: &self.basic_auth_username,
            basic_auth_password_file: &self.basic_auth_password_file,
            bearer_token_file: &self.bearer_token_file,
        }
    }
}

/// `[alert_file]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertFile {
    pub path: String,
    /// Octal mode of the file created, e.g. "0600".
    pub mode: String,
}

impl Default for AlertFile {
    fn default() -> Self {
        Self {
            path: String::new(),
            mode: DEFAULT_FILE_MODE.into(),
        }
    }
}

/// `[delivery]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    pub queue_size: u32,
    pub max_backoff: Dur,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            socket: crate::api::DEFAULT_SOCKET.into(),
            max_sockets: 1_000_000,
            reconcile_interval: Dur(Duration::from_secs(30)),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9977".into(),
            top_processes: 20,
        }
    }
}

impl Default for Alertmanager {
    fn default() -> Self {
        Self {
            url: String::new(),
            resend_interval: Dur(Duration::from_secs(60)),
            instance: String::new(),
            ca_file: String::new(),
            basic_auth_username: String::new(),
            basic_auth_password_file: String::new(),
            bearer_token_file: String::new(),
            generator_url: String::new(),
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            queue_size: 1024,
            max_backoff: Dur(Duration::from_secs(10)),
        }
    }
}

/// A configuration that cannot be used. Its message is one line: where, which key, what value,
/// what is allowed. `main` maps it to exit code 2, like a bad flag.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file, or `--flag` for a command-line value.
    pub source_name: String,
    /// Dotted key, e.g. `rules.close_wait_count`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source_name, self.message)
        } else {
            write!(f, "{}: {}: {}", self.source_name, self.key, self.message)
        }
    }
}

impl Config {
    /// Reads `path`; `None` means the default path, whose absence gives embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_PATH), false),
        };
        let name = path.display().to_string();
        match read_capped(path) {
            Ok(text) => Self::parse(&text, &name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(e) => Err(ConfigError {
                source_name: name,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }

    /// Parses and validates a file's text; `name` is used in messages.
    pub fn parse(text: &str, name: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| syntax_error(text, name, &e))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError {
                source_name: name.into(),
                key: if key == "." { String::new() } else { key },
                message: inner.message().replace('\n', " "),
            }
        })?;
        config.validate(name)?;
        Ok(config)
    }

    /// Range and format checks, one per key.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| {
            Err(ConfigError {
                source_name: name.into(),
                key: key.into(),
                message,
            })
        };
        let dur_range = |key: &str, d: Dur, min: Duration, max: Duration, allowed: &str| {
            if d.0 < min || d.0 > max {
                return err(
                    key,
                    format!(
                        "{} is out of range: allowed {allowed}",
                        humantime::format_duration(d.0)
                    ),
                );
            }
            Ok(())
        };
        if !(1..=100_000_000).contains(&self.agent.max_sockets) {
            return err(
                "agent.max_sockets",
                format!(
                    "{} is out of range: allowed 1 ..= 100000000",
                    self.agent.max_sockets
                ),
            );
        }
        if self.agent.socket.as_os_str().is_empty() {
            return err(
                "agent.socket",
                "\"\" is not a path: give the API socket's path".into(),
            );
        }
        dur_range(
            "agent.reconcile_interval",
            self.agent.reconcile_interval,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            "1s ..= 1h",
        )?;
        if let Err((key, message)) = self.rules.check() {
            return err(&key, message);
        }
        if let Err((key, message)) = self.abort_rule.check() {
            return err(&format!("abort_rule.{key}"), message);
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return err(
                "metrics.listen",
                format!(
                    "\"{}\" is not an address: allowed \"IP:PORT\" (e.g. \"127.0.0.1:9977\") or \"\" to disable",
                    self.metrics.listen
                ),
            );
        }
        if !(1..=10_000).contains(&self.metrics.top_processes) {
            return err(
                "metrics.top_processes",
                format!(
                    "{} is out of range: allowed 1 ..= 10000",
                    self.metrics.top_processes
                ),
            );
        }
        for receiver in [self.alertmanager.receiver(), self.webhook.receiver()] {
            if let Err((key, message)) = receiver.check() {
                return err(&key, message);
            }
        }
        let generator = &self.alertmanager.generator_url;
        if !generator.is_empty() && http::url_scheme(generator).is_none() {
            return err(
                "alertmanager.generator_url",
                format!(
                    "\"{generator}\" is not an http:// or https:// URL: give one, or \"\" for none"
                ),
            );
        }
        dur_range(
            "alertmanager.resend_interval",
            self.alertmanager.resend_interval,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            "1s ..= 1h",
        )?;
        if !(1..=1_000_000).contains(&self.delivery.queue_size) {
            return err(
                "delivery.queue_size",
                format!(
                    "{} is out of range: allowed 1 ..= 1000000",
                    self.delivery.queue_size
                ),
            );
        }
        if !(4096..=1 << 40).contains(&self.transition_log.max_bytes) {
            return err(
                "transition_log.max_bytes",
                format!(
                    "{} is out of range: allowed 4096 ..= 1099511627776",
                    self.transition_log.max_bytes
                ),
            );
        }
        if !(1..=100).contains(&self.transition_log.keep) {
            return err(
                "transition_log.keep",
                format!(
                    "{} is out of range: allowed 1 ..= 100",
                    self.transition_log.keep
                ),
            );
        }
        for (key, mode) in [
            ("alert_file.mode", &self.alert_file.mode),
            ("transition_log.mode", &self.transition_log.mode),
        ] {
            if input::parse_mode(mode).is_none() {
                return err(
                    key,
                    format!(
                        "\"{mode}\" is not allowed: allowed an octal mode within \"0644\" (no execute bit, no write for group or others), e.g. \"0600\" or \"0640\""
                    ),
                );
            }
        }
        for (key, path) in [
            ("alert_file.path", &self.alert_file.path),
            ("transition_log.path", &self.transition_log.path),
        ] {
            if let Err(why) = check_output_file(path) {
                return err(key, format!("\"{path}\" {why}"));
            }
        }
        dur_range(
            "delivery.max_backoff",
            self.delivery.max_backoff,
            Duration::from_millis(100),
            Duration::from_secs(3600),
            "100ms ..= 1h",
        )?;
        Ok(())
    }
}

fn syntax_error(text: &str, name: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
    ConfigError {
        source_name: match line {
            Some(l) => format!("{name}:{l}"),
            None => name.into(),
        },
        key: String::new(),
        message: format!("invalid TOML: {}", e.message().replace('\n', " ")),
    }
}

mod input;
#[cfg(test)]
mod tests;
