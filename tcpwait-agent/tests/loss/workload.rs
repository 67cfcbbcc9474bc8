//! The loss tests' workload: `n` connections the server closes first, from one or two client
//! threads, on one namespace's loopback or across a veth pair between two namespaces; and the
//! wait for its last transitions.
use std::{os::fd::AsRawFd as _, process::Command, sync::Arc, time::Duration};

use super::common::{NetNs, under_emulation, wait_until};

/// Connections per run: 10 transitions each, so ≥ 1M transitions on the host. Under the
/// kernel matrix's software emulation (`tcpwait.vm` on the guest's command line) a smaller
/// run, which still nests transitions (DESIGN.md, "Kernel matrix").
pub fn connections() -> usize {
    if under_emulation() { 10_000 } else { 100_000 }
}

/// Where the workload's two ends live.
#[derive(Clone, Copy, Debug)]
pub enum Path {
    /// One namespace, both ends on its loopback.
    Loopback,
    /// The server in one namespace, clients in another, joined by a veth pair.
    Veth,
}

/// The namespaces of a workload, and the server's address.
pub struct Topology {
    pub server: NetNs,
    pub client: Option<NetNs>,
    pub addr: &'static str,
}

impl Topology {
    /// Builds `path`'s namespaces; `None` (printed) where the kernel has no veth links.
    pub fn new(path: Path) -> Option<Self> {
        let server = NetNs::new("loss-s");
        tune(&server);
        match path {
            Path::Loopback => Some(Self {
                server,
                client: None,
                addr: "127.0.0.1",
            }),
            Path::Veth => {
                let client = NetNs::new("loss-c");
                tune(&client);
                let peer = format!("netns {}", client.name);
                let mut args = vec!["link", "add", "lv0", "type", "veth", "peer", "name", "lv1"];
                args.extend(peer.split(' '));
                if let Err(e) = server.try_ip(&args) {
                    // The kernel-matrix VMs boot without the veth module.
                    eprintln!("SKIPPED: this kernel has no veth links ({e})");
                    return None;
                }
                server.ip(&["addr", "add", "10.77.0.1/24", "dev", "lv0"]);
                server.ip(&["link", "set", "lv0", "up"]);
                client.ip(&["addr", "add", "10.77.0.2/24", "dev", "lv1"]);
                client.ip(&["link", "set", "lv1", "up"]);
                Some(Self {
                    server,
                    client: Some(client),
                    addr: "10.77.0.1",
                })
            }
        }
    }

    pub fn client_ns(&self) -> &NetNs {
        self.client.as_ref().unwrap_or(&self.server)
    }

    /// The namespaces' inode numbers: the `netns` of the workload's transitions.
    pub fn inodes(&self) -> Vec<u64> {
        let mut v = vec![self.server.inode()];
        v.extend(self.client.as_ref().map(NetNs::inode));
        v
    }
}

/// A namespace's TCP settings for 100,000 connections in seconds: the whole port range for the
/// clients, and the server's TIME_WAIT sockets (it closes first) reusable by a new SYN.
pub fn tune(ns: &NetNs) {
    // Written from a thread inside the namespace: a net sysctl file is the namespace of the
    // task that opens it (and the kernel matrix's guests have no `sysctl` binary).
    let path = ns.path();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns on an fd this thread owns; only this thread moves.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        for (key, value) in [
            ("net/ipv4/ip_local_port_range", "1024 65535"),
            ("net/ipv4/tcp_max_tw_buckets", "1000000"),
            ("net/core/somaxconn", "4096"),
        ] {
            std::fs::write(format!("/proc/sys/{key}"), value)
                .unwrap_or_else(|e| panic!("write {key} in {}: {e}", path.display()));
        }
    })
    .join()
    .expect("tune the namespace");
}

/// Moves the calling thread into `ns` (only this thread: `setns` is per thread).
pub fn enter(ns: &NetNs) {
    let f = std::fs::File::open(ns.path()).expect("open the namespace");
    // SAFETY: setns on an fd this function owns.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

/// `n` connections from `threads` client threads to a listener that closes each one first:
/// 10 transitions per connection and 2 for the listener.
pub fn churn(topo: &Arc<Topology>, n: usize, threads: usize) {
    let t = topo.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let acceptor = std::thread::spawn(move || {
        enter(&t.server);
        let listener = std::net::TcpListener::bind((t.addr, 0)).expect("bind");
        // SAFETY: listen again on our socket, with the backlog the burst needs.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        tx.send(listener.local_addr().expect("addr"))
            .expect("send addr");
        for _ in 0..n {
            drop(listener.accept().expect("accept"));
        }
    });
    let addr = rx.recv().expect("listener address");
    let clients: Vec<_> = (0..threads)
        .map(|i| {
            let t = topo.clone();
            let share = n / threads + usize::from(i < n % threads);
            std::thread::spawn(move || {
                use std::io::Read as _;
                enter(t.client_ns());
                for _ in 0..share {
                    let mut s = std::net::TcpStream::connect(addr).expect("connect");
                    // EOF: the server closed first; then this side closes.
                    assert_eq!(s.read(&mut [0u8; 1]).expect("read"), 0);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    acceptor.join().expect("acceptor");
}

/// Waits until the workload's last transitions have run: a client's LAST_ACK → CLOSE and the
/// server's FIN_WAIT2 → CLOSE follow its `close()` when the peer's segment arrives, after the
/// client thread has returned. Only TIME_WAIT sockets (no transitions left) may remain.
pub fn settle(topo: &Topology) {
    let left = |ns: &NetNs| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "ss",
                "-Htan",
                "exclude",
                "time-wait",
            ])
            .output()
            .expect("run ss");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let all_left = || {
        let mut s = left(&topo.server);
        if let Some(c) = &topo.client {
            s.push_str(&left(c));
        }
        s
    };
    // A segment dropped under load (a full socket backlog) costs a retransmission timeout,
    // seconds with backoff, before the last connections close.
    let settled = wait_until(Duration::from_secs(30), || all_left().is_empty());
    if !settled {
        let left = all_left();
        let n = left.lines().count();
        let first: Vec<&str> = left.lines().take(5).collect();
        panic!("the workload's sockets did not close: {n} left, first {first:?}");
    }
}
