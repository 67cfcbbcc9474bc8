//! `cargo xtask bench`: workload slowdown, loss, BPF and agent CPU per event, and memory of
//! tcpwait, measured on this machine with public tools only (std, /proc, the kernel's BPF run
//! statistics). Results are printed as one table; BENCHMARKS.md records them.
//!
//! Every tracer mode runs twice per round: with the kernel's BPF run statistics off, as on a
//! production host (the slowdown), and on (BPF run time per event, and the kernel's own count of
//! the tracepoint's firings to measure loss against). The statistics cost two clock reads per
//! program run, which would count as tcpwait's slowdown otherwise.
//!
//! The workload is a loopback client/server pair on 127.0.0.1 (bounded in time): the server
//! accepts and closes first, the client reads EOF and closes, so every connection makes exactly
//! 10 transitions (DESIGN.md), plus 2 for the listener.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Bench settings.
pub struct Settings {
    pub runs: usize,
    pub seconds: u64,
    pub modes: Vec<String>,
}

/// The modes `--modes` accepts.
const KNOWN_MODES: [&str; 4] = ["none", "trace", "run", "floor"];

/// The count-only program of the `floor` mode, for bpftrace (whose 0.17 knows no raw
/// tracepoints): the cost of the classic tracepoint and of running any program at all.
const FLOOR_PROGRAM: &str = "tracepoint:sock:inet_sock_set_state { @n = count(); }";

/// The modes to run: those asked for (refusing unknown ones, and `floor` without bpftrace), or
/// by default all of them, without `floor` if bpftrace is not installed (said on stdout).
pub fn check_modes(modes: Option<Vec<String>>) -> Result<Vec<String>> {
    let has_bpftrace = Command::new("bpftrace").arg("--version").output().is_ok();
    let Some(modes) = modes else {
        if !has_bpftrace {
            println!("mode floor skipped: bpftrace is not installed (apt-get install bpftrace)");
        }
        return Ok(["none", "floor", "trace", "run"]
            .into_iter()
            .filter(|m| has_bpftrace || *m != "floor")
            .map(String::from)
            .collect());
    };
    for m in &modes {
        if !KNOWN_MODES.contains(&m.as_str()) {
            bail!(
                "unknown bench mode `{m}`: choose from {}",
                KNOWN_MODES.join(", ")
            );
        }
    }
    if modes.iter().any(|m| m == "floor") && !has_bpftrace {
        bail!("mode `floor` needs bpftrace: install it (apt-get install bpftrace) or drop `floor`");
    }
    Ok(modes)
}

/// How a mode is shown in the table.
fn label(mode: &str) -> &str {
    match mode {
        "trace" => "trace --json",
        "floor" => "floor (count)",
        m => m,
    }
}

/// The kernel's switch for BPF run statistics (`run_time_ns`, `run_cnt` in a program's fdinfo).
const STATS_PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Clone, Default)]
struct Sample {
    /// Run with BPF run statistics on.
    stats: bool,
    conns_per_s: f64,
    expected: u64,
    captured: u64,
    ring_full: u64,
    recursion_misses: u64,
    /// Times the tracepoint fired on the whole host during the run, by the kernel's own count
    /// (the main program's runs plus the runs it skipped): what the agent should have got.
    /// Known only with BPF run statistics on.
    fired: u64,
    /// Transitions the agent counted as lost (ring full, recursion misses not rescued,
    /// malformed): what it knows without the kernel's fire count.
    agent_lost: u64,
    bpf_ns_per_event: f64,
    agent_us_per_event: f64,
    peak_rss_kib: u64,
    /// The agent's own last line on stderr (its summary of transitions seen and lost, by
    /// reason), kept for the runs where captured ≠ expected.
    summary: String,
}

/// Runs the loopback workload for `secs`; returns (connections, elapsed).
fn workload(secs: u64) -> Result<(u64, Duration)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let port = listener.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(s);
            }
        })
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut n = 0u64;
    let mut buf = [0u8; 1];
    while Instant::now() < deadline {
        let mut c = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
        // EOF: the server closed first, so this socket goes through CLOSE_WAIT.
        let _ = c.read(&mut buf);
        drop(c);
        n += 1;
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(("127.0.0.1", port)).map(|mut c| c.read(&mut buf));
    let _ = server.join();
    // The wake-up connection above is one more.
    Ok((n + 1, elapsed))
}

fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (run_time_ns, run_cnt, recursion_misses) of the main BPF program `pid` holds: summed over
/// its programs but the raw-tracepoint rescue program (prog_type 17), so that a program loaded
/// but not attached (a fallback) adds nothing.
fn bpf_stats(pid: u32) -> (u64, u64, u64) {
    let mut sum = (0, 0, 0);
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return sum;
    };
    for fd in fds.flatten() {
        let Ok(text) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if !text.contains("prog_type:") || text.contains("prog_type:\t17\n") {
            continue;
        }
        let get = |k: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        sum.0 += get("run_time_ns:");
        sum.1 += get("run_cnt:");
        sum.2 += get("recursion_misses:");
    }
    sum
}

struct Agent {
    child: Child,
    out: Option<std::path::PathBuf>,
    sock: Option<String>,
    /// The agent's last line on stderr after the ready line, read until it exits.
    stderr: Option<std::thread::JoinHandle<Option<String>>>,
}

fn start(bin: &Path, mode: &str, dir: &Path, run: usize) -> Result<Agent> {
    if mode == "floor" {
        return start_floor(dir, run);
    }
    let (args, out, sock): (Vec<String>, _, _) = match mode {
        "trace" => {
            let out = dir.join(format!("trace-{run}.jsonl"));
            (vec!["trace".into(), "--json".into()], Some(out), None)
        }
        _ => {
            let sock = dir.join(format!("bench-{run}.sock")).display().to_string();
            (
                vec![
                    "run".into(),
                    "--socket".into(),
                    sock.clone(),
                    "--metrics-listen".into(),
                    String::new(),
                ],
                None,
                Some(sock),
            )
        }
    };
    let stdout = match &out {
        Some(p) => Stdio::from(std::fs::File::create(p)?),
        None => Stdio::null(),
    };
    let mut child = Command::new(bin)
        .args(&args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let ready = lines.next().transpose()?.unwrap_or_default();
    if !ready.contains("tracing TCP") && !ready.contains("agent running") {
        bail!("tcpwait {mode} did not start: {ready}");
    }
    let stderr = std::thread::spawn(move || lines.map_while(Result::ok).last());
    Ok(Agent {
        child,
        out,
        sock,
        stderr: Some(stderr),
    })
}

/// bpftrace counting transitions: it prints "Attaching 1 probe..." once attached, and the
/// count (`@n: N`) when interrupted. bpftrace finds classic tracepoints through tracefs, which
/// this kernel does not mount by itself (tcpwait mounts it when it needs it).
fn start_floor(dir: &Path, run: usize) -> Result<Agent> {
    if !Path::new("/sys/kernel/tracing/events").exists() {
        let st = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status()
            .context("run mount")?;
        if !st.success() {
            bail!(
                "mounting tracefs for bpftrace failed: run `mount -t tracefs tracefs /sys/kernel/tracing` as root"
            );
        }
    }
    let out = dir.join(format!("floor-{run}.txt"));
    let err = dir.join(format!("floor-{run}.err"));
    let mut child = Command::new("bpftrace")
        .args(["-e", FLOOR_PROGRAM])
        .stdout(Stdio::from(std::fs::File::create(&out)?))
        .stderr(Stdio::from(std::fs::File::create(&err)?))
        .spawn()
        .context("start bpftrace")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("Attaching")
    {
        let why = std::fs::read_to_string(&err).unwrap_or_default();
        let why = why
            .lines()
            .find(|l| l.contains("ERROR"))
            .unwrap_or("")
            .trim()
            .to_owned();
        if let Some(st) = child.try_wait()? {
            bail!("bpftrace exited ({st}) before attaching: {why}");
        }
        if Instant::now() > deadline {
            bail!(
                "bpftrace did not attach within 30 s: {why} (see {})",
                err.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Agent {
        child,
        out: Some(out),
        sock: None,
        stderr: None,
    })
}

/// The count the floor program printed at exit.
fn floor_count(out: &Path) -> u64 {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("@n: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn transitions_seen(bin: &Path, sock: &str) -> u64 {
    counter_of(bin, sock, "transitions")
}

/// A counter of the daemon's `status --json` report.
fn counter_of(bin: &Path, sock: &str, key: &str) -> u64 {
    let o = Command::new(bin)
        .args(["status", "--json", "--socket", sock])
        .output();
    o.ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let k = format!("\"{key}\":");
            let i = text.find(&k)? + k.len();
            text[i..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The lost count in the agent's last line: `…, N lost (…` (trace) or `lost: ring buffer full
/// A, kernel recursion misses B, malformed C` (run).
fn agent_lost(summary: &str) -> u64 {
    let num = |s: &str| -> u64 {
        s.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    if let Some((head, _)) = summary.split_once(" lost (") {
        return num(head.rsplit(' ').next().unwrap_or_default());
    }
    ["ring buffer full ", "recursion misses ", "malformed "]
        .iter()
        .filter_map(|k| summary.split_once(k).map(|(_, rest)| num(rest)))
        .sum()
}

fn one(bin: &Path, mode: &str, stats: bool, dir: &Path, run: usize, secs: u64) -> Result<Sample> {
    let tick_us = 1e6 / 100.0; // USER_HZ
    std::fs::write(STATS_PATH, if stats { "1" } else { "0" })
        .context("switch BPF run statistics (needs root)")?;
    let agent = if mode == "none" {
        None
    } else {
        Some(start(bin, mode, dir, run)?)
    };
    let pid = agent.as_ref().map(|a| a.child.id());
    let seen_before = match agent.as_ref().and_then(|a| a.sock.as_deref()) {
        Some(s) => transitions_seen(bin, s),
        None => 0,
    };
    let cpu0 = pid.map(proc_cpu_ticks).transpose()?.unwrap_or(0);
    let bpf0 = pid.map(bpf_stats).unwrap_or_default();
    let (conns, elapsed) = workload(secs)?;
    let expected = conns * 10 + 2;
    let mut s = Sample {
        stats,
        conns_per_s: conns as f64 / elapsed.as_secs_f64(),
        expected,
        ..Default::default()
    };
    let Some(mut agent) = agent else { return Ok(s) };
    let pid = agent.child.id();
    // The kernel's own statistics, read once the workload's last transitions are over (the
    // last connection's may still be under way when `workload` returns): nothing else runs
    // TCP here.
    let mut bpf1 = bpf_stats(pid);
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(200));
        let now = bpf_stats(pid);
        if (now.1, now.2) == (bpf1.1, bpf1.2) {
            break;
        }
        bpf1 = now;
    }
    let ran = bpf1.1.saturating_sub(bpf0.1);
    s.recursion_misses = bpf1.2.saturating_sub(bpf0.2);
    s.fired = ran + s.recursion_misses;
    s.bpf_ns_per_event = bpf1.0.saturating_sub(bpf0.0) as f64 / ran.max(1) as f64;
    // Let the agent drain: poll (bounded) until it has everything or stops moving.
    let count = |a: &Agent| -> u64 {
        match (&a.out, &a.sock) {
            (Some(p), _) if mode == "floor" => floor_count(p),
            (Some(p), _) => std::fs::read_to_string(p)
                .map(|t| t.lines().count() as u64)
                .unwrap_or(0),
            (_, Some(sock)) => transitions_seen(bin, sock).saturating_sub(seen_before),
            _ => 0,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = u64::MAX;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let c = count(&agent);
        // Without statistics the kernel's count is unknown: the workload's is the target.
        if c >= if stats { s.fired } else { expected } || c == last {
            break;
        }
        last = c;
    }
    let cpu1 = proc_cpu_ticks(pid)?;
    s.peak_rss_kib = status_kib(pid, "VmHWM:");
    s.ring_full = match &agent.sock {
        Some(sock) => counter_of(bin, sock, "lost_ring_full"),
        None => 0,
    };
    if agent.sock.is_some() {
        s.captured = count(&agent);
    }
    // SAFETY: signal our own child.
    unsafe { libc_kill(pid as i32, 2) };
    let _ = agent.child.wait();
    s.summary = agent
        .stderr
        .take()
        .and_then(|h| h.join().ok().flatten())
        .unwrap_or_default();
    s.agent_lost = agent_lost(&s.summary);
    if agent.out.is_some() {
        // After exit: the file holds the final drain too.
        s.captured = count(&agent);
    }
    s.agent_us_per_event = (cpu1.saturating_sub(cpu0)) as f64 * tick_us / s.captured.max(1) as f64;
    Ok(s)
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Runs everything and prints the table.
pub fn bench(root: &Path, s: &Settings) -> Result<()> {
    let bin = root.join("target/release/tcpwait");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("machine: {cpu}, {cores} cores, Linux {}", kernel.trim());
    println!(
        "workload: one client thread, loopback 127.0.0.1, {} s per run, {} runs per mode (modes \
         take turns), medians; slowdown: the median of each round's against that round's `none`; \
         each tracer mode with BPF run statistics off (slowdown) and on \
         (`+stats`: BPF ns/event, the kernel's fire count)",
        s.seconds, s.runs
    );
    let stats_before = std::fs::read_to_string(STATS_PATH).unwrap_or_default();
    let result = table(&bin, &dir, s);
    let _ = std::fs::write(STATS_PATH, stats_before.trim());
    result?;
    // Idle RSS of the agent.
    let mut idle = start(&bin, "run", &dir, 999)?;
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = status_kib(idle.child.id(), "VmRSS:");
    // SAFETY: signal our own child.
    unsafe { libc_kill(idle.child.id() as i32, 2) };
    let _ = idle.child.wait();
    println!(
        "agent idle RSS (tcpwait run, 2 s after start): {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    // Memory per tracked socket.
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--release",
            "-q",
            "-p",
            "tcpwait-agent",
            "--",
            "--ignored",
            "--nocapture",
            "--exact",
            "tracker::tests::table::million_sockets_memory",
        ])
        .current_dir(root)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find(|l| l.contains("B/socket")) {
        Some(line) => println!("tracker at 1,000,000 sockets: {line}"),
        None => bail!(
            "the million-socket test printed no figure ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ),
    }
    Ok(())
}

/// Runs every mode (modes take turns, each tracer mode with BPF statistics off then on) and
/// prints one row per mode and setting.
fn table(bin: &Path, dir: &Path, s: &Settings) -> Result<()> {
    println!(
        "{:<20} {:>9} {:>9} {:>11} {:>11} {:>11} {:>8} {:>9} {:>10} {:>11} {:>9}",
        "mode",
        "conn/s",
        "slowdown",
        "expected",
        "fired",
        "captured",
        "ring",
        "recursion",
        "bpf ns/ev",
        "agent µs/ev",
        "peak RSS"
    );
    // Modes take turns (none, trace, run, none, ...) so that a drift of the machine over the
    // bench (TIME_WAIT sockets of earlier runs, page cache, a noisy neighbour) weighs on every
    // mode alike instead of on whichever ran last.
    let entries: Vec<(&str, bool)> = s
        .modes
        .iter()
        .flat_map(|m| {
            let m = m.as_str();
            if m == "none" {
                vec![(m, false)]
            } else {
                vec![(m, false), (m, true)]
            }
        })
        .collect();
    let mut all: Vec<Vec<Sample>> = vec![Vec::new(); entries.len()];
    for run in 0..s.runs {
        for (i, &(mode, stats)) in entries.iter().enumerate() {
            all[i].push(one(bin, mode, stats, dir, run, s.seconds)?);
        }
    }
    // The no-tracer rate of each round, if `none` ran.
    let baseline: Option<Vec<f64>> = entries
        .iter()
        .position(|&(m, _)| m == "none")
        .map(|i| all[i].iter().map(|x| x.conns_per_s).collect());
    for (&(mode, stats), samples) in entries.iter().zip(all) {
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let rate = m(|x| x.conns_per_s);
        // Each round's slowdown against the no-tracer run of the same round (the runs next to
        // each other in time, so that a drift of the machine cancels out), and their median.
        let per_round: Vec<f64> = match &baseline {
            Some(base) => samples
                .iter()
                .zip(base)
                .map(|(x, b)| (1.0 - x.conns_per_s / b) * 100.0)
                .collect(),
            None => Vec::new(),
        };
        let slowdown = median(per_round.clone());
        // With statistics: the kernel's count less what tcpwait captured, signed (a negative
        // figure is a transition delivered twice, or TCP traffic of another program after the
        // kernel's count was read). Without: what the agent counted as lost.
        let lost: Vec<String> = samples
            .iter()
            .map(|x| match (x.stats, mode) {
                (true, _) => (x.fired as i64 - x.captured as i64).to_string(),
                // bpftrace counts no loss of its own.
                (false, "floor") => "-".to_owned(),
                (false, _) => x.agent_lost.to_string(),
            })
            .collect();
        let dash = |v: String| if stats { v } else { "-".to_owned() };
        println!(
            "{:<20} {:>9.0} {:>8.1}% {:>11.0} {:>11} {:>11.0} {:>8.0} {:>9.0} {:>10} {:>11.2} {:>7} MiB   lost per run: {}",
            format!("{}{}", label(mode), if stats { " +stats" } else { "" }),
            rate,
            slowdown,
            m(|x| x.expected as f64),
            dash(format!("{:.0}", m(|x| x.fired as f64))),
            m(|x| x.captured as f64),
            m(|x| x.ring_full as f64),
            m(|x| x.recursion_misses as f64),
            dash(format!("{:.0}", m(|x| x.bpf_ns_per_event))),
            m(|x| x.agent_us_per_event),
            (m(|x| x.peak_rss_kib as f64) / 1024.0).round(),
            if mode == "none" {
                "-".into()
            } else {
                lost.join(" ")
            },
        );
        let rates: Vec<String> = samples
            .iter()
            .map(|x| format!("{:.0}", x.conns_per_s))
            .collect();
        println!("  conn/s per run: {}", rates.join(" "));
        if mode != "none" && !per_round.is_empty() {
            let rounds: Vec<String> = per_round.iter().map(|p| format!("{p:.1}%")).collect();
            println!(
                "  slowdown per round: {} (ratio of the medians: {:.1}%)",
                rounds.join(" "),
                baseline
                    .as_ref()
                    .map_or(0.0, |b| (1.0 - rate / median(b.clone())) * 100.0)
            );
        }
        for (i, x) in samples.iter().enumerate() {
            if mode != "none" && x.stats && x.fired != x.captured {
                println!(
                    "  run {i}: the tracepoint fired {} times, tcpwait captured {}; agent: {}",
                    x.fired, x.captured, x.summary
                );
            }
            if mode != "none" && x.stats && x.fired != x.expected {
                println!(
                    "  run {i}: the workload's {} connections made {} transitions by the \
                     kernel's count, not {} (10 each, 2 for the listener)",
                    (x.expected - 2) / 10,
                    x.fired,
                    x.expected
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::agent_lost;

    #[test]
    fn reads_the_agents_lost_count() {
        let trace = "tcpwait: 812 transitions seen, 812 printed, 7 lost (ring buffer full: 5, \
                     kernel recursion misses: 2, malformed: 0); 3 nested transitions rescued, 0 \
                     out of order";
        assert_eq!(agent_lost(trace), 7);
        let run = "tcpwait: stopped; 900 transitions, lost: ring buffer full 4, kernel recursion \
                   misses 1, malformed 2; out of order 0";
        assert_eq!(agent_lost(run), 7);
        assert_eq!(agent_lost(""), 0);
    }
}
