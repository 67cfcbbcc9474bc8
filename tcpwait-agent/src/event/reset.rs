//! Resets at the decoding boundary: `tcpwait_common::reset::ResetEvent` bytes → [`Reset`], and
//! why an abort happened ([`AbortReason`]), from the kernel's `enum sk_rst_reason` where it
//! passes one (6.10 and later) and otherwise from the socket as the kernel's `__tcp_close`
//! decides: unread data first, then `SO_LINGER` with a zero time.
use std::net::IpAddr;

use tcpwait_common::reset::{KIND_ABORT, REASON_NONE, ResetEvent, flag};

use super::{Comm, DecodeError, SocketId, addr, check_size};

/// Which way the reset went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetKind {
    /// The socket reset its connection itself (`tcp_send_active_reset`): data thrown away.
    Abort,
    /// The peer reset the connection.
    Received,
}

impl ResetKind {
    /// The JSON `kind` of its record.
    pub fn name(self) -> &'static str {
        match self {
            Self::Abort => "abort",
            Self::Received => "reset_received",
        }
    }
}

/// One reset, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub kind: ResetKind,
    /// CLOCK_MONOTONIC ns.
    pub ts_ns: u64,
    pub sock: SocketId,
    /// Network namespace inode; 0 when unknown.
    pub netns: u32,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// The task on CPU.
    pub pid: u32,
    pub comm: Comm,
    /// The program ran in the task that held the socket lock (`close()` and the like), so
    /// `pid`/`comm` name the caller. `false`: a softirq or timer, whose on-CPU task is
    /// unrelated to the socket.
    pub in_task: bool,
    /// `SO_LINGER` was on with a zero time.
    pub linger_zero: bool,
    /// Bytes written and not acknowledged (`SIOCOUTQ`); `None` when not readable.
    pub unsent: Option<u32>,
    /// Bytes received and not read (`SIOCINQ`); `None` when not readable.
    pub unread: Option<u32>,
    /// `enum sk_rst_reason` value, where the kernel passes one.
    pub kernel_reason: Option<u8>,
}

impl Reset {
    /// 4 or 6.
    pub fn family(&self) -> u8 {
        if self.saddr.is_ipv4() { 4 } else { 6 }
    }

    /// The process that caused it, when the event ran in its context.
    pub fn caller(&self) -> Option<(u32, Comm)> {
        self.in_task.then_some((self.pid, self.comm))
    }

    /// Bytes thrown away: unsent plus unread (0 when unknown).
    pub fn discarded(&self) -> u64 {
        u64::from(self.unsent.unwrap_or(0)) + u64::from(self.unread.unwrap_or(0))
    }

    /// Why the socket aborted, given the kernel's `enum sk_rst_reason` names (`(name, value)`
    /// from its BTF).
    pub fn reason(&self, names: &[(String, u32)]) -> AbortReason {
        let name = self.kernel_reason.map(|v| {
            names
                .iter()
                .find(|(_, n)| *n == u32::from(v))
                .map_or_else(|| format!("reason_{v}"), |(s, _)| s.clone())
        });
        AbortReason::classify(
            name.as_deref(),
            self.in_task,
            self.linger_zero,
            self.unread.unwrap_or(0),
        )
    }
}

/// Why a socket aborted its connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbortReason {
    /// `close()` with `SO_LINGER {1, 0}`: unsent data dropped, the peer gets a reset.
    Linger0,
    /// `close()` with received data not read (RFC 2525 §2.17).
    UnreadData,
    /// Another kernel reason (6.10 and later), lower-case without its `SK_RST_REASON_`
    /// prefix (`tcp_keepalive_timeout`, `tcp_abort_on_memory`, …), or `unknown`.
    Other(String),
}

impl AbortReason {
    /// `__tcp_close` checks unread data before a zero linger; the kernel's own reason, where it
    /// gives one, decides the rest. A zero linger counts only in the closing task's context (a
    /// timer's abort of a lingering socket is not the linger's doing).
    pub fn classify(kernel: Option<&str>, in_task: bool, linger_zero: bool, unread: u32) -> Self {
        let kernel = kernel.map(|k| k.strip_prefix("SK_RST_REASON_").unwrap_or(k));
        match kernel {
            Some("TCP_ABORT_ON_CLOSE") => Self::UnreadData,
            None if in_task && unread > 0 => Self::UnreadData,
            Some("TCP_STATE" | "TCP_ABORT_ON_LINGER" | "NOT_SPECIFIED") | None
                if in_task && linger_zero =>
            {
                Self::Linger0
            }
            Some(k) => Self::Other(k.to_ascii_lowercase()),
            None => Self::Other("unknown".to_owned()),
        }
    }

    /// The label: `linger_0`, `unread_data`, or the kernel's reason.
    pub fn label(&self) -> &str {
        match self {
            Self::Linger0 => "linger_0",
            Self::UnreadData => "unread_data",
            Self::Other(s) => s,
        }
    }
}

/// Decodes a record whose kind byte is an abort or a received reset.
pub fn decode(bytes: &[u8]) -> Result<Reset, DecodeError> {
    check_size(bytes.len())?;
    // SAFETY: the length is exactly the size of `ResetEvent`, every bit pattern is valid for
    // it (integers only), and `read_unaligned` makes no alignment assumption.
    let ev: ResetEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ResetEvent>()) };
    let family = u16::from(ev.family);
    let (saddr, daddr) = (addr(family, ev.saddr)?, addr(family, ev.daddr)?);
    let known = ev.flags & flag::QUEUES_UNKNOWN == 0;
    Ok(Reset {
        kind: if ev.kind == KIND_ABORT {
            ResetKind::Abort
        } else {
            ResetKind::Received
        },
        ts_ns: ev.ts_ns,
        sock: SocketId(ev.skaddr),
        netns: ev.netns,
        saddr,
        sport: ev.sport,
        daddr,
        dport: ev.dport,
        pid: ev.pid,
        comm: Comm(ev.comm),
        in_task: ev.flags & flag::IN_TASK != 0,
        linger_zero: ev.flags & flag::LINGER_ZERO != 0,
        unsent: known.then_some(ev.unsent),
        unread: known.then_some(ev.unread),
        kernel_reason: (ev.reason != REASON_NONE).then_some(ev.reason),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use tcpwait_common::reset::{KIND_OFFSET, KIND_RESET_RECEIVED, RESET_EVENT_SIZE};

    use super::*;
    use crate::event::{Record, decode_record, tests::wire_addr};

    /// Hand-made wire bytes, field by field as the kernel program writes them.
    pub(crate) fn wire(kind: u8, family: u8, reason: u8, flags: u8) -> Vec<u8> {
        let mut b = Vec::with_capacity(RESET_EVENT_SIZE);
        b.extend_from_slice(&7_000u64.to_le_bytes()); // ts_ns
        b.extend_from_slice(&0xffff_8880_0000_0040u64.to_le_bytes()); // skaddr
        b.extend_from_slice(&4242u32.to_le_bytes()); // pid
        b.extend_from_slice(&4_026_532_301u32.to_le_bytes()); // netns
        let (saddr, daddr) = if family == 10 {
            ("::1", "::1")
        } else {
            ("10.0.0.1", "10.0.0.2")
        };
        b.extend_from_slice(&wire_addr(saddr));
        b.extend_from_slice(&wire_addr(daddr));
        let mut comm = [0u8; 16];
        comm[..9].copy_from_slice(b"login-srv");
        b.extend_from_slice(&comm);
        b.extend_from_slice(&7000u16.to_le_bytes()); // sport
        b.extend_from_slice(&40000u16.to_le_bytes()); // dport
        b.extend_from_slice(&123_456u32.to_le_bytes()); // unsent
        b.extend_from_slice(&10_000u32.to_le_bytes()); // unread
        assert_eq!(b.len(), KIND_OFFSET);
        b.extend_from_slice(&[kind, family, reason, flags]);
        assert_eq!(b.len(), RESET_EVENT_SIZE);
        b
    }

    #[test]
    fn decodes_an_abort() {
        let b = wire(KIND_ABORT, 2, 14, flag::IN_TASK | flag::LINGER_ZERO);
        let Ok(Record::Reset(r)) = decode_record(&b) else {
            panic!("an abort record");
        };
        assert_eq!(r.kind, ResetKind::Abort);
        assert_eq!(
            (r.ts_ns, r.sock, r.netns),
            (7_000, SocketId(0xffff_8880_0000_0040), 4_026_532_301)
        );
        assert_eq!(r.saddr, "10.0.0.1".parse::<IpAddr>().expect("literal"));
        assert_eq!(r.daddr, "10.0.0.2".parse::<IpAddr>().expect("literal"));
        assert_eq!((r.sport, r.dport, r.pid), (7000, 40000, 4242));
        assert_eq!(r.comm.as_bytes(), b"login-srv");
        assert_eq!((r.unsent, r.unread), (Some(123_456), Some(10_000)));
        assert_eq!(r.discarded(), 133_456);
        assert_eq!(r.kernel_reason, Some(14));
        assert!(r.in_task && r.linger_zero);
        assert_eq!(r.caller().map(|c| c.0), Some(4242));
    }

    #[test]
    fn decodes_a_received_reset_without_trusting_the_task() {
        let b = wire(KIND_RESET_RECEIVED, 10, REASON_NONE, flag::QUEUES_UNKNOWN);
        let r = decode(&b).expect("valid");
        assert_eq!(r.kind, ResetKind::Received);
        assert_eq!(r.family(), 6);
        assert_eq!((r.unsent, r.unread, r.kernel_reason), (None, None, None));
        assert_eq!(r.caller(), None);
        assert_eq!(r.discarded(), 0);
    }

    #[test]
    fn bad_resets_are_errors() {
        let b = wire(KIND_ABORT, 3, 0, 0);
        assert_eq!(decode_record(&b), Err(DecodeError::UnknownFamily(3)));
        assert_eq!(decode_record(&b[..40]), Err(DecodeError::Truncated(40)));
        let mut big = wire(KIND_ABORT, 2, 0, 0);
        big.push(0);
        assert_eq!(decode_record(&big), Err(DecodeError::Oversize(89)));
        // A reset is never taken for a transition.
        assert_eq!(
            crate::event::decode(&wire(KIND_ABORT, 2, 0, 0)),
            Err(DecodeError::UnknownKind(KIND_ABORT))
        );
    }

    #[test]
    fn reasons_follow_the_kernel_then_the_socket() {
        use AbortReason::*;
        let c = AbortReason::classify;
        // 6.10 and later, as measured on 6.18: linger 0 reports TCP_STATE, unread data
        // TCP_ABORT_ON_CLOSE.
        assert_eq!(c(Some("SK_RST_REASON_TCP_STATE"), true, true, 0), Linger0);
        assert_eq!(c(Some("TCP_ABORT_ON_CLOSE"), true, true, 5), UnreadData);
        assert_eq!(
            c(Some("TCP_STATE"), true, false, 0),
            Other("tcp_state".into())
        );
        assert_eq!(
            c(Some("TCP_KEEPALIVE_TIMEOUT"), false, true, 0),
            Other("tcp_keepalive_timeout".into())
        );
        // Older kernels: from the socket, unread data first as in `__tcp_close`.
        assert_eq!(c(None, true, true, 10_000), UnreadData);
        assert_eq!(c(None, true, true, 0), Linger0);
        assert_eq!(c(None, false, true, 0), Other("unknown".into()));
        assert_eq!(c(None, false, false, 7), Other("unknown".into()));
        let names = vec![("SK_RST_REASON_TCP_STATE".to_owned(), 14)];
        let r = decode(&wire(KIND_ABORT, 2, 14, flag::IN_TASK | flag::LINGER_ZERO)).expect("ok");
        assert_eq!(r.reason(&names).label(), "linger_0");
        let r = decode(&wire(KIND_ABORT, 2, 99, 0)).expect("ok");
        assert_eq!(r.reason(&names).label(), "reason_99");
    }
}
