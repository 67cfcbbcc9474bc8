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
//! The main program pushes the transition's mark (socket, old and new state) at its first
//! instruction; the rescue program searches the stack from the top for the mark of its own
//! transition. Found: the main program handled it; the rescue program pops it and everything
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
//!   leave it unrecorded, counted as lost to nesting. Neither is silent.
//!
//! Kernels without the per-program guard run the main program again, nested: it pushes and
//! its rescue run pops, so nothing is recorded twice there either.
//!
//! Two designs came before (DESIGN.md, "Loss accounting"): a per-CPU mark of the last
//! transition handled (a transition between the two runs of another moved it on: copies), and
//! a mark in each socket's own storage (exact, but storage allocated for every new socket and
//! freed in its destructor: twice the BPF cost per transition).
use tcpwait_common::{STAGE_MARKS, Stage};

const _: () = assert!(STAGE_MARKS == 8, "take() is unrolled for 8 marks");

/// Old and new state in one nonzero word.
#[inline(always)]
pub(crate) fn states(oldstate: u64, newstate: u64) -> u64 {
    (1 << 63) | (oldstate & 0xffff) | ((newstate & 0xffff) << 16)
}

/// The main program's first step: pushes the transition's mark.
#[inline(always)]
pub(crate) fn push(stage: &mut Stage, sk: u64, states: u64) {
    // SAFETY (the block): plain, volatile loads and stores of this CPU's slot.
    unsafe {
        let mut d = core::ptr::read_volatile(&stage.marks_len) as usize;
        if d >= STAGE_MARKS {
            // Full: leftovers (see the module).
            d = 0;
        }
        core::ptr::write_volatile(&mut stage.marks_len, d as u32 + 1);
        if let Some(m) = stage.marks.get_mut(d) {
            core::ptr::write_volatile(&mut m.sk, sk);
            core::ptr::write_volatile(&mut m.states, states);
        }
    }
}

/// The rescue program's test: whether the main program pushed this transition's mark; if so,
/// pops it and everything above it. Unrolled (no loop): older verifiers take it as it is.
#[inline(always)]
pub(crate) fn take(stage: &mut Stage, sk: u64, states: u64) -> bool {
    // SAFETY (the block): as in `push`.
    unsafe {
        let n = core::ptr::read_volatile(&stage.marks_len) as usize;
        macro_rules! at {
            ($i:literal) => {
                if n > $i {
                    let m = &stage.marks[$i];
                    if core::ptr::read_volatile(&m.sk) == sk
                        && core::ptr::read_volatile(&m.states) == states
                    {
                        core::ptr::write_volatile(&mut stage.marks_len, $i);
                        return true;
                    }
                }
            };
        }
        // From the top: the transition's own mark is the newest one still there.
        at!(7);
        at!(6);
        at!(5);
        at!(4);
        at!(3);
        at!(2);
        at!(1);
        at!(0);
    }
    false
}
