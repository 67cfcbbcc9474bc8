//! Resets on the wire: a socket that aborts its connection (a reset sent on `close()` with
//! `SO_LINGER {1, 0}` or with unread data: RFC 2525 §2.17), and a reset received from the
//! peer. They share the ring buffer, the record size and the time order with transitions: a
//! [`ResetEvent`] is as long as a `TransitionEvent`, starts with the same `ts_ns`, and names
//! its kind in the byte where a transition carries 0 (the low byte of its `reserved` word, at
//! [`KIND_OFFSET`]), so the agent's drain and reorder handle both alike and the decoder tells
//! them apart.

/// Where every record names its kind: byte 84, the low byte of `TransitionEvent::reserved`
/// (always 0) and [`ResetEvent::kind`].
pub const KIND_OFFSET: usize = 84;
/// A TCP state transition (`TransitionEvent`).
pub const KIND_TRANSITION: u8 = 0;
/// A reset the socket sent on its own (an abort: `tcp_send_active_reset`).
pub const KIND_ABORT: u8 = 1;
/// A reset received from the peer (`tcp:tcp_receive_reset`).
pub const KIND_RESET_RECEIVED: u8 = 2;

/// [`ResetEvent::reason`] when the kernel gives none (before 6.10, or a received reset).
pub const REASON_NONE: u8 = 0xff;

/// Bits of [`ResetEvent::flags`].
pub mod flag {
    /// The socket lock was held by a task (`sk->sk_lock.owned`): the program ran in the process
    /// that locked the socket (`close()`, `connect(AF_UNSPEC)`, `SOCK_DESTROY`), never in a
    /// softirq or a timer, which only work on a socket no task owns. The on-CPU task is then
    /// the caller, and its pid and comm can be trusted.
    pub const IN_TASK: u8 = 1;
    /// `SO_LINGER` is on with a zero linger time (`SOCK_LINGER` in `sk_flags`, `sk_lingertime`
    /// 0): `close()` aborts instead of sending a FIN.
    pub const LINGER_ZERO: u8 = 2;
    /// The peer's FIN was received (`SOCK_DONE`): `rcv_nxt` counts it, so the unread byte count
    /// was lowered by one, as `SIOCINQ` does.
    pub const FIN_RECEIVED: u8 = 4;
    /// The queue lengths could not be read (no BTF offsets for them): both are 0 and unknown.
    pub const QUEUES_UNKNOWN: u8 = 8;
}

/// One reset, sent or received, as the kernel program submits it.
///
/// Keep in sync with the decoder in `tcpwait-agent/src/event/reset.rs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetEvent {
    /// `bpf_ktime_get_ns()`, as in a transition (same offset: the agent sorts both by it).
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`.
    pub skaddr: u64,
    /// Thread group id of the task on CPU (the caller when [`flag::IN_TASK`] is set).
    pub pid: u32,
    /// Inode number of the socket's network namespace; 0 when unknown.
    pub netns: u32,
    /// Local address (IPv4 in the first 4 bytes, network order, or IPv6).
    pub saddr: [u8; 16],
    /// Remote address.
    pub daddr: [u8; 16],
    /// `comm` of the task on CPU, NUL-padded.
    pub comm: [u8; 16],
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    /// Bytes written but not acknowledged by the peer (`write_seq - snd_una`, what `SIOCOUTQ`
    /// reports): thrown away by an abort.
    pub unsent: u32,
    /// Bytes received but not read (`rcv_nxt - copied_seq`, less the FIN: what `SIOCINQ`
    /// reports): thrown away by `close()`.
    pub unread: u32,
    /// [`KIND_ABORT`] or [`KIND_RESET_RECEIVED`]; at [`KIND_OFFSET`].
    pub kind: u8,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u8,
    /// `enum sk_rst_reason` as the kernel passed it (6.10 and later), or [`REASON_NONE`].
    pub reason: u8,
    /// [`flag`] bits.
    pub flags: u8,
}

/// Size of [`ResetEvent`]: the size of a `TransitionEvent`.
pub const RESET_EVENT_SIZE: usize = 88;
const _: () = assert!(core::mem::size_of::<ResetEvent>() == RESET_EVENT_SIZE);
const _: () = assert!(RESET_EVENT_SIZE == crate::TRANSITION_EVENT_SIZE);
const _: () = assert!(core::mem::offset_of!(ResetEvent, kind) == KIND_OFFSET);
const _: () = assert!(core::mem::offset_of!(crate::TransitionEvent, reserved) == KIND_OFFSET);

/// Indices into the reset programs' per-CPU `RESET_COUNTERS` map (apart from the transition
/// programs' `COUNTERS`, so that no two programs that can nest share a slot).
pub mod counter {
    /// Aborts submitted into the ring buffer.
    pub const ABORT_SENT: u32 = 0;
    /// Aborts lost: the ring buffer was full.
    pub const ABORT_RESERVE_FAILED: u32 = 1;
    /// Received resets submitted.
    pub const RECEIVED_SENT: u32 = 2;
    /// Received resets lost: the ring buffer was full.
    pub const RECEIVED_RESERVE_FAILED: u32 = 3;
    /// Number of counters.
    pub const COUNT: u32 = 4;
}

/// Where the reset programs read a socket, from the running kernel's BTF (the addresses,
/// ports and namespace come from `SockOffsets`). An offset of 0 means "not found": the
/// programs then send the queues as unknown ([`flag::QUEUES_UNKNOWN`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetOffsets {
    /// `sock.sk_lock.owned` (int).
    pub lock_owned: u32,
    /// `sock.sk_flags` (unsigned long).
    pub sk_flags: u32,
    /// `sock.sk_lingertime` (unsigned long).
    pub lingertime: u32,
    /// `tcp_sock.write_seq` (u32).
    pub write_seq: u32,
    /// `tcp_sock.snd_una` (u32).
    pub snd_una: u32,
    /// `tcp_sock.rcv_nxt` (u32).
    pub rcv_nxt: u32,
    /// `tcp_sock.copied_seq` (u32).
    pub copied_seq: u32,
    /// Bit of `SOCK_LINGER` in `sk_flags` (`enum sock_flags`).
    pub linger_bit: u32,
    /// Bit of `SOCK_DONE` in `sk_flags`.
    pub done_bit: u32,
    /// Nonzero: the program's third argument is `enum sk_rst_reason` (`tcp:tcp_send_reset` on
    /// 6.10 and later); read it.
    pub has_reason: u32,
}
const _: () = assert!(core::mem::size_of::<ResetOffsets>() == 40);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, u32 fields only, no padding (size asserted above).
unsafe impl aya::Pod for ResetOffsets {}
