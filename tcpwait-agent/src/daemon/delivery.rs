//! Alert delivery: Alertmanager API v2, a generic JSON webhook, a JSON-lines file. Each sink
//! is a thread with a bounded queue; the state task only ever `try_send`s, so a slow or dead
//! receiver never slows the agent. A full queue drops the new change and counts it. A sink
//! keeps the latest state of every alert and retries each independently (see [`retry`]):
//! exponential backoff from 100 ms to `max_backoff`, every failed attempt counted; a change the
//! receiver refuses for good (HTTP 4xx other than 408 and 429: retrying the same body cannot
//! succeed) is counted as failed and dropped. On shutdown a sink makes one last attempt per
//! change it still holds; what it could not deliver then, or by the end of the shutdown budget,
//! is counted as dropped.
//!
//! Alertmanager forgets an alert whose `endsAt` passes, so firing alerts are re-sent every
//! `resend_interval` with `endsAt = now + 4 × resend_interval`; a resolved alert is sent once
//! with `endsAt = now`.
mod retry;

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};
use tracing::warn;

use crate::config::Config;

/// One alert change, ready for every sink.
#[derive(Clone, Debug)]
pub struct AlertMessage {
    /// Identity of the (rule, process) pair: stable while it fires.
    pub key: String,
    /// Firing (true) or resolved.
    pub firing: bool,
    /// When it started firing.
    pub starts_at: SystemTime,
    /// Alertmanager labels.
    pub labels: BTreeMap<String, String>,
    /// Alertmanager annotations.
    pub annotations: BTreeMap<String, String>,
    /// The JSON object sent to the webhook and the file (the `run --json` alert line).
    pub json: Value,
}

/// Sinks, by index into the counters.
const SINKS: [&str; 3] = ["alertmanager", "webhook", "file"];
const RESULTS: [&str; 4] = ["sent", "failed", "dropped", "superseded"];
const SENT: usize = 0;
const FAILED: usize = 1;
const DROPPED: usize = 2;
const SUPERSEDED: usize = 3;

#[derive(Default)]
struct Counts {
    by_result: [AtomicU64; 12],
    /// Changes queued or held for retry, per sink: what is lost if the process ends now.
    owed: [AtomicU64; 3],
}

impl Counts {
    fn add(&self, sink: usize, result: usize, n: u64) {
        self.by_result[sink * RESULTS.len() + result].fetch_add(n, Ordering::Relaxed);
    }
}

/// The running sinks.
pub struct Delivery {
    senders: Vec<(usize, SyncSender<AlertMessage>)>,
    threads: Vec<(usize, JoinHandle<()>)>,
    counts: Arc<Counts>,
}

impl Delivery {
    /// Starts a thread per configured sink.
    pub fn start(config: &Config) -> std::io::Result<Self> {
        Self::start_counting(config, Arc::new(Counts::default()))
    }

    /// Replaces the sinks with those `config` names (a configuration reload); the counters
    /// go on. The old sinks' queues close: each old thread makes its last attempt for what it
    /// holds (counted as usual) and ends; [`Delivery::finish`] waits for those too. The new
    /// sinks know no alert yet: the caller sends them the firing ones.
    pub fn restart(&mut self, config: &Config) -> std::io::Result<()> {
        let fresh = Self::start_counting(config, self.counts.clone())?;
        // Dropping the old senders closes the old queues.
        self.senders = fresh.senders;
        self.threads.extend(fresh.threads);
        Ok(())
    }

    fn start_counting(config: &Config, counts: Arc<Counts>) -> std::io::Result<Self> {
        let mut me = Self {
            senders: Vec::new(),
            threads: Vec::new(),
            counts,
        };
        let queue = config.delivery.queue_size as usize;
        let backoff = config.delivery.max_backoff.0;
        let resend = config.alertmanager.resend_interval.0;
        if !config.alertmanager.url.is_empty() {
            let url = format!(
                "{}/api/v2/alerts",
                config.alertmanager.url.trim_end_matches('/')
            );
            me.spawn(
                0,
                queue,
                Sink::Alertmanager {
                    url,
                    resend,
                    firing: HashMap::new(),
                },
                backoff,
            )?;
        }
        if !config.webhook.url.is_empty() {
            me.spawn(
                1,
                queue,
                Sink::Webhook {
                    url: config.webhook.url.clone(),
                },
                backoff,
            )?;
        }
        if !config.alert_file.path.is_empty() {
            me.spawn(
                2,
                queue,
                Sink::File {
                    path: config.alert_file.path.clone().into(),
                    mode: crate::config::file_mode(&config.alert_file.mode),
                },
                backoff,
            )?;
        }
        Ok(me)
    }

    fn spawn(
        &mut self,
        idx: usize,
        queue: usize,
        sink: Sink,
        max_backoff: Duration,
    ) -> std::io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let counts = self.counts.clone();
        let handle = thread::Builder::new()
            .name(format!("tcpwait-{}", SINKS[idx]))
            .spawn(move || worker(idx, sink, &rx, &counts, max_backoff))?;
        self.senders.push((idx, tx));
        self.threads.push((idx, handle));
        Ok(())
    }

    /// Queues a change for every sink; never blocks.
    pub fn send(&self, msg: &AlertMessage) {
        for (idx, tx) in &self.senders {
            // Counted as owed first: the sink may take it before try_send returns.
            self.counts.owed[*idx].fetch_add(1, Ordering::Relaxed);
            match tx.try_send(msg.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.counts.owed[*idx].fetch_sub(1, Ordering::Relaxed);
                    self.counts.add(*idx, DROPPED, 1);
                    warn!(
                        sink = SINKS[*idx],
                        "alert delivery queue full; change dropped"
                    );
                }
            }
        }
    }

    /// (sink, result, count) for every configured sink.
    pub fn counts(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (idx, _) in &self.senders {
            for (r, result) in RESULTS.iter().enumerate() {
                out.push((
                    SINKS[*idx],
                    *result,
                    self.counts.by_result[idx * RESULTS.len() + r].load(Ordering::Relaxed),
                ));
            }
        }
        out
    }

    /// Closes the queues and waits up to `limit` for the sinks to deliver what they hold;
    /// what a sink still holds then is counted as dropped.
    /// Returns the changes dropped during shutdown.
    pub fn finish(self, limit: Duration) -> u64 {
        let dropped = |c: &Counts| -> u64 {
            (0..SINKS.len())
                .map(|i| c.by_result[i * RESULTS.len() + DROPPED].load(Ordering::Relaxed))
                .sum()
        };
        let before = dropped(&self.counts);
        let deadline = Instant::now() + limit;
        drop(self.senders);
        for (idx, t) in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                // Taken from `owed` so that the sink, if it finishes after all, cannot count
                // the same changes again.
                let lost = self.counts.owed[idx].swap(0, Ordering::Relaxed);
                self.counts.add(idx, DROPPED, lost);
                warn!(
                    sink = SINKS[idx],
                    lost, "alert delivery did not finish in time; undelivered changes dropped"
                );
            }
        }
        dropped(&self.counts) - before
    }
}

enum Sink {
    Alertmanager {
        url: String,
        resend: Duration,
        firing: HashMap<String, AlertMessage>,
    },
    Webhook {
        url: String,
    },
    File {
        path: std::path::PathBuf,
        /// Mode of the file when created.
        mode: u32,
    },
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn am_alert(m: &AlertMessage, ends_at: SystemTime) -> Value {
    json!({
        "labels": m.labels,
        "annotations": m.annotations,
        "startsAt": rfc3339(m.starts_at),
        "endsAt": rfc3339(ends_at),
    })
}

impl Sink {
    /// Delivers one change (or, with `None`, the periodic re-send of firing alerts).
    fn deliver(&mut self, http: &ureq::Agent, msg: Option<&AlertMessage>) -> Result<(), Failed> {
        match self {
            Sink::Alertmanager {
                url,
                resend,
                firing,
            } => {
                let now = SystemTime::now();
                let mut batch = Vec::new();
                if let Some(m) = msg {
                    if m.firing {
                        firing.insert(m.key.clone(), m.clone());
                    } else {
                        // Resolve under the labels it fired with: Alertmanager identifies an
                        // alert by its label set, and a label (comm) may have changed since.
                        let labels = firing.remove(&m.key).map(|f| f.labels);
                        let resolved = AlertMessage {
                            labels: labels.unwrap_or_else(|| m.labels.clone()),
                            ..m.clone()
                        };
                        batch.push(am_alert(&resolved, now));
                    }
                }
                let until = now + *resend * 4;
                batch.extend(firing.values().map(|m| am_alert(m, until)));
                if batch.is_empty() {
                    return Ok(());
                }
                post(http, url, &Value::Array(batch))
            }
            Sink::Webhook { url } => match msg {
                Some(m) => post(http, url, &m.json),
                None => Ok(()),
            },
            Sink::File { path, mode } => match msg {
                // 0600 by default: alerts hold command lines (the umask can only narrow it).
                Some(m) => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(*mode)
                    .open(&*path)
                    .and_then(|mut f| writeln!(f, "{}", m.json))
                    .map_err(|e| format!("{}: {e}", path.display()).into()),
                None => Ok(()),
            },
        }
    }

    fn resend_interval(&self) -> Option<Duration> {
        match self {
            Sink::Alertmanager { resend, .. } => Some(*resend),
            _ => None,
        }
    }
}

/// Why a delivery failed.
#[derive(Debug)]
struct Failed {
    error: String,
    /// The receiver refused this change for good: do not retry it.
    permanent: bool,
}

impl From<String> for Failed {
    fn from(error: String) -> Self {
        Self {
            error,
            permanent: false,
        }
    }
}

fn post(http: &ureq::Agent, url: &str, body: &Value) -> Result<(), Failed> {
    http.post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map(|_| ())
        .map_err(|e| Failed {
            permanent: matches!(e, ureq::Error::StatusCode(c) if is_permanent(c)),
            error: format!("POST {url}: {e}"),
        })
}

/// HTTP statuses that retrying the same request cannot fix: 4xx but 408 (timeout) and 429
/// (rate limited).
fn is_permanent(status: u16) -> bool {
    (400..500).contains(&status) && status != 408 && status != 429
}

fn worker(
    idx: usize,
    mut sink: Sink,
    rx: &Receiver<AlertMessage>,
    counts: &Counts,
    max_backoff: Duration,
) {
    let http = agent();
    let mut next_resend = sink.resend_interval().map(|d| Instant::now() + d);
    let mut owed = retry::Owed::new(max_backoff);
    // Leaves `owed`: sent, given up or superseded. Saturating: `finish` may have taken them.
    let settle = |n: u64| {
        let _ = counts.owed[idx].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
            Some(o.saturating_sub(n))
        });
    };
    let take = |owed: &mut retry::Owed, m: AlertMessage| {
        if owed.add(m, Instant::now()) {
            counts.add(idx, SUPERSEDED, 1);
            settle(1);
        }
    };
    loop {
        let wake = owed.next_due().into_iter().chain(next_resend).min();
        let wait = wake.map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(Instant::now())
        });
        let closed = match rx.recv_timeout(wait) {
            Ok(m) => {
                take(&mut owed, m);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        while let Ok(m) = rx.try_recv() {
            take(&mut owed, m);
        }
        // At shutdown: one last attempt for every change held, due or not.
        let (sent, failed, gave_up) = owed.attempt(Instant::now(), closed, |m| {
            match sink.deliver(&http, Some(m)) {
                Ok(()) => retry::Outcome::Sent,
                Err(Failed { error, permanent }) => {
                    if permanent {
                        warn!(sink = SINKS[idx], error = %error, "alert change refused by the receiver; dropped");
                        retry::Outcome::GiveUp
                    } else if closed {
                        warn!(sink = SINKS[idx], error = %error, "alert delivery failed at shutdown; dropped");
                        retry::Outcome::GiveUp
                    } else {
                        warn!(sink = SINKS[idx], error = %error, "alert delivery failed; will retry");
                        retry::Outcome::Retry
                    }
                }
            }
        });
        counts.add(idx, SENT, sent);
        counts.add(idx, FAILED, failed);
        counts.add(idx, DROPPED, gave_up);
        settle(sent + gave_up);
        if closed {
            return;
        }
        if let Some(t) = next_resend
            && Instant::now() >= t
        {
            // Firing alerts re-sent (Alertmanager); a failure waits for the next round.
            if let Err(Failed { error, .. }) = sink.deliver(&http, None) {
                counts.add(idx, FAILED, 1);
                warn!(sink = SINKS[idx], error = %error, "alert re-send failed");
            }
            next_resend = sink.resend_interval().map(|d| Instant::now() + d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_client_errors_that_a_retry_cannot_fix_are_permanent() {
        for code in [400, 401, 404, 413, 422] {
            assert!(is_permanent(code), "{code}");
        }
        for code in [200, 408, 429, 500, 502, 503] {
            assert!(!is_permanent(code), "{code}");
        }
    }
}
