//! Domain types shared by the tracker (pure), the owner resolver (procfs + inet_diag) and the
//! daemon: who holds a socket, and what inet_diag says about a socket.
use std::net::IpAddr;

use crate::event::TcpState;

/// A process, robust to pid reuse: the pid plus its start time (`/proc/<pid>/stat` field 22,
/// clock ticks since boot). Two processes with the same pid never share a start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    pub pid: u32,
    pub start_ticks: u64,
}

/// What is known of a process that holds a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub key: ProcessKey,
    /// `/proc/<pid>/comm`, raw (escape before printing).
    pub comm: String,
    /// `/proc/<pid>/cmdline`, arguments joined by spaces, raw (escape before printing).
    pub cmdline: String,
    /// The process's cgroup v2 path (`/proc/<pid>/cgroup`, the `0::` line), if any.
    pub cgroup: Option<String>,
    /// Container id derived from the cgroup path (64-hex docker/containerd/cri-o id), if any.
    pub container: Option<String>,
    /// Kubernetes pod UID derived from the cgroup path (kubelet's `pod<uid>` component), if any.
    pub pod_uid: Option<String>,
    /// The container runtime that named the cgroup (`docker`, `containerd`, `cri-o`,
    /// `podman`), when the path tells.
    pub runtime: Option<&'static str>,
    /// Inode of the process's network namespace (`/proc/<pid>/ns/net`), if readable.
    pub netns: Option<u32>,
}

/// A socket's 4-tuple. Unique among non-listening TCP sockets of one network namespace (not of
/// the host: every pod has its own 127.0.0.1), so (namespace inode, tuple) links an inet_diag
/// record (which has no kernel socket address) to the tracked socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

/// One socket as inet_diag (`NETLINK_SOCK_DIAG`) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Inode of the network namespace the dump ran in (0: unknown, when the kernel program
    /// cannot read socket namespaces and only the agent's own namespace is dumped).
    pub netns: u32,
    pub tuple: Tuple,
    pub state: TcpState,
    /// Socket inode (`socket:[N]` in `/proc/<pid>/fd`); 0 when no file refers to it any more
    /// (orphaned, e.g. FIN_WAIT2 after close, or TIME_WAIT).
    pub inode: u64,
    /// Owning uid.
    pub uid: u32,
    /// Bytes received and not read by the application (Recv-Q).
    pub recv_q: u32,
    /// Bytes not yet acknowledged by the peer (Send-Q).
    pub send_q: u32,
    /// The kernel's socket cookie (`ss -e` shows it as `sk:`).
    pub cookie: u64,
    /// `tcp_info.tcpi_last_ack_recv`: ms since the last ACK arrived. A socket in CLOSE_WAIT
    /// entered it when the peer's FIN (which carries an ACK) arrived, so its age in CLOSE_WAIT
    /// is at least this.
    pub last_ack_recv_ms: Option<u32>,
    /// `idiag_expires`: ms until the socket's pending timer fires; for a TIME_WAIT socket,
    /// until it expires (0 when no timer runs).
    pub expires_ms: u32,
}

/// A socket whose holders the owner resolver should find (see `Tracker::owner_query`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerQuery {
    /// Network namespace inode (0: unknown).
    pub netns: u32,
    pub tuple: Tuple,
    /// Pids to check first (their fd tables only), most likely first; none confirmed.
    pub candidates: Vec<u32>,
}
