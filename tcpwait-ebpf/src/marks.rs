//! How the rescue program tells a transition the kernel skipped the main program for (a
//! nested one) from one the main program handled: a mark in the socket's own storage.
//!
//! The kernel skips a program that would nest into itself on one CPU (a BTF tracepoint's
//! per-program `active` count, 2024, Linux 6.10 as we read it; without it a nested run re-enters
//! the program), counting a recursion miss. The marks are right either way. The rescue program, attached after the main one, runs
//! after it for every transition, and also for the nested ones the main program missed. The
//! main program marks the transition it handles in `MARKS`, storage that belongs to the socket
//! (`BPF_MAP_TYPE_SK_STORAGE`, reachable from tracing programs since Linux 5.11); the rescue
//! program records the transition unless it finds that very mark there, and takes it.
//!
//! Why per socket, and why that is exact: one socket's transitions never interleave. The
//! kernel changes a socket's state under the socket's lock (process context holds it as owner,
//! softirq takes `bh_lock_sock` and defers to the backlog while a process owns it), so the main
//! and rescue runs of one transition are not separated by another transition of the same
//! socket, on any CPU. Whatever nests between or inside them belongs to other sockets and
//! touches other sockets' marks. Per-CPU marks (the design this replaces) were shared by every
//! socket of a CPU: a transition nested between the main and the rescue run of another one
//! moved the CPU's marks on, and the rescue program recorded the outer one a second time.
//!
//! What is left: a mark the rescue program did not take (its own run was skipped because the
//! transition nested into the rescue program; the main program ran and sent it) stays on the
//! socket until the socket's next transition overwrites it. Should that next transition be
//! skipped by the main program and have the same old and new state (CLOSE → CLOSE twice), the
//! rescue program takes it as handled: it stays counted as a recursion miss, never a duplicate.
use aya_ebpf::{bindings::BPF_SK_STORAGE_GET_F_CREATE, btf_maps::SkStorage, macros::btf_map};

/// Per socket: the transition the main program handled last, as [`mark_of`] spells it; 0
/// once the rescue program has taken it.
#[btf_map]
static MARKS: SkStorage<u64> = SkStorage::new();

/// Old and new state in one nonzero word.
#[inline(always)]
fn mark_of(oldstate: u64, newstate: u64) -> u64 {
    (1 << 63) | (oldstate & 0xffff) | ((newstate & 0xffff) << 16)
}

/// The socket's mark word, created if `create`; `None` if the kernel has no storage for it
/// (a socket going away, no memory).
///
/// # Safety
/// `sk` must be the BTF-typed `struct sock *` of the tracepoint's arguments.
#[inline(always)]
unsafe fn slot(sk: u64, create: bool) -> Option<*mut u64> {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    let map = core::ptr::from_ref(&MARKS).cast_mut().cast();
    // SAFETY: the helper checks `sk` (a full socket, alive) and returns NULL otherwise.
    let p = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            map,
            sk as *mut _,
            core::ptr::null_mut(),
            flags,
        )
    };
    (!p.is_null()).then_some(p.cast())
}

/// Marks the transition as handled by the main program; false if the socket has no storage
/// (the main program then leaves the transition to the rescue program).
///
/// # Safety
/// As [`slot`].
#[inline(always)]
pub(crate) unsafe fn mark(sk: u64, oldstate: u64, newstate: u64) -> bool {
    match unsafe { slot(sk, true) } {
        Some(p) => {
            // SAFETY: the socket's storage; its transitions are serialized (see the module).
            unsafe { core::ptr::write_volatile(p, mark_of(oldstate, newstate)) };
            true
        }
        None => false,
    }
}

/// Whether the main program marked this very transition; if so, takes the mark.
///
/// # Safety
/// As [`slot`].
#[inline(always)]
pub(crate) unsafe fn take(sk: u64, oldstate: u64, newstate: u64) -> bool {
    let Some(p) = (unsafe { slot(sk, false) }) else {
        return false;
    };
    // SAFETY: as in `mark`.
    unsafe {
        if core::ptr::read_volatile(p) != mark_of(oldstate, newstate) {
            return false;
        }
        core::ptr::write_volatile(p, 0);
    }
    true
}
