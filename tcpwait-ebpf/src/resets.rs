//! Resets: the connections a socket aborts (a reset it sends on its own, through
//! `tcp_send_active_reset`: `close()` with `SO_LINGER {1, 0}` or with unread data, RFC 2525
//! §2.17) and the resets it receives. One [`ResetEvent`] each, into the transitions' ring.
//!
//! Where an abort can be seen depends on the kernel (checked on Debian's 5.10, 6.1, 6.12 and
//! on 6.18): from 6.10 (19822a980e19, "trace: tcp: fully support trace_tcp_send_reset")
//! `tcp_send_active_reset` fires `tcp:tcp_send_reset` with a NULL skb and its `enum
//! sk_rst_reason`; before, that tracepoint fires only for resets sent in reply to a segment
//! (`tcp_v4_send_reset`), and the abort is seen at the entry of `tcp_send_active_reset` itself
//! (fentry, or a kprobe where fentry is refused). The agent attaches the first that works.
//!
//! What each abort threw away is read from the socket at BTF offsets the agent found at load
//! (`ResetOffsets`): at both attach points the queues are still whole (`__tcp_close` counts
//! and frees the unread skbs but leaves `copied_seq`; `tcp_disconnect` purges after the
//! reset). Rare events: sent one by one, through `bpf_probe_read_kernel` (the `tcp_sock`
//! fields lie past `struct sock`, where the verifier refuses direct loads).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_current_comm},
    macros::{btf_tracepoint, fentry, kprobe, map},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FEntryContext, ProbeContext},
};
use tcpwait_common::reset::{
    KIND_ABORT, KIND_RESET_RECEIVED, REASON_NONE, ResetEvent, ResetOffsets, counter, flag,
};

use crate::{
    EVENTS, RECORD_BYTES, SOCK_OFFSETS,
    sock::{Probed, SockMem, sock_fields},
    wakeup_flags,
};

/// Per-CPU counters of the reset programs, indexed by `tcpwait_common::reset::counter`.
#[map]
static RESET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Offsets from the running kernel's BTF, set by the agent at load.
#[unsafe(no_mangle)]
static RESET_OFFSETS: ResetOffsets = ResetOffsets {
    lock_owned: 0,
    sk_flags: 0,
    lingertime: 0,
    write_seq: 0,
    snd_una: 0,
    rcv_nxt: 0,
    copied_seq: 0,
    linger_bit: 0,
    done_bit: 0,
    has_reason: 0,
};

/// `tcp:tcp_send_reset` as a BTF tracepoint (args: `const struct sock *sk, const struct
/// sk_buff *skb` and, from 6.10, `enum sk_rst_reason reason`). A NULL skb is an abort; a reset
/// in reply to a segment carries that segment, and is not one.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    if sk == 0 || skb != 0 {
        return 0;
    }
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&RESET_OFFSETS) };
    // A constant to the verifier (frozen read-only data): the third argument is read only on
    // kernels whose tracepoint has it.
    let reason = if off.has_reason != 0 {
        let r: u64 = ctx.arg(2);
        u8::try_from(r).unwrap_or(REASON_NONE)
    } else {
        REASON_NONE
    };
    record(sk, KIND_ABORT, reason, &off);
    0
}

/// The entry of `tcp_send_active_reset(struct sock *sk, gfp_t priority)`: aborts on kernels
/// whose `tcp:tcp_send_reset` does not fire for them (before 6.10).
#[fentry(function = "tcp_send_active_reset")]
pub fn tcp_send_active_reset_fentry(ctx: FEntryContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&RESET_OFFSETS) };
    record(sk, KIND_ABORT, REASON_NONE, &off);
    0
}

/// The same as a kprobe, where fentry is refused.
#[kprobe]
pub fn tcp_send_active_reset_kprobe(ctx: ProbeContext) -> u32 {
    let Some(sk) = ctx.arg::<u64>(0) else {
        return 0;
    };
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&RESET_OFFSETS) };
    record(sk, KIND_ABORT, REASON_NONE, &off);
    0
}

/// `tcp:tcp_receive_reset` as a BTF tracepoint (arg: `struct sock *sk`): the peer reset the
/// connection. Runs in softirq (on loopback, in the peer's context): the on-CPU task is not
/// the socket's owner, and the event says so (no [`flag::IN_TASK`]).
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&RESET_OFFSETS) };
    record(sk, KIND_RESET_RECEIVED, REASON_NONE, &off);
    0
}

/// Reads `sk` and sends one event; a full ring is counted.
#[inline(always)]
fn record(sk: u64, kind: u8, reason: u8, off: &ResetOffsets) {
    if sk == 0 {
        return;
    }
    // SAFETY: reads a read-only global the agent set at load.
    let sock = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    // SAFETY: bpf_probe_read_kernel checks every address; offsets come from the kernel's BTF.
    let Some(f) = (unsafe { sock_fields::<Probed>(sk, 0, 0, &sock) }) else {
        return;
    };
    let (sent, failed) = if kind == KIND_ABORT {
        (counter::ABORT_SENT, counter::ABORT_RESERVE_FAILED)
    } else {
        (counter::RECEIVED_SENT, counter::RECEIVED_RESERVE_FAILED)
    };
    let Some(mut entry) = EVENTS.reserve::<ResetEvent>(0) else {
        bump(failed);
        return;
    };
    // SAFETY (the block): every read goes through the helper, which fails instead of faulting.
    let (flags, unsent, unread) = unsafe {
        let get32 = |at: u32| Probed::get::<u32>(sk, at).unwrap_or(0);
        let mut flags = 0u8;
        if off.lock_owned != 0 && Probed::get::<i32>(sk, off.lock_owned).unwrap_or(0) != 0 {
            flags |= flag::IN_TASK;
        }
        let sk_flags: u64 = Probed::get(sk, off.sk_flags).unwrap_or(0);
        let lingertime: u64 = Probed::get(sk, off.lingertime).unwrap_or(u64::MAX);
        let bit = |b: u32| b < 64 && (sk_flags >> b) & 1 == 1;
        if off.sk_flags != 0 && bit(off.linger_bit) && lingertime == 0 {
            flags |= flag::LINGER_ZERO;
        }
        let done = off.sk_flags != 0 && bit(off.done_bit);
        if done {
            flags |= flag::FIN_RECEIVED;
        }
        if off.write_seq == 0 || off.rcv_nxt == 0 {
            flags |= flag::QUEUES_UNKNOWN;
            (flags, 0, 0)
        } else {
            let unsent = get32(off.write_seq).wrapping_sub(get32(off.snd_una));
            let mut unread = get32(off.rcv_nxt).wrapping_sub(get32(off.copied_seq));
            // As `tcp_inq` (SIOCINQ): the FIN takes a sequence number, not a byte.
            if unread > 0 && done {
                unread -= 1;
            }
            (flags, unsent, unread)
        }
    };
    let dst = entry.as_mut_ptr();
    // SAFETY (the block): the reservation is sized for one event; plain stores into it.
    unsafe {
        use core::ptr::addr_of_mut;
        (*dst).ts_ns = bpf_ktime_get_ns();
        (*dst).skaddr = sk;
        (*dst).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*dst).netns = f.netns;
        let saddr = addr_of_mut!((*dst).saddr).cast::<u32>();
        let daddr = addr_of_mut!((*dst).daddr).cast::<u32>();
        for i in 0..4 {
            saddr.add(i).write_unaligned(f.saddr[i]);
            daddr.add(i).write_unaligned(f.daddr[i]);
        }
        bpf_get_current_comm(addr_of_mut!((*dst).comm).cast(), 16);
        (*dst).sport = f.sport;
        (*dst).dport = f.dport;
        (*dst).unsent = unsent;
        (*dst).unread = unread;
        (*dst).kind = kind;
        (*dst).family = f.family as u8;
        (*dst).reason = reason;
        (*dst).flags = flags;
    }
    entry.submit(wakeup_flags(RECORD_BYTES, RECORD_BYTES));
    bump(sent);
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = RESET_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot. Aborts and received resets have slots of their own, one
        // program each; the kernel never nests a program into itself (it skips the nested run
        // and counts a recursion miss), so no two runs share a slot.
        unsafe { *slot += 1 };
    }
}
