//! The agent's file-descriptor budget. What local users can open — metrics connections, API
//! clients — is capped so that a reserve always stays free for what the agent itself needs:
//! the inet_diag netlink socket, `/proc/<pid>/fd` directories, BPF objects, the alert and log
//! files. Measured before this existed (issue 13): with the soft limit at 1,024 and no cap,
//! 1,100 idle metrics connections made every owner lookup fail with "cannot open a
//! NETLINK_SOCK_DIAG socket".
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit (the systemd unit sets
//! `LimitNOFILE=65536`); the caps are then taken from what is left above the reserve.

/// Fds kept free for the agent's own work.
pub const RESERVE: u64 = 256;
/// Most metrics connections at once (a scraper needs one; a few curls).
pub const MAX_METRICS_CONNECTIONS: usize = 64;
/// Most API clients (`status`, `tail`) at once.
pub const MAX_API_CLIENTS: usize = 256;

/// How many connections of each kind the agent accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft fd limit in force.
    pub limit: u64,
    /// Metrics connections at once.
    pub metrics_connections: usize,
    /// API clients at once.
    pub api_clients: usize,
}

impl FdBudget {
    /// The caps for a soft fd limit: the maxima when they fit above the reserve, otherwise a
    /// quarter each of what is above it (at least 1: the endpoint keeps working, slowly).
    pub fn for_limit(limit: u64) -> Self {
        let spare = limit.saturating_sub(RESERVE) / 4;
        let cap = |max: usize| usize::try_from(spare).unwrap_or(usize::MAX).clamp(1, max);
        Self {
            limit,
            metrics_connections: cap(MAX_METRICS_CONNECTIONS),
            api_clients: cap(MAX_API_CLIENTS),
        }
    }

    /// Raises the soft fd limit to the hard one and sizes the caps for it.
    pub fn raise() -> Self {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    ..lim
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim = raised;
                }
            }
        }
        Self::for_limit(lim.rlim_cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_leave_the_reserve_free() {
        assert_eq!(
            FdBudget::for_limit(65536),
            FdBudget {
                limit: 65536,
                metrics_connections: 64,
                api_clients: 256
            }
        );
        // 1,024 (a default soft limit): 192 each at most, 64 metrics, 192 API.
        assert_eq!(
            FdBudget::for_limit(1024),
            FdBudget {
                limit: 1024,
                metrics_connections: 64,
                api_clients: 192
            }
        );
        assert_eq!(
            FdBudget::for_limit(300),
            FdBudget {
                limit: 300,
                metrics_connections: 11,
                api_clients: 11
            }
        );
        assert_eq!(FdBudget::for_limit(100).metrics_connections, 1);
    }
}
