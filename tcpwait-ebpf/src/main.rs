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
//! A third program, `inet_sock_set_state_nested` (raw tracepoint), records the transitions the
//! kernel skips because they nest into the main program on one CPU (see `HANDLED`).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_get_current_comm,
    },
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use tcpwait_common::{
    AF_INET6, FLUSH_BUSY, FLUSH_DONE, IPPROTO_TCP, RING_BYTES, STAGE_EVENTS, SockOffsets, Stage,
    TransitionEvent, WAKEUP_BYTES, counter, record,
};

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

/// The last transition the main program handled, per socket (hashed into `HANDLED_SLOTS`
/// slots), per CPU: `[skaddr, oldstate | newstate << 32, generation]`, where the generation
/// counts the main program's runs on this CPU (`SEQ[GEN]`).
///
/// The kernel skips a program that would nest into itself on one CPU (a BTF tracepoint's
/// per-program `active` count; for a classic tracepoint, the per-CPU `bpf_prog_active` shared
/// by all of them), counting a recursion miss. The rescue program, attached after the main one,
/// runs after it for every transition, and also for the nested ones the main program missed
/// (its own guard is not taken then). It records a transition unless the main program marked
/// it here *since the last transition the rescue program found handled* on this CPU
/// (`SEQ[SEEN]`): at the top level, the main program's mark for this very transition is
/// there, newer than that; nested, the main program did not run for it, and an older mark of
/// the same socket address (a transition of a freed socket, seen on this CPU) is not newer.
/// A flag the main program raised while it runs would leave a gap: the kernel counts the
/// program active some instructions before its first one and after its last, and a nested
/// transition there would be skipped by both.
///
/// What is left: a transition of another socket in the same slot, run by the main program
/// between its mark and the rescue program's check (nested in that instant), makes the rescue
/// program record a duplicate; a nested transition equal to one marked in the last instants of
/// the rescue program's previous run would be taken as handled, and stays counted as a
/// recursion miss.
#[map]
static HANDLED: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(HANDLED_SLOTS, 0);

/// Per-CPU sequence numbers: `SEQ[GEN]`, the main program's runs; `SEQ[SEEN]`, the generation
/// when the rescue program last found a transition handled.
#[map]
static SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
const GEN: u32 = 0;
const SEEN: u32 = 1;

/// One per-CPU word to turn the BTF tracepoint's typed `struct sock *` into a plain number:
/// the verifier forbids arithmetic on the pointer (to hash it), but a value read back from a
/// map is a number.
#[map]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The address in a typed kernel pointer, as a number (see `SCRATCH`).
#[inline(always)]
fn address_of(ptr: u64) -> u64 {
    match SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's slot. The main program does not nest into itself (the kernel's
        // guard); where it could (kernels without that guard), a wrong value only makes a mark
        // that matches nothing: the rescue program then records a duplicate, never loses.
        Some(slot) => unsafe {
            core::ptr::write_volatile(slot, ptr);
            core::ptr::read_volatile(slot)
        },
        None => 0,
    }
}

/// Slots of `HANDLED` per CPU.
const HANDLED_SLOTS: u32 = 1024;

/// `HANDLED`'s slot for a socket: `struct sock` objects are at least 1 KiB apart in their slab.
#[inline(always)]
fn slot_of(sk: u64) -> u32 {
    ((sk >> 10) ^ (sk >> 20)) as u32 & (HANDLED_SLOTS - 1)
}

/// Old and new state in one word.
#[inline(always)]
fn states_of(oldstate: u64, newstate: u64) -> u64 {
    (oldstate & 0xffff_ffff) | (newstate << 32)
}

#[inline(always)]
fn seq(index: u32) -> u64 {
    SEQ.get(index).copied().unwrap_or(0)
}

#[inline(always)]
fn set_seq(index: u32, v: u64) {
    if let Some(slot) = SEQ.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; see `bump`.
        unsafe { *slot = v };
    }
}

/// Marks a transition as handled by the main program on this CPU (recorded, counted as lost,
/// or not TCP), with a new generation.
#[inline(always)]
fn mark_handled(sk: u64, oldstate: u64, newstate: u64) {
    let generation = seq(GEN) + 1;
    set_seq(GEN, generation);
    if let Some(slot) = HANDLED.get_ptr_mut(slot_of(sk)) {
        // SAFETY: this CPU's slot; a nested writer would be writing another transition's mark,
        // which is the mark the slot should hold after it.
        unsafe { *slot = [sk, states_of(oldstate, newstate), generation] };
    }
}

/// Whether the main program handled this transition on this CPU (see `HANDLED`); if so, the
/// current generation becomes the one the next check compares against.
#[inline(always)]
fn was_handled(sk: u64, oldstate: u64, newstate: u64) -> bool {
    let seen = seq(SEEN);
    let handled = HANDLED
        .get(slot_of(sk))
        .is_some_and(|m| m[0] == sk && m[1] == states_of(oldstate, newstate) && m[2] > seen);
    if handled {
        set_seq(SEEN, seq(GEN));
    }
    handled
}

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
    // SAFETY: the offsets are the tracepoint record's layout, checked by the agent at load.
    unsafe {
        mark_handled(
            field(&ctx, record::SKADDR),
            field::<i32>(&ctx, record::OLDSTATE) as u32 as u64,
            field::<i32>(&ctx, record::NEWSTATE) as u32 as u64,
        );
        try_inet_sock_set_state(&ctx);
    }
    0
}

/// The main program as a BTF tracepoint (args: `struct sock *sk, int oldstate, int newstate`).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let oldstate: u64 = ctx.arg(1);
    let newstate: u64 = ctx.arg(2);
    mark_handled(address_of(sk), oldstate, newstate);
    let Some(stage) = STAGE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's stage, which nothing else writes while `busy` is set (see `STAGE`).
    let stage = unsafe { &mut *stage };
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    // SAFETY: `sk` is the kernel's BTF-typed `struct sock *`: the verifier checks every direct
    // load against the type and the kernel turns a fault into a zero read.
    let Some(fields) =
        (unsafe { sock_fields::<Direct>(sk, oldstate as i32, newstate as i32, &off) })
    else {
        return 0;
    };
    // SAFETY: a plain load of this CPU's slot, volatile so it is not cached.
    if unsafe { core::ptr::read_volatile(&stage.busy) } != 0 {
        // This interrupted `flush_stage` on this CPU (run by the agent in process context):
        // the stage is not ours now; send this one on its own.
        send_now(&fields);
        return 0;
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
    0
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

/// Sends one event to the ring buffer at once.
#[inline(always)]
fn send_now(fields: &Fields) {
    match EVENTS.reserve::<TransitionEvent>(0) {
        Some(mut entry) => {
            // SAFETY: the reservation is sized for one event.
            unsafe { write_event(entry.as_mut_ptr(), fields) };
            entry.submit(wakeup_flags(RECORD_BYTES, RECORD_BYTES));
            bump(counter::SENT);
        }
        None => bump(counter::RESERVE_FAILED),
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

/// The rescue path: the same transition, seen through the raw tracepoint (args: `struct sock
/// *sk, int oldstate, int newstate`). Records only what the main program did not handle on
/// this CPU, i.e. the nested transitions the kernel skipped it for (see `HANDLED`).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_nested(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let oldstate: u64 = ctx.arg(1);
    let newstate: u64 = ctx.arg(2);
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    if off.always == 0 && was_handled(sk, oldstate, newstate) {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel checks every address; offsets come from the kernel's BTF.
    let Some(fields) =
        (unsafe { sock_fields::<Probed>(sk, oldstate as i32, newstate as i32, &off) })
    else {
        // A nested transition of another protocol: the main program's miss, but no loss.
        bump(counter::NESTED_NOT_TCP);
        return 0;
    };
    match EVENTS.reserve::<TransitionEvent>(0) {
        Some(mut entry) => {
            // SAFETY: the reservation is sized for one event.
            unsafe { write_event(entry.as_mut_ptr(), &fields) };
            // Never a wake-up from here: this runs nested in an interrupt already.
            entry.submit(BPF_RB_NO_WAKEUP.into());
            bump(counter::RESCUED);
        }
        None => bump(counter::RESCUE_RESERVE_FAILED),
    }
    0
}

/// How a program reads `struct sock`: the raw tracepoint gets an untyped pointer and must go
/// through `bpf_probe_read_kernel`; the BTF tracepoint gets a typed one and loads directly.
trait SockMem {
    /// The value of type `T` at `sk + off`, if readable.
    unsafe fn get<T: Copy>(sk: u64, off: u32) -> Option<T>;
}

/// Loads through `bpf_probe_read_kernel` (raw tracepoint).
struct Probed;

impl SockMem for Probed {
    #[inline(always)]
    unsafe fn get<T: Copy>(sk: u64, off: u32) -> Option<T> {
        // SAFETY: the helper validates the address and fails instead of faulting.
        unsafe { bpf_probe_read_kernel((sk + u64::from(off)) as *const T).ok() }
    }
}

/// Direct loads from a BTF-typed pointer (BTF tracepoint). The verifier checks each load
/// against `struct sock` (the offsets are constants to it: they come from a frozen read-only
/// map) and the JIT makes it fault-safe.
struct Direct;

impl SockMem for Direct {
    #[inline(always)]
    unsafe fn get<T: Copy>(sk: u64, off: u32) -> Option<T> {
        // SAFETY: see the type's documentation.
        Some(unsafe { core::ptr::read_volatile((sk as *const u8).add(off as usize).cast::<T>()) })
    }
}

/// What an event carries besides what helpers give when it is written (time, task).
struct Fields {
    skaddr: u64,
    /// Address words in memory order: an IPv4 address in the first.
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
    family: u16,
    oldstate: u8,
    newstate: u8,
}

/// The fields of a transition of `sk`, or `None` if it is not a TCP socket.
#[inline(always)]
unsafe fn sock_fields<M: SockMem>(
    sk: u64,
    oldstate: i32,
    newstate: i32,
    off: &SockOffsets,
) -> Option<Fields> {
    let protocol = unsafe {
        if off.protocol_size == 1 {
            M::get::<u8>(sk, off.protocol).map(u16::from)
        } else {
            M::get::<u16>(sk, off.protocol)
        }
    };
    if protocol != Some(IPPROTO_TCP) {
        return None;
    }
    let family: u16 = unsafe { M::get(sk, off.family) }.unwrap_or(0);
    // SAFETY (the block): loads checked as `M` says; offsets come from the kernel's BTF.
    let (saddr, daddr) = unsafe {
        if family == AF_INET6 {
            (v6::<M>(sk, off.v6_rcv_saddr), v6::<M>(sk, off.v6_daddr))
        } else {
            (
                [M::get::<u32>(sk, off.rcv_saddr).unwrap_or(0), 0, 0, 0],
                [M::get::<u32>(sk, off.daddr).unwrap_or(0), 0, 0, 0],
            )
        }
    };
    // `inet_sport` lies in `struct inet_sock`, past the end of `struct sock`: the verifier
    // refuses a direct load there, so both programs read it through the helper.
    let sport: u16 = u16::from_be(unsafe { Probed::get(sk, off.sport) }.unwrap_or(0));
    let dport: u16 = u16::from_be(unsafe { M::get(sk, off.dport) }.unwrap_or(0));
    Some(Fields {
        skaddr: sk,
        saddr,
        daddr,
        sport,
        dport,
        family,
        oldstate: state_u8(oldstate),
        newstate: state_u8(newstate),
    })
}

/// An IPv6 address at `sk + off`, as four 32-bit loads (`struct in6_addr` is an array of
/// `__be32` to the verifier, which refuses a load across two of its elements).
#[inline(always)]
unsafe fn v6<M: SockMem>(sk: u64, off: u32) -> [u32; 4] {
    let w = |i: u32| unsafe { M::get::<u32>(sk, off + 4 * i) }.unwrap_or(0);
    [w(0), w(1), w(2), w(3)]
}

/// Writes the event at `dst` (a stage slot or a ring reservation) in place, one store per
/// field, `comm` straight from the helper (which zero-fills it on failure); returns its
/// `ts_ns`. Building the event elsewhere and copying it cost more than the rest of the program
/// (byte-wise moves of the arrays and a zeroing loop, in the BPF code the compiler makes).
#[inline(always)]
unsafe fn write_event(dst: *mut TransitionEvent, f: &Fields) -> u64 {
    use core::ptr::{addr_of_mut, write_volatile as put};
    // SAFETY (whole function): the caller passes memory for one event; volatile stores so that
    // none moves across the stage's `busy` marks.
    unsafe {
        let ts = bpf_ktime_get_ns();
        put(addr_of_mut!((*dst).ts_ns), ts);
        put(addr_of_mut!((*dst).skaddr), f.skaddr);
        put(addr_of_mut!((*dst).pid_tgid), bpf_get_current_pid_tgid());
        let saddr = addr_of_mut!((*dst).saddr).cast::<u32>();
        let daddr = addr_of_mut!((*dst).daddr).cast::<u32>();
        for i in 0..4 {
            put(saddr.add(i), f.saddr[i]);
            put(daddr.add(i), f.daddr[i]);
        }
        bpf_get_current_comm(addr_of_mut!((*dst).comm).cast(), 16);
        put(addr_of_mut!((*dst).sport), f.sport);
        put(addr_of_mut!((*dst).dport), f.dport);
        put(addr_of_mut!((*dst).family), f.family);
        put(addr_of_mut!((*dst).oldstate), f.oldstate);
        put(addr_of_mut!((*dst).newstate), f.newstate);
        ts
    }
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

/// Reads a field of the tracepoint record. The record is the program's context: the verifier
/// allows direct, aligned loads from it, which are cheaper than `bpf_probe_read`.
#[inline(always)]
unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the caller passes an in-record offset aligned for T.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
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
    add(index, 1);
}

#[inline(always)]
fn add(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU. The rescue program runs nested
        // inside the main program on the same CPU (that is its purpose), and the flush program
        // interrupts it or is interrupted by it, so none of them share a slot: each has its own
        // counters (a plain `+=` on a shared slot could lose an increment, and the BPF target
        // has no atomic read-modify-write in `core`).
        unsafe { *slot += n };
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
    // Addresses are read as whole words at constant offsets: the verifier rejects loads
    // through a ctx pointer that was moved (as a byte-wise memcpy loop would do).
    let words = |at: usize| -> [u32; 4] {
        // SAFETY: `at` is SADDR_V6 or DADDR_V6, 16 bytes within the record.
        unsafe {
            [
                field(ctx, at),
                field(ctx, at + 4),
                field(ctx, at + 8),
                field(ctx, at + 12),
            ]
        }
    };
    let (saddr, daddr) = if family == AF_INET6 {
        (words(record::SADDR_V6), words(record::DADDR_V6))
    } else {
        unsafe {
            (
                [field::<u32>(ctx, record::SADDR), 0, 0, 0],
                [field::<u32>(ctx, record::DADDR), 0, 0, 0],
            )
        }
    };
    let oldstate: i32 = unsafe { field(ctx, record::OLDSTATE) };
    let newstate: i32 = unsafe { field(ctx, record::NEWSTATE) };
    let fields = Fields {
        skaddr: unsafe { field(ctx, record::SKADDR) },
        saddr,
        daddr,
        sport: unsafe { field(ctx, record::SPORT) },
        dport: unsafe { field(ctx, record::DPORT) },
        family,
        oldstate: state_u8(oldstate),
        newstate: state_u8(newstate),
    };
    // SAFETY: the reservation is sized for one event.
    unsafe { write_event(entry.as_mut_ptr(), &fields) };
    // The reservation is already in the pending data.
    entry.submit(wakeup_flags(RECORD_BYTES, RECORD_BYTES));
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
