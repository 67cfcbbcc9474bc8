//! Logging: to the journal under systemd (when `JOURNAL_STREAM` is set), to stderr otherwise.
//!
//! Stderr is written by a thread of its own, fed by a bounded queue: a log line is never
//! written by the task that logs it, so a stderr pipe whose reader stopped cannot freeze the
//! agent's state task (see `daemon::sinks` for stdout). When the queue is full the line is
//! dropped and counted (`tcpwait_sink_dropped_total{sink="stderr"}`).
use std::{
    io::{self, IsTerminal as _, Write as _},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use tracing_subscriber::{
    EnvFilter, Layer as _, fmt::MakeWriter, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

/// Log lines that may wait for stderr.
const STDERR_QUEUE_LINES: usize = 1024;

/// Log lines dropped because stderr's queue was full.
pub static STDERR_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Log lines queued and not yet written.
static PENDING: AtomicU64 = AtomicU64::new(0);
static QUEUE: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();

/// Sets up logging; `verbose` is the number of `-v` flags.
pub fn init(verbose: u8) {
    let default = match verbose {
        // aya warns when it cannot raise RLIMIT_MEMLOCK after a refused map (kernels before
        // 5.11, unprivileged): the load error that follows names the cause in one line.
        0 => "warn,aya::sys::bpf=error",
        1 => "tcpwait=debug,info",
        _ => "trace",
    };
    let filter =
        || EnvFilter::try_from_env("TCPWAIT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Under systemd (JOURNAL_STREAM is set for the service's stderr), log to the journal with
    // structured fields; elsewhere, to stderr.
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|l| l.with_filter(filter()));
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(QueuedStderr)
            // Colour only for a person at a terminal: a log file, a pipe or a container
            // runtime's log would otherwise keep the escape codes (`NO_COLOR` is honoured).
            .with_ansi(io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .with_target(false)
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(journald)
        .with(stderr)
        .init();
}

/// Prints `line` on stderr without waiting for it: through the log queue (dropped and counted
/// when full), so a stalled stderr cannot hold the agent at start or exit.
pub fn print_line(line: &str) {
    let mut event = EventLine(Vec::with_capacity(line.len() + 1));
    event.0.extend_from_slice(line.as_bytes());
    event.0.push(b'\n');
    // Queued by its Drop.
}

/// Waits until the queued log lines are written, at most `limit`.
pub fn flush(limit: Duration) {
    let deadline = Instant::now() + limit;
    while PENDING.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn queue() -> Option<&'static SyncSender<Vec<u8>>> {
    if let Some(q) = QUEUE.get() {
        return Some(q);
    }
    let (tx, rx) = sync_channel::<Vec<u8>>(STDERR_QUEUE_LINES);
    std::thread::Builder::new()
        .name("tcpwait-stderr".into())
        .spawn(move || {
            for line in rx {
                let _ = io::stderr().lock().write_all(&line);
                PENDING.fetch_sub(1, Ordering::Relaxed);
            }
        })
        .ok()?;
    // A race with another first logger loses one thread and queue, harmlessly.
    Some(QUEUE.get_or_init(|| tx))
}

/// The fmt layer's writer: one buffer per event, queued when the event is complete.
struct QueuedStderr;

/// One event's text.
struct EventLine(Vec<u8>);

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = EventLine;

    fn make_writer(&'a self) -> Self::Writer {
        EventLine(Vec::with_capacity(256))
    }
}

impl io::Write for EventLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventLine {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let Some(q) = queue() else {
            // No thread could be started: write in place rather than lose the line.
            let _ = io::stderr().write_all(&self.0);
            return;
        };
        PENDING.fetch_add(1, Ordering::Relaxed);
        match q.try_send(std::mem::take(&mut self.0)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                PENDING.fetch_sub(1, Ordering::Relaxed);
                STDERR_DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
