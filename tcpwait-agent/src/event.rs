//! The decoding boundary: raw ring-buffer bytes → domain [`Transition`].
//!
//! This is the only place that knows the wire layout (`tcpwait_common::TransitionEvent`, and
//! `ResetEvent` in [`reset`]). Unknown record kinds, states and families, truncated and
//! oversize records become a [`DecodeError`] that the caller counts; nothing here is fatal.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use tcpwait_common::{
    AF_INET, AF_INET6, TRANSITION_EVENT_SIZE, TransitionEvent,
    reset::{KIND_ABORT, KIND_OFFSET, KIND_RESET_RECEIVED, KIND_TRANSITION},
};

pub mod reset;

/// One ring-buffer record, decoded: the kinds the kernel programs send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// A TCP state transition.
    Transition(Transition),
    /// A reset sent on the socket's own (an abort) or received from the peer.
    Reset(reset::Reset),
}

/// Decodes one ring-buffer record of any kind (its byte at `KIND_OFFSET` names it).
pub fn decode_record(bytes: &[u8]) -> Result<Record, DecodeError> {
    check_size(bytes.len())?;
    match bytes[KIND_OFFSET] {
        KIND_TRANSITION => decode(bytes).map(Record::Transition),
        KIND_ABORT | KIND_RESET_RECEIVED => reset::decode(bytes).map(Record::Reset),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// Every record is exactly one event long.
fn check_size(n: usize) -> Result<(), DecodeError> {
    match n {
        n if n < TRANSITION_EVENT_SIZE => Err(DecodeError::Truncated(n)),
        n if n > TRANSITION_EVENT_SIZE => Err(DecodeError::Oversize(n)),
        _ => Ok(()),
    }
}

/// A kernel TCP state (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// The states a tracked connection can be in (the table holds no TIME_WAIT, listener or
    /// closed socket): what a reconciliation dumps to repair every entry.
    pub const TRACKED: [TcpState; 8] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::CloseWait,
        Self::LastAck,
        Self::Closing,
    ];

    /// Every state, in kernel order.
    pub const ALL: [TcpState; 12] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
    ];

    /// The name as the kernel spells it, without the `TCP_` prefix (`CLOSE_WAIT`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// The name as a metric label value: lowercase, as node_exporter spells
    /// `node_tcp_connection_states{state="close_wait"}`, so the two join without
    /// `label_replace`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::SynSent => "syn_sent",
            Self::SynRecv => "syn_recv",
            Self::FinWait1 => "fin_wait1",
            Self::FinWait2 => "fin_wait2",
            Self::TimeWait => "time_wait",
            Self::Close => "close",
            Self::CloseWait => "close_wait",
            Self::LastAck => "last_ack",
            Self::Listen => "listen",
            Self::Closing => "closing",
            Self::NewSynRecv => "new_syn_recv",
        }
    }

    /// Parses a state name, case-insensitively, with or without `TCP_`, `-` for `_` allowed.
    pub fn from_name(s: &str) -> Option<Self> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        let norm = norm.strip_prefix("TCP_").unwrap_or(&norm);
        Self::ALL.into_iter().find(|st| st.name() == norm)
    }
}

impl TryFrom<u8> for TcpState {
    type Error = DecodeError;

    fn try_from(v: u8) -> Result<Self, DecodeError> {
        Self::ALL
            .get(usize::from(v).wrapping_sub(1))
            .copied()
            .ok_or(DecodeError::UnknownState(v))
    }
}

impl serde::Serialize for TcpState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for TcpState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown TCP state {name:?}")))
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kernel's identity of a socket: the address of its `struct sock`. Unique while the socket
/// lives; the kernel may reuse it after the socket is freed (after CLOSE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u64);

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A task name (`comm`): up to 16 bytes as the kernel stores them, NUL-padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    /// The bytes before the first NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// The name as text, invalid UTF-8 replaced. Control characters are kept: escape them
    /// (see `output::escape_control`) before showing them on a terminal.
    #[expect(
        clippy::wrong_self_convention,
        reason = "borrows from self, like OsStr's"
    )]
    pub fn to_string_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string_lossy())
    }
}

/// The task that was on CPU when the transition ran. In softirq context this is *not* the
/// socket's owner (DESIGN.md, "attribution trap").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    /// Thread group id (the process id users see).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Task name.
    pub comm: Comm,
}

/// One TCP state transition, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel socket identity.
    pub sock: SocketId,
    /// Inode number of the socket's network namespace (as `stat -L /proc/<pid>/ns/net` shows
    /// it for a process inside); 0 when the kernel side could not read it (no kernel BTF).
    /// Two namespaces can hold the same addresses and ports at once.
    pub netns: u32,
    /// Local address.
    pub saddr: IpAddr,
    /// Local port.
    pub sport: u16,
    /// Remote address.
    pub daddr: IpAddr,
    /// Remote port.
    pub dport: u16,
    /// State before.
    pub old: TcpState,
    /// State after.
    pub new: TcpState,
    /// Task on CPU.
    pub task: Task,
}

impl Transition {
    /// 4 or 6.
    pub fn family(&self) -> u8 {
        if self.saddr.is_ipv4() { 4 } else { 6 }
    }
}

/// Why a ring-buffer record could not be decoded. Each is counted, never fatal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event ({TRANSITION_EVENT_SIZE} bytes)")]
    Truncated(usize),
    #[error("record of {0} bytes is longer than an event ({TRANSITION_EVENT_SIZE} bytes)")]
    Oversize(usize),
    #[error("unknown TCP state {0}")]
    UnknownState(u8),
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
}

/// Decodes one ring-buffer record that must be a transition.
pub fn decode(bytes: &[u8]) -> Result<Transition, DecodeError> {
    check_size(bytes.len())?;
    if bytes[KIND_OFFSET] != KIND_TRANSITION {
        return Err(DecodeError::UnknownKind(bytes[KIND_OFFSET]));
    }
    // SAFETY: the length is exactly the size of `TransitionEvent`, every bit pattern is valid
    // for it (integers only), and `read_unaligned` makes no alignment assumption.
    let ev: TransitionEvent =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TransitionEvent>()) };
    let (saddr, daddr) = (addr(ev.family, ev.saddr)?, addr(ev.family, ev.daddr)?);
    Ok(Transition {
        ts_ns: ev.ts_ns,
        sock: SocketId(ev.skaddr),
        netns: ev.netns,
        saddr,
        sport: ev.sport,
        daddr,
        dport: ev.dport,
        old: TcpState::try_from(ev.oldstate)?,
        new: TcpState::try_from(ev.newstate)?,
        task: Task {
            pid: (ev.pid_tgid >> 32) as u32,
            tid: ev.pid_tgid as u32,
            comm: Comm(ev.comm),
        },
    })
}

/// An address field of a wire record (every record kind lays them out alike): an IPv4
/// address in its first 4 bytes, an IPv6 address in all 16.
fn addr(family: u16, a: [u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(a))),
        other => Err(DecodeError::UnknownFamily(other)),
    }
}

/// Counts of records that could not be decoded, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeErrors {
    pub truncated: u64,
    pub oversize: u64,
    pub unknown_state: u64,
    pub unknown_family: u64,
    pub unknown_kind: u64,
}

impl DecodeErrors {
    /// Counts one error.
    pub fn count(&mut self, e: DecodeError) {
        match e {
            DecodeError::Truncated(_) => self.truncated += 1,
            DecodeError::Oversize(_) => self.oversize += 1,
            DecodeError::UnknownState(_) => self.unknown_state += 1,
            DecodeError::UnknownFamily(_) => self.unknown_family += 1,
            DecodeError::UnknownKind(_) => self.unknown_kind += 1,
        }
    }

    /// All malformed records.
    pub fn total(&self) -> u64 {
        self.truncated
            + self.oversize
            + self.unknown_state
            + self.unknown_family
            + self.unknown_kind
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An address as a wire record's address field holds it (the inverse of `addr`).
    pub(crate) fn wire_addr(a: &str) -> [u8; 16] {
        let mut b = [0u8; 16];
        match a.parse::<IpAddr>().expect("an address literal") {
            IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b = v6.octets(),
        }
        b
    }

    /// Hand-made wire bytes, laid out field by field as the kernel program writes them.
    fn wire(family: u16, old: u8, new: u8) -> Vec<u8> {
        wire_in(family, old, new, 4_026_531_833)
    }

    /// `wire`, in network namespace `netns`.
    fn wire_in(family: u16, old: u8, new: u8, netns: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(TRANSITION_EVENT_SIZE);
        b.extend_from_slice(&1_234_567_890u64.to_le_bytes()); // ts_ns
        b.extend_from_slice(&0xffff_8880_1234_5678u64.to_le_bytes()); // skaddr
        b.extend_from_slice(&((4242u64 << 32) | 4243).to_le_bytes()); // pid_tgid
        let (saddr, daddr) = if family == AF_INET6 {
            ("::1", "2001:db8::2")
        } else {
            ("127.0.0.1", "10.1.2.3")
        };
        b.extend_from_slice(&wire_addr(saddr));
        b.extend_from_slice(&wire_addr(daddr));
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"curl\x1b");
        b.extend_from_slice(&comm);
        b.extend_from_slice(&8080u16.to_le_bytes());
        b.extend_from_slice(&54321u16.to_le_bytes());
        b.extend_from_slice(&family.to_le_bytes());
        b.push(old);
        b.push(new);
        b.extend_from_slice(&netns.to_le_bytes());
        b.extend_from_slice(&[0; 4]); // reserved
        assert_eq!(b.len(), TRANSITION_EVENT_SIZE);
        b
    }

    #[test]
    fn metric_labels_are_the_kernel_names_lowercased() {
        for st in TcpState::ALL {
            assert_eq!(st.label(), st.name().to_ascii_lowercase(), "{st:?}");
        }
        assert_eq!(TcpState::CloseWait.label(), "close_wait");
    }

    #[test]
    fn decodes_ipv4() {
        let t = decode(&wire(AF_INET, 1, 8)).expect("valid record");
        assert_eq!(t.ts_ns, 1_234_567_890);
        assert_eq!(t.sock, SocketId(0xffff_8880_1234_5678));
        assert_eq!(t.saddr, "127.0.0.1".parse::<IpAddr>().expect("literal"));
        assert_eq!(t.daddr, "10.1.2.3".parse::<IpAddr>().expect("literal"));
        assert_eq!((t.sport, t.dport), (8080, 54321));
        assert_eq!((t.old, t.new), (TcpState::Established, TcpState::CloseWait));
        assert_eq!((t.task.pid, t.task.tid), (4242, 4243));
        assert_eq!(t.task.comm.as_bytes(), b"curl\x1b");
        assert_eq!(t.family(), 4);
        // The initial namespace's inode number on 6.18 (PROC_NET_INIT_INO, 0xeffffff9).
        assert_eq!(t.netns, 4_026_531_833);
    }

    #[test]
    fn decodes_the_namespace() {
        let t = decode(&wire_in(AF_INET6, 1, 8, 4_026_532_301)).expect("valid record");
        assert_eq!(t.netns, 4_026_532_301);
        assert_eq!(t.dport, 54321, "the fields before it are unmoved");
        // 0 is the kernel side's "unknown", passed on as it is.
        assert_eq!(decode(&wire_in(AF_INET, 1, 8, 0)).expect("valid").netns, 0);
        assert_eq!(
            decode(&wire_in(AF_INET, 1, 8, u32::MAX))
                .expect("valid")
                .netns,
            u32::MAX
        );
    }

    #[test]
    fn decodes_ipv6() {
        let t = decode(&wire(AF_INET6, 4, 5)).expect("valid record");
        assert_eq!(t.saddr, "::1".parse::<IpAddr>().expect("literal"));
        assert_eq!(t.daddr, "2001:db8::2".parse::<IpAddr>().expect("literal"));
        assert_eq!((t.old, t.new), (TcpState::FinWait1, TcpState::FinWait2));
        assert_eq!(t.family(), 6);
    }

    #[test]
    fn rejects_truncated_and_oversize() {
        let good = wire(AF_INET, 1, 8);
        assert_eq!(decode(&good[..87]), Err(DecodeError::Truncated(87)));
        // The size of the event before it carried its namespace.
        assert_eq!(decode(&good[..80]), Err(DecodeError::Truncated(80)));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated(0)));
        let mut big = good.clone();
        big.extend_from_slice(&[0; 8]);
        assert_eq!(decode(&big), Err(DecodeError::Oversize(96)));
    }

    #[test]
    fn unknown_values_are_errors() {
        assert_eq!(
            decode(&wire(AF_INET, 0, 8)),
            Err(DecodeError::UnknownState(0))
        );
        assert_eq!(
            decode(&wire(AF_INET, 1, 13)),
            Err(DecodeError::UnknownState(13))
        );
        assert_eq!(decode(&wire(1, 1, 8)), Err(DecodeError::UnknownFamily(1)));
        let mut odd = wire(AF_INET, 1, 8);
        odd[KIND_OFFSET] = 9;
        assert_eq!(decode_record(&odd), Err(DecodeError::UnknownKind(9)));
        assert_eq!(decode(&odd), Err(DecodeError::UnknownKind(9)));
        assert!(matches!(
            decode_record(&wire(AF_INET, 1, 8)),
            Ok(Record::Transition(_))
        ));
        let mut errs = DecodeErrors::default();
        errs.count(DecodeError::UnknownState(0));
        errs.count(DecodeError::Truncated(3));
        assert_eq!(
            (errs.unknown_state, errs.truncated, errs.total()),
            (1, 1, 2)
        );
    }

    #[test]
    fn state_names_round_trip() {
        for st in TcpState::ALL {
            assert_eq!(TcpState::try_from(st as u8), Ok(st));
            assert_eq!(TcpState::from_name(st.name()), Some(st));
        }
        assert_eq!(
            TcpState::from_name("tcp_close-wait"),
            Some(TcpState::CloseWait)
        );
        assert_eq!(TcpState::from_name("closewait"), None);
    }
}
