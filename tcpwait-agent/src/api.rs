//! The daemon's local API: a Unix socket (mode 0600) that `tcpwait status` and `tcpwait tail`
//! talk to. Protocol: the client sends one JSON request line; the daemon answers with one JSON
//! line (`status`) or a stream of JSON lines (`tail`).
//!
//! `tail` fans out through a bounded broadcast channel: a slow client never slows the daemon.
//! When a client falls behind by more than the backlog, it skips ahead; the daemon counts what
//! it missed and tells it with a `{"missed": N}` line.
use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::{
    event::Transition,
    filter::Filter,
    output::{OwnerView, TransitionRecord},
};

/// Default path of the API socket.
pub const DEFAULT_SOCKET: &str = "/run/tcpwait/tcpwait.sock";

/// Transitions a `tail` client may lag behind before it skips ahead (and is told so).
pub const TAIL_BACKLOG: usize = 16 * 1024;

/// A request line from a client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Who holds CLOSE_WAIT sockets now.
    Status,
    /// Stream transitions that pass the filter.
    Tail { filter: Filter },
}

/// One line of a `tail` stream: a transition, or how many the client missed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived line at a time, never stored in bulk"
)]
pub enum TailLine<'a> {
    /// First line of a stream: the client is subscribed, nothing after this is missed
    /// silently.
    Subscribed {
        subscribed: bool,
    },
    Missed {
        missed: u64,
    },
    Record(TransitionRecord<'a>),
}

/// What the daemon broadcasts to `tail` clients for each transition.
#[derive(Clone, Debug)]
pub struct TailItem {
    pub transition: Transition,
    pub ns_in_old: Option<u64>,
    pub owner: Option<OwnerView>,
}

/// The `status` answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Sockets in the daemon's table.
    pub tracked_sockets: u64,
    /// Processes holding CLOSE_WAIT sockets, most first.
    pub processes: Vec<ProcessReport>,
    /// CLOSE_WAIT sockets whose holder is not (yet) known.
    pub unowned: Vec<SocketReport>,
    /// Alerts firing now.
    pub alerts: Vec<AlertReport>,
    /// Counters since start.
    pub counters: Counters,
}

/// One process holding CLOSE_WAIT sockets.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub cgroup: Option<String>,
    pub container: Option<String>,
    /// CLOSE_WAIT sockets it holds.
    pub count: u64,
    /// Age of its oldest CLOSE_WAIT socket, s.
    pub oldest_age_s: f64,
    /// When true, `oldest_age_s` is a lower bound (the socket predates the daemon).
    pub oldest_age_is_lower_bound: bool,
    /// Remote endpoints, most sockets first.
    pub peers: Vec<PeerReport>,
    pub sockets: Vec<SocketReport>,
}

/// Sockets towards one remote address.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PeerReport {
    pub addr: String,
    pub count: u64,
}

/// One socket.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SocketReport {
    pub local: String,
    pub remote: String,
    /// Time in its state, s.
    pub age_s: f64,
    /// When true, `age_s` is a lower bound ("≥").
    pub age_is_lower_bound: bool,
    /// Bytes received and never read (Recv-Q), when known.
    pub recv_q: Option<u32>,
}

/// A firing alert.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AlertReport {
    pub rule: String,
    pub state: String,
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub cgroup: Option<String>,
    pub count: u64,
    pub oldest_age_s: f64,
    /// Seconds since it fired.
    pub firing_for_s: f64,
    pub peers: Vec<PeerReport>,
}

/// Counters since the daemon started.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub transitions: u64,
    pub lost_ring_full: u64,
    /// `null` where the kernel keeps no recursion-miss count (before 5.12).
    pub lost_recursion_misses: Option<u64>,
    pub malformed: u64,
    pub tail_missed: u64,
    pub table_overflow: u64,
    pub reconcile_added: u64,
    pub reconcile_removed: u64,
    pub reconcile_corrected: u64,
    /// Transitions the kernel side delivered twice (ignored by the table).
    #[serde(default)]
    pub duplicates: u64,
    /// Transitions that reached the agent after a later one (applied out of time order).
    #[serde(default)]
    pub late: u64,
}

/// Requests the API forwards to the daemon's state-owning task.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<StatusReport>),
    /// The Prometheus rendering of every metric.
    Metrics(oneshot::Sender<String>),
}

/// Failures to set up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "another tcpwait daemon is already listening on {0}: stop it, or choose another --socket"
    )]
    InUse(PathBuf),
    #[error(
        "cannot create the API socket {0}: check the directory exists and is writable, or choose another --socket"
    )]
    Bind(PathBuf, #[source] io::Error),
}

/// Binds the API socket: removes a stale socket file, refuses if a daemon answers on it,
/// creates the parent directory (0755), and makes the socket 0600 (root only).
pub async fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse(path.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| ApiError::Bind(path.into(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind(path.into(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ApiError::Bind(path.into(), e))?;
    Ok(listener)
}

/// Accepts clients until the listener fails; each client gets its own task.
pub async fn serve(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    tail: broadcast::Sender<Arc<TailItem>>,
    tail_missed: Arc<AtomicU64>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (commands, rx, missed) = (commands.clone(), tail.subscribe(), tail_missed.clone());
        tokio::spawn(async move {
            if let Err(e) = client(stream, commands, rx, missed).await {
                debug!(error = %e, "API client ended");
            }
        });
    }
}

async fn client(
    stream: UnixStream,
    commands: mpsc::Sender<Command>,
    mut tail: broadcast::Receiver<Arc<TailItem>>,
    tail_missed: Arc<AtomicU64>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let msg = serde_json::json!({ "error": format!("bad request: {e}") });
            write.write_all(format!("{msg}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    match request {
        Request::Status => {
            drop(tail);
            let (tx, rx) = oneshot::channel();
            commands
                .send(Command::Status(tx))
                .await
                .map_err(|_| io::Error::other("daemon stopping"))?;
            let report = rx.await.map_err(|_| io::Error::other("daemon stopping"))?;
            let mut out = serde_json::to_vec(&report).map_err(io::Error::other)?;
            out.push(b'\n');
            write.write_all(&out).await
        }
        Request::Tail { filter } => {
            let mut buf = Vec::with_capacity(64 * 1024);
            serde_json::to_writer(&mut buf, &TailLine::Subscribed { subscribed: true })
                .map_err(io::Error::other)?;
            buf.push(b'\n');
            write.write_all(&buf).await?;
            buf.clear();
            loop {
                let item = match tail.recv().await {
                    Ok(item) => item,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tail_missed.fetch_add(n, Ordering::Relaxed);
                        serde_json::to_writer(&mut buf, &TailLine::Missed { missed: n })
                            .map_err(io::Error::other)?;
                        buf.push(b'\n');
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                };
                push_item(&mut buf, &filter, &item)?;
                // Batch what is already queued into one write.
                while buf.len() < 60 * 1024 {
                    match tail.try_recv() {
                        Ok(item) => push_item(&mut buf, &filter, &item)?,
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            tail_missed.fetch_add(n, Ordering::Relaxed);
                            serde_json::to_writer(&mut buf, &TailLine::Missed { missed: n })
                                .map_err(io::Error::other)?;
                            buf.push(b'\n');
                        }
                        Err(_) => break,
                    }
                }
                if !buf.is_empty() {
                    write.write_all(&buf).await?;
                    buf.clear();
                }
            }
        }
    }
}

fn push_item(buf: &mut Vec<u8>, filter: &Filter, item: &TailItem) -> io::Result<()> {
    let owner = item.owner.as_ref().map(|o| (o.pid, o.comm.as_str()));
    if !filter.matches(&item.transition, owner) {
        return Ok(());
    }
    let record = TransitionRecord::new(&item.transition, item.ns_in_old, item.owner.as_ref());
    serde_json::to_writer(&mut *buf, &record).map_err(io::Error::other)?;
    buf.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("ser"),
            r#""status""#
        );
        let r: Request = serde_json::from_str(
            r#"{"tail":{"filter":{"ports":[80],"states":["CLOSE_WAIT"],"family":4}}}"#,
        )
        .expect("valid request");
        let Request::Tail { filter } = r else {
            panic!("tail expected")
        };
        assert_eq!(filter.ports, vec![80]);
        assert_eq!(filter.states, vec![crate::event::TcpState::CloseWait]);
        assert!(
            serde_json::from_str::<Request>(r#"{"tail":{"filter":{"states":["NOPE"]}}}"#).is_err()
        );
    }

    #[test]
    fn tail_lines_parse_both_kinds() {
        let m: TailLine<'_> = serde_json::from_str(r#"{"missed":12}"#).expect("missed line");
        assert!(matches!(m, TailLine::Missed { missed: 12 }));
        let r: TailLine<'_> = serde_json::from_str(
            r#"{"ts_ns":1,"skaddr":"0x1","pid":2,"tid":2,"comm":"a","family":4,"saddr":"127.0.0.1","sport":1,"daddr":"127.0.0.1","dport":2,"old":"ESTABLISHED","new":"CLOSE_WAIT","ms_in_old":null,"owner_pid":9,"owner_comm":"leaky"}"#,
        )
        .expect("record line");
        let TailLine::Record(r) = r else {
            panic!("record expected")
        };
        assert_eq!((r.owner_pid, r.new.as_ref()), (Some(9), "CLOSE_WAIT"));
    }
}
