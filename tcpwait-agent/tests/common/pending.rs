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
