//! Command-line arguments as parsed. Each command resolves them into its own settings.
use clap::{Args, Parser, Subcommand};

use crate::{event::TcpState, filter::Filter};

/// tcpwait: which process holds which CLOSE_WAIT sockets, and for how long.
///
/// tcpwait follows every TCP state transition on this host through an eBPF program on the
/// `sock:inet_sock_set_state` tracepoint. A socket stuck in CLOSE_WAIT means its peer closed
/// and the process holding it never called close(): a file-descriptor and port leak.
/// Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) and Linux 5.8 or newer.
#[derive(Debug, Parser)]
#[command(name = "tcpwait", version, propagate_version = true)]
pub struct Cli {
    /// More log detail on stderr (-v debug, -vv trace); `TCPWAIT_LOG` takes an env-filter too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every TCP state transition as it happens (standalone: loads the probe itself).
    ///
    /// One line per transition: time (UTC), on-CPU pid and comm, local -> remote endpoint,
    /// OLD -> NEW state, and the milliseconds spent in OLD when tcpwait saw the socket enter it
    /// ("-" otherwise). The on-CPU task is whoever ran the transition: for ESTABLISHED ->
    /// CLOSE_WAIT that is the peer or an idle task, not the socket's owner. Ctrl-C or SIGTERM
    /// stops and prints a summary of transitions seen and lost.
    Trace(TraceArgs),
}

/// Arguments of `tcpwait trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// One JSON object per line (keys: ts_ns, skaddr, pid, tid, comm, family, saddr, sport,
    /// daddr, dport, old, new, ms_in_old).
    #[arg(long)]
    pub json: bool,
    /// Attach to another tracepoint (CATEGORY:NAME). For tests of the error path only.
    #[arg(long, hide = true, default_value = "sock:inet_sock_set_state", value_parser = parse_tracepoint)]
    pub tracepoint: (String, String),
}

/// Filters shared by `trace` and `tail`. Criteria combine with AND; repeated flags with OR.
#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Only transitions of this process id (on-CPU or owner). Repeatable.
    #[arg(long, value_name = "PID")]
    pub pid: Vec<u32>,
    /// Only transitions of this task name (exact; on-CPU or owner). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,
    /// Only sockets with this local or remote port. Repeatable.
    #[arg(long, value_name = "PORT")]
    pub port: Vec<u16>,
    /// Only transitions from or to this state (e.g. CLOSE_WAIT, case-insensitive). Repeatable.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Vec<TcpState>,
    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
}

impl FilterArgs {
    /// The resolved filter.
    pub fn to_filter(&self) -> Filter {
        Filter {
            pids: self.pid.clone(),
            comms: self.comm.clone(),
            ports: self.port.clone(),
            states: self.state.clone(),
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(4),
                (_, true) => Some(6),
                _ => None,
            },
        }
    }
}

fn parse_state(s: &str) -> Result<TcpState, String> {
    TcpState::from_name(s).ok_or_else(|| {
        let names: Vec<_> = TcpState::ALL.iter().map(|s| s.name()).collect();
        format!("unknown TCP state; expected one of {}", names.join(", "))
    })
}

fn parse_tracepoint(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(c, n)| (c.to_owned(), n.to_owned()))
        .ok_or_else(|| "expected CATEGORY:NAME".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_filters() {
        let cli = Cli::try_parse_from([
            "tcpwait",
            "trace",
            "--json",
            "--pid",
            "5",
            "--port",
            "80",
            "--port",
            "443",
            "--state",
            "close-wait",
            "-6",
        ])
        .expect("valid flags");
        let Command::Trace(args) = cli.command;
        let f = args.filter.to_filter();
        assert_eq!(f.pids, vec![5]);
        assert_eq!(f.ports, vec![80, 443]);
        assert_eq!(f.states, vec![TcpState::CloseWait]);
        assert_eq!(f.family, Some(6));
        assert!(args.json);
    }

    #[test]
    fn rejects_bad_flags() {
        for bad in [
            vec!["tcpwait", "trace", "--state", "nope"],
            vec!["tcpwait", "trace", "--port", "70000"],
            vec!["tcpwait", "trace", "-4", "-6"],
            vec!["tcpwait", "trace", "--bogus"],
        ] {
            let err = Cli::try_parse_from(&bad).expect_err("invalid flags");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
