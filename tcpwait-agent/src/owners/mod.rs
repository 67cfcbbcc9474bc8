//! Who holds a socket. The kernel event names a socket by its `struct sock` address and the
//! task on CPU, which is not its owner (DESIGN.md, "attribution trap"), so owners come from two
//! snapshots joined on the socket inode:
//! - [`diag`]: inet_diag (`NETLINK_SOCK_DIAG`) gives each socket's 4-tuple → inode, plus uid,
//!   queues, cookie and `tcp_info` (the tracker links records to its sockets by tuple);
//! - [`procs`]: `/proc/<pid>/fd` gives inode → the processes whose fd tables refer to it, with
//!   their comm, cmdline, cgroup and container, read once per process;
//! - [`cgroup`]: a process's cgroup paths → its container id, pod UID and runtime (pure).
//!
//! Resolution is lazy and batched: neither runs per event. The daemon's resolver thread calls
//! them when sockets enter a watched state without a known owner (at most every few hundred
//! ms) and for periodic reconciliation. Orphaned sockets (FIN_WAIT2 after close, TIME_WAIT)
//! have inode 0 and no holder.
pub mod cgroup;
pub mod diag;
pub mod netns;
pub mod procs;

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        io::Write as _,
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
        time::{Duration, Instant},
    };

    use super::{
        diag::{self, dump_tcp},
        procs::ProcScanner,
    };
    use crate::{event::TcpState, model::DiagSocket};

    /// A client whose peer closed: it sits in CLOSE_WAIT, held by this process.
    fn close_wait_client(ip: IpAddr) -> Option<(TcpListener, TcpStream)> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).ok()?;
        let client = TcpStream::connect(listener.local_addr().expect("bound")).expect("connect");
        let (mut accepted, _) = listener.accept().expect("accept");
        accepted.write_all(b"hello").expect("write");
        drop(accepted);
        Some((listener, client))
    }

    /// The dump's record of `client`, once its state is CLOSE_WAIT (on loopback the FIN is
    /// delivered within close(); the wait only guards against a slow softirq).
    fn find(client: &TcpStream) -> DiagSocket {
        let (local, peer) = (
            client.local_addr().expect("local"),
            client.peer_addr().expect("peer"),
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let dump = dump_tcp(&[TcpState::CloseWait]).expect("inet_diag dump");
            assert!(dump.iter().all(|d| d.state == TcpState::CloseWait));
            if let Some(d) = dump
                .into_iter()
                .find(|d| d.tuple.sport == local.port() && d.tuple.dport == peer.port())
            {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "{local} never reached CLOSE_WAIT"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    #[ignore = "needs root: real inet_diag"]
    fn a_real_close_wait_socket_is_held_by_this_process() {
        let me = procfs::process::Process::myself()
            .and_then(|p| p.stat())
            .expect("own stat");
        let mut scanner = ProcScanner::new("/proc");
        let mut clients = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
            clients.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        } else {
            eprintln!("skipping IPv6: no ::1 on this host");
        }
        for ip in clients {
            let (_listener, client) = close_wait_client(ip).expect("loopback listener");
            let d = find(&client);
            assert_eq!(d.tuple.saddr, ip);
            assert_eq!(d.tuple.daddr, ip);
            // 5 unread bytes + 1 for the FIN (idiag_rqueue counts sequence space).
            assert_eq!((d.recv_q, d.send_q), (6, 0));
            assert!(d.last_ack_recv_ms.is_some(), "tcp_info requested: {d:?}");
            assert_ne!(d.cookie, 0);
            let inode = rustix::fs::fstat(&client).expect("fstat").st_ino;
            assert_ne!(d.inode, 0);
            assert_eq!(d.inode, inode, "inet_diag's inode is the fd's socket inode");

            // The exact lookup (no dump) finds the same record, and nothing for a tuple
            // that does not exist.
            let socket = diag::open().expect("netlink socket");
            let exact = diag::lookup_on(&socket, &d.tuple, 7)
                .expect("lookup")
                .expect("found");
            assert_eq!(
                (exact.netns, exact.inode, exact.state, exact.cookie),
                (7, d.inode, TcpState::CloseWait, d.cookie)
            );
            let absent = crate::model::Tuple {
                dport: 1,
                ..d.tuple
            };
            assert_eq!(diag::lookup_on(&socket, &absent, 7).expect("lookup"), None);
            let holders = scanner.holders(&HashSet::from([d.inode]));
            let held = &holders[&d.inode];
            assert_eq!(held.len(), 1, "{held:?}");
            assert_eq!(held[0].key.pid, std::process::id());
            assert_eq!(held[0].key.start_ticks, me.starttime);
            assert!(!scanner.has_exited(held[0].key));
            let stats = scanner.last_scan();
            assert!(stats.processes > 1 && stats.fds > 0, "{stats:?}");
        }
    }
}
