//! Test support: real peer processes holding real sockets, the real `tcpwait` binary, and
//! bounded polls.
//!
//! Peer processes are this test executable re-executed in a "role" (see [`role_main`]): each
//! names itself with `prctl(PR_SET_NAME)` so its comm is distinct, and is driven line by line
//! over stdin/stdout.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
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
pub use serde_json::Value;

#[allow(
    unused_imports,
    reason = "each test binary uses a different part of this module"
)]
pub use clock::*;

pub mod alertmanager;
pub mod clock;
pub mod kernel;
pub mod netns;
mod pending;
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
    pub fn spawn_reader(&self, r: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("lines lock").push(line);
            }
        });
    }

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

/// A peer process (server or client role) driven over stdin/stdout.
pub struct Peer {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts this test executable in `role` with `args`, named `comm`.
    pub fn spawn(role: &str, comm: &str, args: &[String]) -> Self {
        Self::spawn_in(None, role, comm, args)
    }

    /// [`Peer::spawn`], in network namespace `netns` (the host's if `None`).
    pub fn spawn_in(netns: Option<&NetNs>, role: &str, comm: &str, args: &[String]) -> Self {
        let exe = std::env::current_exe().expect("test executable path");
        let mut cmd = Command::new(exe);
        // Open in the parent, kept open until the child has entered the namespace.
        let ns_file = netns.map(|ns| {
            std::fs::File::open(ns.path())
                .unwrap_or_else(|e| panic!("open {}: {e}", ns.path().display()))
        });
        if let Some(f) = &ns_file {
            let fd = std::os::fd::AsRawFd::as_raw_fd(f);
            // SAFETY: setns is async-signal-safe, and only reads an fd the parent opened.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd
            .args([
                "--exact",
                "common_role_entry",
                "--nocapture",
                "--include-ignored",
            ])
            .env("TCPWAIT_TEST_ROLE", role)
            .env("TCPWAIT_TEST_COMM", comm)
            .env("TCPWAIT_TEST_ARGS", args.join(" "))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn peer");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads lines until one starts with `prefix`; returns the rest of it.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read peer stdout");
            assert!(n > 0, "peer exited before printing {prefix:?}");
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Sends one command line.
    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write peer stdin");
        self.stdin.flush().expect("flush peer stdin");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server peer: listens on `addr` (port 0 = any), accepts `n` connections and closes each
/// accepted socket at once; prints `port <P>` when listening and `accepted <n>` when done.
pub fn server(comm: &str, addr: &str, n: usize) -> (Peer, u16) {
    server_in(None, comm, addr, n)
}

/// [`server`], in network namespace `netns` (the host's if `None`).
pub fn server_in(netns: Option<&NetNs>, comm: &str, addr: &str, n: usize) -> (Peer, u16) {
    let mut p = Peer::spawn_in(netns, "server", comm, &[addr.to_owned(), n.to_string()]);
    let port = p.expect_line("port").parse().expect("port number");
    (p, port)
}

/// A client peer: connects `n` sockets to `addr`, prints `connected <local ports…>`, holds them
/// until told `close`, then closes them and prints `closed`.
pub fn client(comm: &str, addr: SocketAddr, n: usize) -> (Peer, Vec<u16>) {
    client_in(None, comm, addr, n)
}

/// [`client`], in network namespace `netns` (the host's if `None`).
pub fn client_in(
    netns: Option<&NetNs>,
    comm: &str,
    addr: SocketAddr,
    n: usize,
) -> (Peer, Vec<u16>) {
    let mut p = Peer::spawn_in(netns, "client", comm, &[addr.to_string(), n.to_string()]);
    let ports = p
        .expect_line("connected")
        .split_whitespace()
        .map(|s| s.parse().expect("port number"))
        .collect();
    (p, ports)
}

/// A leaking client: `n` sockets in CLOSE_WAIT, owned by a process named `comm`.
pub fn leak(comm: &str, n: usize) -> (Peer, Peer) {
    let (mut srv, port) = server("tw-server", "127.0.0.1:0", n);
    let (cli, _) = client(comm, format!("127.0.0.1:{port}").parse().expect("addr"), n);
    srv.expect_line("accepted");
    (srv, cli)
}

/// Entry point of a peer role, called by each test binary's `common_role_entry` test.
pub fn role_main() {
    let Ok(role) = std::env::var("TCPWAIT_TEST_ROLE") else {
        return;
    };
    let comm = std::env::var("TCPWAIT_TEST_COMM").expect("role has a comm");
    // The process's comm (what /proc/<pid>/stat shows) is its main thread's; this code runs
    // in a test thread, whose name is what the kernel reports for syscalls made here.
    std::fs::write("/proc/self/comm", &comm).expect("name the process");
    let cname = std::ffi::CString::new(comm).expect("comm has no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes by the kernel).
    unsafe { libc::prctl(libc::PR_SET_NAME, cname.as_ptr()) };
    let args: Vec<String> = std::env::var("TCPWAIT_TEST_ARGS")
        .expect("role has args")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    // Peers may hold thousands of sockets: raise the soft fd limit to the hard one.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    match role.as_str() {
        "server" => {
            let listener = TcpListener::bind(args[0].as_str()).expect("bind");
            // std listens with a backlog of 128: a burst of connections would overflow the
            // accept queue, the kernel would drop handshake ACKs and retransmit for seconds.
            // listen() again raises the backlog (capped by net.core.somaxconn, 4096).
            // SAFETY: listen on a socket fd this process owns.
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
            let n: usize = args[1].parse().expect("count");
            writeln!(out, "port {}", listener.local_addr().expect("addr").port()).expect("out");
            out.flush().expect("flush");
            for _ in 0..n {
                let (s, _) = listener.accept().expect("accept");
                drop(s);
            }
            writeln!(out, "accepted {n}").expect("out");
            out.flush().expect("flush");
            // Keep the listener until told to stop (or stdin closes).
            for line in stdin.lock().lines() {
                if line.map(|l| l == "exit").unwrap_or(true) {
                    break;
                }
            }
        }
        "client" => {
            let addr: SocketAddr = args[0].parse().expect("addr");
            let n: usize = args[1].parse().expect("count");
            let socks: Vec<TcpStream> = (0..n)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            let ports: Vec<String> = socks
                .iter()
                .map(|s| s.local_addr().expect("addr").port().to_string())
                .collect();
            writeln!(out, "connected {}", ports.join(" ")).expect("out");
            out.flush().expect("flush");
            hold(socks, &mut out);
        }
        "client_bound" => {
            // Like "client", each socket bound to local port `lport + i` first, so two
            // namespaces can hold the very same 4-tuples.
            let addr: SocketAddr = args[0].parse().expect("addr");
            let n: usize = args[1].parse().expect("count");
            let lport: u16 = args[2].parse().expect("local port");
            let socks: Vec<TcpStream> = (0..n)
                .map(|i| bound_connect(lport + i as u16, addr))
                .collect();
            writeln!(out, "connected {n}").expect("out");
            out.flush().expect("flush");
            hold(socks, &mut out);
        }
        "connect_pending" => {
            // `n` non-blocking connects to `addr`, whose SYNs go unanswered: the sockets stay in
            // SYN_SENT (retransmitting) until told `close`.
            let addr: SocketAddr = args[0].parse().expect("addr");
            let n: usize = args[1].parse().expect("count");
            let socks: Vec<std::os::fd::OwnedFd> = (0..n).map(|_| pending::connect(addr)).collect();
            writeln!(out, "connecting {n}").expect("out");
            out.flush().expect("flush");
            hold(socks, &mut out);
        }
        "forker" => {
            // One socket, then fork: parent and child both hold it.
            let addr: SocketAddr = args[0].parse().expect("addr");
            let sock = TcpStream::connect(addr).expect("connect");
            // SAFETY: the child only calls async-signal-safe functions (prctl, pause, _exit).
            let child = unsafe { libc::fork() };
            if child == 0 {
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    loop {
                        libc::pause();
                    }
                }
            }
            let port = sock.local_addr().expect("addr").port();
            writeln!(out, "connected {port} child {child}").expect("out");
            out.flush().expect("flush");
            for line in stdin.lock().lines() {
                if line.map(|l| l == "exit").unwrap_or(true) {
                    break;
                }
            }
            // SAFETY: kill the forked child we own.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
        other if pending::role(other, &args, &mut out) => {}
        other if tw::role(other, &args, &mut out) => {}
        other => panic!("unknown role {other}"),
    }
    std::process::exit(0);
}

/// Holds `socks` until stdin says `close` (then closes them and prints `closed`) or `exit`.
fn hold<T>(mut socks: Vec<T>, out: &mut std::io::Stdout) {
    for line in std::io::stdin().lock().lines() {
        match line.as_deref() {
            Ok("close") => {
                socks.clear();
                writeln!(out, "closed").expect("out");
                out.flush().expect("flush");
            }
            Ok("exit") | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// An IPv4 TCP socket bound to 127.0.0.1:`lport`, connected to `addr`.
fn bound_connect(lport: u16, addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket calls on an fd this function owns until it is handed to TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = |port: u16, ip: std::net::Ipv4Addr| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        let local = sin(lport, std::net::Ipv4Addr::LOCALHOST);
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&raw const local).cast(), len),
            0,
            "bind 127.0.0.1:{lport}: {}",
            std::io::Error::last_os_error()
        );
        let remote = sin(v4.port(), *v4.ip());
        assert_eq!(
            libc::connect(fd, (&raw const remote).cast(), len),
            0,
            "connect {addr} from {lport}: {}",
            std::io::Error::last_os_error()
        );
        TcpStream::from_raw_fd(fd)
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

/// Records of one socket (by local port and remote port), in order.
pub fn of_socket(records: &[Value], sport: u16, dport: u16) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["sport"] == sport && r["dport"] == dport)
        .cloned()
        .collect()
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
