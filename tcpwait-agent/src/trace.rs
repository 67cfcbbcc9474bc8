//! `tcpwait trace`: standalone, no daemon. Loads the probe, prints transitions, and on Ctrl-C
//! or SIGTERM detaches and prints what it saw and what was lost.
use std::{
    collections::HashMap,
    io::{self, Write as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::TraceArgs,
    event::{DecodeErrors, Record, SocketId, TcpState, Transition, decode_record},
    output::{Clock, Format, TEXT_HEADER, TransitionRecord, write_record},
    probe::{KernelCounters, Probe, TestModes},
};

/// How often the ring is drained when the kernel has not woken us (it wakes us once per
/// batch, not per event): the worst-case delay of a lone transition.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Sockets whose entry time `trace` remembers, to print time spent in the old state.
const AGES_CAP: usize = 1 << 20;

/// When each live socket entered its current state, for the "ms in old state" column.
/// Bounded: past the cap new sockets are not remembered (their column shows "-").
pub struct StateAges {
    entered: HashMap<SocketId, u64>,
    cap: usize,
}

impl StateAges {
    /// An empty table that holds at most `cap` sockets.
    pub fn new(cap: usize) -> Self {
        Self {
            entered: HashMap::new(),
            cap,
        }
    }

    /// Records `t` and returns the ns the socket spent in `t.old`, if it was seen entering it.
    pub fn observe(&mut self, t: &Transition) -> Option<u64> {
        let prev = if t.new == TcpState::Close {
            self.entered.remove(&t.sock)
        } else if self.entered.len() < self.cap || self.entered.contains_key(&t.sock) {
            self.entered.insert(t.sock, t.ts_ns)
        } else {
            self.entered.remove(&t.sock)
        };
        prev.map(|entered| t.ts_ns.saturating_sub(entered))
    }
}

/// Runs `tcpwait trace` until a signal or a closed stdout.
pub async fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    let filter = args.filter.to_filter();
    let format = if args.json {
        Format::Json
    } else {
        Format::Text
    };
    let (category, name) = &args.tracepoint;
    let test = TestModes {
        compare: args.test_compare,
        no_netns: args.test_no_netns,
        ..TestModes::default()
    };
    // Before the probe: a stop asked during start-up (seconds on a slow machine) is acted on
    // once tracing starts, with its summary, and is not lost where the parent left SIGINT
    // ignored (a background job of a non-interactive shell).
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut probe = Probe::attach(category, name, test)?;
    let mut clock = Clock::now();
    let mut out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    if format == Format::Text {
        writeln!(out, "{TEXT_HEADER}")?;
        out.flush()?;
    }
    eprintln!(
        "tcpwait: tracing TCP state transitions ({category}:{name}, {}; {}); Ctrl-C to stop",
        probe.attachment(),
        probe.resets().describe()
    );

    let mut ages = StateAges::new(AGES_CAP);
    let mut stats = Stats::default();
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stdout_closed = false;
    loop {
        tokio::select! {
            r = probe.readable() => r.context("wait for the ring buffer")?,
            _ = tick.tick() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        clock.refresh(crate::output::clock_ns(libc::CLOCK_MONOTONIC));
        if let Err(e) = drain(
            &mut probe, &mut out, format, &clock, &filter, &mut ages, &mut stats,
        ) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                stdout_closed = true;
                break;
            }
            return Err(e).context("write to stdout");
        }
    }
    // Detach, then show what the kernel side still had: the ring, the per-CPU stages.
    probe.stop();
    if !stdout_closed {
        let _ = drain(
            &mut probe, &mut out, format, &clock, &filter, &mut ages, &mut stats,
        );
    }
    let kernel = probe.counters().context("read the kernel's counters")?;
    let resets = probe.resets().counters();
    drop(probe); // detach before reporting
    // The transitions' summary stays the last line: `cargo xtask bench` reads the loss there.
    eprintln!("tcpwait: {}", stats.resets.summary(&resets));
    eprintln!("tcpwait: {}", stats.summary(&kernel));
    Ok(ExitCode::SUCCESS)
}

/// What `trace` saw.
#[derive(Debug, Default)]
struct Stats {
    seen: u64,
    printed: u64,
    malformed: DecodeErrors,
    resets: crate::resets::ResetStats,
}

impl Stats {
    fn summary(&self, k: &KernelCounters) -> String {
        let lost = k.reserve_failed + k.recursion_misses.unwrap_or(0) + self.malformed.total();
        // Where the kernel does not count recursion misses, the total is only a lower bound.
        let at_least = if k.recursion_misses.is_none() {
            "at least "
        } else {
            ""
        };
        let malformed = self.malformed.total();
        format!(
            "{} transitions seen, {} printed, {at_least}{lost} lost (ring buffer full: {}, \
             kernel recursion misses: {}, malformed: {}); {} nested transitions rescued, {} out \
             of order; accounting: {}",
            self.seen,
            self.printed,
            k.reserve_failed,
            crate::probe::count_or_unknown(k.recursion_misses),
            malformed,
            k.rescued,
            k.late,
            k.identity(self.seen + malformed, malformed)
        )
    }
}

fn drain(
    probe: &mut Probe,
    out: &mut impl io::Write,
    format: Format,
    clock: &Clock,
    filter: &crate::filter::Filter,
    ages: &mut StateAges,
    stats: &mut Stats,
) -> io::Result<()> {
    let mut result = Ok(());
    let reasons = probe.resets().reasons.clone();
    probe.drain(|bytes| match decode_record(bytes) {
        Ok(Record::Reset(r)) => {
            let shown = result.is_ok() && crate::resets::matches(filter, &r, None);
            stats.resets.seen(&r, shown);
            if shown {
                let rec = crate::resets::ResetRecord::new(&r, &reasons, None, clock.wall(r.ts_ns));
                result = crate::resets::write_reset(out, format, clock, &rec);
            }
        }
        Ok(Record::Transition(t)) => {
            stats.seen += 1;
            let in_old = ages.observe(&t);
            if result.is_ok() && filter.matches(&t, None) {
                stats.printed += 1;
                result = write_record(
                    out,
                    format,
                    clock,
                    &TransitionRecord::new(&t, in_old, None, clock.wall(t.ts_ns)),
                );
            }
        }
        Err(e) => stats.malformed.count(e),
    });
    result?;
    // One flush per batch: live through a pipe (`| jq`), without a syscall per line.
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Comm, Task};

    fn tr(sock: u64, ts_ns: u64, old: TcpState, new: TcpState) -> Transition {
        Transition {
            ts_ns,
            sock: SocketId(sock),
            netns: 4_026_531_833,
            saddr: "127.0.0.1".parse().expect("literal"),
            sport: 1,
            daddr: "127.0.0.1".parse().expect("literal"),
            dport: 2,
            old,
            new,
            task: Task {
                pid: 1,
                tid: 1,
                comm: Comm([0; 16]),
            },
        }
    }

    #[test]
    fn ages_measure_time_in_old_state() {
        use TcpState::*;
        let mut a = StateAges::new(10);
        assert_eq!(a.observe(&tr(1, 100, Close, SynSent)), None);
        assert_eq!(a.observe(&tr(1, 350, SynSent, Established)), Some(250));
        assert_eq!(a.observe(&tr(1, 1350, Established, FinWait1)), Some(1000));
        assert_eq!(a.observe(&tr(1, 1400, FinWait1, Close)), Some(50));
        // Gone after CLOSE: a reused address starts fresh.
        assert_eq!(a.observe(&tr(1, 2000, Close, SynSent)), None);
    }

    #[test]
    fn ages_are_bounded() {
        use TcpState::*;
        let mut a = StateAges::new(1);
        a.observe(&tr(1, 0, Close, SynSent));
        a.observe(&tr(2, 0, Close, SynSent));
        assert_eq!(a.observe(&tr(2, 5, SynSent, Established)), None);
        assert_eq!(a.observe(&tr(1, 5, SynSent, Established)), Some(5));
    }
}
