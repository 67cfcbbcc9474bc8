//! The marks by which the rescue program tells a transition the kernel skipped the main
//! program for from one the main program handled: a per-CPU stack in each CPU's [`Stage`]
//! (tcpwait-ebpf's `nesting` module says why it is exact).
use crate::Stage;

/// A transition the main program has taken on (pushed first thing); the rescue
/// program, which runs after it for the same transition, pops it, and records a transition
/// whose mark it does not find: one the kernel skipped the main program for (tcpwait-ebpf's
/// `nesting` module says why that is exact).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The socket's address.
    pub sk: u64,
    /// Old state in bits 0..16, new state in bits 16..32, the low 31 bits of the socket's
    /// `sk_txhash` in bits 32..63, bit 63 set (never 0).
    pub key: u64,
}

impl Mark {
    /// The mark of `sk`'s transition from `oldstate` to `newstate`; `txhash` is the socket's
    /// `sk_txhash`. A mark can outlive its transition (one whose rescue run the kernel
    /// skipped), and the kernel reuses a freed socket's address for the next one. Such a
    /// leftover matched the next socket at that address making the same transition (every
    /// server socket goes FIN_WAIT1 to FIN_WAIT2, in softirq), which then went unrecorded while
    /// the live marks above the leftover were popped and their transitions recorded twice: a
    /// loss and a copy that cancelled in the accounting. Two guards, each enough for most
    /// transitions: a socket's transition to CLOSE, which comes before the kernel frees it,
    /// forgets its leftovers ([`Stage::forget_socket`]); and the hash, random per connection
    /// (set at connect, and from the request when a child is made; changed only under the
    /// socket's lock, so equal in one transition's two runs), tells two sockets at one address
    /// apart where a leftover outlives that (a CLOSE transition's own). The hash is not yet
    /// set at two transitions: `CLOSE` to `SYN_SENT` (connect sets it after), which runs in
    /// the connecting task and so never nests, and `LISTEN` to `SYN_RECV` (the child still has
    /// its listener's, so every child of one listener made the same mark). There the CLOSE
    /// guard was the only one, and it clears only its own CPU's stack: a child that closed on
    /// another CPU left its leftover for the next child at its address. So where the kernel
    /// lets tracing programs ask for it (`SockOffsets::cookie`), a transition from LISTEN
    /// passes the socket's cookie as `txhash`: the kernel numbers every socket's life once
    /// (a clone starts with none) and never reuses a number, so the leftover of one child can
    /// match no other. One helper call, on one transition of each accepted connection.
    #[inline(always)]
    pub const fn new(sk: u64, oldstate: u64, newstate: u64, txhash: u32) -> Self {
        Self {
            sk,
            key: (1 << 63)
                | ((txhash as u64 & 0x7fff_ffff) << 32)
                | ((newstate & 0xffff) << 16)
                | (oldstate & 0xffff),
        }
    }
}

/// The kernel's `TCP_CLOSE` (SCTP's `SCTP_SS_CLOSED` too): the state a socket is in when the
/// kernel frees it.
pub const STATE_CLOSE: u64 = 7;

/// The kernel's `TCP_LISTEN`: a transition from it is a new child socket's first (to
/// SYN_RECV), made before the child has a hash of its own (see [`Mark::new`]).
pub const STATE_LISTEN: u64 = 10;

impl Stage {
    /// The main program's step: pushes its transition's mark; returns the slot it took. A full
    /// stack is taken for leftovers and emptied (tcpwait-ebpf's `nesting` module says why).
    ///
    /// In four stores, each safe to be interrupted after: the slot's key cleared, the slot
    /// claimed (the length), the socket, the key. Where the kernel guards the main program, an
    /// interrupting run is a rescue run, which must not find the slot's previous mark once the
    /// length shows the slot (a cleared key matches nothing); where it does not (5.10 here),
    /// it is a main run too, which must not take a slot already claimed (until the length is
    /// written it takes the slot and gives it back before this goes on).
    #[inline(always)]
    pub fn push_mark(&mut self, mark: Mark) -> usize {
        // SAFETY (the block): plain, volatile loads and stores of this value; volatile so that
        // an interrupting run on the same CPU (in BPF, where this runs) sees them in order.
        unsafe {
            let mut d = core::ptr::read_volatile(&self.marks_len) as usize;
            if d >= STAGE_MARKS {
                d = 0;
            }
            if let Some(m) = self.marks.get_mut(d) {
                core::ptr::write_volatile(&mut m.key, 0);
            }
            core::ptr::write_volatile(&mut self.marks_len, d as u32 + 1);
            if let Some(m) = self.marks.get_mut(d) {
                core::ptr::write_volatile(&mut m.sk, mark.sk);
                core::ptr::write_volatile(&mut m.key, mark.key);
            }
            d
        }
    }

    /// For a transition of `sk` to CLOSE: makes every mark of `sk` but the one in slot `keep`
    /// (`STAGE_MARKS`: none) match nothing. A live mark of `sk` other than its own
    /// transition's cannot be there (one socket's transitions never interleave), so these are
    /// leftovers, which must not outlive the socket: the kernel reuses its address. Key 0 is
    /// never a mark's ([`Mark::new`] sets bit 63). Only slots change, never the length, so a
    /// rescue run that interrupts this is not disturbed. Unrolled, as `take_mark`.
    #[inline(always)]
    pub fn forget_socket(&mut self, sk: u64, keep: usize) {
        // SAFETY (the block): as in `push_mark`.
        unsafe {
            macro_rules! at {
                ($i:literal) => {
                    if $i != keep && core::ptr::read_volatile(&self.marks[$i].sk) == sk {
                        core::ptr::write_volatile(&mut self.marks[$i].key, 0);
                    }
                };
            }
            at!(0);
            at!(1);
            at!(2);
            at!(3);
            at!(4);
            at!(5);
            at!(6);
            at!(7);
        }
    }

    /// The rescue program's test: whether the main program pushed `mark`; if so, pops it and
    /// everything above it. Unrolled (no loop): older verifiers take it as it is.
    #[inline(always)]
    pub fn take_mark(&mut self, mark: Mark) -> bool {
        // SAFETY (the block): as in `push_mark`.
        unsafe {
            let n = core::ptr::read_volatile(&self.marks_len) as usize;
            macro_rules! at {
                ($i:literal) => {
                    if n > $i {
                        let m = &self.marks[$i];
                        if core::ptr::read_volatile(&m.sk) == mark.sk
                            && core::ptr::read_volatile(&m.key) == mark.key
                        {
                            core::ptr::write_volatile(&mut self.marks_len, $i);
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
}

const _: () = assert!(
    STAGE_MARKS == 8,
    "take_mark and forget_socket are unrolled for 8 marks"
);

/// Marks a CPU's stack holds: more than transitions can nest (task, softirq, hardirq, NMI),
/// with room for the rare mark whose rescue run the kernel skipped.
pub const STAGE_MARKS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> Stage {
        // SAFETY: integers only; all zeros is an empty stage.
        unsafe { core::mem::zeroed() }
    }

    /// FIN_WAIT1 (4) to FIN_WAIT2 (5), the transition every server socket makes in softirq.
    fn fin_wait2(sk: u64, txhash: u32) -> Mark {
        Mark::new(sk, 4, 5, txhash)
    }

    #[test]
    fn a_nested_transition_finds_no_mark_and_the_outer_one_finds_its_own() {
        let mut s = stage();
        let outer = Mark::new(0x1000, 1, 4, 7); // ESTABLISHED to FIN_WAIT1, in a task
        s.push_mark(outer);
        // Softirq on the same CPU while the main program runs: the kernel skips the main
        // program, the rescue program looks.
        assert!(!s.take_mark(fin_wait2(0x2000, 9)));
        assert!(s.take_mark(outer));
        assert_eq!(s.marks_len, 0);
    }

    #[test]
    fn a_leftover_mark_does_not_match_the_next_socket_at_its_address() {
        // What CI caught on 6.1 under emulation (`trace` stress: FIN_WAIT1>FIN_WAIT2 3,999 of
        // 4,000 and one other transition twice, while the accounting said exact): a leftover
        // (its rescue run skipped) stays below the next marks; a socket freed and allocated
        // again at the same address makes the same transition nested in the main program.
        let mut s = stage();
        s.push_mark(fin_wait2(0x2000, 0x1234_5678)); // leftover
        let outer = Mark::new(0x1000, 1, 4, 7);
        s.push_mark(outer);
        // The new socket at 0x2000 has its own hash: the rescue program records it...
        assert!(!s.take_mark(fin_wait2(0x2000, 0x0bad_cafe)));
        // ...and the outer transition's mark is still there: not recorded twice.
        assert!(s.take_mark(outer));
        assert_eq!(s.marks_len, 1, "the leftover stays until the stack fills");
    }

    #[test]
    fn without_the_hash_the_leftover_hid_the_transition_and_popped_the_live_mark() {
        // The same sequence with marks as they were (no hash): shows the test above can fail.
        let mut s = stage();
        s.push_mark(fin_wait2(0x2000, 0));
        let outer = Mark::new(0x1000, 1, 4, 0);
        s.push_mark(outer);
        assert!(s.take_mark(fin_wait2(0x2000, 0)), "taken as handled: lost");
        assert!(
            !s.take_mark(outer),
            "its mark popped with the leftover: a copy"
        );
    }

    #[test]
    fn a_socket_closing_forgets_its_leftovers_but_not_its_own_mark() {
        // LISTEN (10) to SYN_RECV (3): the child still has its listener's hash (0 here), so
        // every child of one listener makes the same mark; only CLOSE guards this one.
        let child = |sk| Mark::new(sk, 10, 3, 0);
        let mut s = stage();
        s.push_mark(child(0x2000)); // leftover: its rescue run was skipped
        let other = Mark::new(0x3000, 1, 4, 5);
        s.push_mark(other);
        // The child's life goes on (its marks pushed and popped) and ends in CLOSE: the main
        // program pushes that transition and forgets the child's other marks.
        let close = Mark::new(0x2000, 9, STATE_CLOSE, 77); // LAST_ACK to CLOSE
        let slot = s.push_mark(close);
        assert_eq!(slot, 2);
        s.forget_socket(0x2000, slot);
        assert!(s.take_mark(close), "its own mark stays");
        assert!(s.take_mark(other), "another socket's stays");
        assert_eq!(s.marks_len, 1);
        // The next child at that address, nested: recorded, and nothing live is popped.
        let outer = Mark::new(0x1000, 1, 4, 7);
        s.push_mark(outer);
        assert!(!s.take_mark(child(0x2000)));
        assert!(s.take_mark(outer));
        // A rescue run that records a nested CLOSE forgets them all.
        s.push_mark(child(0x4000));
        s.forget_socket(0x4000, STAGE_MARKS);
        assert!(!s.take_mark(child(0x4000)));
    }

    #[test]
    fn a_childs_leftover_from_a_close_on_another_cpu_does_not_hide_the_next_child() {
        // What the CLOSE guard could not cover: the child's CLOSE ran on another CPU, so its
        // LISTEN to SYN_RECV leftover stayed on this one. With the listener's hash in the mark
        // the next child at the address matched it (lost) and popped the live mark above it
        // (a copy): the loss and the copy cancelled in the accounting. With each child's
        // cookie in its mark, neither happens.
        let first = |id| Mark::new(0x2000, STATE_LISTEN, 3, id);
        // (the two children's ids, whether the failure happens): the listener's hash in
        // both, then each child's own cookie.
        for (ids, fails) in [((0x51, 0x51), true), ((101, 102), false)] {
            let mut s = stage();
            s.push_mark(first(ids.0)); // leftover; the child closes on another CPU
            let outer = Mark::new(0x1000, 1, 4, 7);
            s.push_mark(outer);
            assert_eq!(
                s.take_mark(first(ids.1)),
                fails,
                "the next child, nested: lost?"
            );
            assert_eq!(
                s.take_mark(outer),
                !fails,
                "the live mark above the leftover: a copy?"
            );
        }
    }

    #[test]
    fn a_full_stack_is_emptied_and_only_the_hash_bits_that_fit_count() {
        let mut s = stage();
        for i in 0..STAGE_MARKS as u64 {
            s.push_mark(fin_wait2(0x3000 + i, 1));
        }
        assert_eq!(s.marks_len as usize, STAGE_MARKS);
        let next = fin_wait2(0x4000, 1);
        s.push_mark(next);
        assert_eq!(s.marks_len, 1);
        assert!(s.take_mark(next));
        // Bit 31 of the hash would collide with bit 63 (the never-0 bit): dropped.
        assert_eq!(fin_wait2(1, 0x8000_0001), fin_wait2(1, 1));
        assert_ne!(fin_wait2(1, 2).key, 0);
        assert_ne!(fin_wait2(1, 0).key, 0);
    }
}
