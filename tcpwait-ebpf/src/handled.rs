//! The marks that let the rescue program tell a transition the kernel skipped the main program
//! for (a nested one) from one the main program handled (see `HANDLED`).
use aya_ebpf::{macros::map, maps::PerCpuArray};

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
pub(crate) fn address_of(ptr: u64) -> u64 {
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
        // SAFETY: this CPU's slot; see `crate::add`.
        unsafe { *slot = v };
    }
}

/// Marks a transition as handled by the main program on this CPU (recorded, counted as lost,
/// or not TCP), with a new generation.
#[inline(always)]
pub(crate) fn mark_handled(sk: u64, oldstate: u64, newstate: u64) {
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
pub(crate) fn was_handled(sk: u64, oldstate: u64, newstate: u64) -> bool {
    let seen = seq(SEEN);
    let handled = HANDLED
        .get(slot_of(sk))
        .is_some_and(|m| m[0] == sk && m[1] == states_of(oldstate, newstate) && m[2] > seen);
    if handled {
        set_seq(SEEN, seq(GEN));
    }
    handled
}
