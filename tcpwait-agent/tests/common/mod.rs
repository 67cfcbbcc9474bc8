//! Test support: real peer processes holding real sockets (`peers`), the real `tcpwait`
//! binary, and bounded polls.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[allow(
    unused_imports,
    reason = "each test binary uses a different part of this module"
)]
pub use kernel::*;
#[allow(
    unused_imports,
    reason = "each test binary uses a different part of this module"
)]
pub use netns::{NetNs, netns_inode};
pub use peers::*;
pub use serde_json::Value;

#[allow(
    unused_imports,
    reason = "each test binary uses a different part of this module"
)]
pub use clock::*;
#[allow(
    unused_imports,
    reason = "each test binary uses a different part of this module"
)]
pub use connections::*;

pub mod alertmanager;
pub mod clock;
mod connections;
pub mod kernel;
pub mod netns;
mod peers;
mod pending;
pub mod tpcount;
mod tw;
pub mod webhook;

/// The `tcpwait` binary built by cargo for this test run.
pub const TCPWAIT: &str = env!("CARGO_BIN_EXE_tcpwait");

/// Whether this runs in the kernel matrix's software emulation (`tcpwait.vm` on the guest's
/// command line), where everything takes several times longer (DESIGN.md, "Kernel matrix").
pub fn under_emulation() -> bool {
    static VM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VM.get_or_init(|| {
        std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.contains("tcpwait.vm"))
    })
}

/// How much longer a bounded wait may take under emulation: `tcpwait trace` starts in 0.1 s
/// on the host and in 17 s on Debian's 6.1 under TCG.
pub const EMULATION_SLOWDOWN: u32 = 6;

/// `d`, or `d` × [`EMULATION_SLOWDOWN`] under emulation: the bound of every poll here.
pub fn scaled(d: Duration) -> Duration {
    if under_emulation() {
        d * EMULATION_SLOWDOWN
    } else {
        d
    }
}

/// The daemon's table for `netns` (the API's `table` request): `(state, local, remote)` of
/// every socket it tracks there.
pub fn table(sock: &str, netns: u64) -> std::collections::BTreeSet<(String, String, String)> {
    use std::io::Write as _;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect API");
    writeln!(s, "{{\"table\":{{\"netns\":{netns}}}}}").expect("request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("answer");
    let v: Value = serde_json::from_str(&line).expect("JSON answer");
    v["sockets"]
        .as_array()
        .unwrap_or_else(|| panic!("no sockets: {v}"))
        .iter()
        .map(|s| {
            let f = |k: &str| s[k].as_str().expect("field").to_owned();
            (f("state"), f("local"), f("remote"))
        })
        .collect()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes ([`scaled`] under emulation);
/// returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Panics unless this runs as root: privileged tests need the real kernel program.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged test: run as root (cargo xtask test does, in CI)"
    );
}

/// Lines a child writes, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    /// Collects the lines of `r` from a thread of their own until it closes.
    pub fn spawn_reader(&self, r: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("lines lock").push(line);
            }
        });
    }

    /// The lines collected so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().expect("lines lock").clone()
    }

    /// Waits until some line contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.snapshot().iter().any(|l| l.contains(needle))
        })
    }
}

/// A running `tcpwait` process with its stdout and stderr collected.
pub struct Tcpwait {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Tcpwait {
    /// Starts `tcpwait <args>` and waits until it says it is tracing.
    pub fn start(args: &[&str], ready: &str) -> Self {
        Self::start_with_env(args, &[], ready)
    }

    /// [`Tcpwait::start`] with environment variables set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)], ready: &str) -> Self {
        let mut child = Command::new(TCPWAIT)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpwait");
        let (stdout, stderr) = (Lines::default(), Lines::default());
        stdout.spawn_reader(child.stdout.take().expect("piped stdout"));
        stderr.spawn_reader(child.stderr.take().expect("piped stderr"));
        let mut me = Self {
            child,
            stdout,
            stderr,
        };
        if !me.stderr.wait_for(ready, Duration::from_secs(20)) {
            let _ = me.child.kill();
            panic!(
                "tcpwait did not get ready; stderr: {:?}",
                me.stderr.snapshot()
            );
        }
        me
    }

    /// stdout lines parsed as JSON (panics on a line that is not).
    pub fn json(&self) -> Vec<Value> {
        self.stdout
            .snapshot()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Sends a signal and waits (bounded) for exit; returns the exit code.
    pub fn stop(&mut self, signal: i32) -> i32 {
        // SAFETY: kill with a valid pid and signal number.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait tcpwait") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "tcpwait did not exit after signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tcpwait {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port: bound once by the test, then released for a server.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A unique API socket path for one test.
pub fn api_socket(name: &str) -> String {
    format!("/tmp/tcpwait-test-{}-{name}.sock", std::process::id())
}

/// Runs `tcpwait status --json` against `socket` and parses the report.
pub fn status(socket: &str) -> Value {
    let out = std::process::Command::new(TCPWAIT)
        .args(["status", "--json", "--socket", socket])
        .output()
        .expect("run tcpwait status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// The status entry of process `pid`, if listed.
pub fn process_in(status: &Value, pid: u32) -> Option<Value> {
    status["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"] == pid)
        .cloned()
}

/// `OLD>NEW` strings of records.
pub fn edges(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            format!(
                "{}>{}",
                r["old"].as_str().expect("old"),
                r["new"].as_str().expect("new")
            )
        })
        .collect()
}

/// What `tcpwait run` prints once it is attached and serving.
pub const AGENT_READY: &str = "agent running";

/// `tcpwait run --json` serving its API on `socket`, with `extra` flags.
pub fn daemon(socket: &str, extra: &[&str]) -> Tcpwait {
    // No metrics endpoint: tests run in parallel and would share the default port.
    let mut args = vec!["run", "--json", "--socket", socket, "--metrics-listen", ""];
    args.extend_from_slice(extra);
    Tcpwait::start(&args, AGENT_READY)
}

/// Alert lines (JSON) the daemon printed about this test's own peers. The agent sees every
/// process of the host, in every network namespace: a leak elsewhere on the machine (another
/// test run, a benchmark) must not count as this test's. Peers are this test executable
/// re-executed (`Peer::spawn`), which their command line says.
pub fn alerts(tw: &Tcpwait) -> Vec<Value> {
    tw.json()
        .into_iter()
        .filter(|v| v.get("alert").is_some() && is_mine(v))
        .collect()
}

/// Whether an alert or status entry (with a `cmdline`) names one of this test's peers.
pub fn is_mine(v: &Value) -> bool {
    let exe = std::env::current_exe().expect("test executable path");
    v["cmdline"]
        .as_str()
        .is_some_and(|c| c.starts_with(&*exe.to_string_lossy()))
}
