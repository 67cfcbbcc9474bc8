//! How the rescue program tells a transition the kernel skipped the main program for (a
//! nested one) from one the main program handled: a stack of marks in the CPU's stage
//! (`tcpwait_common::Stage`, `Mark`).
//!
//! The kernel skips a BTF tracepoint program that would nest into itself on one CPU (its
//! per-program `active` count) and counts a recursion miss. A transition nests into the main
//! program when an interrupt (softirq packet processing, typically) changes a socket's state
//! while the main program is active on that CPU: in its body, or in the kernel's few
//! instructions around it. The rescue program runs after the main one for every transition,
//! and for the nested ones too.
//!
//! The main program pushes the transition's mark (socket, old and new state, the socket's
//! `sk_txhash`) first (the hash is one load before it); the rescue program searches the stack
//! from the top for the mark of its own transition. Found: the main program handled it; the rescue program pops it and everything
//! above it. Not found: the kernel skipped the main program for it, and the rescue program
//! records it. Why that is exact:
//! - Interrupts on one CPU nest, and each one ends before the code it interrupted goes on.
//!   One that runs both programs for its transition pushes and pops: the stack is as it found
//!   it. One that comes between the main and the rescue run of a transition therefore leaves
//!   that transition's mark in place, and a nested transition finds only other marks.
//! - No two marks on the stack are the same transition: one socket's transitions never
//!   interleave (the kernel changes a socket's state under the socket's lock, and softirq work
//!   on a socket a process owns waits in its backlog).
//! - While the main program pushes, the kernel skips it for any transition that interrupts
//!   (it is active), so a push is never interleaved with another push.
//! - Left over: the mark of a transition whose own rescue run the kernel skipped (it nested
//!   into the rescue program; the main program ran and sent it). If the interrupted rescue
//!   run had not yet popped, its pop removes it; otherwise it stays. A full stack is taken for
//!   leftovers and emptied: live marks are at most the nesting depth (task, softirq, hardirq,
//!   NMI), half the stack. Should that ever drop a live mark, its transition is recorded twice,
//!   which the agent counts (`copies`); a leftover that matched a later nested transition would
//!   leave it unrecorded, counted as lost to nesting. Neither is silent, unless both happen
//!   at once: a leftover below live marks that matched popped them with it, so their
//!   transitions were recorded twice while the matched one was not, and the counts balanced.
//!   The kernel reuses a freed socket's address, and every server socket makes the same
//!   transition (FIN_WAIT1 to FIN_WAIT2, in softirq): CI saw it once in 40,002 transitions
//!   under emulation. Two guards now (`tcpwait_common::Mark::new`): a transition to CLOSE,
//!   which every socket makes before the kernel frees it, forgets the socket's leftovers
//!   (`Stage::forget_socket`, in whichever program records it), and the socket's
//!   `sk_txhash`, random per connection, in the mark keeps a CLOSE transition's own leftover
//!   from matching the next socket at its address. A new child's first transition (from
//!   LISTEN) has its listener's hash, so its mark carries the socket's cookie instead, which
//!   the kernel never gives two sockets (Linux ≥ 5.12; before that, the CLOSE guard alone).
//! - A push clears the slot's key, claims the slot, then writes the mark
//!   (`Stage::push_mark`): a rescue run that interrupts it never finds the slot's previous
//!   mark, and a main run that interrupts it (kernels without the guard) never takes the
//!   claimed slot.
//!
//! Kernels without the per-program guard run the main program again, nested: it pushes and
//! its rescue run pops, so nothing is recorded twice there either.
//!
//! Two designs came before (DESIGN.md, "Loss accounting"): a per-CPU mark of the last
//! transition handled (a transition between the two runs of another moved it on: copies), and
//! a mark in each socket's own storage (exact, but storage allocated for every new socket and
//! freed in its destructor: twice the BPF cost per transition).
use aya_ebpf::{cty::c_void, helpers::generated::bpf_get_socket_cookie};
use tcpwait_common::{Mark, STATE_LISTEN, SockOffsets};

use crate::sock::{Direct, SockMem};

/// The mark of `sk`'s transition, as both programs build it from the tracepoint's arguments
/// and the socket's `sk_txhash` (a direct load: it lies in `struct sock`), or, for a new
/// child's first transition (from LISTEN) where the kernel allows it, the socket's cookie
/// (see `Mark::new`).
#[inline(always)]
pub(crate) fn mark(sk: u64, oldstate: u64, newstate: u64, off: &SockOffsets) -> Mark {
    let id = if off.cookie != 0 && oldstate == STATE_LISTEN {
        // SAFETY: `sk` is the BTF tracepoint's typed `struct sock *`, which the helper takes
        // (it gives the socket a cookie if it has none yet, as inet_diag would).
        unsafe { bpf_get_socket_cookie(sk as *mut c_void) as u32 }
    } else {
        // SAFETY: `sk` is the BTF tracepoint's typed pointer and the offset comes from the
        // kernel's BTF (see `Direct`); the agent loads the BTF programs only with every offset.
        unsafe { Direct::get::<u32>(sk, off.txhash) }.unwrap_or(0)
    };
    Mark::new(sk, oldstate, newstate, id)
}
