//! Peer processes holding real sockets: this test executable re-executed in a "role" (see
//! [`role_main`]), each named with `prctl(PR_SET_NAME)` so its comm is distinct, and driven
//! line by line over stdin/stdout. The roles of the pending-connection and TIME_WAIT tests
//! live in `pending` and `tw`.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use super::{NetNs, pending, tw};

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

    /// The peer's process id.
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
pub(super) fn hold<T>(mut socks: Vec<T>, out: &mut std::io::Stdout) {
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
