//! SIGHUP: reopen the files and reload the configuration, without a restart. A restart loses
//! the ages of the sockets the agent saw enter their state (after it, they are known only as
//! lower bounds from inet_diag), and the alerts firing; a reload keeps both.
//!
//! What a reload does, in order:
//! 1. Reopens the transition log (after the lines already queued): logrotate renames the
//!    file, then signals. The alert file needs nothing: it is opened for each change.
//! 2. Reads the configuration file again, with the command-line flags over it, as at start.
//!    A file that does not parse or validate is refused with the one-line error `config
//!    --check` prints, and nothing else changes.
//! 3. Replaces the rules when they changed ([`Tracker::set_rules`](crate::tracker::Tracker)):
//!    the table and its ages stay, an alert whose rule is still there keeps firing, the
//!    alerts of rules that went are resolved, and the new thresholds apply at once to every
//!    process — a lowered age fires on sockets tracked before the reload.
//! 4. Restarts the delivery sinks when their settings changed (`alertmanager`, `webhook`,
//!    `alert_file`, `delivery`), and sends them every firing alert, which the new sinks do
//!    not know; the counters go on.
//! 5. Settings that shape what the agent opened at start (`agent.socket`, `agent.max_sockets`,
//!    `metrics.listen`, `transition_log.*`) keep their running value: a change to one is
//!    named in a warning, and applies at the next restart.
use tracing::{error, warn};

use super::{Daemon, report, settle};
use crate::{
    config::{Config, DEFAULT_PATH},
    tracker::{alerts::AlertChange, rules::Scope},
};

impl Daemon {
    /// Reloads on SIGHUP; see the module comment.
    pub(super) fn reload(&mut self) {
        // First, and whatever the file holds: logrotate's signal must not wait for a fix.
        if let Some(log) = &self.sinks.translog {
            log.reopen();
        }
        let mut new = match self.args.resolve() {
            Ok(c) => c,
            Err(e) => {
                error!("SIGHUP: configuration refused, the running one stays in force: {e}");
                return;
            }
        };
        for key in keep_running_values(&self.config, &mut new) {
            warn!(
                key,
                "SIGHUP: this setting applies at the next restart; its running value stays"
            );
        }
        let now = self.now_ns();
        let rules = new.rules.rules();
        if self.timewait.rules() != crate::tracker::timewait::PeerWatch::new(&rules).rules() {
            self.set_peer_rules(&rules, now);
        }
        let of_scope =
            |scope| -> Vec<_> { rules.iter().filter(|r| r.scope == scope).cloned().collect() };
        let rules_changed = of_scope(Scope::Process) != self.tracker.rules()
            || of_scope(Scope::Host) != self.tracker.host_rules();
        if rules_changed {
            let gone = self.tracker.rules().to_vec();
            let gone_host = self.tracker.host_rules().to_vec();
            self.settling.set_settle(settle::settle_time(&rules));
            let (resolved, resolved_host) = self.tracker.set_rules(rules, now);
            self.announce(&resolved, now, &gone);
            self.announce_host(&resolved_host, now, &gone_host);
        }
        let delivery_changed = (
            &new.alertmanager,
            &new.webhook,
            &new.alert_file,
            &new.delivery,
        ) != (
            &self.config.alertmanager,
            &self.config.webhook,
            &self.config.alert_file,
            &self.config.delivery,
        );
        if delivery_changed {
            if let Err(e) = self.delivery.restart(&new) {
                error!(error = %e, "SIGHUP: cannot start the new alert delivery; the running one stays");
                new.alertmanager = self.config.alertmanager.clone();
                new.webhook = self.config.webhook.clone();
                new.alert_file = self.config.alert_file.clone();
                new.delivery = self.config.delivery.clone();
            } else {
                self.instance = report::instance(&new.alertmanager.instance, self.metrics_at);
                let firing: Vec<AlertChange> = self
                    .tracker
                    .firing()
                    .into_iter()
                    .map(AlertChange::Firing)
                    .collect();
                for change in &firing {
                    let AlertChange::Firing(a) = change else {
                        continue;
                    };
                    let rule = self
                        .tracker
                        .rule(&a.rule)
                        .expect("a firing alert's rule is one of the tracker's");
                    self.deliver(change, rule, now);
                }
            }
        }
        self.config = new;
        // The new thresholds, at once: sockets tracked before the reload may match already.
        self.evaluate();
        // Said whatever the log level, as the start-up line is: the operator asked for it.
        let path = self.args.config.as_deref().unwrap_or(DEFAULT_PATH.as_ref());
        crate::logging::print_line(&format!(
            "tcpwait: SIGHUP: configuration reloaded from {} ({} rules{}{})",
            path.display(),
            self.tracker.rules().len(),
            if rules_changed {
                ", rules replaced"
            } else {
                ""
            },
            if delivery_changed {
                ", delivery restarted"
            } else {
                ""
            },
        ));
    }
}

/// Puts back into `new` the running values of the settings a reload cannot change, and names
/// those that differed.
fn keep_running_values(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    if new.agent.socket != running.agent.socket {
        new.agent.socket = running.agent.socket.clone();
        kept.push("agent.socket");
    }
    if new.agent.max_sockets != running.agent.max_sockets {
        new.agent.max_sockets = running.agent.max_sockets;
        kept.push("agent.max_sockets");
    }
    if new.metrics.listen != running.metrics.listen {
        new.metrics.listen = running.metrics.listen.clone();
        kept.push("metrics.listen");
    }
    if new.transition_log != running.transition_log {
        new.transition_log = running.transition_log.clone();
        kept.push("transition_log");
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_opened_at_start_keep_their_running_value() {
        let running = Config::default();
        let mut new = Config::parse(
            "[agent]\nmax_sockets = 5\n[metrics]\nlisten = \"\"\ntop_processes = 3\n\
             [transition_log]\npath = \"/tmp/x.jsonl\"\n[webhook]\nurl = \"http://127.0.0.1:1/\"\n",
            "f.toml",
        )
        .expect("valid");
        assert_eq!(
            keep_running_values(&running, &mut new),
            ["agent.max_sockets", "metrics.listen", "transition_log"]
        );
        assert_eq!(new.agent, running.agent);
        assert_eq!(new.metrics.listen, running.metrics.listen);
        assert_eq!(new.transition_log, running.transition_log);
        // What a reload does change stays changed.
        assert_eq!(new.metrics.top_processes, 3);
        assert_eq!(new.webhook.url, "http://127.0.0.1:1/");
    }
}
