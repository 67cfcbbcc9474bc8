//! The inet_diag answer parser (`owners::diag::parse_datagram`) over datagrams.
use netlink_packet_core::{NetlinkHeader, NetlinkMessage};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6},
    inet::{InetResponse, InetResponseHeader, SocketId, nlas::Nla},
};

use crate::{
    model::DiagSocket,
    owners::diag::{DiagError, Dump, parse_datagram},
};

/// Smallest netlink message: its header.
const NLMSG_HDRLEN: usize = 16;

/// One datagram. Invariants: the parser fails only with a decode error inside the datagram or
/// the kernel's refusal; it never yields more answers than the datagram holds headers; and each
/// socket it yields, sent back as the kernel would, parses to itself.
pub fn run(datagram: &[u8]) {
    let mut dump = Dump::default();
    match parse_datagram(datagram, &mut dump) {
        Ok(_) | Err(DiagError::Kernel(_)) => {}
        Err(DiagError::Decode { offset, .. }) => assert!(offset < datagram.len()),
        Err(e) => panic!("parse_datagram failed with a socket error: {e:?}"),
    }
    let answers = dump.sockets.len() as u64 + dump.unknown_states;
    assert!(answers * NLMSG_HDRLEN as u64 <= datagram.len() as u64);
    for socket in &dump.sockets {
        assert_eq!(socket.netns, 0, "set by the caller, not the parser");
        let again = answer(socket);
        let mut back = Dump::default();
        parse_datagram(&again, &mut back).expect("an answer built from a parsed one");
        assert_eq!(back.sockets, std::slice::from_ref(socket), "{again:?}");
    }
}

/// `s` as the kernel answers it: one `InetResponse` message, with a `tcp_info` when it has one.
fn answer(s: &DiagSocket) -> Vec<u8> {
    let (low, high) = (s.cookie as u32, (s.cookie >> 32) as u32);
    let mut cookie = [0u8; 8];
    cookie[..4].copy_from_slice(&low.to_ne_bytes());
    cookie[4..].copy_from_slice(&high.to_ne_bytes());
    let mut response = InetResponse {
        header: InetResponseHeader {
            family: if s.tuple.saddr.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            },
            state: s.state as u8,
            timer: None,
            socket_id: SocketId {
                source_port: s.tuple.sport,
                destination_port: s.tuple.dport,
                source_address: s.tuple.saddr,
                destination_address: s.tuple.daddr,
                interface_id: 0,
                cookie,
            },
            recv_queue: s.recv_q,
            send_queue: s.send_q,
            uid: s.uid,
            inode: u32::try_from(s.inode).expect("inet_diag inodes are 32 bits"),
        },
        nlas: Default::default(),
    };
    if let Some(ms) = s.last_ack_recv_ms {
        // 6.18's `sizeof(struct tcp_info)`.
        let mut info = vec![0u8; 280];
        info[56..60].copy_from_slice(&ms.to_ne_bytes());
        response.nlas.push(Nla::TcpInfo(info));
    }
    let mut packet = NetlinkMessage::new(
        NetlinkHeader::default(),
        SockDiagMessage::InetResponse(Box::new(response)).into(),
    );
    packet.finalize();
    let mut bytes = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut bytes);
    // `idiag_expires`, which the crate does not carry for every timer (the parser reads it
    // from the bytes): after the 16-byte netlink header, at offset 52 of `inet_diag_msg`.
    bytes[16 + 52..16 + 56].copy_from_slice(&s.expires_ms.to_ne_bytes());
    bytes
}
