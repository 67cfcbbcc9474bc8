//! Peer roles for the TIME_WAIT and port tests: a server that closes only after its client
//! did (so the client is the active closer and holds the TIME_WAIT socket), a client that
//! makes short connections from a chosen local address, a server that holds what it
//! accepts until it is killed, and a client that closes as soon as it reads EOF.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
};

/// Runs role `name` if it is one of these; false otherwise.
pub fn role(name: &str, args: &[String], out: &mut std::io::Stdout) -> bool {
    match name {
        // Accepts forever; reads each connection to EOF (the client's FIN) before closing it.
        "eof_server" => {
            let listener = listen(&args[0]);
            print(
                out,
                &format!("port {}", listener.local_addr().expect("addr").port()),
            );
            loop {
                let (mut s, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
        }
        // `n` connections from `local` (port chosen by the kernel) to `addr`, each closed at
        // once by this process: the active close, so the TIME_WAIT socket is ours.
        "short_client" => {
            let addr: SocketAddr = args[0].parse().expect("addr");
            let local: Ipv4Addr = args[1].parse().expect("local IPv4 address");
            let n: usize = args[2].parse().expect("count");
            for _ in 0..n {
                drop(connect_from(local, addr));
            }
            print(out, &format!("closed {n}"));
            hold_until_exit();
        }
        // Accepts `n` connections and holds them until killed.
        "holding_server" => {
            let listener = listen(&args[0]);
            let n: usize = args[1].parse().expect("count");
            print(
                out,
                &format!("port {}", listener.local_addr().expect("addr").port()),
            );
            let held: Vec<TcpStream> = (0..n)
                .map(|_| listener.accept().expect("accept").0)
                .collect();
            print(out, &format!("accepted {}", held.len()));
            hold_until_exit();
        }
        // `n` connections to `addr`; each is closed as soon as it reads EOF.
        "eof_client" => {
            let addr: SocketAddr = args[0].parse().expect("addr");
            let n: usize = args[1].parse().expect("count");
            let socks: Vec<TcpStream> = (0..n)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            print(out, "connected");
            for mut s in socks {
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
            print(out, "closed");
            hold_until_exit();
        }
        _ => return false,
    }
    true
}

fn listen(addr: &str) -> TcpListener {
    let listener = TcpListener::bind(addr).expect("bind");
    // SAFETY: listen on a socket fd this process owns (a backlog for bursts; see "server").
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    listener
}

fn print(out: &mut std::io::Stdout, line: &str) {
    writeln!(out, "{line}").expect("out");
    out.flush().expect("flush");
}

fn hold_until_exit() {
    use std::io::BufRead as _;
    for line in std::io::stdin().lock().lines() {
        if line.map(|l| l == "exit").unwrap_or(true) {
            break;
        }
    }
}

/// A TCP socket bound to `local`:0 (the kernel picks an ephemeral port), connected to `addr`.
fn connect_from(local: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on an fd this function owns until TcpStream takes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let l = sin(local, 0);
        assert_eq!(
            libc::bind(fd, (&raw const l).cast(), len),
            0,
            "bind {local}:0: {}",
            std::io::Error::last_os_error()
        );
        let r = sin(*v4.ip(), v4.port());
        assert_eq!(
            libc::connect(fd, (&raw const r).cast(), len),
            0,
            "connect {addr}: {}",
            std::io::Error::last_os_error()
        );
        TcpStream::from_raw_fd(fd)
    }
}
