//! Output the state task produces but never waits for: alert lines on stdout and the
//! transition log file. Each sink is a thread fed by a queue bounded in bytes; the state task
//! only hands it a buffer, so a stdout pipe whose reader stopped (systemd, a container runtime,
//! `| less` left alone) or a slow disk cannot stop tracking, attribution or alerting. When a
//! sink's queue is full the new lines are dropped and counted per sink (`status`,
//! `tcpwait_sink_dropped_total`); lines the writer fails to write are counted too.
//!
//! Measured before this existed (issue 13): `run --json > fifo` with a reader that stopped froze
//! the state task on its first alert line; status and metrics timed out and 3,992,322 of ~4.04M
//! transitions were lost in 10 s of churn.
use std::{
    io::{self, Write as _},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use tracing::warn;

use super::translog::TransitionLog;

/// Bytes of alert lines that may wait for stdout; past it new lines are dropped and counted.
pub const STDOUT_QUEUE_BYTES: u64 = 1 << 20;
/// Bytes of transition-log lines that may wait for the disk.
pub const TRANSLOG_QUEUE_BYTES: u64 = 16 << 20;

/// Which output a queue feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// Alert lines (`run`'s stdout).
    Stdout,
    /// The transition log file.
    TransitionLog,
}

impl SinkKind {
    /// The `sink` label and `status` key.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Stdout => "stdout",
            SinkKind::TransitionLog => "transition_log",
        }
    }
}

/// Lines of one sink, by outcome; shared by the state task and the sink's thread.
#[derive(Debug, Default)]
pub struct SinkCounts {
    /// Lines written.
    pub written: AtomicU64,
    /// Lines dropped because the queue was full (or the writer had stopped).
    pub dropped: AtomicU64,
    /// Lines the writer could not write (I/O error).
    pub failed: AtomicU64,
    /// Bytes queued and not yet written.
    queued_bytes: AtomicU64,
}

/// A batch of newline-terminated lines.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

/// A bounded queue drained by its own thread.
pub struct LineQueue {
    kind: SinkKind,
    tx: Option<Sender<Batch>>,
    counts: Arc<SinkCounts>,
    max_bytes: u64,
    thread: Option<JoinHandle<()>>,
}

/// Writes one batch; returns the lines it could not write.
type WriteFn = Box<dyn FnMut(&[u8], u64) -> u64 + Send>;

impl LineQueue {
    /// A queue of at most `max_bytes` whose thread hands each batch to `write`.
    fn spawn(kind: SinkKind, max_bytes: u64, mut write: WriteFn) -> io::Result<Self> {
        let (tx, rx): (Sender<Batch>, Receiver<Batch>) = mpsc::channel();
        let counts = Arc::new(SinkCounts::default());
        let thread = {
            let counts = counts.clone();
            thread::Builder::new()
                .name(format!("tcpwait-{}", kind.name()))
                .spawn(move || {
                    for batch in rx {
                        let failed = write(&batch.bytes, batch.lines);
                        counts
                            .written
                            .fetch_add(batch.lines - failed, Ordering::Relaxed);
                        counts.failed.fetch_add(failed, Ordering::Relaxed);
                        counts
                            .queued_bytes
                            .fetch_sub(batch.bytes.len() as u64, Ordering::Relaxed);
                    }
                })?
        };
        Ok(Self {
            kind,
            tx: Some(tx),
            counts,
            max_bytes,
            thread: Some(thread),
        })
    }

    /// Alert lines to this process's stdout, flushed after each batch.
    pub fn stdout(max_bytes: u64) -> io::Result<Self> {
        let mut warned = false;
        Self::spawn(
            SinkKind::Stdout,
            max_bytes,
            Box::new(move |bytes, lines| {
                let mut out = io::stdout().lock();
                match out.write_all(bytes).and_then(|()| out.flush()) {
                    Ok(()) => 0,
                    Err(e) => {
                        if !std::mem::replace(&mut warned, true) {
                            warn!(error = %e, "cannot print alert lines on stdout; counting them as failed");
                        }
                        lines
                    }
                }
            }),
        )
    }

    /// Transition-log lines, written and rotated by `log`.
    pub fn transition_log(mut log: TransitionLog, max_bytes: u64) -> io::Result<Self> {
        let mut warned = false;
        Self::spawn(
            SinkKind::TransitionLog,
            max_bytes,
            Box::new(move |bytes, _| {
                if bytes.is_empty() {
                    match log.reopen() {
                        Ok(()) => crate::logging::print_line(&format!(
                            "tcpwait: transition log {} reopened",
                            log.path().display()
                        )),
                        Err(e) => {
                            warn!(error = %e, "cannot reopen the transition log; writing on to the open file")
                        }
                    }
                    return 0;
                }
                let (written, error) = log.write_batch(bytes);
                if let Some(e) = error
                    && !std::mem::replace(&mut warned, true)
                {
                    warn!(error = %e, "cannot write the transition log; counting lost lines (tcpwait_sink_failed_total)");
                }
                written.failed
            }),
        )
    }

    /// Queues `lines` newline-terminated lines; never blocks. When they do not fit, they are
    /// dropped and counted.
    pub fn send(&self, bytes: Vec<u8>, lines: u64) {
        if lines == 0 {
            return;
        }
        let len = bytes.len() as u64;
        let queued = self.counts.queued_bytes.fetch_add(len, Ordering::Relaxed);
        let sent = queued + len <= self.max_bytes
            && self
                .tx
                .as_ref()
                .is_some_and(|tx| tx.send(Batch { bytes, lines }).is_ok());
        if !sent {
            self.counts.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.counts.dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }

    /// Asks the writer to reopen its file after what is queued (SIGHUP: logrotate renamed
    /// it): an empty batch, which the stdout writer writes as nothing.
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Batch {
                bytes: Vec::new(),
                lines: 0,
            });
        }
    }

    /// This queue's sink.
    pub fn kind(&self) -> SinkKind {
        self.kind
    }

    /// Its counters.
    pub fn counts(&self) -> &SinkCounts {
        &self.counts
    }

    /// Closes the queue and waits until `deadline` for the thread to write what it holds;
    /// what it could not write by then is counted as dropped. Returns the lines dropped so.
    pub fn finish(mut self, deadline: Instant) -> u64 {
        drop(self.tx.take());
        let Some(thread) = self.thread.take() else {
            return 0;
        };
        while !thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
            return 0;
        }
        // The writer is stuck (a stalled pipe): what it still holds is lost with the process.
        let held = self.counts.queued_bytes.load(Ordering::Relaxed);
        warn!(
            sink = self.kind.name(),
            bytes = held,
            "output still queued at exit is lost"
        );
        held
    }
}

/// Every sink the state task writes to.
pub struct Sinks {
    /// Alert lines.
    pub stdout: LineQueue,
    /// The transition log, when configured.
    pub translog: Option<LineQueue>,
}

impl Sinks {
    /// (sink, dropped, failed) per sink, for `status` and `/metrics`.
    pub fn counts(&self) -> Vec<(&'static str, u64, u64)> {
        let stderr = (
            "stderr",
            crate::logging::STDERR_DROPPED.load(Ordering::Relaxed),
            0,
        );
        std::iter::once(&self.stdout)
            .chain(self.translog.as_ref())
            .map(|q| {
                (
                    q.kind().name(),
                    q.counts().dropped.load(Ordering::Relaxed),
                    q.counts().failed.load(Ordering::Relaxed),
                )
            })
            .chain(std::iter::once(stderr))
            .collect()
    }

    /// Gives every sink until `deadline` to write what it holds.
    pub fn finish(self, deadline: Instant) {
        self.stdout.finish(deadline);
        if let Some(t) = self.translog {
            t.finish(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    /// A sink whose writer blocks until the test lets it go: the queue fills, the sender never
    /// waits, and every line is either written or counted as dropped.
    #[test]
    fn a_stalled_writer_never_blocks_the_sender_and_drops_are_exact() {
        let (gate_tx, gate_rx) = sync_channel::<()>(0);
        let written = Arc::new(AtomicU64::new(0));
        let q = {
            let written = written.clone();
            LineQueue::spawn(
                SinkKind::Stdout,
                100,
                Box::new(move |_, lines| {
                    let _ = gate_rx.recv();
                    written.fetch_add(lines, Ordering::Relaxed);
                    0
                }),
            )
            .expect("spawn")
        };
        let started = Instant::now();
        // 10-byte lines, one per batch: ten fill the 100 bytes (the writer holds the first,
        // blocked on the gate), the remaining 90 are dropped.
        for _ in 0..100 {
            q.send(b"012345678\n".to_vec(), 1);
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "send never waits"
        );
        // Bytes leave the count only once written: the blocked batch still counts.
        let dropped = q.counts().dropped.load(Ordering::Relaxed);
        assert_eq!(dropped, 90);
        let counts = q.counts.clone();
        let releaser = thread::spawn(move || while gate_tx.send(()).is_ok() {});
        assert_eq!(q.finish(Instant::now() + Duration::from_secs(10)), 0);
        releaser.join().expect("releaser");
        assert_eq!(
            written.load(Ordering::Relaxed) + counts.dropped.load(Ordering::Relaxed),
            100
        );
        assert_eq!(counts.written.load(Ordering::Relaxed), 100 - dropped);
    }

    #[test]
    fn failed_lines_are_counted() {
        let q = LineQueue::spawn(SinkKind::TransitionLog, 1 << 20, Box::new(|_, lines| lines))
            .expect("spawn");
        q.send(b"a\nb\nc\n".to_vec(), 3);
        let counts = q.counts.clone();
        q.finish(Instant::now() + Duration::from_secs(10));
        assert_eq!(counts.failed.load(Ordering::Relaxed), 3);
        assert_eq!(counts.written.load(Ordering::Relaxed), 0);
    }
}
