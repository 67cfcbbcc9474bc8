//! The main program on the classic tracepoint: the fallback where the kernel has no BTF, and
//! the reference the decoding test compares the BTF program against. It copies the kernel's
//! trace record into its own ring reservation, one event at a time.
use aya_ebpf::{EbpfContext as _, macros::tracepoint, programs::TracePointContext};
use tcpwait_common::{AF_INET6, IPPROTO_TCP, TransitionEvent, counter, record};

use crate::{
    EVENTS, RECORD_BYTES, SOCK_OFFSETS, bump,
    sock::{Fields, Probed, netns, state_u8, write_event},
    wakeup_flags,
};

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

#[inline(always)]
unsafe fn try_inet_sock_set_state(ctx: &TracePointContext) {
    // SAFETY (whole function): offsets are within the record and naturally aligned.
    let protocol: u16 = unsafe { field(ctx, record::PROTOCOL) };
    if protocol != IPPROTO_TCP {
        bump(counter::NOT_TCP);
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
    let skaddr: u64 = unsafe { field(ctx, record::SKADDR) };
    // SAFETY: reads a read-only global the agent set at load.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    let fields = Fields {
        skaddr,
        saddr,
        daddr,
        sport: unsafe { field(ctx, record::SPORT) },
        dport: unsafe { field(ctx, record::DPORT) },
        family,
        oldstate: state_u8(oldstate),
        newstate: state_u8(newstate),
        // The record has no namespace: read it from the socket (through the helper, `skaddr`
        // is an untyped address here) at the offsets the agent found in the kernel's BTF; 0
        // without them (no BTF: the agent says at start that namespaces are unknown).
        // SAFETY: bpf_probe_read_kernel checks every address.
        netns: unsafe { netns::<Probed>(skaddr, &off) },
    };
    // SAFETY: the reservation is sized for one event.
    unsafe { write_event(entry.as_mut_ptr(), &fields) };
    // The reservation is already in the pending data.
    entry.submit(wakeup_flags(RECORD_BYTES, RECORD_BYTES));
    bump(counter::SENT);
}
