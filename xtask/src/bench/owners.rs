//! `cargo xtask bench-owners`: what owner attribution costs on a loaded host. ~300 helper
//! processes hold ~110,000 fds; one process leaks 10 CLOSE_WAIT sockets per second for 60 s;
//! `tcpwait run` (release build, default reconcile interval) is measured for its CPU (all
//! threads, /proc/<pid>/stat, as % of one core over the leak) and, for every leaked socket, the
//! time from entering CLOSE_WAIT to its first appearance under the leaker's pid in
//! `tcpwait status --json` (polled every 100 ms: its `age_s` at first sight, minus the 0.5 s
//! settle delay). The same again with the load and the leaker spread over network namespaces,
//! with the owner snapshot's duration and namespace count from /metrics. One table; the
//! figures are recorded in BENCHMARKS.md.
use std::{
    collections::HashMap,
    net::TcpListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

mod agent;

use agent::{Agent, agent_cpu, counter, last_snapshot, metrics, status};

use super::owners_load::{self, Load, Role};

/// The agent's settle delay: a socket is resolved once it has been in CLOSE_WAIT this long.
const SETTLE_S: f64 = 0.5;
/// How often `status --json` is polled.
const POLL: Duration = Duration::from_millis(100);
/// The targets: attribution within this long after the settle delay, CPU at most this.
const LATENCY_TARGET_S: f64 = 1.0;
const CPU_TARGET_PCT: f64 = 5.0;
/// USER_HZ: the unit of utime/stime in /proc/<pid>/stat.
const TICKS_PER_S: f64 = 100.0;

/// `cargo xtask bench-owners` arguments (the hidden ones are for the re-executed helpers).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of leaking per configuration (the CPU window).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Helper processes holding fds: the host load.
    #[arg(long, default_value_t = 300)]
    pub processes: usize,
    /// Fds each helper holds: files, pipes, eventfds and ~5 % idle loopback TCP connections.
    #[arg(long, default_value_t = 370)]
    pub fds: usize,
    /// Configurations, in order: 0 runs everything in the host namespace; N spreads the
    /// helpers over N network namespaces the bench creates, the leaker in the first.
    #[arg(long, value_delimiter = ',', default_value = "0,1,20,100")]
    pub namespaces: Vec<usize>,
    /// CLOSE_WAIT sockets leaked per second.
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    #[arg(long, hide = true)]
    pub role: Option<Role>,
    #[arg(long, hide = true)]
    pub netns: Option<PathBuf>,
    #[arg(long, hide = true, default_value_t = 0)]
    pub port: u16,
}

/// The entry point: a helper role, or setup, release build and the bench.
pub fn main(root: &Path, a: Args) -> Result<()> {
    if let Some(role) = a.role {
        return owners_load::helper(role, a.netns.as_deref(), a.fds, a.port, a.rate, a.seconds);
    }
    check(&a)?;
    crate::setup::setup(root)?;
    crate::cargo(root, &["build", "--release", "--package", "tcpwait-agent"])?;
    let bin = root.join("target/release/tcpwait");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).context("create target/bench")?;
    owners_load::delete_stale_namespaces();
    println!("{}", super::machine());
    println!(
        "load: {} processes x {} fds; leaker: {} CLOSE_WAIT sockets/s for {} s; status polled \
         every {} ms; latency = age_s at first sight under the leaker's pid - {SETTLE_S} s \
         settle; targets: CPU <= {CPU_TARGET_PCT} % of one core, latency <= {LATENCY_TARGET_S} s",
        a.processes,
        a.fds,
        a.rate,
        a.seconds,
        POLL.as_millis()
    );
    print_header();
    let started = Instant::now();
    for &ns in &a.namespaces {
        let row = measure(&bin, &dir, &a, ns)
            .with_context(|| format!("configuration `{}`", label(ns)))?;
        print_row(&row);
    }
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn check(a: &Args) -> Result<()> {
    if a.seconds == 0 || a.seconds > 3600 {
        bail!("--seconds {}: allowed 1 ..= 3600", a.seconds);
    }
    if a.processes > 2000 {
        bail!("--processes {}: allowed 0 ..= 2000", a.processes);
    }
    if a.fds > 10_000 {
        bail!("--fds {}: allowed 0 ..= 10000", a.fds);
    }
    if a.rate == 0 || a.rate > 1000 {
        bail!("--rate {}: allowed 1 ..= 1000", a.rate);
    }
    if let Some(n) = a.namespaces.iter().find(|&&n| n > 500) {
        bail!("--namespaces {n}: at most 500 per configuration");
    }
    if a.namespaces.is_empty() {
        bail!("--namespaces: give at least one configuration (0 = host namespace)");
    }
    Ok(())
}

fn label(ns: usize) -> String {
    if ns == 0 {
        "host".into()
    } else {
        format!("{ns} netns")
    }
}

/// What one leaked socket looked like in `status`.
#[derive(Default)]
struct Seen {
    /// `age_s` when it was first listed under the leaker's pid.
    owned_age: Option<f64>,
    /// Listed under another pid.
    other_pid: bool,
    /// Listed as "holder unknown" at the last poll.
    unowned_last: bool,
    /// Listed as "holder unknown" at some poll.
    unowned_ever: bool,
}

#[derive(Default)]
struct Row {
    ns: usize,
    processes: usize,
    held: u64,
    host_fds: u64,
    leaked: usize,
    latencies: Vec<f64>,
    unowned_at_end: usize,
    /// Listed as holder unknown, then no longer listed at all.
    dropped: usize,
    other_pid: usize,
    never_listed: usize,
    cpu_pct: f64,
    owners_cpu_pct: f64,
    reconciliations: u64,
    /// (namespaces, seconds) of the bootstrap reconciliation (every namespace dumped, every fd
    /// walked), scraped before any socket settles: the last snapshot then is that one.
    reconcile: (f64, f64),
    /// (namespaces, seconds) of the last owner snapshot, scraped every 500 ms of the window:
    /// mostly settled-socket resolutions.
    snapshots: Vec<(f64, f64)>,
}

fn measure(bin: &Path, dir: &Path, a: &Args, ns: usize) -> Result<Row> {
    let mut load = Load::start(ns, a.processes, a.fds)?;
    let mut row = Row {
        ns,
        processes: a.processes,
        held: load.held,
        host_fds: owners_load::host_fds(),
        ..Row::default()
    };
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let sock = dir.join("owners.sock").display().to_string();
    let mut agent = Agent::start(bin, &sock, port)?;
    // The bootstrap reconciliation (a full walk) is over before the window starts.
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter(&status(bin, &sock), "reconciliations") < 1 {
        if Instant::now() > deadline {
            bail!("the agent's first reconciliation took over 120 s");
        }
        std::thread::sleep(POLL);
    }
    row.reconcile = metrics(port).map_or((f64::NAN, f64::NAN), |m| last_snapshot(&m));
    let pid = agent.pid();
    let cpu0 = agent_cpu(pid)?;
    let t0 = Instant::now();
    load.leak(a.rate, a.seconds)?;
    let ports = load.leaked_ports()?;
    let server = format!("127.0.0.1:{}", load.server_port);
    let mut seen: HashMap<u16, Seen> = HashMap::new();
    let (mut cpu1, mut polls) = (None, 0u64);
    let end = t0 + Duration::from_secs(a.seconds);
    loop {
        std::thread::sleep(POLL);
        while let Ok(p) = ports.try_recv() {
            seen.entry(p).or_default();
        }
        if cpu1.is_none() && Instant::now() >= end {
            cpu1 = Some((agent_cpu(pid)?, t0.elapsed()));
        }
        let last = status(bin, &sock);
        observe(&last, load.leaker, &server, &mut seen);
        polls += 1;
        if polls % 5 == 0
            && let Some(m) = metrics(port)
        {
            row.snapshots.push(last_snapshot(&m));
        }
        let all = seen.len() as u64 >= u64::from(a.rate) * a.seconds
            && seen.values().all(|s| s.owned_age.is_some());
        if cpu1.is_some() && (all || Instant::now() >= end + Duration::from_secs(5)) {
            row.reconciliations = counter(&last, "reconciliations");
            break;
        }
    }
    let (c0, (c1, elapsed)) = (cpu0, cpu1.expect("set before the loop ends"));
    // Ticks over the window, as % of one core.
    let window = elapsed.as_secs_f64() * TICKS_PER_S / 100.0;
    row.cpu_pct = c1.0.saturating_sub(c0.0) as f64 / window;
    row.owners_cpu_pct = c1.1.saturating_sub(c0.1) as f64 / window;
    agent.stop();
    row.leaked = seen.len();
    row.latencies = seen
        .values()
        .filter_map(|s| s.owned_age.map(|age| age - SETTLE_S))
        .collect();
    for s in seen.values().filter(|s| s.owned_age.is_none()) {
        match (s.other_pid, s.unowned_last, s.unowned_ever) {
            (true, _, _) => row.other_pid += 1,
            (false, true, _) => row.unowned_at_end += 1,
            (false, false, true) => row.dropped += 1,
            (false, false, false) => row.never_listed += 1,
        }
    }
    Ok(row)
}

/// Records, for each leaked socket (by local port) listed in `status`, how it was listed.
fn observe(status: &Value, leaker: u32, server: &str, seen: &mut HashMap<u16, Seen>) {
    let leaked = |s: &Value| -> Option<u16> {
        (s["remote"].as_str()? == server).then_some(())?;
        s["local"].as_str()?.rsplit_once(':')?.1.parse().ok()
    };
    for s in seen.values_mut() {
        s.unowned_last = false;
    }
    let procs = status["processes"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    for p in procs {
        let is_leaker = p["pid"].as_u64() == Some(u64::from(leaker));
        for s in p["sockets"].as_array().map_or(&[][..], Vec::as_slice) {
            let Some(entry) = leaked(s).and_then(|port| seen.get_mut(&port)) else {
                continue;
            };
            if !is_leaker {
                entry.other_pid = true;
            } else if entry.owned_age.is_none() {
                entry.owned_age = s["age_s"].as_f64();
            }
        }
    }
    for s in status["unowned"].as_array().map_or(&[][..], Vec::as_slice) {
        if let Some(entry) = leaked(s).and_then(|port| seen.get_mut(&port)) {
            entry.unowned_last = true;
            entry.unowned_ever = true;
        }
    }
}

/// The nearest-rank percentile `q` (0..=1) of `v`, NaN when empty.
fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => v[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

fn print_header() {
    println!(
        "{:<9} {:>5} {:>8} {:>8} {:>6} {:>10} {:>6} {:>6} {:>5} {:>9} {:>8} {:>5} {:>14} {:>16}",
        "config",
        "procs",
        "fds held",
        "host fds",
        "leaked",
        "attributed",
        "p50 s",
        "max s",
        ">1 s",
        "agent CPU",
        "resolver",
        "recon",
        "reconcile s (ns)",
        "snap s p50/max"
    );
}

fn print_row(r: &Row) {
    let attributed = r.latencies.len();
    let late = r
        .latencies
        .iter()
        .filter(|&&l| l > LATENCY_TARGET_S)
        .count();
    let secs: Vec<f64> = r
        .snapshots
        .iter()
        .map(|s| s.1)
        .filter(|s| !s.is_nan())
        .collect();
    println!(
        "{:<9} {:>5} {:>8} {:>8} {:>6} {:>10} {:>6.2} {:>6.2} {:>5} {:>8.1}% {:>7.1}% {:>5} {:>14} {:>8.3}/{:<7.3}",
        label(r.ns),
        r.processes,
        r.held,
        r.host_fds,
        r.leaked,
        attributed,
        percentile(&r.latencies, 0.5),
        percentile(&r.latencies, 1.0),
        late,
        r.cpu_pct,
        r.owners_cpu_pct,
        r.reconciliations,
        format!("{:.3} ({})", r.reconcile.1, r.reconcile.0),
        percentile(&secs, 0.5),
        percentile(&secs, 1.0),
    );
    if attributed < r.leaked {
        println!(
            "  {} of {} leaked sockets never listed under the leaker's pid: {} listed as \
             holder unknown at the end, {} listed as holder unknown then dropped from status, \
             {} under another pid, {} never listed",
            r.leaked - attributed,
            r.leaked,
            r.unowned_at_end,
            r.dropped,
            r.other_pid,
            r.never_listed
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{
        agent::{metric, stat_cpu},
        percentile,
    };

    #[test]
    fn reads_cpu_ticks_and_comm_from_stat() {
        // A comm with a space and a parenthesis: fields are counted after the last ')'.
        let stat = "4242 (tcpwait) x) S 1 4242 4242 0 -1 4194560 2583 0 0 0 731 269 0 0 20 0 \
                    5 0 1234 123456 789 18446744073709551615";
        assert_eq!(stat_cpu(stat), Some(("tcpwait) x", 1000)));
        assert_eq!(stat_cpu("4242 (tcpwait) S 1 2"), None);
        assert_eq!(stat_cpu("garbage"), None);
        assert_eq!(stat_cpu(""), None);
    }

    #[test]
    fn reads_an_unlabelled_metric() {
        let text = "# HELP tcpwait_owner_snapshot_namespaces Network namespaces\n\
                    tcpwait_owner_snapshot_namespaces 21\n\
                    tcpwait_owner_snapshot_duration_seconds 0.0125\n\
                    tcpwait_owner_snapshot_duration_seconds_x 9\n";
        assert_eq!(
            metric(text, "tcpwait_owner_snapshot_namespaces"),
            Some(21.0)
        );
        assert_eq!(
            metric(text, "tcpwait_owner_snapshot_duration_seconds"),
            Some(0.0125)
        );
        assert_eq!(metric(text, "tcpwait_missing"), None);
        assert_eq!(metric("tcpwait_x abc\n", "tcpwait_x"), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v = [0.4, 0.1, 0.3, 0.2];
        assert_eq!(percentile(&v, 0.5), 0.2);
        assert_eq!(percentile(&v, 1.0), 0.4);
        assert_eq!(percentile(&[0.7], 0.5), 0.7);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
