//! The `status` sections of TIME_WAIT pile-ups per peer and of `status --port P`, as the API
//! carries them (JSON). Built by `daemon::timewait`, printed by `client::timewait`.
use serde::{Deserialize, Serialize};

/// TIME_WAIT sockets per peer, as of the last census.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TimeWaitReport {
    /// Seconds since the last census started (`null`: none yet).
    pub census_age_s: Option<f64>,
    /// How long the last census took, s.
    pub census_seconds: f64,
    /// Namespaces the last census could not dump.
    pub census_failed_namespaces: u64,
    /// TIME_WAIT sockets in every namespace.
    pub sockets: u64,
    /// Peers with TIME_WAIT sockets.
    pub peers_total: u64,
    /// The peers with the most, most first (at most `TOP_PEERS_SHOWN`).
    pub peers: Vec<TimeWaitPeer>,
    /// Active closes whose closer was not remembered (too many peers at once).
    pub closes_unrecorded: u64,
}

/// One peer's TIME_WAIT sockets.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TimeWaitPeer {
    /// Network namespace inode (`null`: unknown).
    pub netns: Option<u32>,
    /// Local address.
    pub local: String,
    /// Remote address.
    pub remote: String,
    /// Remote port.
    pub port: u16,
    /// TIME_WAIT sockets from `local` toward `remote`:`port`.
    pub count: u64,
    /// The namespace's `ip_local_port_range`, inclusive.
    pub port_range: [u16; 2],
    /// `count` / ports in the range.
    pub share: f64,
    /// Active closes toward the peer per second over the last census interval.
    pub rate_per_s: Option<f64>,
    /// Processes that closed them (ESTABLISHED → FIN_WAIT1 runs in the closer's context),
    /// most closes first.
    pub closers: Vec<CloserReport>,
    /// Seconds until the first of them expires.
    pub first_expiry_s: f64,
    /// Peer rules firing for it.
    pub alerts: Vec<String>,
}

/// A process that closed connections toward a peer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CloserReport {
    pub pid: u32,
    pub comm: String,
    /// Active closes seen from it toward the peer.
    pub closes: u64,
}

/// `status --port P`: every socket whose local port is P, and P's listeners.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PortReport {
    pub port: u16,
    /// Sockets in any state, by namespace: tracked ones, then TIME_WAIT (census).
    pub sockets: Vec<PortSocket>,
    /// Listeners of P, open and recently closed (newest first).
    pub listeners: Vec<ListenerReport>,
    /// Seconds until the last TIME_WAIT socket on P expires, in any namespace (`null`: none);
    /// each namespace's own time is in `explanation`.
    pub time_wait_free_in_s: Option<f64>,
    /// What holds the port and whether a new listener can bind it, one sentence each, per
    /// network namespace (a port number is per namespace: what holds it in one does not stop
    /// a bind in another); each sentence begins "in network namespace N: " when several
    /// namespaces use P.
    pub explanation: Vec<String>,
}

/// One socket on the port.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PortSocket {
    pub netns: Option<u32>,
    pub state: String,
    pub local: String,
    pub remote: String,
    /// Time in its state, s (`null` for TIME_WAIT: the census does not date them).
    pub age_s: Option<f64>,
    #[serde(default)]
    pub age_is_lower_bound: bool,
    /// TIME_WAIT: seconds before the kernel frees it.
    pub seconds_left: Option<f64>,
    /// Processes known to hold it.
    pub holders: Vec<CloserReport>,
}

/// A listener of the port.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ListenerReport {
    pub netns: Option<u32>,
    /// The process that called `listen()`.
    pub pid: u32,
    pub comm: String,
    /// Whether it is still listening.
    pub open: bool,
    /// Seconds it listened (until now, or until it closed).
    pub listened_s: f64,
    /// Seconds since it closed (`null`: open).
    pub closed_ago_s: Option<f64>,
}
