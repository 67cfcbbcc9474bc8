//! The daemon's local API: a Unix socket (mode 0600) that `tcpwait status` and `tcpwait tail`
//! talk to. Protocol: the client sends one JSON request line; the daemon answers with one JSON
//! line (`status`) or a stream of JSON lines (`tail`).
//!
//! `tail` fans out through a bounded broadcast channel: a slow client never slows the daemon.
//! When a client falls behind by more than the backlog, it skips ahead; the daemon counts what
//! it missed and tells it with a `{"missed": N}` line (see `api::tail`).
use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub mod host;
pub mod timewait;

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

pub use tail::{Subscriber, TailClientReport, TailHub};

use crate::{
    event::Transition,
    filter::Filter,
    output::{OwnerView, TransitionRecord, WallTime},
};

mod status;
mod tail;

pub use status::{
    AlertReport, Counters, PeerReport, ProcessReport, STATUS_SCHEMA_VERSION, SocketReport,
    StatusReport,
};

/// Default path of the API socket.
pub const DEFAULT_SOCKET: &str = "/run/tcpwait/tcpwait.sock";

/// Transitions a `tail` client may lag behind before it skips ahead (and is told so).
pub const TAIL_BACKLOG: usize = 16 * 1024;

/// Longest request line; a longer one is refused without being read further (a tail filter
/// with every port listed is under 1 KiB).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take a `status` answer; then it is dropped with its buffer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// `status` answers being written at once: each holds the whole serialized report, so this
/// bounds the memory that clients that do not read can pin. Others wait for a turn at most
/// [`STATUS_TURN_WAIT`], then are told the agent is busy.
pub const STATUS_IN_FLIGHT: usize = 32;
/// How long a `status` request waits for a turn.
pub const STATUS_TURN_WAIT: Duration = Duration::from_secs(2);

/// A request line from a client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Who holds sockets in the watched states (CLOSE_WAIT by default) now.
    Status,
    /// [`Request::Status`], with what holds local port `port` (`status --port`).
    PortStatus { port: u16 },
    /// Stream transitions that pass the filter.
    Tail { filter: Filter },
    /// Every socket the table tracks in one network namespace (inode), whatever its state:
    /// what the agent believes, to compare with `ss` there (diagnostics, tests).
    Table { netns: u32 },
}

/// Why a request line was refused; the client is told the message.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request line over {MAX_REQUEST} bytes")]
    TooLong,
    #[error("bad request: {0}")]
    Bad(#[source] serde_json::Error),
}

/// Parses a request line as read (at most [`MAX_REQUEST`] + 1 bytes, its newline included).
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    serde_json::from_str(line).map_err(RequestError::Bad)
}

/// The answer to a refused request: `{"error": "<message>"}` and a newline. The message can
/// quote the request (serde_json names an unknown key), so it is JSON-escaped and then rid of
/// the raw controls, bidi and line-separator characters JSON would keep (`escape_json`): one
/// line whatever the request held (found by the `api_request` fuzz target).
pub fn refusal_line(message: &str) -> String {
    let json = serde_json::json!({ "error": message }).to_string();
    format!("{}\n", crate::output::escape_json(&json))
}

/// One line of a `tail` stream: a transition, or how many the client missed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
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
    /// An abort or a reset received (its `kind` says which).
    Reset(crate::resets::ResetRecord<'a>),
}

/// What the daemon broadcasts to `tail` clients for each transition.
#[derive(Clone, Debug)]
pub enum TailItem {
    /// A transition, with its wall-clock time (by the daemon's clock), the time its socket
    /// spent in the old state and its holder.
    Transition {
        transition: Transition,
        time: WallTime,
        ns_in_old: Option<u64>,
        owner: Option<OwnerView>,
    },
    /// A reset (an abort, or one received), with its record as printed.
    Reset {
        reset: crate::event::reset::Reset,
        record: Box<crate::resets::ResetRecord<'static>>,
    },
}

/// Requests the API forwards to the daemon's state-owning task.
#[derive(Debug)]
pub enum Command {
    /// The `status` answer; with a port, its [`StatusReport::port`] section too.
    Status(Option<u16>, oneshot::Sender<StatusReport>),
    /// [`Request::Table`]: the sockets of one namespace.
    Table(u32, oneshot::Sender<Vec<SocketReport>>),
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
        "{0} exists and is not a socket ({1}): tcpwait replaces only a stale socket of its own; move the file away or choose another --socket"
    )]
    NotASocket(PathBuf, &'static str),
    #[error(
        "{0} is a socket owned by uid {1}, not by this user: tcpwait replaces only a stale socket of its own; remove it or choose another --socket"
    )]
    NotOurs(PathBuf, u32),
    #[error(
        "cannot create the API socket {0}: check the directory exists and is writable, or choose another --socket"
    )]
    Bind(PathBuf, #[source] io::Error),
}

/// The bound socket file; removed when dropped (the daemon's exit, or a failed start), unless
/// another file has taken its path since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "a regular file"
    }
}

/// Binds the API socket. An existing path is replaced only when it is a stale socket (nobody
/// answers) owned by this user; anything else is refused, untouched. Missing directories are
/// created 0700 and the socket is bound under umask 0177, so it is 0600 from its first
/// instant whatever the caller's umask (no window in which another user could connect to or
/// replace it).
pub async fn bind(path: &Path) -> Result<(UnixListener, SocketFile), ApiError> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ApiError::InUse(path.into()));
            }
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me {
                return Err(ApiError::NotOurs(path.into(), meta.uid()));
            }
            std::fs::remove_file(path).map_err(|e| ApiError::Bind(path.into(), e))?;
        }
        Ok(meta) => {
            return Err(ApiError::NotASocket(
                path.into(),
                file_kind(meta.file_type()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ApiError::Bind(path.into(), e)),
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        // Every missing ancestor is created 0700 (mkdir's mode is masked by the umask, which
        // can only narrow it; the chmod then makes it exactly 0700).
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ApiError::Bind(path.into(), e))?;
        for d in missing {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| ApiError::Bind(path.into(), e))?;
        }
    }
    // The umask is process-wide: this runs at start, before the threads that create files
    // (delivery, sinks, resolver) exist, and a stricter umask could only narrow their modes.
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| ApiError::Bind(path.into(), e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| ApiError::Bind(path.into(), e))?;
    let file = SocketFile {
        path: path.into(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ApiError::Bind(path.into(), e))?;
    Ok((listener, file))
}

/// Accepts clients until the listener fails; each client gets its own task. At most
/// `max_clients` at once: past it a new client is told so and closed (its fd is needed back).
pub async fn serve(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    tail: Subscriber,
    max_clients: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_clients));
    let status_turns = Arc::new(tokio::sync::Semaphore::new(STATUS_IN_FLIGHT));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Never waits for the client: a full socket buffer just loses the message.
            let msg = format!("{{\"error\":\"too many clients ({max_clients}); try again\"}}\n");
            let _ = stream.try_write(msg.as_bytes());
            continue;
        };
        let (commands, tail) = (commands.clone(), tail.clone());
        let turns = status_turns.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, commands, &tail, turns).await {
                debug!(error = %e, "API client ended");
            }
            drop(slot);
        });
    }
}

async fn client(
    stream: UnixStream,
    commands: mpsc::Sender<Command>,
    tail: &Subscriber,
    status_turns: Arc<tokio::sync::Semaphore>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let request = match parse_request(&line) {
        Ok(r) => r,
        Err(e) => {
            let msg = refusal_line(&e.to_string());
            let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(msg.as_bytes())).await;
            return match e {
                RequestError::TooLong => Err(io::Error::other("request line too long")),
                RequestError::Bad(_) => Ok(()),
            };
        }
    };
    match request {
        Request::Status | Request::PortStatus { .. } => {
            let port = match request {
                Request::PortStatus { port } => Some(port),
                _ => None,
            };
            let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "status answer not taken");
            let Ok(turn) = tokio::time::timeout(STATUS_TURN_WAIT, status_turns.acquire()).await
            else {
                let msg = format!(
                    "{{\"error\":\"busy: {STATUS_IN_FLIGHT} status answers are waiting for their clients to read them; try again\"}}\n"
                );
                let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(msg.as_bytes())).await;
                return Ok(());
            };
            let _turn = turn.map_err(io::Error::other)?;
            let (tx, rx) = oneshot::channel();
            commands
                .send(Command::Status(port, tx))
                .await
                .map_err(|_| io::Error::other("daemon stopping"))?;
            let report = rx.await.map_err(|_| io::Error::other("daemon stopping"))?;
            let mut out = serde_json::to_vec(&report).map_err(io::Error::other)?;
            drop(report);
            out.push(b'\n');
            tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out))
                .await
                .map_err(|_| timed_out())?
        }
        Request::Tail { filter } => tail::stream(tail, &mut write, &filter).await,
        Request::Table { netns } => {
            let (tx, rx) = oneshot::channel();
            commands
                .send(Command::Table(netns, tx))
                .await
                .map_err(|_| io::Error::other("daemon stopping"))?;
            let sockets = rx.await.map_err(|_| io::Error::other("daemon stopping"))?;
            let mut out = serde_json::to_vec(&serde_json::json!({ "sockets": sockets }))
                .map_err(io::Error::other)?;
            out.push(b'\n');
            tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "table answer not taken"))?
        }
    }
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

    /// A request quoting a newline and a bidi override is refused in one line that holds
    /// neither raw, and decodes to the parser's message.
    #[test]
    fn a_refusal_is_one_line_whatever_the_request_held() {
        let err = parse_request("{\"ta\\n\u{202e}il\":{}}").expect_err("an unknown variant");
        let message = err.to_string();
        assert!(message.contains("ta\n\u{202e}il"), "{message}");
        let line = refusal_line(&message);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n') && !line.contains('\u{202e}'), "{line}");
        let back: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(back["error"], message.as_str());
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
        assert_eq!((r.owner.owner_pid, r.new.as_ref()), (Some(9), "CLOSE_WAIT"));
    }
}
