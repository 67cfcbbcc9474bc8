//! The metrics endpoint's HTTP server: `GET /metrics` (and `/`), `/healthz` and `/readyz` for
//! a container orchestrator's probes (see [`Health`]), one request per connection,
//! within a budget a local user cannot exhaust. Measured before this existed (issue 13): 1,100
//! idle connections from `nobody` held 1,100 of the agent's 1,024 fds, so inet_diag and /proc
//! lookups failed and a 1 s alert fired 33.6 s late.
//!
//! - At most `max_connections` at once ([`super::budget`] sizes it from the fd limit); past it
//!   a new connection is closed at once and counted (`tcpwait_http_rejected_total{reason="limit"}`).
//! - The request head must arrive whole within [`HEAD_TIMEOUT`] of the accept (slowloris, idle
//!   connections: `reason="timeout"`) and fit in [`MAX_HEAD`] bytes (`reason="too_large"`).
//! - The answer must be taken within [`WRITE_TIMEOUT`]; then the connection is closed
//!   (`Connection: close`: no idle keep-alive connection holds an fd).
//!
//! Only what a scraper sends is understood: a request line and headers (Accept); no body.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use super::metrics::to_text_format;
use crate::api::Command;

/// Time from accept to the end of the request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to write the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;

/// Connections refused or closed early, by reason (for `/metrics`).
pub static REJECTED_LIMIT: AtomicU64 = AtomicU64::new(0);
/// Connections closed because the head did not arrive in time.
pub static REJECTED_TIMEOUT: AtomicU64 = AtomicU64::new(0);
/// Connections closed because the head was too large.
pub static REJECTED_TOO_LARGE: AtomicU64 = AtomicU64::new(0);

/// The agent's health as the probes see it: the state task reports, the server reads. The
/// listener is bound before the probe is attached, so a probe during start-up gets an answer
/// (503, not a refused connection) that says what the agent is waiting for.
/// - `/readyz`: 200 once the probe is attached and the bootstrap snapshot (the sockets that
///   predate the agent, with their holders) is applied; 503 before.
/// - `/healthz`: 200 while starting, and afterwards while the state task keeps turning (it
///   turns at least every drain tick, 50 ms); 503 when it has not turned for [`STALL`].
pub struct Health {
    phase: AtomicU8,
    /// CLOCK_MONOTONIC ms of the state task's last turn.
    last_turn_ms: AtomicU64,
}

/// How long the state task may go without a turn before `/healthz` says it is stalled. A
/// reconciliation of a million sockets takes seconds, not this.
pub const STALL: Duration = Duration::from_secs(30);

const STARTING: u8 = 0;
const ATTACHED: u8 = 1;
const READY: u8 = 2;

/// The process's health (one agent per process).
pub static HEALTH: Health = Health {
    phase: AtomicU8::new(STARTING),
    last_turn_ms: AtomicU64::new(0),
};

impl Health {
    /// The probe is attached: transitions are being tracked.
    pub fn attached(&self) {
        self.phase.fetch_max(ATTACHED, Ordering::Relaxed);
    }

    /// The state task turned at `now_ms`; `bootstrapped` once the first full snapshot is in.
    pub fn turned(&self, now_ms: u64, bootstrapped: bool) {
        self.last_turn_ms.store(now_ms, Ordering::Relaxed);
        if bootstrapped {
            // Only from ATTACHED: a snapshot without the probe is no readiness.
            let _ =
                self.phase
                    .compare_exchange(ATTACHED, READY, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn readiness(&self) -> (&'static str, String) {
        readiness(self.phase.load(Ordering::Relaxed))
    }

    fn liveness(&self, now_ms: u64) -> (&'static str, String) {
        liveness(
            self.phase.load(Ordering::Relaxed),
            self.last_turn_ms.load(Ordering::Relaxed),
            now_ms,
        )
    }
}

fn readiness(phase: u8) -> (&'static str, String) {
    match phase {
        READY => ("200 OK", "ready\n".into()),
        ATTACHED => (
            "503 Service Unavailable",
            "not ready: probe attached, bootstrap snapshot not applied yet\n".into(),
        ),
        _ => (
            "503 Service Unavailable",
            "not ready: probe not attached yet\n".into(),
        ),
    }
}

fn liveness(phase: u8, last_turn_ms: u64, now_ms: u64) -> (&'static str, String) {
    let stalled = now_ms.saturating_sub(last_turn_ms);
    if phase == READY && stalled > STALL.as_millis() as u64 {
        (
            "503 Service Unavailable",
            format!("stalled: the state task has not turned for {stalled} ms\n"),
        )
    } else {
        ("200 OK", "ok\n".into())
    }
}

/// CLOCK_MONOTONIC in ms, the clock of [`Health`].
pub fn monotonic_ms() -> u64 {
    crate::output::clock_ns(libc::CLOCK_MONOTONIC) / 1_000_000
}

/// Binds `listen`; returns the listener and the address it bound (the port, when `:0`).
pub async fn bind(listen: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Serves until the process ends.
pub fn spawn(listener: TcpListener, commands: mpsc::Sender<Command>, max_connections: usize) {
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: the fd reserve is for netlink and /proc, wait.
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                REJECTED_LIMIT.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            };
            let commands = commands.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, commands).await {
                    debug!(error = %e, "metrics connection ended");
                }
                drop(slot);
            });
        }
    });
}

/// A request, as far as this server cares.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    openmetrics: bool,
}

/// Where the head ends (after the blank line), if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a complete head; `None` when it is not HTTP.
fn parse(head: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.lines();
    let mut parts = lines.next()?.split_whitespace();
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    Some(Request {
        method: method.to_owned(),
        path: target.split('?').next().unwrap_or(target).to_owned(),
        openmetrics,
    })
}

/// Reads the head within the deadline; `Ok(None)` when the peer closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() >= MAX_HEAD {
            REJECTED_TOO_LARGE.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::other("request head too large"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connection(mut stream: TcpStream, commands: mpsc::Sender<Command>) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            let _ = write(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
            return Err(e);
        }
        Err(_) => {
            REJECTED_TIMEOUT.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request in time",
            ));
        }
    };
    let (status, content_type, body) = match parse(&head) {
        None => ("400 Bad Request", "text/plain", "bad request\n".to_owned()),
        Some(r) if r.method != "GET" => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
        Some(r) if r.path == "/" => (
            "200 OK",
            "text/plain",
            "tcpwait: metrics at /metrics, probes at /healthz and /readyz\n".to_owned(),
        ),
        Some(r) if r.path == "/readyz" => {
            let (status, body) = HEALTH.readiness();
            (status, "text/plain", body)
        }
        Some(r) if r.path == "/healthz" => {
            let (status, body) = HEALTH.liveness(monotonic_ms());
            (status, "text/plain", body)
        }
        Some(r) if r.path == "/metrics" => {
            let (tx, rx) = oneshot::channel();
            let body = match commands.send(Command::Metrics(tx)).await {
                Ok(()) => rx.await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            // OpenMetrics for scrapers that ask for it (Prometheus does), the classic text
            // format (0.0.4) otherwise (curl, `promtool check metrics`).
            if r.openmetrics {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                )
            } else {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    to_text_format(&body),
                )
            }
        }
        Some(_) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    write(&mut stream, status, content_type, &body).await
}

async fn write(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let all = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, all)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "answer not taken in time")
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_scrapers_send() {
        let head = b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n";
        assert_eq!(head_end(head), Some(head.len()));
        assert_eq!(
            parse(head),
            Some(Request {
                method: "GET".into(),
                path: "/metrics".into(),
                openmetrics: true
            })
        );
        let curl = b"GET / HTTP/1.0\n\n";
        assert_eq!(head_end(curl), Some(curl.len()));
        assert_eq!(
            parse(curl),
            Some(Request {
                method: "GET".into(),
                path: "/".into(),
                openmetrics: false
            })
        );
    }

    #[test]
    fn ready_only_once_attached_and_bootstrapped() {
        assert_eq!(readiness(STARTING).0, "503 Service Unavailable");
        assert_eq!(readiness(STARTING).1, "not ready: probe not attached yet\n");
        assert_eq!(readiness(ATTACHED).0, "503 Service Unavailable");
        assert_eq!(readiness(READY), ("200 OK", "ready\n".to_owned()));
        let h = Health {
            phase: AtomicU8::new(STARTING),
            last_turn_ms: AtomicU64::new(0),
        };
        h.turned(5, true);
        assert_eq!(h.readiness().0, "503 Service Unavailable", "not attached");
        h.attached();
        h.turned(10, false);
        assert_eq!(h.readiness().0, "503 Service Unavailable");
        h.turned(15, true);
        assert_eq!(h.readiness().0, "200 OK");
        h.attached();
        assert_eq!(h.readiness().0, "200 OK", "never goes back");
    }

    #[test]
    fn live_until_the_state_task_stalls() {
        let stall = STALL.as_millis() as u64;
        // Starting (attach, bootstrap) is never a stall.
        assert_eq!(liveness(STARTING, 0, 10 * stall).0, "200 OK");
        assert_eq!(liveness(READY, 1000, 1000 + stall).0, "200 OK");
        assert_eq!(
            liveness(READY, 1000, 1001 + stall),
            (
                "503 Service Unavailable",
                format!(
                    "stalled: the state task has not turned for {} ms\n",
                    stall + 1
                )
            )
        );
    }

    #[test]
    fn incomplete_or_foreign_heads() {
        assert_eq!(head_end(b"GET /metrics HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(parse(b"\x16\x03\x01 TLS hello\r\n\r\n"), None);
        assert_eq!(parse(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(parse(b"GET / HTTP/1.1 extra\r\n\r\n"), None);
    }
}
