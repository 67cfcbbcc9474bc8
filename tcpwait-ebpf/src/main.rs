//! tcpwait's kernel programs: one fixed-size event per TCP state transition.
//!
//! The tracepoint `sock:inet_sock_set_state` fires for every `inet_sk_set_state` and
//! `inet_sk_state_store` (TCP, SCTP and MPTCP). The main program keeps TCP only and sends one
//! event per transition; an event the ring buffer has no room for is counted in a per-CPU map,
//! never silently lost. Nothing logs on this path. The main program comes in two forms:
//! - `inet_sock_set_state_btf`, a BTF tracepoint (`tp_btf`), the one the agent attaches: the
//!   kernel builds no trace record for it, and it reads `struct sock` directly (BTF-checked,
//!   fault-safe loads) at offsets the agent takes from the running kernel's BTF. It stages
//!   events per CPU and hands them to the ring in batches (see `tcpwait_common::Stage`); the
//!   agent runs `flush_stage` on every CPU to take what a quiet CPU has staged;
//! - `inet_sock_set_state`, the classic tracepoint, which copies the kernel's trace record
//!   into its own reservation: the fallback where the kernel has no BTF, and the reference a
//!   test compares against.
//!
//! A second BTF program, `inet_sock_set_state_nested`, records the transitions the kernel
//! skips because they nest into the main program on one CPU (see `nesting`).
//!
//! Every run of the main program ends in exactly one counter or event: sent (staged, then
//! `SENT`/`FLUSHED`), lost to a full ring (`*_RESERVE_FAILED`) or not TCP (`NOT_TCP`); every run of
//! the rescue program that finds the main program's mark does the same with its own counters. The agent adds them up against the kernel's count of the main
//! program's runs and recursion misses (`tcpwait-agent/src/probe/account.rs`).
#![no_std]
#![no_main]
// `core::intrinsics::atomic_xadd` (see `add`); the eBPF build runs with RUSTC_BOOTSTRAP=1.
#![allow(internal_features)]
#![feature(core_intrinsics, adt_const_params)]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use tcpwait_common::{
    FLUSH_BUSY, FLUSH_DONE, RING_BYTES, STAGE_EVENTS, STAGE_MARKS, STATE_CLOSE, SockOffsets, Stage,
    TransitionEvent, WAKEUP_BYTES, counter,
};

use sock::{Direct, Fields, sock_fields, write_event};

mod classic;
mod nesting;
mod resets;
mod sock;

/// Transitions for the agent.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Each CPU's staged events (see `tcpwait_common::Stage`). Only the main BTF program (which
/// the kernel never nests into itself on one CPU) and `flush_stage` touch a CPU's stage, each
/// under the stage's `busy` mark: the one that finds it set (it interrupted the other, on the
/// same CPU) leaves the stage alone. The agent reads what is left after it has detached both.
#[map]
static STAGE: PerCpuArray<Stage> = PerCpuArray::with_max_entries(1, 0);

/// `[0]`: how old the oldest staged event may get before the next transition on its CPU sends
/// the stage (`tcpwait_common::STAGE_MAX_AGE_NS`). The agent sets it once it has run
/// `flush_stage` on every CPU; until then it is 0, and every event goes to the ring at once.
#[map]
static STAGE_AGE: Array<u64> = Array::with_max_entries(1, 0);

/// Per-CPU counters, indexed by `tcpwait_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

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
    net: 0,
    net_inum: 0,
    always: 0,
    txhash: 0,
    cookie: 0,
};

/// Bytes one event takes in the ring: the 8-byte record header plus the event, rounded up to 8.
const RECORD_BYTES: u64 = ((8 + core::mem::size_of::<TransitionEvent>() as u64) + 7) & !7;

/// The main program as a BTF tracepoint (args: `struct sock *sk, int oldstate, int newstate`).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let Some(stage) = STAGE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's stage; its marks are a stack that nested runs leave as they found it
    // (see `nesting`), the rest is taken under `busy` (see `STAGE`).
    let stage = unsafe { &mut *stage };
    let sk: u64 = ctx.arg(0);
    let oldstate: u64 = ctx.arg(1);
    let newstate: u64 = ctx.arg(2);
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    let slot = stage.push_mark(nesting::mark(sk, oldstate, newstate, &off));
    if newstate == STATE_CLOSE {
        // The socket's last transition before the kernel may free it (see `nesting`).
        stage.forget_socket(sk, slot);
    }
    main_run(stage, sk, oldstate, newstate, &off);
    0
}

#[inline(always)]
fn main_run(stage: &mut Stage, sk: u64, oldstate: u64, newstate: u64, off: &SockOffsets) {
    // SAFETY: `sk` is the kernel's BTF-typed `struct sock *`: the verifier checks every direct
    // load against the type and the kernel turns a fault into a zero read.
    let Some(fields) =
        (unsafe { sock_fields::<Direct>(sk, oldstate as i32, newstate as i32, off) })
    else {
        bump(counter::NOT_TCP);
        return;
    };
    // SAFETY: a plain load of this CPU's slot, volatile so it is not cached.
    if unsafe { core::ptr::read_volatile(&stage.busy) } != 0 {
        // This interrupted `flush_stage` on this CPU (run by the agent in process context), or
        // (kernels without the per-program recursion guard) this program itself: the stage is
        // not ours now; send this one on its own.
        send_now(&fields, MAIN_COUNTERS);
        return;
    }
    set_busy(stage, 1);
    let mut n = staged(stage);
    if n == STAGE_EVENTS {
        // Never left full (a full stage is flushed at once); keep the bound for the verifier.
        flush(stage, n, MAIN_COUNTERS);
        n = 0;
    }
    if let Some(slot) = stage.events.get_mut(n) {
        // Every access to the stage is volatile, so none moves across the `busy` marks.
        // SAFETY (the block): stores in this CPU's slot, and plain loads of it.
        let ts = unsafe { write_event(slot, &fields) };
        if n == 0 {
            unsafe { core::ptr::write_volatile(&mut stage.first_ts, ts) };
        }
        n += 1;
        let max_age = STAGE_AGE.get(0).copied().unwrap_or(0);
        let first_ts = unsafe { core::ptr::read_volatile(&stage.first_ts) };
        if n == STAGE_EVENTS || ts.wrapping_sub(first_ts) >= max_age {
            flush(stage, n, MAIN_COUNTERS);
        } else {
            set_staged(stage, n);
        }
    }
    set_busy(stage, 0);
}

/// Hands a CPU's staged events to the ring buffer. Never attached: the agent runs it on each
/// CPU in turn (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`, an interrupt on that CPU, or
/// process context on the agent's own) every `tcpwait_common::FLUSH_INTERVAL_NS`. Returns
/// `FLUSH_DONE`, or `FLUSH_BUSY` if it interrupted the main program, whose stage it then
/// leaves alone: the agent then knows that CPU may still hold older events.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn flush_stage(_ctx: RawTracePointContext) -> i32 {
    let Some(stage) = STAGE.get_ptr_mut(0) else {
        return FLUSH_DONE;
    };
    // SAFETY: this CPU's stage, taken under its `busy` mark (see `STAGE`).
    let stage = unsafe { &mut *stage };
    // SAFETY: a plain load of this CPU's slot, volatile so it is not cached.
    if unsafe { core::ptr::read_volatile(&stage.busy) } != 0 {
        return FLUSH_BUSY;
    }
    set_busy(stage, 2);
    let n = staged(stage);
    if n > 0 {
        flush(stage, n, (counter::FLUSHED, counter::FLUSH_RESERVE_FAILED));
    }
    set_busy(stage, 0);
    FLUSH_DONE
}

/// Sends one event to the ring buffer at once; counts it in `counters.0` if sent, in
/// `counters.1` if the ring was full.
#[inline(always)]
fn send_now(fields: &Fields, counters: (u32, u32)) {
    match EVENTS.reserve::<TransitionEvent>(0) {
        Some(mut entry) => {
            // SAFETY: the reservation is sized for one event.
            unsafe { write_event(entry.as_mut_ptr(), fields) };
            entry.submit(wakeup_flags(RECORD_BYTES, RECORD_BYTES));
            bump(counters.0);
        }
        None => bump(counters.1),
    }
}

/// Raises or clears the stage's `busy` mark. The stage's other accesses are volatile too, so
/// the compiler keeps them between the marks (the BPF backend has no compiler fence); the
/// interrupting reader is on this same CPU, so no hardware barrier is needed.
#[inline(always)]
fn set_busy(stage: &mut Stage, v: u32) {
    // SAFETY: a plain store to this CPU's slot.
    unsafe { core::ptr::write_volatile(&mut stage.busy, v) };
}

/// Events staged, bounded by the stage's size.
#[inline(always)]
fn staged(stage: &Stage) -> usize {
    // SAFETY: a plain load of this CPU's slot.
    let n = unsafe { core::ptr::read_volatile(&stage.len) } as usize;
    n.min(STAGE_EVENTS)
}

#[inline(always)]
fn set_staged(stage: &mut Stage, n: usize) {
    // SAFETY: a plain store to this CPU's slot.
    unsafe { core::ptr::write_volatile(&mut stage.len, n as u32) };
}

/// The main program's counters of events sent and lost to a full ring.
const MAIN_COUNTERS: (u32, u32) = (counter::SENT, counter::RESERVE_FAILED);

/// Outputs the first `n` staged events as one ring record and empties the stage; a full ring
/// loses them, counted in `counters.1` (sent ones in `counters.0`).
#[inline(always)]
fn flush(stage: &mut Stage, n: usize, counters: (u32, u32)) {
    let n = n.min(STAGE_EVENTS);
    if let Some(events) = stage.events.get(..n) {
        let bytes = 8 + (n * core::mem::size_of::<TransitionEvent>()) as u64;
        match EVENTS.output::<[TransitionEvent]>(events, wakeup_flags(0, bytes)) {
            Ok(()) => add(counters.0, n as u64),
            Err(_) => add(counters.1, n as u64),
        }
    }
    set_staged(stage, 0);
}

/// The rescue path: the same transition, run after the main program (args: `struct sock *sk,
/// int oldstate, int newstate`). Records only the transitions that nested into the main
/// program on this CPU, which the kernel skipped it for (see `nesting`).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_nested(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    let sk: u64 = ctx.arg(0);
    let oldstate: u64 = ctx.arg(1);
    let newstate: u64 = ctx.arg(2);
    if off.always == 0 {
        let Some(stage) = STAGE.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: this CPU's stage; only its marks are touched (see `nesting`).
        let stage = unsafe { &mut *stage };
        if stage.take_mark(nesting::mark(sk, oldstate, newstate, &off)) {
            return 0;
        }
        if newstate == STATE_CLOSE {
            // Recorded here, not by the main program: forget the socket's leftovers here.
            stage.forget_socket(sk, STAGE_MARKS);
        }
    }
    // SAFETY: as in the main program.
    let Some(fields) =
        (unsafe { sock_fields::<Direct>(sk, oldstate as i32, newstate as i32, &off) })
    else {
        // A nested transition of another protocol: the main program's miss, but no loss.
        bump(counter::NESTED_NOT_TCP);
        return 0;
    };
    // Never a wake-up of its own: this runs nested in an interrupt, typically; the agent's
    // timer and the next batch's wake-up take it.
    match EVENTS.reserve::<TransitionEvent>(0) {
        Some(mut entry) => {
            // SAFETY: the reservation is sized for one event.
            unsafe { write_event(entry.as_mut_ptr(), &fields) };
            entry.submit(BPF_RB_NO_WAKEUP.into());
            bump(counter::RESCUED);
        }
        None => bump(counter::RESCUE_RESERVE_FAILED),
    }
    0
}

/// Batch wake-ups: wake the reader once, when the pending data *crosses* WAKEUP_BYTES with a
/// record of `bytes` (of which `reserved` are already reserved, so pending). Waking on every
/// record above the threshold (a reader that fell behind) would mean one irq_work interrupt per
/// record, and interrupts inside this program are what let softirq work nest into the
/// tracepoint, which the kernel then skips (recursion misses). The agent also drains on a 50 ms
/// timer, so data below the threshold is never stranded.
#[inline(always)]
fn wakeup_flags(reserved: u64, bytes: u64) -> u64 {
    let before = EVENTS
        .query(BPF_RB_AVAIL_DATA.into())
        .saturating_sub(reserved);
    if before < WAKEUP_BYTES && before + bytes >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

#[inline(always)]
fn bump(index: u32) {
    add(index, 1);
}

#[inline(always)]
fn add(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // An atomic add (`BPF_XADD`, no fetch): a per-CPU slot is only touched by this CPU, but
        // a program can be interrupted by another (the rescue program nests into the main one,
        // the flush program and the main program interrupt each other) or, on kernels without
        // the per-program recursion guard, by itself; a plain `+=` could lose an increment.
        // Counters move once per batch or per rare event, so the cost is not per transition.
        // `AtomicU64::fetch_add` is not offered on the BPF target (no compare-and-swap in its
        // `core`), but the add itself is one instruction (`lock *(u64 *)(r + 0) += r`).
        // SAFETY: the map value is a valid, aligned u64 for the program's run.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, n,
            )
        };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
