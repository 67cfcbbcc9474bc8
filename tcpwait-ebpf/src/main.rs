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
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use tcpwait_common::{
    AF_INET6, IPPROTO_TCP, RING_BYTES, TransitionEvent, WAKEUP_BYTES, counter, record,
};

/// Transitions for the agent.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Per-CPU counters, indexed by `tcpwait_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Bytes one event takes in the ring: the 8-byte record header plus the event, rounded up to 8.
const RECORD_BYTES: u64 = ((8 + core::mem::size_of::<TransitionEvent>() as u64) + 7) & !7;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: the offsets are the tracepoint record's layout, checked by the agent at load.
    unsafe { try_inet_sock_set_state(&ctx) };
    0
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

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU; the program does not nest with
        // itself on one CPU (the kernel's recursion guard skips a nested run instead).
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
        // Kernel TCP states are 1..=12; a wider value is passed on truncated and the agent
        // counts it as unknown.
        oldstate: oldstate as u8,
        newstate: newstate as u8,
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
