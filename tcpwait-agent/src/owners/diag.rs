//! inet_diag over `NETLINK_SOCK_DIAG`, through the rust-netlink crates: one dump of the TCP
//! sockets (IPv4 and IPv6) of the agent's network namespace in chosen states, each with its
//! 4-tuple, inode, owner uid, queues, cookie and `tcp_info.tcpi_last_ack_recv`. The dump answers
//! for the namespace the netlink socket was opened in (`netns` opens one in each namespace).
//!
//! The socket I/O ([`dump_tcp`]) is separate from the parsing of the kernel's answers
//! ([`parse_datagram`]), which is a pure function over bytes, tested over real answers captured
//! once (`tests/fixtures/inet_diag_tcp{4,6}.bin`, see `capture_inet_diag.py` there).
//!
//! Kernel behaviour this relies on (net/ipv4/inet_diag.c, checked on 6.18):
//! - timewait sockets answer with their `tw_substate` as state: TIME_WAIT, or FIN_WAIT2 for an
//!   orphan whose FIN_WAIT2 timeout was handed to a timewait socket. They have inode 0, uid 0
//!   and no `tcp_info`;
//! - request sockets (state NEW_SYN_RECV in the hash) answer as SYN_RECV, without `tcp_info`;
//! - `idiag_rqueue` counts sequence space, so a CLOSE_WAIT socket's Recv-Q includes 1 for the
//!   peer's FIN (5 unread bytes show as 6); a listener's queues are its accept queue and backlog.
use std::io;

use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::debug;

use crate::{
    event::TcpState,
    model::{DiagSocket, Tuple},
};

/// Offset of `tcpi_last_ack_recv` in `struct tcp_info` (include/uapi/linux/tcp.h): eight u8
/// fields, then the u32s rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
/// last_data_sent, last_ack_sent, last_data_recv, last_ack_recv. Stable ABI since 2.6.
const TCPI_LAST_ACK_RECV: usize = 56;

/// Length of `struct nlmsghdr`, before each answer.
const NLMSG_HDRLEN: usize = 16;
/// Offset of `idiag_expires` in `struct inet_diag_msg` (include/uapi/linux/inet_diag.h):
/// family, state, timer, retrans (u8 each), then the 48-byte `inet_diag_sockid`.
const IDIAG_EXPIRES: usize = 52;

/// Receive buffer for one datagram. The kernel sizes dump datagrams to what the reader asked
/// for, capped at 32 KiB (`netlink_recvmsg`: `max_recvmsg_len`), so 64 KiB never truncates;
/// a truncation is still detected (`MSG_TRUNC`) and reported, never parsed.
const RECV_BUF: usize = 64 * 1024;

/// Why an inet_diag dump failed. Nothing partial is returned: a dump is all or nothing.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// The netlink socket could not be opened, bound or connected.
    #[error("cannot open a NETLINK_SOCK_DIAG socket")]
    Socket(#[source] io::Error),
    /// The request could not be sent.
    #[error("cannot send the inet_diag request")]
    Send(#[source] io::Error),
    /// An answer could not be received.
    #[error("cannot receive inet_diag answers")]
    Recv(#[source] io::Error),
    /// A datagram was longer than the receive buffer (its tail was lost).
    #[error("an inet_diag datagram of {len} bytes did not fit the {cap}-byte buffer")]
    Truncated { len: usize, cap: usize },
    /// An answer could not be decoded.
    #[error("malformed inet_diag answer at byte {offset} of a datagram")]
    Decode {
        offset: usize,
        #[source]
        source: DecodeError,
    },
    /// The kernel answered the request with an error (`NLMSG_ERROR`, or `NLMSG_DONE` carrying a
    /// negative errno).
    #[error("the kernel refused the inet_diag dump")]
    Kernel(#[source] io::Error),
}

/// The sockets of one dump (or of the datagrams parsed so far).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dump {
    /// Sockets in a state tcpwait knows, in the kernel's order.
    pub sockets: Vec<DiagSocket>,
    /// Answers skipped because their state number is unknown to [`TcpState`] (a newer kernel).
    pub unknown_states: u64,
}

/// Whether a dump goes on after a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// More datagrams follow.
    More,
    /// `NLMSG_DONE` was seen: the dump is complete.
    Done,
}

/// Opens a `NETLINK_SOCK_DIAG` socket. It answers for the network namespace of the thread that
/// opens it, for its whole life (see `netns`).
pub fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Dumps the TCP sockets in `states` (empty: every state tcpwait knows) of the agent's own
/// network namespace, labelled `netns`. See [`dump_on`].
#[cfg(test)]
pub fn dump_tcp(states: &[TcpState]) -> Result<Vec<DiagSocket>, DiagError> {
    let socket = open().map_err(DiagError::Socket)?;
    dump_on(&socket, states, 0)
}

/// Dumps the TCP sockets in `states` (empty: every state tcpwait knows) of the namespace
/// `socket` lives in, IPv4 then IPv6, with `tcp_info`; each record is labelled `netns`.
/// Blocking; cost is linear in the number of sockets in those states (the kernel filters by
/// state before answering). Answers with unknown states are skipped and logged.
pub fn dump_on(
    socket: &Socket,
    states: &[TcpState],
    netns: u32,
) -> Result<Vec<DiagSocket>, DiagError> {
    let mut dump = Dump::default();
    let mut buf = vec![0u8; RECV_BUF];
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        socket
            .send(&request(family, states, seq), 0)
            .map_err(DiagError::Send)?;
        loop {
            let len = recv_datagram(socket, &mut buf)?;
            if parse_datagram(&buf[..len], &mut dump)? == Progress::Done {
                break;
            }
        }
    }
    if dump.unknown_states > 0 {
        debug!(
            skipped = dump.unknown_states,
            "inet_diag answers with unknown TCP states"
        );
    }
    for s in &mut dump.sockets {
        s.netns = netns;
    }
    Ok(dump.sockets)
}

/// Looks up one socket by its exact 4-tuple in the namespace `socket` lives in (labelled
/// `netns`): a request without `NLM_F_DUMP`, which the kernel answers with a hash lookup
/// (`inet_diag_find_one_icsk`) instead of walking every bucket of the established hash, as a
/// dump does whatever its state filter (~7 ms per dump on a host with 262,144 buckets,
/// measured). `None` when no such socket exists (any more). The reply carries the socket in
/// whatever state it is in: the caller checks it.
pub fn lookup_on(
    socket: &Socket,
    tuple: &Tuple,
    netns: u32,
) -> Result<Option<DiagSocket>, DiagError> {
    let family = if tuple.saddr.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let bytes = encode(
        NLM_F_REQUEST,
        3,
        InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: StateFlags::from_bits_retain(state_mask(&[])),
            socket_id: SocketId {
                source_port: tuple.sport,
                destination_port: tuple.dport,
                source_address: tuple.saddr,
                destination_address: tuple.daddr,
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match by tuple alone.
                cookie: [0xff; 8],
            },
        },
    );
    socket.send(&bytes, 0).map_err(DiagError::Send)?;
    let mut buf = vec![0u8; RECV_BUF];
    let len = recv_datagram(socket, &mut buf)?;
    let mut dump = Dump::default();
    match parse_datagram(&buf[..len], &mut dump) {
        Ok(_) => {}
        Err(DiagError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok(dump.sockets.pop().map(|mut d| {
        d.netns = netns;
        d
    }))
}

/// Receives one datagram into `buf`; its length. A datagram longer than `buf` is an error, never
/// parsed (`MSG_TRUNC` makes the kernel report the real length).
fn recv_datagram(socket: &Socket, buf: &mut [u8]) -> Result<usize, DiagError> {
    loop {
        match socket.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(len) if len > buf.len() => {
                return Err(DiagError::Truncated {
                    len,
                    cap: buf.len(),
                });
            }
            Ok(len) => return Ok(len),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DiagError::Recv(e)),
        }
    }
}

/// The kernel's `TCPF_*` state mask for `states` (empty: every known state).
fn state_mask(states: &[TcpState]) -> u32 {
    let states = if states.is_empty() {
        &TcpState::ALL[..]
    } else {
        states
    };
    states.iter().fold(0, |acc, &s| acc | 1 << (s as u32))
}

/// One `SOCK_DIAG_BY_FAMILY` dump request (`struct inet_diag_req_v2`) for TCP in `family`.
fn request(family: u8, states: &[TcpState], seq: u32) -> Vec<u8> {
    encode(
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            // The crate's flags stop at CLOSING (1 << 11); keep NEW_SYN_RECV's bit as well.
            states: StateFlags::from_bits_retain(state_mask(states)),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        },
    )
}

/// A request as netlink bytes, with header `flags` and sequence number `seq`.
fn encode(flags: u16, seq: u32, request: InetRequest) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    packet.finalize();
    let mut bytes = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut bytes);
    bytes
}

/// Parses one datagram of dump answers (one or more netlink messages) into `dump`.
pub fn parse_datagram(bytes: &[u8], dump: &mut Dump) -> Result<Progress, DiagError> {
    let mut offset = 0;
    while offset < bytes.len() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&bytes[offset..])
            .map_err(|source| DiagError::Decode { offset, source })?;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                // The crate drops `idiag_expires` of timewait sockets: read it from the bytes.
                let at = offset + NLMSG_HDRLEN + IDIAG_EXPIRES;
                let expires_ms = bytes.get(at..at + 4).map_or(0, |b| {
                    u32::from_ne_bytes(b.try_into().expect("a 4-byte range"))
                });
                match to_diag_socket(&r, expires_ms) {
                    Some(s) => dump.sockets.push(s),
                    None => dump.unknown_states += 1,
                }
            }
            NetlinkPayload::Done(done) if done.code < 0 => {
                // Saturating: `i32::MIN` in a malformed answer has no positive errno (found by
                // the `inet_diag` fuzz target: a plain negation overflowed).
                let errno = done.code.saturating_neg();
                return Err(DiagError::Kernel(io::Error::from_raw_os_error(errno)));
            }
            NetlinkPayload::Done(_) => return Ok(Progress::Done),
            NetlinkPayload::Error(e) => {
                let errno = e.code.map_or(0, |c| c.get().saturating_neg());
                return Err(DiagError::Kernel(io::Error::from_raw_os_error(errno)));
            }
            _ => {}
        }
        // `deserialize` checked that the length is at least a header and within the buffer.
        // Messages in a datagram are 4-byte aligned (NLMSG_ALIGN).
        offset += (msg.header.length as usize).next_multiple_of(4);
    }
    Ok(Progress::More)
}

/// Converts one answer; `None` for a state tcpwait does not know.
fn to_diag_socket(r: &InetResponse, expires_ms: u32) -> Option<DiagSocket> {
    let h = &r.header;
    let state = TcpState::try_from(h.state).ok()?;
    let last_ack_recv_ms = r.nlas.iter().find_map(|nla| match nla {
        // Without the crate's `rich_nlas` feature, tcp_info is the raw bytes: the kernel sends
        // its own `sizeof(struct tcp_info)` (280 bytes on 6.18), which varies by version.
        Nla::TcpInfo(bytes) => bytes
            .get(TCPI_LAST_ACK_RECV..TCPI_LAST_ACK_RECV + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("a 4-byte range"))),
        _ => None,
    });
    // `sock_diag_save_cookie`: idiag_cookie[0] is the low half, [1] the high half, each in
    // host order.
    let c = h.socket_id.cookie;
    let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
    Some(DiagSocket {
        // Set by the caller, which knows which namespace it dumped.
        netns: 0,
        // An AF_INET6 socket talking IPv4 reports v4-mapped IPv6 addresses (`::ffff:a.b.c.d`);
        // the tracepoint reports them the same way (its family is the socket's), so tuples
        // from both sides agree and are kept as the kernel gives them.
        tuple: Tuple {
            saddr: h.socket_id.source_address,
            sport: h.socket_id.source_port,
            daddr: h.socket_id.destination_address,
            dport: h.socket_id.destination_port,
        },
        state,
        inode: u64::from(h.inode),
        uid: h.uid,
        recv_q: h.recv_queue,
        send_q: h.send_queue,
        cookie: u64::from(high) << 32 | u64::from(low),
        last_ack_recv_ms,
        expires_ms,
    })
}

#[cfg(test)]
mod tests;
