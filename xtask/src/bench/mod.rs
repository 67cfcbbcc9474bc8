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
pub mod owners;
mod owners_load;
mod table;
pub mod timewait;
mod tracers;
mod workload;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use tracers::{
    Agent, agent_lost, bpf_stats, counter_of, floor_count, proc_cpu_ticks, start, status_kib,
    transitions_seen,
};
use workload::workload;

/// Bench settings.
pub struct Settings {
    pub runs: usize,
    pub seconds: u64,
    pub modes: Vec<String>,
    /// A `tcpwait` binary built from another commit, for the `@base` modes.
    pub baseline: Option<std::path::PathBuf>,
}

/// A mode name ending in this (`run@base`, `trace@base`) runs the baseline binary: a change to
/// a hot path is measured against the code before it in the same rounds, where drift between
/// two separate benches cannot pass for an effect.
pub const BASE_SUFFIX: &str = "@base";

/// The modes `--modes` accepts.
/// `run-fw2` is `run` with the opt-in rule fin_wait2_held added to the defaults: what watching
/// FIN_WAIT2 (every active close passes through it) costs.
const KNOWN_MODES: [&str; 5] = ["none", "trace", "run", "run-fw2", "floor"];

/// The modes to run: those asked for (refusing unknown ones, and `floor` without bpftrace), or
/// by default all of them, without `floor` if bpftrace is not installed (said on stdout); with
/// a baseline, each tcpwait mode also runs as `<mode>@base` just before it.
pub fn check_modes(modes: Option<Vec<String>>, baseline: bool) -> Result<Vec<String>> {
    let has_bpftrace = Command::new("bpftrace").arg("--version").output().is_ok();
    let Some(modes) = modes else {
        if !has_bpftrace {
            println!("mode floor skipped: bpftrace is not installed (apt-get install bpftrace)");
        }
        return Ok(["none", "floor", "trace", "run"]
            .into_iter()
            .filter(|m| has_bpftrace || *m != "floor")
            .flat_map(|m| {
                let base =
                    (baseline && matches!(m, "trace" | "run")).then(|| format!("{m}{BASE_SUFFIX}"));
                base.into_iter().chain([m.to_owned()])
            })
            .collect());
    };
    for m in &modes {
        let plain = m.strip_suffix(BASE_SUFFIX);
        if let Some(p) = plain {
            if !matches!(p, "trace" | "run") {
                bail!("mode `{m}`: only trace and run have a baseline form");
            }
            if !baseline {
                bail!("mode `{m}` needs a baseline: --baseline-rev REV");
            }
            continue;
        }
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

fn one(bins: &Bins, mode: &str, stats: bool, dir: &Path, run: usize, secs: u64) -> Result<Sample> {
    let (bin, mode) = bins.pick(mode);
    let bin = bin.as_path();
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
            // Transition records only: `trace` also prints resets (records with a `kind`),
            // which the tracepoint's count does not include.
            (Some(p), _) => std::fs::read_to_string(p)
                .map(|t| t.lines().filter(|l| !l.starts_with("{\"kind\"")).count() as u64)
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
    agent.interrupt();
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

/// Runs everything and prints the table.
pub fn bench(root: &Path, s: &Settings) -> Result<()> {
    let bin = root.join("target/release/tcpwait");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    println!("{}", machine());
    println!(
        "workload: one client thread, loopback 127.0.0.1, {} s per run, {} runs per mode (modes \
         take turns), medians; slowdown: the median of each round's against that round's `none`; \
         each tracer mode with BPF run statistics off (slowdown) and on \
         (`+stats`: BPF ns/event, the kernel's fire count)",
        s.seconds, s.runs
    );
    let stats_before = std::fs::read_to_string(STATS_PATH).unwrap_or_default();
    let result = rounds(&bin, &dir, s);
    let _ = std::fs::write(STATS_PATH, stats_before.trim());
    result?;
    // Idle RSS of the agent.
    let mut idle = start(&bin, "run", &dir, 999)?;
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = status_kib(idle.child.id(), "VmRSS:");
    idle.interrupt();
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

/// `machine: <cpu model>, <n> cores, Linux <release>`: the first line of both benches.
pub(super) fn machine() -> String {
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
    format!("machine: {cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// The binaries a bench compares.
struct Bins {
    current: std::path::PathBuf,
    baseline: Option<std::path::PathBuf>,
}

impl Bins {
    /// The binary for `mode`, and the mode without its baseline suffix.
    fn pick<'m>(&self, mode: &'m str) -> (&std::path::PathBuf, &'m str) {
        match (mode.strip_suffix(BASE_SUFFIX), &self.baseline) {
            (Some(m), Some(b)) => (b, m),
            _ => (&self.current, mode),
        }
    }
}

/// Runs every mode (modes take turns, each tracer mode with BPF statistics off then on) and
/// prints one row per mode and setting.
fn rounds(bin: &Path, dir: &Path, s: &Settings) -> Result<()> {
    let bins = Bins {
        current: bin.to_owned(),
        baseline: s.baseline.clone(),
    };
    table::print_header();
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
            let sample = one(&bins, mode, stats, dir, run, s.seconds)?;
            if mode != "none" && mode != "floor" {
                // The agent's own identity for the run: the kernel's hits against what it
                // delivered and counted lost (DESIGN.md, "Loss accounting").
                println!(
                    "run {run} {mode}{}: {}",
                    if stats { "+stats" } else { "" },
                    sample.summary.split_once("accounting: ").map_or(
                        "no accounting in this binary",
                        |(_, a)| a.split("; alert").next().unwrap_or_default()
                    )
                );
            }
            all[i].push(sample);
        }
    }
    table::print_rows(&entries, all);
    Ok(())
}

/// Builds the `tcpwait` binary of commit `rev` in a worktree of its own under `target/bench/`
/// (reusing this checkout's bpf-linker), and returns its path. A second call for the same
/// commit only checks that the build is up to date.
pub fn build_baseline(root: &Path, rev: &str) -> Result<std::path::PathBuf> {
    let out = Command::new("git")
        .args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .current_dir(root)
        .output()
        .context("run git")?;
    if !out.status.success() {
        bail!("--baseline-rev {rev}: not a commit of this repository");
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let tree = root.join("target/bench/baseline").join(&commit[..12]);
    if !tree.join("Cargo.toml").exists() {
        let _ = std::fs::remove_dir_all(&tree);
        let status = Command::new("git")
            .args(["worktree", "add", "--detach", "--force"])
            .arg(&tree)
            .arg(&commit)
            .current_dir(root)
            .status()
            .context("run git worktree add")?;
        if !status.success() {
            bail!(
                "git worktree add {} {commit} failed: {status}",
                tree.display()
            );
        }
    }
    // The baseline's build finds bpf-linker where its own setup would put it.
    let build = tree.join(".build");
    if !build.exists() {
        std::os::unix::fs::symlink(root.join(".build"), &build).context("link .build")?;
    }
    println!(
        "building the baseline {rev} ({}) in {}",
        &commit[..12],
        tree.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--package", "tcpwait-agent"])
        .current_dir(&tree)
        .status()
        .context("build the baseline")?;
    if !status.success() {
        bail!("the baseline {rev} does not build: {status}");
    }
    Ok(tree.join("target/release/tcpwait"))
}
