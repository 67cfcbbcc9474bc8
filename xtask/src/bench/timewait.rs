//! `cargo xtask bench-timewait`: what counting TIME_WAIT sockets per peer costs at scale. In a
//! network namespace of its own (port range widened to 1024-65535), a load process makes
//! `--sockets` short connections (100,000 by default) to `--ports` local servers, closing each
//! itself first, so each leaves a TIME_WAIT socket for 60 s. `tcpwait run` (release build,
//! default configuration) is watched from before the load until the sockets have expired:
//! every 250 ms `tcpwait status --json` is timed (the issue asks for answers within 1 s
//! throughout), process start included, and so is the same request sent straight over the
//! API socket (the agent's own answer time), and the TIME_WAIT count, the census's own duration, the agent's CPU (all
//! threads, and its census thread) and RSS are read. One table; BENCHMARKS.md records it.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

const NETNS: &str = "tcpwait-bench-timewait";
const POLL: Duration = Duration::from_millis(250);
const TICKS_PER_S: f64 = 100.0;

/// `cargo xtask bench-timewait` arguments (`--role` is for the re-executed load process).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Short connections made, each leaving one TIME_WAIT socket.
    #[arg(long, default_value_t = 100_000)]
    pub sockets: usize,
    /// Server ports they are spread over (at most 64,512 TIME_WAIT sockets per peer).
    #[arg(long, default_value_t = 4)]
    pub ports: usize,
    #[arg(long, hide = true)]
    pub role: bool,
}

/// The entry point: the load role, or setup, release build and the bench.
pub fn main(root: &Path, a: Args) -> Result<()> {
    if a.ports == 0 || a.ports > 64 || a.sockets == 0 || a.sockets > 64_512 * a.ports {
        bail!("--sockets 1 ..= 64512 x --ports, --ports 1 ..= 64");
    }
    if a.role {
        return load(a.sockets, a.ports);
    }
    crate::setup::setup(root)?;
    crate::cargo(root, &["build", "--release", "--package", "tcpwait-agent"])?;
    let bin = root.join("target/release/tcpwait");
    let _ = Command::new("ip").args(["netns", "del", NETNS]).output();
    for args in [
        &["netns", "add", NETNS][..],
        &["-n", NETNS, "link", "set", "lo", "up"],
    ] {
        let ok = Command::new("ip").args(args).status().context("run ip")?;
        if !ok.success() {
            bail!("ip {args:?} failed");
        }
    }
    let _ns = Namespace;
    let sysctl = |k: &str, v: &str| {
        Command::new("ip")
            .args(["netns", "exec", NETNS, "sysctl", "-qw", &format!("{k}={v}")])
            .status()
    };
    sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    sysctl("net.ipv4.tcp_max_tw_buckets", "1000000")?;
    // Loopback connects may otherwise take over their own TIME_WAIT tuples (the default 2).
    sysctl("net.ipv4.tcp_tw_reuse", "0")?;
    println!("{}", super::machine());
    let sock = format!("/tmp/tcpwait-bench-timewait-{}.sock", std::process::id());
    let mut agent = Command::new(&bin)
        .args(["run", "--socket", &sock, "--metrics-listen", ""])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start tcpwait run")?;
    let mut err = BufReader::new(agent.stderr.take().context("agent stderr")?);
    let mut line = String::new();
    while !line.contains("agent running") {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("the agent exited before it was ready");
        }
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let pid = agent.id();
    std::thread::sleep(Duration::from_secs(6)); // one census of the idle host first
    let ns_inode = std::fs::metadata(format!("/run/netns/{NETNS}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .context("stat the namespace")?;
    let idle = sample(&bin, &sock, pid, ns_inode)?;
    let mut load = Command::new("ip")
        .args(["netns", "exec", NETNS])
        .arg(std::env::current_exe()?)
        .args(["bench-timewait", "--role", "--sockets"])
        .arg(a.sockets.to_string())
        .args(["--ports", &a.ports.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the load")?;
    let load_out = BufReader::new(load.stdout.take().context("load stdout")?);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in load_out.lines().map_while(Result::ok) {
            let _ = done_tx.send(l);
        }
    });
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut load_line = None;
    let mut peak = 0u64;
    // (agent, kernel) TIME_WAIT counts of the namespace, once settled after the load.
    let mut settled: Option<(u64, u64)> = None;
    let mut load_done: Option<Instant> = None;
    loop {
        let s = sample(&bin, &sock, pid, ns_inode)?;
        peak = peak.max(s.ns_tw);
        let expired = peak > 0 && s.ns_tw == 0;
        samples.push(s);
        if let Ok(l) = done_rx.try_recv() {
            load_line = Some(l);
            load_done = Some(Instant::now());
        }
        // Two censuses after the load, before the first socket expires: the agent's count
        // against the kernel's own (`ss -s`: the namespace's sockstat counter).
        if settled.is_none() && load_done.is_some_and(|t| t.elapsed() > Duration::from_secs(11)) {
            let agent_count = sample(&bin, &sock, pid, ns_inode)?.ns_tw;
            settled = Some((agent_count, kernel_time_wait()?));
        }
        if expired || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(POLL);
    }
    drop(load.stdin.take());
    let _ = load.wait();
    let last = samples.last().context("no sample")?;
    let secs = last.at.duration_since(idle.at).as_secs_f64();
    let cpu = (last.cpu - idle.cpu) as f64 / TICKS_PER_S / secs * 100.0;
    let census_cpu = (last.census_cpu - idle.census_cpu) as f64 / TICKS_PER_S / secs * 100.0;
    let at_peak: Vec<&Sample> = samples.iter().filter(|s| s.ns_tw == peak).collect();
    let host_peak = samples.iter().map(|s| s.tw).max().unwrap_or(0);
    let census_at_peak = at_peak.iter().map(|s| s.census_s).fold(0.0, f64::max);
    let census_max = samples.iter().map(|s| s.census_s).fold(0.0, f64::max);
    let slowest = samples
        .iter()
        .max_by(|a, b| a.status_s.total_cmp(&b.status_s))
        .context("no sample")?;
    let slowest_at = slowest.at.saturating_duration_since(started).as_secs_f64();
    let mut lat: Vec<f64> = samples.iter().map(|s| s.status_s).collect();
    lat.sort_by(f64::total_cmp);
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let mut answers: Vec<f64> = samples.iter().map(|s| s.answer_s).collect();
    answers.sort_by(f64::total_cmp);
    let over = |v: &[f64]| v.iter().filter(|&&x| x > 1.0).count();
    println!(
        "load: {} connections over {} ports from 127.0.0.1 (closed by the client first), {}",
        a.sockets,
        a.ports,
        load_line.as_deref().unwrap_or("load did not finish")
    );
    println!(
        "TIME_WAIT peak seen by the agent: {peak} in the bench's namespace, {host_peak} in all \
         (other traffic of the host included); census at the peak: {census_at_peak:.3} s (max \
         {census_max:.3} s over the run)"
    );
    if let Some((agent_count, kernel)) = settled {
        println!(
            "settled (2 censuses after the load): agent {agent_count}, kernel {kernel} (ss -s \
             in the namespace)"
        );
    }
    println!(
        "agent CPU over {secs:.0} s (load, then the sockets expiring): {cpu:.1} % of one core, \
         census thread {census_cpu:.1} %; RSS idle {} MiB, max {} MiB",
        idle.rss_kib / 1024,
        rss_max / 1024
    );
    println!(
        "status answers: {} polls, median {:.3} s, max {:.3} s, {} over 1 s ({slowest_at:.1} s \
         after the load started, {} TIME_WAIT in the namespace then); the agent's own answer \
         over its socket (no process start): median {:.3} s, max {:.3} s, {} over 1 s; host \
         load average {}",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() - 1],
        over(&lat),
        slowest.ns_tw,
        answers[answers.len() / 2],
        answers[answers.len() - 1],
        over(&answers),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = agent.wait();
    if lat[lat.len() - 1] > 1.0 {
        bail!("a status answer took more than 1 s");
    }
    Ok(())
}

/// The namespace's TIME_WAIT count as the kernel keeps it (`ss -s`, from sockstat).
fn kernel_time_wait() -> Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", NETNS, "ss", "-s"])
        .output()
        .context("run ss -s")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("timewait ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .context("no timewait count in ss -s")
}

struct Namespace;

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).output();
    }
}

struct Sample {
    at: Instant,
    /// `tcpwait status --json`, process start included.
    status_s: f64,
    /// The agent's answer over its socket.
    answer_s: f64,
    tw: u64,
    /// TIME_WAIT sockets of the bench's namespace (its peers in `status`).
    ns_tw: u64,
    census_s: f64,
    cpu: u64,
    census_cpu: u64,
    rss_kib: u64,
}

fn sample(bin: &Path, sock: &str, pid: u32, ns: u64) -> Result<Sample> {
    let t = Instant::now();
    let out = Command::new(bin)
        .args(["status", "--json", "--socket", sock])
        .output()
        .context("run tcpwait status")?;
    let status_s = t.elapsed().as_secs_f64();
    // The same request straight over the API socket: the agent's own answer time, without
    // starting a process (which, on a loaded host, is most of the command's time).
    let t = Instant::now();
    let mut api = std::os::unix::net::UnixStream::connect(sock).context("connect to the API")?;
    api.write_all(b"\"status\"\n")?;
    let mut answer = String::new();
    BufReader::new(&api).read_line(&mut answer)?;
    let answer_s = t.elapsed().as_secs_f64();
    if !answer.starts_with('{') {
        bail!("unexpected API answer: {answer}");
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("status --json")?;
    let (cpu, census_cpu) = cpu_ticks(pid)?;
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(Sample {
        at: Instant::now(),
        status_s,
        answer_s,
        tw: v["timewait"]["sockets"].as_u64().unwrap_or(0),
        ns_tw: v["timewait"]["peers"].as_array().map_or(0, |p| {
            p.iter()
                .filter(|p| p["netns"] == ns)
                .filter_map(|p| p["count"].as_u64())
                .sum()
        }),
        census_s: v["timewait"]["census_seconds"].as_f64().unwrap_or(0.0),
        cpu,
        census_cpu,
        rss_kib,
    })
}

/// utime + stime of the whole agent and of its census thread, in ticks.
fn cpu_ticks(pid: u32) -> Result<(u64, u64)> {
    let ticks = |stat: &str| -> Option<(String, u64)> {
        let (head, rest) = stat.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            head.split_once('(')?.1.to_owned(),
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let total = ticks(&stat).context("the agent has exited")?.1;
    let mut census = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let s = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        if let Some((comm, n)) = ticks(&s)
            && comm == "tcpwait-census"
        {
            census += n;
        }
    }
    Ok((total, census))
}

/// The load: `ports` servers that read each connection to EOF before closing it, and one
/// client that connects and closes first, `n` times, round robin over the servers.
fn load(n: usize, ports: usize) -> Result<()> {
    let mut addrs = Vec::new();
    for _ in 0..ports {
        let l = TcpListener::bind("127.0.0.1:0").context("bind")?;
        // std's backlog (128) overflows under a burst: raise it (capped by somaxconn).
        // SAFETY: listen(2) on a socket this process owns.
        unsafe { listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
        addrs.push(l.local_addr()?);
        std::thread::spawn(move || {
            for mut c in l.incoming().map_while(Result::ok) {
                let mut b = [0u8; 16];
                while matches!(c.read(&mut b), Ok(k) if k > 0) {}
            }
        });
    }
    let t = Instant::now();
    for i in 0..n {
        drop(TcpStream::connect(addrs[i % ports]).context("connect")?);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "made in {:.1} s", t.elapsed().as_secs_f64())?;
    out.flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut sink);
    Ok(())
}

unsafe extern "C" {
    fn listen(fd: i32, backlog: i32) -> i32;
}
