//! Reading a transition's fields from `struct sock` (at offsets from the running kernel's BTF),
//! and writing an event in place.
use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    generated::{bpf_get_current_comm, bpf_probe_read_kernel},
};
use tcpwait_common::{AF_INET6, IPPROTO_TCP, SockOffsets, TransitionEvent};

/// How a program reads `struct sock`: the raw tracepoint gets an untyped pointer and must go
/// through `bpf_probe_read_kernel`; the BTF tracepoint gets a typed one and loads directly.
pub(crate) trait SockMem {
    /// The value of type `T` at `sk + off`, if readable.
    unsafe fn get<T: Copy>(sk: u64, off: u32) -> Option<T>;
}

/// Loads through `bpf_probe_read_kernel` (raw tracepoint, the reset programs). Never `None`:
/// the helper zero-fills what it cannot read, so its result is not tested. Testing it (aya's
/// `bpf_probe_read_kernel` wrapper) put a branch on every read, and older verifiers walked
/// every combination of them: Linux 6.1 went through 957,929 instructions for a reset program
/// of some 900 (the limit is 1,000,000), against 929 on 6.18.
pub(crate) struct Probed;

impl SockMem for Probed {
    #[inline(always)]
    unsafe fn get<T: Copy>(sk: u64, off: u32) -> Option<T> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper validates the address, and on failure zero-fills `v` instead of
        // faulting; either way it writes all of `v`.
        unsafe {
            bpf_probe_read_kernel(
                v.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
                (sk + u64::from(off)) as *const core::ffi::c_void,
            );
            Some(v.assume_init())
        }
    }
}

/// Direct loads from a BTF-typed pointer (BTF tracepoint). The verifier checks each load
/// against `struct sock` (the offsets are constants to it: they come from a frozen read-only
/// map) and the JIT makes it fault-safe.
pub(crate) struct Direct;

impl SockMem for Direct {
    #[inline(always)]
    unsafe fn get<T: Copy>(sk: u64, off: u32) -> Option<T> {
        // SAFETY: see the type's documentation.
        Some(unsafe { core::ptr::read_volatile((sk as *const u8).add(off as usize).cast::<T>()) })
    }
}

/// What an event carries besides what helpers give when it is written (time, task).
pub(crate) struct Fields {
    pub(crate) skaddr: u64,
    /// Address words in memory order: an IPv4 address in the first.
    pub(crate) saddr: [u32; 4],
    pub(crate) daddr: [u32; 4],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) family: u16,
    pub(crate) oldstate: u8,
    pub(crate) newstate: u8,
    /// Inode number of the socket's network namespace; 0 if unknown.
    pub(crate) netns: u32,
}

/// The fields of a transition of `sk`, or `None` if it is not a TCP socket.
#[inline(always)]
pub(crate) unsafe fn sock_fields<M: SockMem>(
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
    let netns = unsafe { netns::<M>(sk, off) };
    Some(Fields {
        skaddr: sk,
        saddr,
        daddr,
        sport,
        dport,
        family,
        oldstate: state_u8(oldstate),
        newstate: state_u8(newstate),
        netns,
    })
}

/// The inode number of `sk`'s network namespace, `sk->__sk_common.skc_net.net->ns.inum`, or 0
/// if the agent found no offsets for it (or a read failed).
///
/// `Direct` (the BTF tracepoint): direct loads, which the verifier accepts (6.18; measured
/// 2026-12-05): the 8-byte load at `off.net` in `struct sock` lands on `possible_net_t.net`,
/// so the verifier types the result as a BTF pointer to `struct net` rather than a number,
/// and checks the 4-byte load at `off.net_inum` against `struct net`; both are fault-safe
/// (PROBE_MEM) loads. No helper call: some 13 instructions on the hot path. Were they
/// refused, the agent would fall back to the classic program, which reads through the helper.
/// `Probed` (the raw and classic tracepoints, whose `sk` is a plain number to the verifier):
/// two `bpf_probe_read_kernel` calls; if one fails the event carries 0.
#[inline(always)]
pub(crate) unsafe fn netns<M: SockMem>(sk: u64, off: &SockOffsets) -> u32 {
    // The agent sets both offsets or neither (`Btf::netns_offsets`): one test on the hot path.
    if off.net_inum == 0 {
        return 0;
    }
    // SAFETY (the block): loads checked as `M` says; offsets come from the kernel's BTF.
    unsafe {
        match M::get::<u64>(sk, off.net) {
            Some(net) => M::get::<u32>(net, off.net_inum).unwrap_or(0),
            None => 0,
        }
    }
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
pub(crate) unsafe fn write_event(dst: *mut TransitionEvent, f: &Fields) -> u64 {
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
        // `netns` and the reserved word that follows it, in one 8-byte store (little-endian
        // target: `netns` is the low half); one instruction fewer per event.
        put(addr_of_mut!((*dst).netns).cast::<u64>(), u64::from(f.netns));
        ts
    }
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(TransitionEvent, netns) % 8 == 0);
    assert!(offset_of!(TransitionEvent, reserved) == offset_of!(TransitionEvent, netns) + 4);
};

/// A kernel state as one byte. Kernel TCP states are 1..=12; a value that does not fit is
/// sent as 0, which the agent counts as an unknown state (truncating 257 to 1 would forge
/// ESTABLISHED).
#[inline(always)]
pub(crate) fn state_u8<T: TryInto<u8>>(state: T) -> u8 {
    state.try_into().unwrap_or(0)
}
