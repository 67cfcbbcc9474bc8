//! The peer roles of the abort tests: a login server that answers more than its client can
//! take and aborts (`SO_LINGER {1, 0}`), its client, and a request server that closes with the
//! request unread, or reads it first. Each prints what it measured with `SIOCOUTQ`/`SIOCINQ`
//! just before `close()`. Other roles go to `common::role_main`.
use std::{
    io::{BufRead, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

/// Runs this process's role, if it is one.
pub fn role_main() {
    let Ok(role) = std::env::var("TCPWAIT_TEST_ROLE") else {
        return;
    };
    if !role.starts_with("rst_") {
        return super::common::role_main();
    }
    let comm = std::env::var("TCPWAIT_TEST_COMM").expect("role has a comm");
    std::fs::write("/proc/self/comm", &comm).expect("name the process");
    let cname = std::ffi::CString::new(comm).expect("comm has no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string; the syscalls of this thread (the
    // test thread) are what the kernel attributes to this name.
    unsafe { libc::prctl(libc::PR_SET_NAME, cname.as_ptr()) };
    let args: Vec<String> = std::env::var("TCPWAIT_TEST_ARGS")
        .expect("role has args")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    match role.as_str() {
        "rst_login_server" => login_server(args[0].parse().expect("count")),
        "rst_login_client" => login_client(args[0].parse().expect("port")),
        "rst_request_server" => request_server(args[0] == "unread"),
        "rst_request_client" => request_client(args[0].parse().expect("port")),
        other => panic!("unknown role {other}"),
    }
    std::process::exit(0);
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("flush");
}

/// `ioctl(fd, req)` as an int: `SIOCOUTQ` (= `TIOCOUTQ`) or `SIOCINQ` (= `FIONREAD`).
fn queue(s: &TcpStream, req: libc::Ioctl) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: the ioctl writes one int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), req, &raw mut n) };
    assert_eq!(r, 0, "ioctl: {}", std::io::Error::last_os_error());
    u64::try_from(n).expect("non-negative")
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a `struct linger`.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

fn listen() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    say(&format!("port {}", l.local_addr().expect("addr").port()));
    l
}

/// Accepts `n` logins; answers each with as much as the send buffer takes (far more than the
/// client's window), waits until the send queue stops moving (the client's window is shut: it
/// does not read), then aborts: `SO_LINGER {1, 0}`, `SIOCOUTQ`, `close()`.
fn login_server(n: usize) {
    let l = listen();
    for _ in 0..n {
        let (mut s, peer) = l.accept().expect("accept");
        let mut login = [0u8; 64];
        let mut got = 0;
        while !login[..got].contains(&b'\n') {
            got += s.read(&mut login[got..]).expect("read login");
        }
        s.set_nonblocking(true).expect("nonblocking");
        let answer = vec![b'A'; 1 << 20];
        let mut written = 0u64;
        loop {
            match s.write(&answer) {
                Ok(k) => written += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write answer: {e}"),
            }
        }
        // Stable for 300 ms (longer than a delayed ACK may wait, 200 ms): nothing acknowledges
        // more between the ioctl and close().
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut last, mut since) = (queue(&s, libc::TIOCOUTQ), Instant::now());
        while since.elapsed() < Duration::from_millis(300) {
            assert!(Instant::now() < deadline, "the send queue never settled");
            std::thread::sleep(Duration::from_millis(20));
            let q = queue(&s, libc::TIOCOUTQ);
            if q != last {
                (last, since) = (q, Instant::now());
            }
        }
        set_linger_zero(&s);
        let outq = queue(&s, libc::TIOCOUTQ);
        drop(s);
        say(&format!("closed {written} {outq} {}", peer.port()));
    }
    wait_exit();
}

/// Per `login` line: connects with a small receive buffer, sends a login, and does not read
/// until told `read`; then reads until the reset (or EOF) and says how much it got.
fn login_client(port: u16) {
    let mut sock = None;
    for line in std::io::stdin().lock().lines() {
        match line.as_deref() {
            Ok("login") => {
                // SAFETY: plain socket calls on an fd handed to TcpStream at once.
                let s = unsafe {
                    use std::os::fd::FromRawFd as _;
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                    assert!(fd >= 0);
                    let small: libc::c_int = 4096;
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUF,
                        (&raw const small).cast(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    );
                    TcpStream::from_raw_fd(fd)
                };
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let s2 = connect_from(s, addr);
                (&s2)
                    .write_all(b"LOGIN alice wrong-password\n")
                    .expect("send login");
                say(&format!("sent {}", s2.local_addr().expect("addr").port()));
                sock = Some(s2);
            }
            Ok("read") => {
                let mut s = sock.take().expect("a login first");
                let mut buf = vec![0u8; 1 << 16];
                let mut got = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k as u64,
                    }
                }
                say(&format!("got {got}"));
            }
            Ok("exit") | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// connect() on a socket made by hand (to set SO_RCVBUF before the handshake, which sets the
/// window scale).
fn connect_from(s: TcpStream, addr: std::net::SocketAddr) -> TcpStream {
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect reads a sockaddr_in of the given length.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
    s
}

/// Accepts one request of 10,000 bytes; `unread`: waits until all of it sits in the receive
/// queue and closes without reading; otherwise reads it all, then closes. Prints `SIOCINQ` as
/// read just before close().
fn request_server(unread: bool) {
    let l = listen();
    let (mut s, _) = l.accept().expect("accept");
    if unread {
        let deadline = Instant::now() + Duration::from_secs(20);
        while queue(&s, libc::FIONREAD) < 10_000 {
            assert!(Instant::now() < deadline, "the request never arrived whole");
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        let mut buf = vec![0u8; 10_000];
        s.read_exact(&mut buf).expect("read the request");
    }
    let inq = queue(&s, libc::FIONREAD);
    drop(s);
    say(&format!("closed {inq}"));
    wait_exit();
}

/// Sends a 10,000-byte request; `close` closes the socket, `exit` ends.
fn request_client(port: u16) {
    let mut s = Some(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    let sock = s.as_mut().expect("connected");
    sock.write_all(&[b'R'; 10_000]).expect("send request");
    say(&format!("sent {}", sock.local_addr().expect("addr").port()));
    for line in std::io::stdin().lock().lines() {
        match line.as_deref() {
            Ok("close") => {
                drop(s.take());
                say("closed");
            }
            Ok("exit") | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn wait_exit() {
    for line in std::io::stdin().lock().lines() {
        if line.map(|l| l == "exit").unwrap_or(true) {
            break;
        }
    }
}
