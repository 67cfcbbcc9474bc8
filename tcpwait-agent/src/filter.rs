//! Which transitions a `trace` or `tail` user asked to see.
use crate::event::{TcpState, Transition};

/// A conjunction of optional criteria; an empty list means "any".
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Filter {
    /// On-CPU pid or owner pid.
    pub pids: Vec<u32>,
    /// On-CPU comm or owner comm, exact.
    pub comms: Vec<String>,
    /// Local or remote port.
    pub ports: Vec<u16>,
    /// Local port (`sport`).
    pub lports: Vec<u16>,
    /// Remote port (`dport`).
    pub rports: Vec<u16>,
    /// Old or new state.
    pub states: Vec<TcpState>,
    /// 4 or 6.
    pub family: Option<u8>,
    /// Network namespace inode numbers. A transition whose namespace is unknown (0) matches
    /// none of them.
    pub netns: Vec<u32>,
}

impl Filter {
    /// Whether `t` passes, given its owner's pid and comm when known.
    pub fn matches(&self, t: &Transition, owner: Option<(u32, &str)>) -> bool {
        (self.pids.is_empty()
            || self.pids.contains(&t.task.pid)
            || owner.is_some_and(|(pid, _)| self.pids.contains(&pid)))
            && (self.comms.is_empty()
                || self
                    .comms
                    .iter()
                    .any(|c| c.as_bytes() == t.task.comm.as_bytes())
                || owner.is_some_and(|(_, comm)| self.comms.iter().any(|c| c == comm)))
            && (self.ports.is_empty()
                || self.ports.contains(&t.sport)
                || self.ports.contains(&t.dport))
            && (self.lports.is_empty() || self.lports.contains(&t.sport))
            && (self.rports.is_empty() || self.rports.contains(&t.dport))
            && (self.states.is_empty()
                || self.states.contains(&t.old)
                || self.states.contains(&t.new))
            && self.family.is_none_or(|f| f == t.family())
            && (self.netns.is_empty() || (t.netns != 0 && self.netns.contains(&t.netns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Comm, SocketId, Task};

    fn t() -> Transition {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"java");
        Transition {
            ts_ns: 1,
            sock: SocketId(1),
            netns: 4_026_532_301,
            saddr: "127.0.0.1".parse().expect("literal"),
            sport: 8080,
            daddr: "127.0.0.1".parse().expect("literal"),
            dport: 5000,
            old: TcpState::Established,
            new: TcpState::CloseWait,
            task: Task {
                pid: 7,
                tid: 7,
                comm: Comm(comm),
            },
        }
    }

    #[test]
    fn each_criterion() {
        let t = t();
        assert!(Filter::default().matches(&t, None));
        let f = |f: Filter| f.matches(&t, None);
        assert!(f(Filter {
            pids: vec![7],
            ..Default::default()
        }));
        assert!(!f(Filter {
            pids: vec![8],
            ..Default::default()
        }));
        assert!(f(Filter {
            comms: vec!["java".into()],
            ..Default::default()
        }));
        assert!(!f(Filter {
            comms: vec!["jav".into()],
            ..Default::default()
        }));
        assert!(f(Filter {
            ports: vec![5000],
            ..Default::default()
        }));
        assert!(f(Filter {
            ports: vec![8080],
            ..Default::default()
        }));
        assert!(!f(Filter {
            ports: vec![80],
            ..Default::default()
        }));
        // By side: 8080 is local, 5000 remote.
        assert!(f(Filter {
            lports: vec![80, 8080],
            ..Default::default()
        }));
        assert!(!f(Filter {
            lports: vec![5000],
            ..Default::default()
        }));
        assert!(f(Filter {
            rports: vec![5000],
            ..Default::default()
        }));
        assert!(!f(Filter {
            rports: vec![8080],
            ..Default::default()
        }));
        assert!(f(Filter {
            states: vec![TcpState::CloseWait],
            ..Default::default()
        }));
        assert!(f(Filter {
            states: vec![TcpState::Established],
            ..Default::default()
        }));
        assert!(!f(Filter {
            states: vec![TcpState::Listen],
            ..Default::default()
        }));
        assert!(f(Filter {
            family: Some(4),
            ..Default::default()
        }));
        assert!(!f(Filter {
            family: Some(6),
            ..Default::default()
        }));
        assert!(!f(Filter {
            pids: vec![7],
            ports: vec![1],
            ..Default::default()
        }));
        assert!(f(Filter {
            netns: vec![1, 4_026_532_301],
            ..Default::default()
        }));
        assert!(!f(Filter {
            netns: vec![4_026_531_833],
            ..Default::default()
        }));
    }

    #[test]
    fn unknown_namespace_matches_no_namespace_filter() {
        let t = Transition { netns: 0, ..t() };
        assert!(Filter::default().matches(&t, None));
        let f = Filter {
            netns: vec![0],
            ..Default::default()
        };
        assert!(!f.matches(&t, None));
    }

    #[test]
    fn owner_matches_too() {
        let t = t();
        let f = Filter {
            pids: vec![99],
            comms: vec!["leaky".into()],
            ..Default::default()
        };
        assert!(!f.matches(&t, None));
        assert!(f.matches(&t, Some((99, "leaky"))));
    }
}
