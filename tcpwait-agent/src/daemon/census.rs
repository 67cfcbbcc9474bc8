//! The TIME_WAIT census: a thread that, every [`CENSUS_INTERVAL`], dumps the TIME_WAIT sockets
//! of every network namespace (inet_diag, from inside each namespace as the resolver does) and
//! reads each namespace's `net.ipv4.ip_local_port_range`, and hands the result to the state
//! task. A thread of its own, apart from the owner resolver: `setns` moves only the calling
//! thread, and a census of 100,000 sockets must not delay owner resolution (or the reverse).
//!
//! Why a periodic dump and not events: no transition enters TIME_WAIT (a timewait socket
//! replaces the full socket), and timewait sockets leave without any event when their 60 s
//! timer fires. The dump is the kernel's own list, so a settled count equals what
//! `ss -tan state time-wait` shows. Its cost is linear in TIME_WAIT sockets (BENCHMARKS.md).
//!
//! `/proc/sys/net` answers for the namespace of the thread that opens the file, so the port
//! range is read while the thread is inside the namespace (checked on 6.18).
use std::{
    path::PathBuf,
    sync::mpsc as std_mpsc,
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::warn;

use super::resolver::Roots;
use crate::{
    event::TcpState,
    output::clock_ns,
    owners::{
        diag,
        netns::{self, Home},
    },
    tracker::timewait::{Census, NsCensus, TwSocket},
};

/// How often the TIME_WAIT sockets are counted. TIME_WAIT lasts 60 s, so a pile-up builds
/// over tens of seconds; one census costs ≈ 1 µs of CPU per TIME_WAIT socket (BENCHMARKS.md).
pub const CENSUS_INTERVAL: Duration = Duration::from_secs(5);

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Handle to the census thread.
pub struct CensusThread {
    /// Censuses, one per interval.
    pub censuses: mpsc::Receiver<Census>,
    /// Dropping it stops the thread at its next wake-up.
    _stop: std_mpsc::Sender<()>,
}

impl CensusThread {
    /// Starts the thread; the first census is taken at once.
    pub fn spawn(roots: Roots, interval: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(2);
        let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
        thread::Builder::new()
            .name("tcpwait-census".into())
            .spawn(move || {
                let home = match Home::here() {
                    Ok(h) => h,
                    Err(e) => {
                        warn!(error = %e, "cannot open the agent's own network namespace");
                        return;
                    }
                };
                loop {
                    let started = Instant::now();
                    let census = take(&home, &roots);
                    // A full channel: the state task is behind; skip this one.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(census) {
                        return;
                    }
                    let wait = interval.saturating_sub(started.elapsed());
                    match stop_rx.recv_timeout(wait) {
                        Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(Self {
            censuses: rx,
            _stop: stop_tx,
        })
    }
}

/// One census of every namespace.
fn take(home: &Home, roots: &Roots) -> Census {
    let started = Instant::now();
    let taken_ns = clock_ns(libc::CLOCK_MONOTONIC);
    let mut census = Census {
        taken_ns,
        ..Census::default()
    };
    let namespaces: Vec<(u32, Vec<PathBuf>)> = if roots.per_namespace {
        netns::discover(&roots.proc, &roots.run_netns)
            .by_inode
            .into_iter()
            .collect()
    } else {
        vec![(0, Vec::new())]
    };
    for (inode, paths) in namespaces {
        let entered = if roots.per_namespace {
            home.within(inode, &paths, || {
                Ok((diag::open()?, std::fs::read_to_string(PORT_RANGE).ok()))
            })
            .map_err(|e| e.to_string())
        } else {
            diag::open()
                .map(|s| (s, std::fs::read_to_string(PORT_RANGE).ok()))
                .map_err(|e| e.to_string())
        };
        let dumped = entered.and_then(|(socket, range)| {
            diag::dump_on(&socket, &[TcpState::TimeWait], inode)
                .map(|d| (d, range))
                .map_err(|e| e.to_string())
        });
        match dumped {
            Ok((sockets, range)) => census.namespaces.push(NsCensus {
                netns: inode,
                port_range: range.as_deref().and_then(parse_port_range),
                sockets: sockets
                    .into_iter()
                    // A timewait socket standing in for an orphaned FIN_WAIT2 answers as
                    // FIN_WAIT2 (`owners::diag`): only TIME_WAIT proper is counted.
                    .filter(|d| d.state == TcpState::TimeWait)
                    .map(|d| TwSocket {
                        netns: inode,
                        tuple: d.tuple,
                        expires_ns: taken_ns + u64::from(d.expires_ms) * 1_000_000,
                    })
                    .collect(),
            }),
            Err(_) => census.failed.push(inode),
        }
    }
    census.seconds = started.elapsed().as_secs_f64();
    census
}

/// `ip_local_port_range` as the file shows it: two numbers separated by whitespace.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_as_the_kernel_prints_them() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 1024"), Some((1024, 1024)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("a b"), None);
    }
}
