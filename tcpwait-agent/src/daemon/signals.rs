//! The signals a daemon receives, and what each does. SIGINT, SIGTERM and SIGQUIT stop the
//! agent gracefully (detach, deliver what is owed, remove the socket, exit 0). SIGHUP — sent by
//! `systemctl reload`, logrotate's `postrotate`, or when a controlling terminal goes away —
//! reloads: the transition log is reopened and the configuration file read again (see
//! `daemon::reload`). SIGUSR1 and SIGUSR2 have no use yet and are ignored with a log line
//! (their default action would kill the agent). SIGPIPE is ignored by the Rust runtime: a
//! closed pipe is an error on the write that met it.
use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::warn;

/// The handlers, installed once at start.
pub struct Signals {
    int: Signal,
    term: Signal,
    quit: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    /// Installs every handler (from then on none of these signals kills the process).
    pub fn install() -> anyhow::Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("install the {name} handler"))
        };
        Ok(Self {
            int: install(SignalKind::interrupt(), "SIGINT")?,
            term: install(SignalKind::terminate(), "SIGTERM")?,
            quit: install(SignalKind::quit(), "SIGQUIT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
            usr1: install(SignalKind::user_defined1(), "SIGUSR1")?,
            usr2: install(SignalKind::user_defined2(), "SIGUSR2")?,
        })
    }

    /// Waits for a signal that stops the agent (named) or reloads it; the others are logged
    /// and ignored. Cancel-safe: a signal is never consumed without its effect.
    pub async fn next(&mut self) -> Received {
        loop {
            tokio::select! {
                _ = self.int.recv() => return Received::Stop("SIGINT"),
                _ = self.term.recv() => return Received::Stop("SIGTERM"),
                _ = self.quit.recv() => return Received::Stop("SIGQUIT"),
                _ = self.hup.recv() => return Received::Reload,
                _ = self.usr1.recv() => warn!("SIGUSR1 received: it has no use yet; ignored"),
                _ = self.usr2.recv() => warn!("SIGUSR2 received: it has no use yet; ignored"),
            }
        }
    }
}

/// What a signal asks of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Stop gracefully; the signal's name.
    Stop(&'static str),
    /// SIGHUP: reopen the files, reload the configuration.
    Reload,
}
