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
#[command(
    name = "tcpwait",
    version,
    propagate_version = true,
    after_help = crate::docs::examples_help()
)]
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
    /// Run the agent in the foreground: track every socket, attribute CLOSE_WAIT sockets to the
    /// processes holding them, and raise alerts.
    ///
    /// Alerts come from rules, data in the configuration file (`[[rules]]`: a state, an age
    /// and/or count threshold, labels, a remedy; `tcpwait config --print-default` documents
    /// them). The default rule, close_wait_leak, fires when a process holds a CLOSE_WAIT socket
    /// older than --close-wait-age or more than --close-wait-count CLOSE_WAIT sockets; an alert
    /// resolves when the process closes them or exits. Alerts are printed on stdout as they fire and resolve. `tcpwait status`
    /// and `tcpwait tail` talk to the running agent through --socket. SIGINT or SIGTERM stops.
    Run(RunArgs),
    /// Ask the running agent which processes hold CLOSE_WAIT sockets, with ages and peers.
    Status(StatusArgs),
    /// Configuration helpers: `tcpwait config --print-default > /etc/tcpwait/tcpwait.toml`.
    Config(ConfigArgs),
    /// Stream the running agent's live transition log, with owners (same format and filters as
    /// `trace`, plus owner_pid / owner_comm).
    Tail(TailArgs),
    /// Print a shell completion script, e.g. `tcpwait completions bash >
    /// /etc/bash_completion.d/tcpwait` (zsh: a `_tcpwait` file in `$fpath`; fish:
    /// `~/.config/fish/completions/tcpwait.fish`).
    Completions(CompletionsArgs),
    /// Print the manual page (roff: `tcpwait man | man -l -`), or write one page per command
    /// into a directory with --dir.
    Man(ManArgs),
}

/// Arguments of `tcpwait completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Arguments of `tcpwait man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write tcpwait.1 and tcpwait-COMMAND.1 into this directory instead of printing
    /// tcpwait.1 (e.g. /usr/local/share/man/man1).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

/// Arguments of `tcpwait run`. Unset flags fall back to the configuration file, then to the
/// embedded defaults (`tcpwait config --print-default` shows them, documented).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML). Default: /etc/tcpwait/tcpwait.toml if it exists, else the
    /// embedded defaults.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Path of the API socket (mode 0600) for `status` and `tail` [default: /run/tcpwait/tcpwait.sock].
    #[arg(long, env = "TCPWAIT_SOCKET")]
    pub socket: Option<std::path::PathBuf>,
    /// Alert when a process holds a CLOSE_WAIT socket at least this old (e.g. 60, 90s, 5m)
    /// [default: 60s]: sets the `age` of the rule named close_wait_leak, over the file's.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub close_wait_age: Option<std::time::Duration>,
    /// Alert when a process holds more than this many CLOSE_WAIT sockets [default: 100]: sets
    /// the `count` of the rule named close_wait_leak, over the file's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub close_wait_count: Option<u32>,
    /// Most sockets tracked at once; past it new sockets are counted as overflow, not tracked
    /// [default: 1000000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_sockets: Option<u64>,
    /// How often the CLOSE_WAIT table is compared with the kernel's (inet_diag) and repaired;
    /// also at once after any lost event [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub reconcile_interval: Option<std::time::Duration>,
    /// Prometheus endpoint address, "" to disable [default: 127.0.0.1:9977].
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_listen: Option<String>,
    /// Send alerts to this Alertmanager (API v2), e.g. http://127.0.0.1:9093.
    #[arg(long, value_name = "URL")]
    pub alertmanager_url: Option<String>,
    /// POST each alert change as JSON to this URL.
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// Append alert changes as JSON lines to this file.
    #[arg(long, value_name = "FILE")]
    pub alert_file: Option<String>,
    /// Print alerts as JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Drop every event instead of tracking it, so only reconciliation fills the table. For
    /// tests of reconciliation only.
    #[arg(long, hide = true)]
    pub test_withhold_events: bool,
    /// Test only: the ring buffer's size in bytes (a power of two, at least a page), to make
    /// real loss.
    #[arg(long, hide = true, value_parser = clap::value_parser!(u32).range(4096..=1 << 30))]
    pub test_ring_bytes: Option<u32>,
    /// Transitions a `tail` client may lag behind (default 16384). For tests only.
    #[arg(long, hide = true, default_value_t = crate::api::TAIL_BACKLOG, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub test_tail_backlog: usize,
    /// Bytes of alert lines that may wait for stdout (default 1 MiB). For tests only.
    #[arg(long, hide = true, default_value_t = crate::daemon::STDOUT_QUEUE_BYTES, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub test_stdout_queue_bytes: u64,
}

impl RunArgs {
    /// The configuration in force: the file (or defaults), overridden by the flags given.
    pub fn resolve(&self) -> Result<crate::config::Config, crate::config::ConfigError> {
        use crate::config::{Config, Dur};
        let mut c = Config::load(self.config.as_deref())?;
        if let Some(v) = &self.socket {
            c.agent.socket = v.clone();
        }
        let flag = match (self.close_wait_age, self.close_wait_count) {
            (Some(_), _) => "--close-wait-age",
            _ => "--close-wait-count",
        };
        c.rules
            .set_close_wait(self.close_wait_age.map(Dur), self.close_wait_count)
            .map_err(|message| crate::config::ConfigError {
                source_name: "command line".into(),
                key: flag.into(),
                message,
            })?;
        if let Some(v) = self.max_sockets {
            c.agent.max_sockets = v;
        }
        if let Some(v) = self.reconcile_interval {
            c.agent.reconcile_interval = Dur(v);
        }
        if let Some(v) = &self.metrics_listen {
            c.metrics.listen = v.clone();
        }
        if let Some(v) = &self.alertmanager_url {
            c.alertmanager.url = v.clone();
        }
        if let Some(v) = &self.webhook_url {
            c.webhook.url = v.clone();
        }
        if let Some(v) = &self.alert_file {
            c.alert_file.path = v.clone();
        }
        c.validate("command line")?;
        Ok(c)
    }
}

/// Arguments of `tcpwait config`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ConfigArgs {
    /// Print the documented default configuration file.
    #[arg(long)]
    pub print_default: bool,
    /// Check a configuration file and exit: 0 if valid, 2 with the first problem otherwise.
    #[arg(long, value_name = "FILE")]
    pub check: Option<std::path::PathBuf>,
}

/// Arguments of `tcpwait status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Path of the agent's API socket.
    #[arg(long, env = "TCPWAIT_SOCKET", default_value = crate::api::DEFAULT_SOCKET)]
    pub socket: std::path::PathBuf,
    /// The full report as JSON.
    #[arg(long)]
    pub json: bool,
    /// What holds local port PORT: its sockets in every state (TIME_WAIT with the seconds
    /// left), its listeners (the last ones that closed too), whether a new listener can bind.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Give up when the agent has not answered within this time (e.g. a stopped agent).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub timeout: std::time::Duration,
}

/// Arguments of `tcpwait tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Path of the agent's API socket.
    #[arg(long, env = "TCPWAIT_SOCKET", default_value = crate::api::DEFAULT_SOCKET)]
    pub socket: std::path::PathBuf,
    /// One JSON object per line (the keys of `trace --json`, plus owner_pid and owner_comm
    /// when the holder is known).
    #[arg(long)]
    pub json: bool,
    /// Give up when the agent has not accepted the subscription within this time (a stopped
    /// agent); once following, tail waits for transitions indefinitely.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub timeout: std::time::Duration,
}

/// A duration: plain seconds (`2`, `0.5`) or with units (`90s`, `5m`, `1h 30m`).
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = match s.trim().parse::<f64>() {
        // try_from: a huge value (1e30) is refused, not a panic.
        Ok(secs) if secs > 0.0 => std::time::Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{secs} seconds is too long"))?,
        Ok(_) => return Err("must be a positive number of seconds".into()),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 60, 90s, 5m)"))?,
    };
    if d.is_zero() {
        return Err("must be positive".into());
    }
    Ok(d)
}

/// Arguments of `tcpwait trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// One JSON object per line (keys: ts_ns, time, skaddr, netns, pid, tid, comm, family, saddr,
    /// sport, daddr, dport, old, new, ms_in_old).
    #[arg(long)]
    pub json: bool,
    /// Attach to another tracepoint (CATEGORY:NAME). For tests of the error path only.
    #[arg(long, hide = true, default_value = "sock:inet_sock_set_state", value_parser = parse_tracepoint)]
    pub tracepoint: (String, String),
    /// Attach the main program both as a BTF and as a classic tracepoint, and make the rescue
    /// program record every transition too, so each appears three times. For the test that
    /// compares the three programs' decoding only.
    #[arg(long, hide = true)]
    pub test_compare: bool,
    /// Withhold the network namespace offsets from the programs, as on a kernel whose BTF
    /// lacks them. For the test of that path only.
    #[arg(long, hide = true)]
    pub test_no_netns: bool,
}

/// Filters shared by `trace` and `tail`. Criteria combine with AND; repeated flags with OR.
#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Only transitions of this process id (on-CPU or owner). Repeatable, or a comma list.
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Only transitions of this task name (exact; on-CPU or owner). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,
    /// Only sockets with this local or remote port. Repeatable, or a comma list (80,443).
    #[arg(long, value_name = "PORT", value_delimiter = ',')]
    pub port: Vec<u16>,
    /// Only sockets with this local port (as bcc's tcpstates -L). Repeatable, or a comma list.
    #[arg(short = 'L', long, value_name = "PORT", value_delimiter = ',')]
    pub lport: Vec<u16>,
    /// Only sockets with this remote port (as bcc's tcpstates -D). Repeatable, or a comma
    /// list.
    #[arg(short = 'D', long, value_name = "PORT", value_delimiter = ',')]
    pub rport: Vec<u16>,
    /// Only transitions from or to this state (e.g. CLOSE_WAIT, case-insensitive). Repeatable,
    /// or a comma list.
    #[arg(long, value_name = "STATE", value_parser = parse_state, value_delimiter = ',')]
    pub state: Vec<TcpState>,
    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only sockets of this network namespace: its inode number (`stat -L -c %i
    /// /proc/PID/ns/net`), or a path to it (`/run/netns/NAME`, `/proc/PID/ns/net`). Repeatable.
    #[arg(long, value_name = "INODE|PATH", value_parser = parse_netns)]
    pub netns: Vec<u32>,
}

impl FilterArgs {
    /// The resolved filter.
    pub fn to_filter(&self) -> Filter {
        Filter {
            pids: self.pid.clone(),
            comms: self.comm.clone(),
            ports: self.port.clone(),
            lports: self.lport.clone(),
            rports: self.rport.clone(),
            states: self.state.clone(),
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(4),
                (_, true) => Some(6),
                _ => None,
            },
            netns: self.netns.clone(),
        }
    }
}

fn parse_state(s: &str) -> Result<TcpState, String> {
    TcpState::from_name(s).ok_or_else(|| {
        let names: Vec<_> = TcpState::ALL.iter().map(|s| s.name()).collect();
        format!("unknown TCP state; expected one of {}", names.join(", "))
    })
}

/// A namespace inode number, or the path of a network namespace file (whose inode it is).
fn parse_netns(s: &str) -> Result<u32, String> {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    /// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, linux/nsfs.h, Linux ≥ 4.11).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    if let Ok(n) = s.parse::<u32>() {
        return match n {
            0 => Err("0 is no namespace's inode number".into()),
            n => Ok(n),
        };
    }
    let file = std::fs::File::open(s)
        .map_err(|e| format!("neither an inode number nor a readable namespace file ({e})"))?;
    // SAFETY: an ioctl without argument on an fd this function owns.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(format!(
            "{s} is not a network namespace file (such as /run/netns/NAME or /proc/PID/ns/net)"
        ));
    }
    let meta = file.metadata().map_err(|e| format!("stat {s}: {e}"))?;
    u32::try_from(meta.ino()).map_err(|_| format!("{s}: inode number beyond 32 bits"))
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
            "--netns",
            "4026532301",
            "--netns",
            "/proc/self/ns/net",
        ])
        .expect("valid flags");
        let Command::Trace(args) = cli.command else {
            panic!("trace expected")
        };
        let f = args.filter.to_filter();
        assert_eq!(f.pids, vec![5]);
        assert_eq!(f.ports, vec![80, 443]);
        assert_eq!(f.states, vec![TcpState::CloseWait]);
        assert_eq!(f.family, Some(6));
        let own = std::fs::metadata("/proc/self/ns/net").expect("own namespace");
        let own = std::os::unix::fs::MetadataExt::ino(&own);
        assert_eq!(
            f.netns,
            vec![4_026_532_301, u32::try_from(own).expect("32-bit")]
        );
        assert!(args.json);
    }

    #[test]
    fn ports_by_side_and_comma_lists() {
        let cli = Cli::try_parse_from([
            "tcpwait",
            "tail",
            "--port",
            "80,443",
            "-L",
            "8080,8443",
            "--lport",
            "9000",
            "-D",
            "5432",
            "--rport",
            "6379,11211",
            "--pid",
            "1,2",
            "--state",
            "close_wait,last_ack",
        ])
        .expect("valid flags");
        let Command::Tail(args) = cli.command else {
            panic!("tail expected")
        };
        let f = args.filter.to_filter();
        assert_eq!(f.ports, [80, 443]);
        assert_eq!(f.lports, [8080, 8443, 9000]);
        assert_eq!(f.rports, [5432, 6379, 11211]);
        assert_eq!(f.pids, [1, 2]);
        assert_eq!(f.states, [TcpState::CloseWait, TcpState::LastAck]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2"), Ok(std::time::Duration::from_secs(2)));
        assert_eq!(
            parse_duration("0.5"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("5m"),
            Ok(std::time::Duration::from_secs(300))
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("nan").is_err());
    }

    #[test]
    fn rejects_bad_flags() {
        for bad in [
            vec!["tcpwait", "trace", "--state", "nope"],
            vec!["tcpwait", "trace", "--port", "70000"],
            vec!["tcpwait", "trace", "--port", "80,x"],
            vec!["tcpwait", "trace", "-L", "80,"],
            vec!["tcpwait", "tail", "-D", "70000"],
            vec!["tcpwait", "trace", "-4", "-6"],
            vec!["tcpwait", "trace", "--netns", "0"],
            vec!["tcpwait", "trace", "--netns", "/nonexistent/ns"],
            vec!["tcpwait", "trace", "--netns", "/proc/self/ns/uts"],
            vec!["tcpwait", "trace", "--netns", "/proc/self/stat"],
            vec!["tcpwait", "trace", "--bogus"],
            vec!["tcpwait", "run", "--close-wait-age", "0"],
            vec!["tcpwait", "run", "--close-wait-age", "-3"],
            vec!["tcpwait", "run", "--close-wait-age", "soon"],
            vec!["tcpwait", "run", "--close-wait-count", "0"],
        ] {
            let err = Cli::try_parse_from(&bad).expect_err("invalid flags");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
