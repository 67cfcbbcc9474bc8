//! tcpwait's kernel program: one fixed-size event per TCP state transition.
//!
//! Attached to the classic tracepoint `sock:inet_sock_set_state`, which fires for every
//! `inet_sk_set_state`/`inet_sk_state_store` (TCP, SCTP and MPTCP). It keeps TCP only, copies
//! the tracepoint record into a ring-buffer reservation, and submits it. A failed reservation is
//! counted in a per-CPU map, never silently lost. It never logs on this path.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use tcpwait_common::{
    AF_INET6, IPPROTO_TCP, RING_BYTES, SockOffsets, TransitionEvent, WAKEUP_BYTES, counter, record,
};

/// Transitions for the agent.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Per-CPU counters, indexed by `tcpwait_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// 1 while the main program runs on this CPU. The kernel skips a classic-tracepoint program
/// that would nest into itself (and any other) on one CPU (`bpf_prog_active`); the
/// raw-tracepoint program below has its own guard, runs for the nested hit, and records it
/// only when this flag says the main program was interrupted.
#[map]
static BUSY: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// `struct sock` field offsets from the running kernel's BTF, set by the agent at load.
#[unsafe(no_mangle)]
static SOCK_OFFSETS: SockOffsets = SockOffsets {
    family: 0,
    sport: 0,
    dport: 0,
    rcv_saddr: 0,
    daddr: 0,
    v6_rcv_saddr: 0,
    v6_daddr: 0,
    protocol: 0,
    protocol_size: 0,
    always: 0,
};

/// Bytes one event takes in the ring: the 8-byte record header plus the event, rounded up to 8.
const RECORD_BYTES: u64 = ((8 + core::mem::size_of::<TransitionEvent>() as u64) + 7) & !7;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    set_busy(1);
    // SAFETY: the offsets are the tracepoint record's layout, checked by the agent at load.
    unsafe { try_inet_sock_set_state(&ctx) };
    set_busy(0);
    0
}

#[inline(always)]
fn set_busy(v: u32) {
    if let Some(slot) = BUSY.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; see `bump`.
        unsafe { *slot = v };
    }
}

/// The rescue path: the same transition, seen through the raw tracepoint (args: `struct sock
/// *sk, int oldstate, int newstate`). Records only when the main program is busy on this CPU,
/// i.e. when the kernel skipped the main program for this nested hit.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_nested(ctx: RawTracePointContext) -> i32 {
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    let busy = BUSY.get(0).copied().unwrap_or(0) != 0;
    if !busy && off.always == 0 {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let oldstate: u64 = ctx.arg(1);
    let newstate: u64 = ctx.arg(2);
    // SAFETY: bpf_probe_read_kernel checks every address; offsets come from the kernel's BTF.
    unsafe { rescue(sk, state_u8(oldstate), state_u8(newstate), &off) };
    0
}

#[inline(always)]
unsafe fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper validates the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

#[inline(always)]
unsafe fn rescue(sk: u64, oldstate: u8, newstate: u8, off: &SockOffsets) {
    let protocol = unsafe {
        if off.protocol_size == 1 {
            read::<u8>(sk + u64::from(off.protocol)).map(u16::from)
        } else {
            read::<u16>(sk + u64::from(off.protocol))
        }
    };
    if protocol != Some(IPPROTO_TCP) {
        return;
    }
    let family: u16 = unsafe { read(sk + u64::from(off.family)) }.unwrap_or(0);
    let (saddr, daddr) = if family == AF_INET6 {
        unsafe {
            (
                read::<[u8; 16]>(sk + u64::from(off.v6_rcv_saddr)).unwrap_or([0; 16]),
                read::<[u8; 16]>(sk + u64::from(off.v6_daddr)).unwrap_or([0; 16]),
            )
        }
    } else {
        unsafe {
            (
                words(
                    u64::from(read::<u32>(sk + u64::from(off.rcv_saddr)).unwrap_or(0)),
                    0,
                ),
                words(
                    u64::from(read::<u32>(sk + u64::from(off.daddr)).unwrap_or(0)),
                    0,
                ),
            )
        }
    };
    let sport: u16 = u16::from_be(unsafe { read(sk + u64::from(off.sport)) }.unwrap_or(0));
    let dport: u16 = u16::from_be(unsafe { read(sk + u64::from(off.dport)) }.unwrap_or(0));
    let Some(mut entry) = EVENTS.reserve::<TransitionEvent>(0) else {
        bump(counter::RESCUE_RESERVE_FAILED);
        return;
    };
    entry.write(TransitionEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: sk,
        pid_tgid: bpf_get_current_pid_tgid(),
        saddr,
        daddr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        sport,
        dport,
        family,
        oldstate,
        newstate,
    });
    // Never a wake-up from here: this runs nested in an interrupt already.
    entry.submit(BPF_RB_NO_WAKEUP.into());
    bump(counter::RESCUED);
}

/// Reads a field of the tracepoint record. The record is the program's context: the verifier
/// allows direct, aligned loads from it, which are cheaper than `bpf_probe_read`.
#[inline(always)]
unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the caller passes an in-record offset aligned for T.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// 16 address bytes from two words read in memory order (native endianness both ways).
#[inline(always)]
fn words(lo: u64, hi: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&lo.to_ne_bytes());
    out[8..].copy_from_slice(&hi.to_ne_bytes());
    out
}

/// A kernel state as one byte. Kernel TCP states are 1..=12; a value that does not fit is
/// sent as 0, which the agent counts as an unknown state (truncating 257 to 1 would forge
/// ESTABLISHED).
#[inline(always)]
fn state_u8<T: TryInto<u8>>(state: T) -> u8 {
    state.try_into().unwrap_or(0)
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU. The rescue program runs nested
        // inside the main program on the same CPU (that is its purpose), so the two never
        // share a slot: each has its own counters (a plain `+= 1` on a shared slot could lose
        // an increment, and the BPF target has no atomic read-modify-write in `core`).
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
unsafe fn try_inet_sock_set_state(ctx: &TracePointContext) {
    // SAFETY (whole function): offsets are within the record and naturally aligned.
    let protocol: u16 = unsafe { field(ctx, record::PROTOCOL) };
    if protocol != IPPROTO_TCP {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<TransitionEvent>(0) else {
        bump(counter::RESERVE_FAILED);
        return;
    };
    let family: u16 = unsafe { field(ctx, record::FAMILY) };
    // Addresses are copied as whole words at constant offsets: the verifier rejects loads
    // through a ctx pointer that was moved (as a byte-wise memcpy loop would do).
    let (saddr, daddr) = if family == AF_INET6 {
        unsafe {
            (
                words(
                    field(ctx, record::SADDR_V6),
                    field(ctx, record::SADDR_V6 + 8),
                ),
                words(
                    field(ctx, record::DADDR_V6),
                    field(ctx, record::DADDR_V6 + 8),
                ),
            )
        }
    } else {
        unsafe {
            (
                words(u64::from(field::<u32>(ctx, record::SADDR)), 0),
                words(u64::from(field::<u32>(ctx, record::DADDR)), 0),
            )
        }
    };
    let oldstate: i32 = unsafe { field(ctx, record::OLDSTATE) };
    let newstate: i32 = unsafe { field(ctx, record::NEWSTATE) };
    entry.write(TransitionEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: unsafe { field(ctx, record::SKADDR) },
        pid_tgid: bpf_get_current_pid_tgid(),
        saddr,
        daddr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        sport: unsafe { field(ctx, record::SPORT) },
        dport: unsafe { field(ctx, record::DPORT) },
        family,
        oldstate: state_u8(oldstate),
        newstate: state_u8(newstate),
    });
    // Batch wake-ups: wake the reader once, when the pending data *crosses* WAKEUP_BYTES.
    // Waking on every event above the threshold (a reader that fell behind) would mean one
    // irq_work interrupt per event, and interrupts inside this program are what let softirq
    // work nest into the tracepoint, which the kernel then skips (recursion misses). The agent
    // also drains on a 50 ms timer, so data below the threshold is never stranded.
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA.into());
    let flags = if pending >= WAKEUP_BYTES && pending < WAKEUP_BYTES + RECORD_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags.into());
    bump(counter::SENT);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
