//! Tests of the inet_diag request and parser, over real kernel answers captured once
//! (`tests/fixtures/capture_inet_diag.py`, kernel 6.18, x86-64) and over messages built with
//! the crate's own types.
use std::{net::IpAddr, num::NonZeroI32};

use netlink_packet_core::{DoneMessage, ErrorMessage};
use netlink_packet_sock_diag::inet::InetResponseHeader;
use smallvec::smallvec;

use super::*;

/// One IPv4 dump: a listener on 127.0.0.1:40000; client 40001 in CLOSE_WAIT holding 5 unread
/// bytes; client 40002 in TIME_WAIT; the orphaned accepted side of 40001 in FIN_WAIT2.
const TCP4: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/inet_diag_tcp4.bin"
));
/// The same on ::1, ports 40010..40012.
const TCP6: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/inet_diag_tcp6.bin"
));
/// Length of the first answer (the listener's) in `TCP4`.
const TCP4_FIRST: usize = 408;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address literal")
}

#[expect(clippy::too_many_arguments, reason = "one row of a fixture table")]
fn sock(
    state: TcpState,
    (saddr, sport): (&str, u16),
    (daddr, dport): (&str, u16),
    inode: u64,
    recv_q: u32,
    send_q: u32,
    cookie: u64,
    last_ack_recv_ms: Option<u32>,
) -> DiagSocket {
    DiagSocket {
        netns: 0,
        tuple: Tuple {
            saddr: ip(saddr),
            sport,
            daddr: ip(daddr),
            dport,
        },
        state,
        inode,
        uid: 0,
        recv_q,
        send_q,
        cookie,
        last_ack_recv_ms,
        expires_ms: 0,
    }
}

fn parse_all(bytes: &[u8]) -> Dump {
    let mut dump = Dump::default();
    assert_eq!(
        parse_datagram(bytes, &mut dump).expect("a valid capture"),
        Progress::Done
    );
    dump
}

#[test]
fn parses_a_real_ipv4_dump_exactly() {
    use TcpState::*;
    let lo = "127.0.0.1";
    let dump = parse_all(TCP4);
    assert_eq!(dump.unknown_states, 0);
    assert_eq!(
        dump.sockets,
        [
            // A listener's Recv-Q/Send-Q are its accept queue and backlog (listen(8)).
            sock(
                Listen,
                (lo, 40000),
                ("0.0.0.0", 0),
                5339000,
                0,
                8,
                71886,
                Some(0)
            ),
            // 5 unread bytes + 1 for the FIN: rqueue is rcv_nxt - copied_seq.
            sock(
                CloseWait,
                (lo, 40001),
                (lo, 40000),
                5339001,
                6,
                0,
                71887,
                Some(352)
            ),
            // Timewait sockets: no inode, no tcp_info; the ms left on their timer.
            DiagSocket {
                expires_ms: 59700,
                ..sock(TimeWait, (lo, 40002), (lo, 40000), 0, 0, 0, 71890, None)
            },
            // An orphan in FIN_WAIT2 is a timewait socket whose substate is FIN_WAIT2.
            DiagSocket {
                expires_ms: 59692,
                ..sock(FinWait2, (lo, 40000), (lo, 40001), 0, 0, 0, 71891, None)
            },
        ]
    );
}

#[test]
fn parses_a_real_ipv6_dump_exactly() {
    use TcpState::*;
    let lo = "::1";
    let dump = parse_all(TCP6);
    assert_eq!(dump.unknown_states, 0);
    assert_eq!(
        dump.sockets,
        [
            sock(
                Listen,
                (lo, 40010),
                ("::", 0),
                5339005,
                0,
                8,
                71888,
                Some(0)
            ),
            sock(
                CloseWait,
                (lo, 40011),
                (lo, 40010),
                5339006,
                6,
                0,
                71889,
                Some(300)
            ),
            DiagSocket {
                expires_ms: 59748,
                ..sock(TimeWait, (lo, 40012), (lo, 40010), 0, 0, 0, 71892, None)
            },
            DiagSocket {
                expires_ms: 59744,
                ..sock(FinWait2, (lo, 40010), (lo, 40011), 0, 0, 0, 71893, None)
            },
        ]
    );
}

#[test]
fn a_datagram_without_done_asks_for_more() {
    let mut dump = Dump::default();
    assert_eq!(
        parse_datagram(&TCP4[..TCP4_FIRST], &mut dump).expect("one whole answer"),
        Progress::More
    );
    assert_eq!(dump.sockets.len(), 1);
    assert_eq!(
        parse_datagram(&TCP4[TCP4_FIRST..], &mut dump).expect("the rest"),
        Progress::Done
    );
    assert_eq!(dump.sockets.len(), 4);
}

#[test]
fn unknown_states_are_skipped_and_counted() {
    let mut bytes = TCP4.to_vec();
    // idiag_state follows the 16-byte netlink header and idiag_family. 13 is
    // TCP_BOUND_INACTIVE (kernel 6.6+), which tcpwait never asks for.
    bytes[17] = 13;
    let dump = parse_all(&bytes);
    assert_eq!(dump.unknown_states, 1);
    assert_eq!(dump.sockets.len(), 3);
    assert_eq!(dump.sockets[0].state, TcpState::CloseWait);
}

#[test]
fn truncated_answers_are_errors_with_their_offset() {
    let err = parse_datagram(&TCP4[..200], &mut Dump::default()).expect_err("truncated");
    assert!(
        matches!(err, DiagError::Decode { offset: 0, .. }),
        "{err:?}"
    );
    let err = parse_datagram(&TCP4[..TCP4_FIRST + 50], &mut Dump::default())
        .expect_err("second answer truncated");
    assert!(
        matches!(
            err,
            DiagError::Decode {
                offset: TCP4_FIRST,
                ..
            }
        ),
        "{err:?}"
    );
}

fn serialize(payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), payload);
    packet.finalize();
    let mut bytes = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut bytes);
    bytes
}

#[test]
fn kernel_errors_are_reported_with_their_errno() {
    let mut nack = ErrorMessage::default();
    nack.code = NonZeroI32::new(-libc::EINVAL);
    let err = parse_datagram(
        &serialize(NetlinkPayload::Error(nack)),
        &mut Dump::default(),
    )
    .expect_err("a NACK");
    match err {
        DiagError::Kernel(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
        other => panic!("expected a kernel error, got {other:?}"),
    }
    let mut done = DoneMessage::default();
    done.code = -libc::EINTR;
    let err = parse_datagram(&serialize(NetlinkPayload::Done(done)), &mut Dump::default())
        .expect_err("a dump ended by an error");
    match err {
        DiagError::Kernel(e) => assert_eq!(e.raw_os_error(), Some(libc::EINTR)),
        other => panic!("expected a kernel error, got {other:?}"),
    }
}

/// The most negative code has no positive errno: a kernel error, not an overflow panic (the
/// `inet_diag` fuzz target's first finding, `fuzz/regressions/inet_diag/`).
#[test]
fn the_most_negative_error_code_is_a_kernel_error() {
    let mut done = DoneMessage::default();
    done.code = i32::MIN;
    let mut nack = ErrorMessage::default();
    nack.code = NonZeroI32::new(i32::MIN);
    for payload in [NetlinkPayload::Done(done), NetlinkPayload::Error(nack)] {
        match parse_datagram(&serialize(payload), &mut Dump::default()) {
            Err(DiagError::Kernel(e)) => assert_eq!(e.raw_os_error(), Some(i32::MAX)),
            other => panic!("expected a kernel error, got {other:?}"),
        }
    }
}

/// Built with the crate's types and round-tripped through its emit/parse: an older kernel's
/// shorter tcp_info still gives last_ack_recv; one too short for it gives none.
#[test]
fn tcp_info_of_any_length_is_read_when_it_holds_last_ack_recv() {
    let answer = |info_len: usize| {
        let mut info = vec![0u8; info_len];
        if let Some(field) = info.get_mut(TCPI_LAST_ACK_RECV..TCPI_LAST_ACK_RECV + 4) {
            field.copy_from_slice(&4321u32.to_ne_bytes());
        }
        let mut cookie = [0u8; 8];
        cookie[..4].copy_from_slice(&0xdead_beefu32.to_ne_bytes());
        cookie[4..].copy_from_slice(&7u32.to_ne_bytes());
        serialize(NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(
            Box::new(InetResponse {
                header: InetResponseHeader {
                    family: AF_INET6,
                    state: TcpState::CloseWait as u8,
                    timer: None,
                    socket_id: SocketId {
                        source_port: 443,
                        destination_port: 51000,
                        source_address: ip("2001:db8::1"),
                        destination_address: ip("::ffff:10.0.0.9"),
                        interface_id: 0,
                        cookie,
                    },
                    recv_queue: 1,
                    send_queue: 0,
                    uid: 1000,
                    inode: 4242,
                },
                nlas: smallvec![Nla::TcpInfo(info)],
            }),
        )))
    };
    let mut dump = Dump::default();
    for len in [104, 60, 59] {
        assert_eq!(
            parse_datagram(&answer(len), &mut dump).expect("valid"),
            Progress::More
        );
    }
    let s = &dump.sockets[0];
    assert_eq!(
        s.tuple,
        Tuple {
            saddr: ip("2001:db8::1"),
            sport: 443,
            daddr: ip("::ffff:10.0.0.9"),
            dport: 51000,
        },
        "v4-mapped addresses are kept as the kernel gives them"
    );
    assert_eq!((s.inode, s.uid, s.recv_q), (4242, 1000, 1));
    assert_eq!(s.cookie, 7 << 32 | 0xdead_beef);
    let acks: Vec<_> = dump.sockets.iter().map(|s| s.last_ack_recv_ms).collect();
    assert_eq!(acks, [Some(4321), Some(4321), None]);
}

/// The request is `struct nlmsghdr` + `struct inet_diag_req_v2`, as the kernel reads it.
#[test]
fn request_layout_matches_inet_diag_req_v2() {
    let req = request(AF_INET6, &[TcpState::CloseWait, TcpState::NewSynRecv], 7);
    assert_eq!(req.len(), 16 + 56);
    assert_eq!(&req[0..4], &72u32.to_ne_bytes(), "nlmsg_len");
    assert_eq!(&req[4..6], &20u16.to_ne_bytes(), "SOCK_DIAG_BY_FAMILY");
    assert_eq!(
        &req[6..8],
        &0x301u16.to_ne_bytes(),
        "NLM_F_REQUEST | NLM_F_DUMP"
    );
    assert_eq!(&req[8..12], &7u32.to_ne_bytes(), "nlmsg_seq");
    assert_eq!(
        &req[16..20],
        &[10, 6, 2, 0],
        "AF_INET6, TCP, INET_DIAG_INFO, pad"
    );
    assert_eq!(
        &req[20..24],
        &(1u32 << 8 | 1 << 12).to_ne_bytes(),
        "TCPF_CLOSE_WAIT | TCPF_NEW_SYN_RECV, not truncated to the crate's flags"
    );
    assert!(req[24..].iter().all(|&b| b == 0), "wildcard socket id");
    // Empty: every state tcpwait knows, ESTABLISHED (1) to NEW_SYN_RECV (12), not
    // TCP_BOUND_INACTIVE (13), whose bound-only sockets have no tuple.
    let all = request(AF_INET, &[], 1);
    assert_eq!(all[16], 2, "AF_INET");
    assert_eq!(&all[20..24], &0x1ffeu32.to_ne_bytes());
}
