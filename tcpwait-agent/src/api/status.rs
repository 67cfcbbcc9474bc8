//! The `status` answer, as `tcpwait status --json` prints it (the README documents every key).
use serde::{Deserialize, Serialize};

use super::{TailClientReport, host, timewait};
use crate::output::WallTime;

/// The version of the `status --json` schema.
pub const STATUS_SCHEMA_VERSION: u32 = 1;

/// The `status` answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// The version of this schema ([`STATUS_SCHEMA_VERSION`]); 0 from an agent that
    /// predates it. Raised when a key changes meaning or goes; new keys keep it.
    #[serde(default)]
    pub schema_version: u32,
    /// When the report was taken: CLOCK_MONOTONIC ns.
    #[serde(default)]
    pub now_ns: u64,
    /// `now_ns` as wall-clock time.
    #[serde(default)]
    pub time: Option<WallTime>,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Sockets in the daemon's table.
    pub tracked_sockets: u64,
    /// The states the rules watch (kernel order): those `processes` and `unowned` cover.
    #[serde(default)]
    pub watched_states: Vec<String>,
    /// Processes holding sockets in a watched state: by state (kernel order), then most
    /// sockets first. A process holding sockets in two watched states appears once per state.
    pub processes: Vec<ProcessReport>,
    /// Sockets in a watched state whose holder is not (yet) known, by state, oldest first.
    pub unowned: Vec<SocketReport>,
    /// Alerts firing now.
    pub alerts: Vec<AlertReport>,
    /// Counters since start.
    pub counters: Counters,
    /// Connections aborted on close and resets received (absent from an older agent).
    #[serde(default)]
    pub aborts: Option<crate::resets::report::AbortsReport>,
    /// TIME_WAIT sockets per peer (absent from an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timewait: Option<timewait::TimeWaitReport>,
    /// `status --port P`: what holds port P.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<timewait::PortReport>,
    /// Host-scope rules with the host's figures (empty: none configured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_rules: Vec<host::HostRuleReport>,
}

/// One process's sockets in one watched state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ProcessReport {
    /// The state, as the kernel spells it (`CLOSE_WAIT`).
    #[serde(default)]
    pub state: String,
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub cgroup: Option<String>,
    pub container: Option<String>,
    /// Kubernetes pod UID, from the cgroup path.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// Container runtime, from the cgroup path.
    #[serde(default)]
    pub runtime: Option<String>,
    /// Inode of the process's network namespace (`/proc/<pid>/ns/net`).
    #[serde(default)]
    pub netns: Option<u32>,
    /// Sockets it holds in `state`.
    pub count: u64,
    /// Age of its oldest socket in `state`, s.
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
    /// Its state, as the kernel spells it.
    #[serde(default)]
    pub state: String,
    /// Inode of the socket's network namespace, when the kernel program reads it.
    #[serde(default)]
    pub netns: Option<u32>,
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
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub pod_uid: Option<String>,
    #[serde(default)]
    pub netns: Option<u32>,
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
    /// Full reconciliations with the kernel's socket lists (every namespace, every holder)
    /// applied since start, bootstrap included.
    #[serde(default)]
    pub reconciliations: u64,
    /// Network namespaces the last owner snapshot dumped.
    #[serde(default)]
    pub namespaces_dumped: u64,
    /// Namespace dumps that failed (could not enter, or gone), summed.
    #[serde(default)]
    pub namespace_failures: u64,
    /// Output lines dropped because a sink's queue was full, by sink (`stdout`,
    /// `transition_log`): the agent never waits for its output.
    #[serde(default)]
    pub sink_dropped: std::collections::BTreeMap<String, u64>,
    /// Output lines a sink failed to write (I/O error), by sink.
    #[serde(default)]
    pub sink_failed: std::collections::BTreeMap<String, u64>,
    /// Each connected `tail` client's counts of what was broadcast while it has been
    /// connected: written to it, passed over by its filter, missed.
    #[serde(default)]
    pub tail_clients: Vec<TailClientReport>,
}
