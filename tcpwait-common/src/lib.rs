//! Wire types shared by the kernel program (`tcpwait-ebpf`) and the agent.
//!
//! Everything here crosses the ring buffer or a BPF map as raw bytes, so every type is
//! `#[repr(C)]`, `Copy`, built from fixed-width integers with explicit padding, and its size
//! is asserted at compile time. States and families stay raw integers on the wire: the agent
//! converts them into domain types once, at its decoding boundary, and counts values it does
//! not know instead of failing.
#![no_std]

mod marks;
pub mod reset;

pub use marks::{Mark, STAGE_MARKS, STATE_CLOSE, STATE_LISTEN};

/// One TCP state transition, as the kernel program submits it into the ring buffer.
///
/// Keep in sync with the decoder in `tcpwait-agent/src/event.rs`, which reads these bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransitionEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds since boot.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    /// `bpf_get_current_pid_tgid()` of the task on CPU: tgid in the upper 32 bits.
    /// This task is *not* the socket's owner in softirq context (see DESIGN.md).
    pub pid_tgid: u64,
    /// Source address: IPv4 in the first 4 bytes (network order), or IPv6.
    pub saddr: [u8; 16],
    /// Destination address, laid out as `saddr`.
    pub daddr: [u8; 16],
    /// `comm` of the task on CPU, NUL-padded.
    pub comm: [u8; 16],
    /// Local port, host byte order (the tracepoint converts it).
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// Kernel `TCP_*` state before the transition.
    pub oldstate: u8,
    /// Kernel `TCP_*` state after the transition.
    pub newstate: u8,
    /// Inode number of the socket's network namespace (`sk->__sk_common.skc_net.net->ns.inum`,
    /// what `stat /proc/<pid>/ns/net` shows for a process in it); 0 when unknown (no kernel
    /// BTF offsets for it). Two namespaces can hold the same 4-tuple at once.
    pub netns: u32,
    /// Always 0: keeps the size a multiple of 8 without implicit padding.
    pub reserved: u32,
}

/// Size of [`TransitionEvent`] on the wire.
pub const TRANSITION_EVENT_SIZE: usize = 88;
const _: () = assert!(core::mem::size_of::<TransitionEvent>() == TRANSITION_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<TransitionEvent>() == 8);

/// Events a CPU stages before it hands them to the ring buffer as one record.
pub const STAGE_EVENTS: usize = 32;

/// A CPU's staged events (one `STAGE` per-CPU map slot). The main program appends each
/// transition here and hands the staged events to the ring buffer as one record of
/// `len` × [`TransitionEvent`] when the stage is full, when its oldest event is
/// [`STAGE_MAX_AGE_NS`] old, or when the agent runs the flush program on that CPU (every
/// [`FLUSH_INTERVAL_NS`]): one ring reservation per batch instead of one per event, and no
/// contention on the ring's lock per event. Records therefore arrive out of time order across
/// CPUs; the agent sorts them by `ts_ns` and hands on only what is older than its last
/// complete flush of every CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stage {
    /// Events staged in `events[..len]`.
    pub len: u32,
    /// 1 while the main program works on the stage, 2 while the flush program does; each
    /// leaves the stage alone if it finds the other's mark (it interrupted it on this CPU).
    pub busy: u32,
    /// `ts_ns` of `events[0]`.
    pub first_ts: u64,
    /// Marks in `marks[..marks_len]`, a stack (see [`Mark`]).
    pub marks_len: u32,
    pub _reserved: u32,
    pub marks: [Mark; STAGE_MARKS],
    pub events: [TransitionEvent; STAGE_EVENTS],
}
const _: () = assert!(
    core::mem::size_of::<Stage>()
        == 24 + STAGE_MARKS * core::mem::size_of::<Mark>() + STAGE_EVENTS * TRANSITION_EVENT_SIZE
);

/// Staged events at least this old go to the ring with the next transition on their CPU.
pub const STAGE_MAX_AGE_NS: u64 = 5_000_000;

/// The agent runs the flush program on every online CPU this often (at most; it does so from
/// its drain loop). A quiet CPU's staged events wait this long at most, plus the agent's drain.
pub const FLUSH_INTERVAL_NS: u64 = 25_000_000;

/// The flush program's return value: the stage was flushed (or empty).
pub const FLUSH_DONE: i32 = 0;
/// The flush program's return value: it interrupted the main program on that CPU and left the
/// stage alone.
pub const FLUSH_BUSY: i32 = 1;

/// Events sent outside a stage (the rescue program's, the classic tracepoint's, one that
/// interrupted the flush program) are reserved in the ring some instants after their `ts_ns`
/// is taken: the agent hands on only events this much older than its last complete flush. A
/// later one is handed on at once, counted as out of order.
pub const IN_FLIGHT_NS: u64 = 1_000_000;

/// `AF_INET` as the kernel spells it.
pub const AF_INET: u16 = 2;
/// `AF_INET6` as the kernel spells it.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`: the only protocol the kernel program forwards.
pub const IPPROTO_TCP: u16 = 6;

/// Indices into the per-CPU `COUNTERS` array map.
pub mod counter {
    /// Events submitted into the ring buffer.
    pub const SENT: u32 = 0;
    /// Events dropped because the ring buffer was full (`bpf_ringbuf_reserve` or, for a
    /// staged batch, `bpf_ringbuf_output` failed).
    pub const RESERVE_FAILED: u32 = 1;
    /// Events the rescue program recorded because they nested into the main program on their
    /// CPU (the kernel skipped the main program for them: a recursion miss, rescued); every
    /// event in the test mode that makes this program record everything.
    pub const RESCUED: u32 = 2;
    /// Nested transitions the rescue program could not record: ring full. Apart from
    /// [`RESERVE_FAILED`] so that the agent can tell the main program's runs from the rescue
    /// program's.
    pub const RESCUE_RESERVE_FAILED: u32 = 3;
    /// Nested transitions the rescue program found not to be TCP (SCTP, MPTCP): nothing
    /// is lost.
    pub const NESTED_NOT_TCP: u32 = 4;
    /// Events the flush program sent into the ring buffer (the main program's staged ones).
    pub const FLUSHED: u32 = 5;
    /// Staged events the flush program could not send: ring full.
    pub const FLUSH_RESERVE_FAILED: u32 = 6;
    /// Runs of the main program for a transition of another protocol (SCTP, MPTCP).
    pub const NOT_TCP: u32 = 7;
    /// Number of counters; the size of the map.
    pub const COUNT: u32 = 8;
}

/// Ring buffer size in bytes: a power of two and a multiple of the page size.
/// 4 MiB holds ~47k events (batches of 32 × 88 bytes, 8 bytes of header each; ~43k sent one
/// by one): a third of a second of the maximum loopback rate measured on the project's
/// machines (~140k transitions/s), against a reader that drains every 50 ms or per 64 KiB. The agent maps the data area twice (the
/// kernel's wrap-around mapping), so this size counts twice in its RSS.
pub const RING_BYTES: u32 = 4 << 20;

/// The kernel program asks for a wake-up only when at least this many bytes are pending.
/// Batching wake-ups matters: a per-event wake-up costs 5–10 µs on the project's machines.
/// The agent polls on a short timer too, so a quiet socket is never stuck in the ring.
pub const WAKEUP_BYTES: u64 = 64 * 1024;

/// The record layout of the classic tracepoint `sock:inet_sock_set_state`, as its format file
/// (`/sys/kernel/tracing/events/sock/inet_sock_set_state/format`) gives it; stable since Linux
/// 4.16. The kernel program reads these offsets; the agent checks them against the running
/// kernel's format file before it attaches, and refuses to attach on a mismatch.
pub mod record {
    /// `(field name, offset, size)` for every field the kernel program reads.
    pub const FIELDS: [(&str, usize, usize); 11] = [
        ("skaddr", SKADDR, 8),
        ("oldstate", OLDSTATE, 4),
        ("newstate", NEWSTATE, 4),
        ("sport", SPORT, 2),
        ("dport", DPORT, 2),
        ("family", FAMILY, 2),
        ("protocol", PROTOCOL, 2),
        ("saddr", SADDR, 4),
        ("daddr", DADDR, 4),
        ("saddr_v6", SADDR_V6, 16),
        ("daddr_v6", DADDR_V6, 16),
    ];
    /// `const void *skaddr`.
    pub const SKADDR: usize = 8;
    /// `int oldstate`.
    pub const OLDSTATE: usize = 16;
    /// `int newstate`.
    pub const NEWSTATE: usize = 20;
    /// `__u16 sport`, host order.
    pub const SPORT: usize = 24;
    /// `__u16 dport`, host order.
    pub const DPORT: usize = 26;
    /// `__u16 family`.
    pub const FAMILY: usize = 28;
    /// `__u16 protocol`.
    pub const PROTOCOL: usize = 30;
    /// `__u8 saddr[4]`.
    pub const SADDR: usize = 32;
    /// `__u8 daddr[4]`.
    pub const DADDR: usize = 36;
    /// `__u8 saddr_v6[16]`.
    pub const SADDR_V6: usize = 40;
    /// `__u8 daddr_v6[16]`.
    pub const DADDR_V6: usize = 56;
}

/// Offsets into `struct sock` for the BTF- and raw-tracepoint programs, read by the agent from
/// the running kernel's BTF and passed in as a read-only global (`SOCK_OFFSETS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `skc_family` (u16).
    pub family: u32,
    /// `inet_sock.inet_sport`: local port, network order (u16). Not `skc_num`, which the
    /// kernel clears when it unhashes the socket, before the last transition to CLOSE.
    pub sport: u32,
    /// `skc_dport`: remote port, network order (u16).
    pub dport: u32,
    /// `skc_rcv_saddr` (IPv4, 4 bytes).
    pub rcv_saddr: u32,
    /// `skc_daddr` (IPv4, 4 bytes).
    pub daddr: u32,
    /// `skc_v6_rcv_saddr` (16 bytes).
    pub v6_rcv_saddr: u32,
    /// `skc_v6_daddr` (16 bytes).
    pub v6_daddr: u32,
    /// `sk_protocol`.
    pub protocol: u32,
    /// Size of `sk_protocol`: 1 or 2 bytes.
    pub protocol_size: u32,
    /// `__sk_common.skc_net.net`: the `struct net *` of the socket's namespace (inside the
    /// `possible_net_t` wrapper). 0: not known, the programs send `netns` 0.
    pub net: u32,
    /// `ns.inum` in `struct net`: the namespace's inode number (u32). 0: not known; the
    /// agent sets both or neither, and the programs test only this one.
    pub net_inum: u32,
    /// Nonzero: the rescue program records every transition, not only nested ones (for the
    /// test that compares the programs' decoding).
    pub always: u32,
    /// `sk_txhash` (u32): part of the main and rescue programs' marks (see [`Mark::new`]).
    pub txhash: u32,
    /// Nonzero: tracing programs may call `bpf_get_socket_cookie` (Linux ≥ 5.12: the kernel's
    /// BTF has `bpf_get_socket_ptr_cookie`), and the marks of transitions from LISTEN carry
    /// the new socket's cookie in place of its hash (see [`Mark::new`]). 0: the verifier
    /// never sees the call (a constant branch).
    pub cookie: u32,
}
const _: () = assert!(core::mem::size_of::<SockOffsets>() == 56);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, u32 fields only, no padding (size asserted above).
unsafe impl aya::Pod for SockOffsets {}

#[cfg(feature = "user")]
// SAFETY: `TransitionEvent` is `repr(C)`, has no padding (size asserted above), and every
// field is an integer or an integer array, so every bit pattern is a valid value.
unsafe impl aya::Pod for TransitionEvent {}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers and `TransitionEvent`s only, no padding (size asserted above).
unsafe impl aya::Pod for Stage {}
