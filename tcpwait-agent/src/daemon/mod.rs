//! `tcpwait run`: the agent. One task owns all state — the probe, the tracker, the alert
//! state — and `select!`s over ring-buffer wake-ups, a drain tick, the next alert deadline,
//! owner snapshots from the resolver thread, API commands, and signals. Other tasks (API
//! clients) talk to it through channels; nothing is shared behind a lock.
mod aborts;
mod budget;
mod census;
mod delivery;
mod drain;
mod host;
mod http;
mod metrics;
mod owning;
mod reload;
mod report;
mod resolver;
mod settle;
mod signals;
mod sinks;
mod stats;
mod timewait;
mod translog;

use std::{
    collections::{HashMap, HashSet},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use crate::{
    api::{self, Command, TailItem},
    cli::RunArgs,
    config::Config,
    event::DecodeErrors,
    model::Tuple,
    output::{Clock, clock_ns},
    probe::{KernelCounters, Probe, TRACEPOINT},
    trace::DRAIN_INTERVAL,
    tracker::{Tracker, TrackerConfig, alerts::AlertChange, rules::Rule, timewait::PeerWatch},
};
use delivery::Delivery;
use metrics::EdgeCounts;
use owning::MIN_RESOLVE_INTERVAL;
use resolver::Resolver;
use settle::Settling;
pub use sinks::STDOUT_QUEUE_BYTES;

/// The shortest wait for the next settling socket: settle deadlines are served in groups, at
/// most this late, instead of one wake-up per socket passing through CLOSE_WAIT (measured at
/// 870 wake-ups/s and a third of the agent's CPU at 16k connections/s).
const SETTLE_COALESCE: Duration = Duration::from_millis(20);

/// Everything the state task owns.
struct Daemon {
    tracker: Tracker,
    probe: Probe,
    resolver: Resolver,
    tail: api::TailHub,
    args: RunArgs,
    config: Config,
    delivery: Delivery,
    edges: EdgeCounts,
    started_ns: u64,
    started: Instant,
    /// Since when the table holds every socket: agent start, or the last loss.
    complete_since_ns: u64,
    transitions: u64,
    malformed: DecodeErrors,
    kernel: KernelCounters,
    /// Transitions lost so far (kernel and decoding), as of the last reconciliation trigger.
    lost_seen: u64,
    /// Processes whose fd table could not be read, summed over /proc scans.
    scan_denied: u64,
    /// The "cannot read /proc/<pid>/fd" warning was logged (once per run).
    warned_denied: bool,
    /// A snapshot request is in flight (at most one).
    in_flight: bool,
    /// Sockets that entered a watched state without a known owner, until they settle.
    settling: Settling,
    last_request: Option<Instant>,
    next_reconcile: Instant,
    /// Tuples that left a watched state while a snapshot was in flight, with when: the snapshot may
    /// still show them, and must not bring them back.
    left_during_snapshot: HashMap<(u32, Tuple), u64>,
    /// Namespaces whose dump failed, each named once in the log.
    warned_namespaces: HashSet<u32>,
    /// Namespace dumps that failed, summed over snapshots.
    namespace_failures: u64,
    /// Full reconciliations applied (bootstrap included).
    reconciliations: u64,
    /// What the last snapshot cost (for metrics and status).
    last_cost: resolver::Cost,
    /// The `instance` label of delivered alerts.
    instance: String,
    /// Where metrics are served (the port bound), if they are.
    metrics_at: Option<std::net::SocketAddr>,
    /// Alert lines and the transition log, written by their own threads.
    sinks: sinks::Sinks,
    /// Drained transitions not yet handed to `tail` clients.
    pending_tail: Vec<Arc<TailItem>>,
    /// TIME_WAIT sockets per peer and the peer rules (`timewait`).
    timewait: PeerWatch,
    /// The thread that counts TIME_WAIT sockets.
    census: census::CensusThread,
    /// Monotonic to wall-clock time, for every JSON record (refreshed by [`Daemon::drain`]).
    clock: Clock,
    /// Aborts and resets received: tallies, the abort rule.
    aborts: aborts::Aborts,
}

/// Runs the agent until SIGINT, SIGTERM or SIGQUIT.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = args.resolve()?;
    // First: a signal during start-up (seconds on a slow machine) is then acted on once the
    // agent runs — a stop stops it gracefully, SIGHUP does not kill it — and is not lost where
    // the parent left SIGINT ignored (a background job of a non-interactive shell).
    let mut signals = signals::Signals::install()?;
    let (category, name) = TRACEPOINT;
    let budget = budget::FdBudget::raise();
    let (cmd_tx, mut cmd_rx) = mpsc::channel(64);
    let tail = api::TailHub::new(args.test_tail_backlog);
    // Bound before the probe is attached: /healthz and /readyz answer during start-up.
    let mut metrics_at = None;
    if !config.metrics.listen.is_empty() {
        let addr = config
            .metrics
            .listen
            .parse()
            .expect("validated by Config::validate");
        let (metrics_listener, bound) = http::bind(addr).await.with_context(|| {
            format!(
                "cannot serve metrics on {addr}: choose another metrics.listen / --metrics-listen"
            )
        })?;
        http::spawn(metrics_listener, cmd_tx.clone(), budget.metrics_connections);
        metrics_at = Some(bound);
    }
    let probe = Probe::attach(
        category,
        name,
        crate::probe::TestModes {
            ring_bytes: args.test_ring_bytes,
            ..Default::default()
        },
    )?;
    http::HEALTH.attached();
    let attachment = probe.attachment();
    // Removed on every way out of this function (its Drop).
    let (listener, _socket_file) = api::bind(&config.agent.socket).await?;
    let resolver = Resolver::spawn(resolver::host_roots(probe.reads_netns()))
        .context("start the owner resolver thread")?;
    let census = census::CensusThread::spawn(
        resolver::host_roots(probe.reads_netns()),
        census::CENSUS_INTERVAL,
    )
    .context("start the TIME_WAIT census thread")?;
    tokio::spawn(api::serve(
        listener,
        cmd_tx,
        tail.subscriber(),
        budget.api_clients,
    ));
    let delivery = Delivery::start(&config).context("start alert delivery")?;
    let translog = match config.transition_log.path.as_str() {
        "" => None,
        path => Some(
            sinks::LineQueue::transition_log(
                translog::TransitionLog::open(
                    path.as_ref(),
                    config.transition_log.max_bytes,
                    config.transition_log.keep,
                    crate::config::file_mode(&config.transition_log.mode),
                )
                .with_context(|| format!("cannot open the transition log {path}: check the directory exists and is writable"))?,
                sinks::TRANSLOG_QUEUE_BYTES,
            )
            .context("start the transition log writer")?,
        ),
    };
    let sinks = sinks::Sinks {
        stdout: sinks::LineQueue::stdout(args.test_stdout_queue_bytes)
            .context("start the alert line writer")?,
        translog,
    };

    let tracker_config = TrackerConfig {
        max_sockets: usize::try_from(config.agent.max_sockets).unwrap_or(usize::MAX),
        rules: config.rules.rules(),
    };
    let settle = settle::settle_time(&tracker_config.rules);
    let timewait = PeerWatch::new(&tracker_config.rules);
    let now = clock_ns(libc::CLOCK_MONOTONIC);
    let aborts = aborts::Aborts::new(config.abort_rule.to_rule(), &probe);
    let mut d = Daemon {
        tracker: Tracker::new(tracker_config),
        probe,
        resolver,
        tail,
        started_ns: now,
        started: Instant::now(),
        complete_since_ns: now,
        transitions: 0,
        malformed: DecodeErrors::default(),
        kernel: KernelCounters::default(),
        lost_seen: 0,
        scan_denied: 0,
        warned_denied: false,
        in_flight: false,
        settling: Settling::new(settle),
        last_request: None,
        next_reconcile: Instant::now() + config.agent.reconcile_interval.0,
        left_during_snapshot: HashMap::new(),
        warned_namespaces: HashSet::new(),
        namespace_failures: 0,
        reconciliations: 0,
        last_cost: resolver::Cost::default(),
        args,
        config,
        delivery,
        edges: EdgeCounts::default(),
        instance: String::new(),
        metrics_at,
        sinks,
        pending_tail: Vec::new(),
        timewait,
        census,
        clock: Clock::now(),
        aborts,
    };
    d.instance = report::instance(&d.config.alertmanager.instance, metrics_at);
    // Bootstrap: the sockets already in the watched states, with their owners.
    d.request_snapshot();
    // The bound address: with port 0 the kernel chose it.
    let metrics_url = match metrics_at {
        None => "metrics off".to_owned(),
        Some(addr) => format!("metrics at http://{addr}/metrics"),
    };
    crate::logging::print_line(&format!(
        "tcpwait: agent running on {category}:{name} ({attachment}; {}); {metrics_url}; API on \
         {} (`tcpwait status`, `tcpwait tail`); SIGINT/SIGTERM/SIGQUIT to stop",
        d.probe.resets().describe(),
        d.config.agent.socket.display()
    ));

    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = d.next_wakeup();
        tokio::select! {
            r = d.probe.readable() => r.context("wait for the ring buffer")?,
            _ = tick.tick() => d.on_tick(),
            _ = tokio::time::sleep_until(deadline) => {}
            Some(snapshot) = d.resolver.snapshots.recv() => {
                // Every transition before the dump is applied before it, as the reconciliation
                // of the two expects: take in what the CPUs have staged.
                d.take_in_all();
                d.on_snapshot(snapshot);
            }
            Some(census) = d.census.censuses.recv() => {
                // A peer's closers are figured as of the census: take in every active close
                // that made its TIME_WAIT sockets first (CPU stages and the reorder buffer
                // hold up to a flush interval of them; seen in CI: 2,334 of 3,000 closes).
                d.take_in_all();
                d.on_census(census);
            }
            Some(cmd) = cmd_rx.recv() => {
                // A status answer includes every transition up to the request.
                d.take_in_all();
                d.on_command(cmd);
            }
            received = signals.next() => match received {
                signals::Received::Stop(signal) => {
                    info!(signal, "stopping");
                    break;
                }
                signals::Received::Reload => d.reload(),
            },
        }
        d.drain();
        d.evaluate();
        d.maybe_request();
        d.publish().await;
        http::HEALTH.turned(http::monotonic_ms(), d.reconciliations > 0);
    }
    // Detach, then take in what the kernel side still had: the ring, the per-CPU stages.
    d.probe.stop();
    d.drain();
    if let Ok(k) = d.probe.counters() {
        d.kernel = k;
    }
    d.evaluate();
    let summary = d.summary();
    let Daemon {
        probe,
        delivery,
        sinks,
        ..
    } = d;
    drop(probe); // detach first, then deliver what is owed
    let deadline = Instant::now() + Duration::from_millis(1500);
    let undelivered = delivery.finish(Duration::from_millis(1500));
    sinks.finish(deadline.into_std());
    crate::logging::print_line(&format!(
        "tcpwait: stopped; {summary}; alert changes dropped at shutdown {undelivered}"
    ));
    Ok(ExitCode::SUCCESS)
}

impl Daemon {
    fn now_ns(&self) -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC)
    }

    /// The next instant the loop must wake without an event: the tracker's earliest alert
    /// deadline, or the periodic reconciliation.
    fn next_wakeup(&self) -> Instant {
        let mut at = self.next_reconcile;
        let deadline = [
            self.tracker.next_deadline(),
            self.tracker.next_host_deadline(),
            self.aborts.tally.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(deadline) = deadline {
            let now = self.now_ns();
            let wait = Duration::from_nanos(deadline.saturating_sub(now));
            at = at.min(Instant::now() + wait);
        }
        if let Some(due) = self.settling.next_due_ns() {
            // Never sooner than SETTLE_COALESCE: under load a socket settles every few
            // microseconds, and waking for each one cost a wake-up per connection.
            let wait = Duration::from_nanos(due.saturating_sub(self.now_ns())).max(SETTLE_COALESCE);
            let rate = self
                .last_request
                .map_or_else(Instant::now, |t| t + MIN_RESOLVE_INTERVAL);
            at = at.min((Instant::now() + wait).max(rate));
        }
        at
    }

    /// Reads the kernel's loss counters; any new loss (in the kernel, or a record that could
    /// not be decoded) makes the table incomplete: repair it.
    fn on_tick(&mut self) {
        match self.probe.counters() {
            Ok(k) => {
                self.aborts.counters = self.probe.resets().counters();
                let lost =
                    k.reserve_failed + k.recursion_misses.unwrap_or(0) + self.malformed.total();
                if lost > self.lost_seen {
                    warn!(
                        ring_full = k.reserve_failed,
                        recursion_misses = crate::probe::count_or_unknown(k.recursion_misses),
                        malformed = self.malformed.total(),
                        "transitions lost; reconciling with inet_diag"
                    );
                    self.complete_since_ns = self.now_ns();
                    self.next_reconcile = Instant::now();
                    self.lost_seen = lost;
                }
                self.kernel = k;
            }
            Err(e) => warn!(error = %e, "cannot read the kernel's counters"),
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(port, reply) => {
                let now = self.now_ns();
                let mut report = report::status(&self.tracker, &self.stats(), now, &self.clock);
                report.timewait = Some(timewait::report(&self.timewait, now));
                report.aborts = Some(self.aborts.report(now));
                report.port =
                    port.map(|p| timewait::port_report(&self.tracker, &self.timewait, p, now));
                report.host_rules = host::report(&self.tracker, now);
                let _ = reply.send(report);
            }
            Command::Table(netns, reply) => {
                let now = self.now_ns();
                let _ = reply.send(
                    self.tracker
                        .sockets_in(netns, now)
                        .iter()
                        .map(report::socket)
                        .collect(),
                );
            }
            Command::Metrics(reply) => {
                let _ = reply.send(metrics::render(
                    &self.tracker,
                    &self.stats(),
                    &self.timewait,
                    self.now_ns(),
                ));
            }
        }
    }

    fn evaluate(&mut self) {
        let now = self.now_ns();
        self.evaluate_aborts(now);
        let changes = self.tracker.evaluate(now);
        self.announce(&changes, now, &[]);
        self.evaluate_host(now);
    }

    /// Prints each alert change and hands it to the delivery sinks. An alert's rule is looked
    /// up in `gone` (the rules a reload replaced), then in the tracker's.
    fn announce(&mut self, changes: &[AlertChange], now: u64, gone: &[Rule]) {
        for change in changes {
            let a = match change {
                AlertChange::Firing(a) | AlertChange::Resolved(a) => a,
            };
            let rule = gone
                .iter()
                .find(|r| r.name == a.rule)
                .or_else(|| self.tracker.rule(&a.rule))
                .expect("an alert's rule is one of the tracker's, or one a reload replaced");
            let line = report::alert_line(change, rule, now, &self.clock, self.args.json);
            let line = if self.args.json {
                crate::output::escape_json(&line).into_owned()
            } else {
                line
            };
            if let AlertChange::Firing(a) = change {
                info!(pid = a.process.key.pid, rule = %a.rule, count = a.count, "alert firing");
            }
            let message = report::alert_message(change, rule, now, &self.clock, &self.instance);
            self.announce_one(line, &message);
        }
    }

    /// Announces one alert change of any rule: its line on stdout and its message to the
    /// delivery sinks. Never waits for stdout: a full queue drops the line and counts it. One
    /// line at a time, so a burst drops only what does not fit.
    /// Hands a process alert change to the delivery sinks only, without a stdout line (a
    /// reload sends again what still fires).
    fn deliver(&self, change: &AlertChange, rule: &Rule, now: u64) {
        let message = report::alert_message(change, rule, now, &self.clock, &self.instance);
        self.delivery.send(&message);
    }

    fn announce_one(&self, mut line: String, message: &delivery::AlertMessage) {
        line.push('\n');
        self.sinks.stdout.send(line.into_bytes(), 1);
        self.delivery.send(message);
    }

    fn summary(&self) -> String {
        format!(
            "{} transitions, lost: ring buffer full {}, kernel recursion misses {}, malformed \
             {}; out of order {}; accounting: {}",
            self.transitions,
            self.kernel.reserve_failed,
            crate::probe::count_or_unknown(self.kernel.recursion_misses),
            self.malformed.total(),
            self.kernel.late,
            self.kernel.identity(
                self.transitions + self.malformed.total(),
                self.malformed.total()
            )
        )
    }
}
