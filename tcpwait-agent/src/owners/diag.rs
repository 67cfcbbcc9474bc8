//! inet_diag over `NETLINK_SOCK_DIAG`, through the rust-netlink crates: a dump of the TCP
//! sockets (IPv4 and IPv6) of the agent's network namespace in chosen states.
use std::io;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{
    event::TcpState,
    model::{DiagSocket, Tuple},
};

/// Offset of `tcpi_last_ack_recv` in `struct tcp_info` (include/uapi/linux/tcp.h): eight u8
/// fields, then u32s rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
/// last_data_sent, last_ack_sent, last_data_recv, last_ack_recv. Stable ABI since 2.6.
const TCPI_LAST_ACK_RECV: usize = 56;

/// Failures of an inet_diag dump.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink send: {0}")]
    Send(#[source] io::Error),
    #[error("netlink receive: {0}")]
    Recv(#[source] io::Error),
    #[error("malformed netlink message: {0}")]
    Decode(String),
    #[error("the kernel refused the inet_diag request (errno {0})")]
    Kernel(i32),
}

/// Dumps TCP sockets in `states` (empty: all), IPv4 then IPv6, with `tcp_info`.
pub fn dump_tcp(states: &[TcpState]) -> Result<Vec<DiagSocket>, DiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Socket)?;
    socket.bind_auto().map_err(DiagError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(DiagError::Socket)?;
    let flags = if states.is_empty() {
        StateFlags::all()
    } else {
        StateFlags::from_bits_truncate(states.iter().fold(0, |acc, s| acc | 1 << (*s as u32)))
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for family in [AF_INET, AF_INET6] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: flags.clone(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        packet.finalize();
        let mut req = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut req);
        socket.send(&req, 0).map_err(DiagError::Send)?;
        loop {
            let n = socket.recv(&mut &mut buf[..], 0).map_err(DiagError::Recv)?;
            if parse_messages(&buf[..n], &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

/// Parses one datagram of dump answers into `out`; returns true at the end of the dump.
pub fn parse_messages(mut bytes: &[u8], out: &mut Vec<DiagSocket>) -> Result<bool, DiagError> {
    while !bytes.is_empty() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
            .map_err(|e| DiagError::Decode(e.to_string()))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                if let Some(s) = to_diag_socket(&r) {
                    out.push(s);
                }
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => {
                return Err(DiagError::Kernel(e.code.map_or(0, |c| c.get())));
            }
            _ => {}
        }
        if len == 0 || len > bytes.len() {
            break;
        }
        // Messages are 4-byte aligned within a datagram.
        bytes = &bytes[(len + 3) & !3usize..];
    }
    Ok(false)
}

/// Converts one answer; states tcpwait does not know are skipped.
fn to_diag_socket(r: &InetResponse) -> Option<DiagSocket> {
    let h = &r.header;
    let state = TcpState::try_from(h.state).ok()?;
    let last_ack_recv_ms = r.nlas.iter().find_map(|nla| match nla {
        Nla::TcpInfo(bytes) => bytes
            .get(TCPI_LAST_ACK_RECV..TCPI_LAST_ACK_RECV + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes"))),
        _ => None,
    });
    Some(DiagSocket {
        tuple: Tuple {
            saddr: unmap(h.socket_id.source_address),
            sport: h.socket_id.source_port,
            daddr: unmap(h.socket_id.destination_address),
            dport: h.socket_id.destination_port,
        },
        state,
        inode: u64::from(h.inode),
        uid: h.uid,
        recv_q: h.recv_queue,
        send_q: h.send_queue,
        cookie: u64::from_ne_bytes(h.socket_id.cookie),
        last_ack_recv_ms,
    })
}

/// inet_diag reports the addresses of an AF_INET6 socket as IPv6, and the tracepoint does the
/// same (its family is the socket's). Kept as is: both sides agree.
fn unmap(a: std::net::IpAddr) -> std::net::IpAddr {
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_sock_diag::inet::InetResponseHeader;
    use smallvec::smallvec;

    fn response(family: u8, state: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        let mut info = vec![0u8; 232];
        info[TCPI_LAST_ACK_RECV..TCPI_LAST_ACK_RECV + 4].copy_from_slice(&1234u32.to_ne_bytes());
        let msg = SockDiagMessage::InetResponse(Box::new(InetResponse {
            header: InetResponseHeader {
                family,
                state,
                timer: None,
                socket_id: SocketId {
                    source_port: sport,
                    destination_port: dport,
                    source_address: src.parse().expect("literal"),
                    destination_address: dst.parse().expect("literal"),
                    interface_id: 0,
                    cookie: 77u64.to_ne_bytes(),
                },
                recv_queue: 5,
                send_queue: 0,
                uid: 1000,
                inode: 4242,
            },
            nlas: smallvec![Nla::TcpInfo(info)],
        }));
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), msg.into());
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    }

    fn done() -> Vec<u8> {
        let mut packet = NetlinkMessage::<SockDiagMessage>::new(
            NetlinkHeader::default(),
            NetlinkPayload::Done(netlink_packet_core::DoneMessage::default()),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    }

    #[test]
    fn parses_ipv4_and_ipv6_answers_and_the_end() {
        let mut bytes = response(AF_INET, 8, "127.0.0.1", 40000, "127.0.0.1", 8080);
        bytes.extend(response(AF_INET6, 5, "::1", 8080, "2001:db8::7", 50000));
        let mut out = Vec::new();
        assert!(!parse_messages(&bytes, &mut out).expect("valid"));
        assert_eq!(out.len(), 2);
        let a = &out[0];
        assert_eq!(a.state, TcpState::CloseWait);
        assert_eq!(
            a.tuple.saddr,
            "127.0.0.1".parse::<std::net::IpAddr>().expect("literal")
        );
        assert_eq!((a.tuple.sport, a.tuple.dport), (40000, 8080));
        assert_eq!((a.inode, a.uid, a.recv_q, a.cookie), (4242, 1000, 5, 77));
        assert_eq!(a.last_ack_recv_ms, Some(1234));
        let b = &out[1];
        assert_eq!(b.state, TcpState::FinWait2);
        assert_eq!(
            b.tuple.daddr,
            "2001:db8::7".parse::<std::net::IpAddr>().expect("literal")
        );
        assert_eq!((b.tuple.sport, b.tuple.dport), (8080, 50000));
        assert!(parse_messages(&done(), &mut out).expect("done"));
    }

    #[test]
    fn unknown_states_are_skipped() {
        let mut out = Vec::new();
        parse_messages(
            &response(AF_INET, 99, "127.0.0.1", 1, "127.0.0.1", 2),
            &mut out,
        )
        .expect("valid");
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_message_is_an_error() {
        let bytes = response(AF_INET, 8, "127.0.0.1", 1, "127.0.0.1", 2);
        assert!(parse_messages(&bytes[..30], &mut Vec::new()).is_err());
    }
}
