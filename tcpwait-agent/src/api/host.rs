//! The `status` section of host-scope rules (`scope = "host"`), as the API carries it (JSON).
//! Built by `daemon::host`, printed by `client`.
use serde::{Deserialize, Serialize};

/// One host rule and the host's figures for its state now.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HostRuleReport {
    /// The rule's name.
    pub rule: String,
    /// The state it counts, as the kernel spells it.
    pub state: String,
    /// Sockets in `state` host-wide (every network namespace).
    pub count: u64,
    /// The rule fires when `count` is more than this (`null`: no count threshold).
    pub max_count: Option<u32>,
    /// Age of the oldest of them, s (`null`: the rule has no age threshold, or none is left).
    pub oldest_age_s: Option<f64>,
    /// When true, `oldest_age_s` is a lower bound (the socket predates the agent).
    pub oldest_age_is_lower_bound: bool,
    /// The rule fires when the oldest is at least this old, s (`null`: no age threshold).
    pub max_age_s: Option<f64>,
    /// Whether its alert fires.
    pub firing: bool,
}
