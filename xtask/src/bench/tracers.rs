//! The tracer modes' processes: starting and stopping tcpwait (`trace`, `run`) and the bpftrace
//! floor, and reading what they count (outputs, daemon counters, /proc, BPF run statistics).
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The count-only program of the `floor` mode, for bpftrace (whose 0.17 knows no raw
/// tracepoints): the cost of the classic tracepoint and of running any program at all.
const FLOOR_PROGRAM: &str = "tracepoint:sock:inet_sock_set_state { @n = count(); }";

pub(super) fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

pub(super) fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (run_time_ns of every program `pid` holds, raw tracepoints (prog_type 17: the flush
/// program, an older build's rescue program) aside; run_cnt and recursion_misses of its main
/// program). A program loaded but not attached (a fallback) adds nothing.
pub(super) fn bpf_stats(pid: u32) -> (u64, u64, u64) {
    // Every program attached to the tracepoint sees every hit of its window (it runs or is
    // skipped as nested): the main program, attached first and detached last, has the widest
    // window, so its runs plus misses are the hits; the rescue program's run time counts too.
    let mut run_time = 0;
    let mut main = (0, 0);
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0, 0);
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
        run_time += get("run_time_ns:");
        let this = (get("run_cnt:"), get("recursion_misses:"));
        if this.0 + this.1 > main.0 + main.1 {
            main = this;
        }
    }
    (run_time, main.0, main.1)
}

pub(super) struct Agent {
    pub(super) child: Child,
    pub(super) out: Option<std::path::PathBuf>,
    pub(super) sock: Option<String>,
    /// The agent's last line on stderr after the ready line, read until it exits.
    pub(super) stderr: Option<std::thread::JoinHandle<Option<String>>>,
}

impl Agent {
    /// Interrupts the tracer (SIGINT) and waits for it to exit.
    pub(super) fn interrupt(&mut self) {
        // SAFETY: signal our own child.
        unsafe { libc_kill(self.child.id() as i32, 2) };
        let _ = self.child.wait();
    }
}

/// The default rules plus fin_wait2_held (mode `run-fw2`).
const FIN_WAIT2_CONFIG: &str = r#"
[[rules]]
name = "close_wait_leak"
state = "CLOSE_WAIT"
age = "60s"
count = 100

[[rules]]
name = "time_wait_pileup"
state = "TIME_WAIT"
scope = "peer"
share = 0.5

[[rules]]
name = "fin_wait2_held"
state = "FIN_WAIT2"
age = "60s"
"#;

pub(super) fn start(bin: &Path, mode: &str, dir: &Path, run: usize) -> Result<Agent> {
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
            let mut args: Vec<String> = vec![
                "run".into(),
                "--socket".into(),
                sock.clone(),
                "--metrics-listen".into(),
                String::new(),
            ];
            if mode == "run-fw2" {
                let config = dir.join("fin-wait2.toml");
                std::fs::write(&config, FIN_WAIT2_CONFIG).context("write the run-fw2 config")?;
                args.extend(["--config".into(), config.display().to_string()]);
            }
            (args, None, Some(sock))
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
        // Whether it exited is asked first, so that what it wrote before is all in the file.
        let exited = child.try_wait()?;
        let timed_out = Instant::now() > deadline;
        if exited.is_none() && timed_out {
            let _ = child.kill();
            let _ = child.wait();
        }
        if exited.is_some() || timed_out {
            let text = std::fs::read_to_string(&err).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            // The last error bpftrace printed (the first can be a harmless RLIMIT_MEMLOCK one).
            let why = lines
                .iter()
                .rev()
                .find(|l| l.contains("ERROR"))
                .or(lines.last())
                .copied()
                .unwrap_or("no message");
            match exited {
                Some(st) => bail!("bpftrace exited ({st}) before attaching: {why}"),
                None => bail!("bpftrace did not attach within 30 s (stopped): {why}"),
            }
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
pub(super) fn floor_count(out: &Path) -> u64 {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("@n: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

pub(super) fn transitions_seen(bin: &Path, sock: &str) -> u64 {
    counter_of(bin, sock, "transitions")
}

/// A counter of the daemon's `status --json` report.
pub(super) fn counter_of(bin: &Path, sock: &str, key: &str) -> u64 {
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
pub(super) fn agent_lost(summary: &str) -> u64 {
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

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
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
