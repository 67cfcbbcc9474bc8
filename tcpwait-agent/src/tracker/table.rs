//! The socket table: one compact [`Slot`] per live socket in a slab, found by kernel socket
//! address ([`SocketId`]) and by 4-tuple.
//!
//! Memory is the concern here (target: ≤ 150 bytes per tracked socket at 1,000,000 sockets), so:
//! - a slot is 64 bytes: no `String`, no `Vec`; owners are `u32` process indices, the first one
//!   inline and any further ones in a side map (several owners are rare: fork, fd passing);
//! - both indices map to a `u32` slab index, never to the slot itself;
//! - the tuple index is keyed by a 64-bit keyed hash of the tuple (16 bytes a bucket instead of
//!   44 for `HashMap<Tuple, u32>`); the slot holds the real tuple, so a lookup compares it, and
//!   the rare tuples whose hash is already taken by another tuple go to a small spill map.
//!
//! Estimate at 1,000,000 sockets (hashbrown rounds buckets up to a power of two at 7/8 load,
//! i.e. 2^21 buckets here, the worst case): slab 64 B × 1.05 + by-id 17 B × 2.1 + by-tuple
//! 17 B × 2.1 ≈ 138 B per socket. [`Table::approx_heap_bytes`] computes it from capacities.
use std::{collections::HashMap, hash::BuildHasher};

// foldhash, not std's SipHash: the per-transition lookups are the agent's hot path, and
// SipHash took as much CPU as the rest of the tracker (profile at 140k transitions/s). It is
// seeded per table, so which tuples collide is not predictable from outside.
use foldhash::fast::RandomState;

mod tuple;

pub(super) use tuple::CompactTuple;
use tuple::TupleIndex;

use super::host::AgeIndex;
use crate::event::{SocketId, TcpState};

/// `Slot::owner` when no owner is known.
pub(super) const NO_OWNER: u32 = u32::MAX;
/// `Slot::recv_q` when Recv-Q is unknown (transitions do not carry it; inet_diag does). A real
/// Recv-Q never reaches it: the receive buffer is capped far below 4 GiB (`tcp_rmem`).
pub(super) const RECV_Q_UNKNOWN: u32 = u32::MAX;
const FLAG_LOWER_BOUND: u8 = 1;
const FLAG_MORE_OWNERS: u8 = 2;
/// `Slot::owner` holds a *candidate* pid, not a process index: the process in whose context
/// the socket's `connect()` ran (CLOSE → SYN_SENT runs in the caller's context). Unverified: it
/// only tells the owner resolver whose fd table to read first. Reusing the owner field keeps the
/// slot at 72 bytes; assigning owners clears it.
const FLAG_HINT: u8 = 4;

/// Index of a state in per-state arrays (`TcpState` discriminants are 1..=12).
pub(super) fn state_index(state: TcpState) -> usize {
    state as usize - 1
}

/// One tracked socket. 72 bytes; see the module comment.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) id: SocketId,
    /// When the socket entered `state` (CLOCK_MONOTONIC ns); the latest possible entry time
    /// when [`Slot::lower_bound`] holds.
    pub(super) entered_ns: u64,
    pub(super) tuple: CompactTuple,
    /// First owner (process index), or [`NO_OWNER`]; a candidate pid under `FLAG_HINT`.
    owner: u32,
    /// Recv-Q bytes from the last inet_diag snapshot, or [`RECV_Q_UNKNOWN`].
    pub(super) recv_q: u32,
    /// `None` marks a free slot.
    pub(super) state: Option<TcpState>,
    flags: u8,
}

impl Slot {
    /// True when `entered_ns` is only an upper bound of the entry time (age is "at least").
    pub(super) fn lower_bound(&self) -> bool {
        self.flags & FLAG_LOWER_BOUND != 0
    }

    pub(super) fn recv_q(&self) -> Option<u32> {
        (self.recv_q != RECV_Q_UNKNOWN).then_some(self.recv_q)
    }
}

/// hashbrown keeps `capacity` at 7/8 of its power-of-two bucket count, plus one control byte a
/// bucket.
#[cfg(test)]
fn bucket_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    (capacity * 8 / 7).next_power_of_two() * (entry + 1)
}

/// The slab and its two indices, kept consistent by every method.
pub(super) struct Table<S = RandomState> {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_id: HashMap<SocketId, u32, RandomState>,
    tuples: TupleIndex<S>,
    /// Owners after the first, for the few sockets with several.
    more_owners: HashMap<u32, Vec<u32>>,
    by_state: [u64; 12],
    /// Slots by entry time, for the states a host rule ages (`host`).
    pub(super) ages: AgeIndex,
}

impl Table<RandomState> {
    pub(super) fn new() -> Self {
        Self::with_hasher(RandomState::default())
    }
}

impl<S: BuildHasher> Table<S> {
    pub(super) fn with_hasher(hasher: S) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::default(),
            tuples: TupleIndex::with_hasher(hasher),
            more_owners: HashMap::new(),
            by_state: [0; 12],
            ages: AgeIndex::default(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(super) fn by_state(&self) -> [u64; 12] {
        self.by_state
    }

    pub(super) fn slot_of(&self, id: SocketId) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    pub(super) fn find_tuple(&self, t: &CompactTuple) -> Option<u32> {
        self.tuples.get(&self.slots, t)
    }

    #[cfg(test)]
    pub(super) fn tuple_index_len(&self) -> usize {
        self.tuples.len()
    }

    pub(super) fn get(&self, slot: u32) -> &Slot {
        &self.slots[slot as usize]
    }

    /// Live slots.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.is_some())
            .map(|(i, s)| (i as u32, s))
    }

    /// Inserts a socket the table does not hold. Returns its slot and, if its tuple was already
    /// indexed for another slot, that slot.
    pub(super) fn insert(
        &mut self,
        id: SocketId,
        state: TcpState,
        entered_ns: u64,
        lower_bound: bool,
        tuple: CompactTuple,
    ) -> (u32, Option<u32>) {
        let slot = Slot {
            id,
            entered_ns,
            tuple,
            owner: NO_OWNER,
            recv_q: RECV_Q_UNKNOWN,
            state: Some(state),
            flags: if lower_bound { FLAG_LOWER_BOUND } else { 0 },
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.by_id.insert(id, idx);
        self.by_state[state_index(state)] += 1;
        self.ages.add(state, entered_ns, idx);
        let displaced = tuple
            .indexable()
            .then(|| self.tuples.insert(&self.slots, tuple, idx))
            .flatten();
        (idx, displaced)
    }

    /// Frees a slot; returns what it held (owners included, for unlinking).
    pub(super) fn remove(&mut self, slot: u32) -> (Slot, Vec<u32>) {
        let owners = self.owners(slot);
        let s = self.slots[slot as usize];
        self.tuples.remove(&s.tuple, slot);
        if self.by_id.get(&s.id) == Some(&slot) {
            self.by_id.remove(&s.id);
        }
        if let Some(state) = s.state {
            self.by_state[state_index(state)] -= 1;
            self.ages.remove(state, s.entered_ns, slot);
        }
        self.more_owners.remove(&slot);
        let freed = &mut self.slots[slot as usize];
        freed.state = None;
        freed.owner = NO_OWNER;
        freed.flags = 0;
        self.free.push(slot);
        (s, owners)
    }

    pub(super) fn set_state(&mut self, slot: u32, state: TcpState, entered_ns: u64, lb: bool) {
        let s = &mut self.slots[slot as usize];
        if let Some(old) = s.state {
            self.by_state[state_index(old)] -= 1;
            self.ages.remove(old, s.entered_ns, slot);
        }
        self.by_state[state_index(state)] += 1;
        self.ages.add(state, entered_ns, slot);
        s.state = Some(state);
        s.entered_ns = entered_ns;
        s.flags = (s.flags & !FLAG_LOWER_BOUND) | if lb { FLAG_LOWER_BOUND } else { 0 };
    }

    /// Changes a slot's tuple, keeping the index consistent. Returns a displaced slot as
    /// [`Table::insert`] does.
    pub(super) fn set_tuple(&mut self, slot: u32, tuple: CompactTuple) -> Option<u32> {
        let old = self.slots[slot as usize].tuple;
        if old == tuple {
            return None;
        }
        self.tuples.remove(&old, slot);
        self.slots[slot as usize].tuple = tuple;
        tuple
            .indexable()
            .then(|| self.tuples.insert(&self.slots, tuple, slot))
            .flatten()
    }

    pub(super) fn set_recv_q(&mut self, slot: u32, recv_q: u32) {
        self.slots[slot as usize].recv_q = recv_q.min(RECV_Q_UNKNOWN - 1);
    }

    /// Gives a slot a new identity (a synthetic entry meets its kernel address).
    pub(super) fn rekey(&mut self, slot: u32, id: SocketId) {
        let old = self.slots[slot as usize].id;
        if self.by_id.get(&old) == Some(&slot) {
            self.by_id.remove(&old);
        }
        self.by_id.insert(id, slot);
        self.slots[slot as usize].id = id;
    }

    pub(super) fn has_owner(&self, slot: u32) -> bool {
        self.first_owner(slot).is_some()
    }

    /// The first process index that owns a slot.
    pub(super) fn first_owner(&self, slot: u32) -> Option<u32> {
        let s = &self.slots[slot as usize];
        (s.owner != NO_OWNER && s.flags & FLAG_HINT == 0).then_some(s.owner)
    }

    /// Records the pid that is the likely owner of a slot without a known owner (see
    /// `FLAG_HINT`); ignored once owners are known.
    pub(super) fn set_hint(&mut self, slot: u32, pid: u32) {
        let s = &mut self.slots[slot as usize];
        if s.owner == NO_OWNER || s.flags & FLAG_HINT != 0 {
            s.owner = pid;
            s.flags |= FLAG_HINT;
        }
    }

    /// The candidate pid of a slot without known owners, if one was recorded.
    pub(super) fn hint(&self, slot: u32) -> Option<u32> {
        let s = &self.slots[slot as usize];
        (s.flags & FLAG_HINT != 0).then_some(s.owner)
    }

    /// The process indices that own a slot.
    pub(super) fn owners(&self, slot: u32) -> Vec<u32> {
        let s = &self.slots[slot as usize];
        let mut v = Vec::new();
        if let Some(owner) = self.first_owner(slot) {
            v.push(owner);
        }
        if s.flags & FLAG_MORE_OWNERS != 0
            && let Some(more) = self.more_owners.get(&slot)
        {
            v.extend_from_slice(more);
        }
        v
    }

    /// Replaces a slot's owners (deduplicated by the caller).
    pub(super) fn set_owners(&mut self, slot: u32, owners: &[u32]) {
        let s = &mut self.slots[slot as usize];
        if owners.is_empty() && s.flags & FLAG_HINT != 0 {
            return; // nothing known yet: keep the candidate
        }
        s.flags &= !FLAG_HINT;
        s.owner = owners.first().copied().unwrap_or(NO_OWNER);
        if owners.len() > 1 {
            s.flags |= FLAG_MORE_OWNERS;
            self.more_owners.insert(slot, owners[1..].to_vec());
        } else {
            s.flags &= !FLAG_MORE_OWNERS;
            self.more_owners.remove(&slot);
        }
    }

    pub(super) fn remove_owner(&mut self, slot: u32, proc_idx: u32) {
        let owners: Vec<u32> = self
            .owners(slot)
            .into_iter()
            .filter(|&p| p != proc_idx)
            .collect();
        self.set_owners(slot, &owners);
    }

    #[cfg(test)]
    pub(super) fn approx_heap_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot>()
            + self.free.capacity() * 4
            + bucket_bytes(self.by_id.capacity(), 16)
            + self.tuples.approx_heap_bytes()
            + bucket_bytes(self.more_owners.capacity(), 28)
            + self
                .more_owners
                .values()
                .map(|v| v.capacity() * 4)
                .sum::<usize>()
    }
}
