//! A connect() that never completes, for rules on SYN_SENT: the socket is created non-blocking
//! and its connect() left in progress.
use std::net::SocketAddr;

/// An IPv4 TCP socket whose non-blocking connect() to `addr` is under way (EINPROGRESS).
pub fn connect(addr: SocketAddr) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket calls on an fd this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let remote = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let r = libc::connect(fd, (&raw const remote).cast(), len);
        let err = std::io::Error::last_os_error();
        assert!(
            r == -1 && err.raw_os_error() == Some(libc::EINPROGRESS),
            "connect {addr}: expected EINPROGRESS, got {r} ({err})"
        );
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

/// Roles for FIN_WAIT2 held by its owner: `server_hold ADDR N` accepts `N` connections and
/// holds them, never reading or closing (its ends go to CLOSE_WAIT); `half_close ADDR N`
/// connects `N` sockets and shuts down their write side (`shutdown(SHUT_WR)`), holding the fds
/// (FIN_WAIT2 that never ends). Both close on `close`. Returns false for another role.
pub fn role(role: &str, args: &[String], out: &mut std::io::Stdout) -> bool {
    use std::{
        io::Write as _,
        net::{Shutdown, TcpListener, TcpStream},
    };
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let socks: Vec<TcpStream> = match role {
        "server_hold" => {
            let listener = TcpListener::bind(args[0].as_str()).expect("bind");
            writeln!(out, "port {}", listener.local_addr().expect("addr").port()).expect("out");
            out.flush().expect("flush");
            let socks = (0..n)
                .map(|_| listener.accept().expect("accept").0)
                .collect();
            writeln!(out, "accepted {n}").expect("out");
            socks
        }
        "half_close" => {
            let addr: SocketAddr = args[0].parse().expect("addr");
            let socks: Vec<TcpStream> = (0..n)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            for s in &socks {
                s.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
            }
            let ports: Vec<String> = socks
                .iter()
                .map(|s| s.local_addr().expect("addr").port().to_string())
                .collect();
            writeln!(out, "half-closed {}", ports.join(" ")).expect("out");
            socks
        }
        _ => return false,
    };
    out.flush().expect("flush");
    super::hold(socks, out);
    true
}
