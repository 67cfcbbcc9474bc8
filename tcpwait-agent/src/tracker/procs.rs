//! The process registry: what is known of each process that owns a tracked socket, and, per
//! process and per state, its sockets ordered by entry time plus a count per peer address.
//!
//! These per-process indices are what keep rule evaluation per-process instead of per-table:
//! a process's count in a state is `len()`, its oldest socket is the first element of an
//! ordered set (O(log n) to maintain), its top peers come from a counter map (O(distinct
//! peers)). Only owned sockets are indexed (owners are resolved for watched states, so this is
//! usually the CLOSE_WAIT sockets, not the whole table): ≈ 32 bytes per owned socket.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use super::{TOP_PEERS, table::state_index};
use crate::{
    event::TcpState,
    model::{ProcessInfo, ProcessKey},
};

/// One process's sockets in one state.
#[derive(Default)]
pub(super) struct StateIndex {
    /// `(entered_ns, slot)`, oldest first.
    pub(super) by_age: BTreeSet<(u64, u32)>,
    /// Remote address → number of sockets.
    peers: HashMap<IpAddr, u32>,
}

impl StateIndex {
    fn insert(&mut self, entered_ns: u64, slot: u32, peer: IpAddr) {
        if self.by_age.insert((entered_ns, slot)) {
            *self.peers.entry(peer).or_default() += 1;
        }
    }

    fn remove(&mut self, entered_ns: u64, slot: u32, peer: IpAddr) {
        if self.by_age.remove(&(entered_ns, slot))
            && let Some(n) = self.peers.get_mut(&peer)
        {
            *n -= 1;
            if *n == 0 {
                self.peers.remove(&peer);
            }
        }
    }

    /// Number of sockets.
    pub(super) fn len(&self) -> usize {
        self.by_age.len()
    }

    /// `(entered_ns, slot)` of the oldest socket.
    pub(super) fn oldest(&self) -> Option<(u64, u32)> {
        self.by_age.first().copied()
    }

    /// The [`TOP_PEERS`] remote addresses with the most sockets, most first, ties by address.
    pub(super) fn top_peers(&self) -> Vec<(IpAddr, u32)> {
        let mut v: Vec<(IpAddr, u32)> = self.peers.iter().map(|(a, n)| (*a, *n)).collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(TOP_PEERS);
        v
    }
}

/// A process that owns at least one tracked socket.
pub(super) struct ProcRecord {
    pub(super) info: ProcessInfo,
    states: [StateIndex; 12],
    /// Sockets owned, all states.
    total: u32,
}

impl ProcRecord {
    pub(super) fn state(&self, state: TcpState) -> &StateIndex {
        &self.states[state_index(state)]
    }

    /// Every `(state, entered_ns, slot)` this process owns.
    pub(super) fn sockets(&self) -> impl Iterator<Item = (TcpState, u64, u32)> + '_ {
        TcpState::ALL.into_iter().flat_map(move |st| {
            self.state(st)
                .by_age
                .iter()
                .map(move |&(entered, slot)| (st, entered, slot))
        })
    }
}

/// Process index ↔ record. Indices are reused after a process is removed; nothing outside the
/// tracker sees them (alerts are keyed by [`ProcessKey`]).
#[derive(Default)]
pub(super) struct Registry {
    recs: Vec<Option<ProcRecord>>,
    free: Vec<u32>,
    by_key: HashMap<ProcessKey, u32>,
}

impl Registry {
    /// The index of `info`'s process, registering it or refreshing what is known of it.
    pub(super) fn intern(&mut self, info: ProcessInfo) -> u32 {
        if let Some(&idx) = self.by_key.get(&info.key) {
            if let Some(rec) = self.recs[idx as usize].as_mut() {
                rec.info = info;
            }
            return idx;
        }
        let key = info.key;
        let rec = ProcRecord {
            info,
            states: Default::default(),
            total: 0,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.recs[i as usize] = Some(rec);
                i
            }
            None => {
                self.recs.push(Some(rec));
                (self.recs.len() - 1) as u32
            }
        };
        self.by_key.insert(key, idx);
        idx
    }

    pub(super) fn index_of(&self, key: &ProcessKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    pub(super) fn get(&self, idx: u32) -> Option<&ProcRecord> {
        self.recs.get(idx as usize).and_then(Option::as_ref)
    }

    pub(super) fn by_key(&self, key: &ProcessKey) -> Option<&ProcRecord> {
        self.index_of(key).and_then(|i| self.get(i))
    }

    pub(super) fn key_of(&self, idx: u32) -> Option<ProcessKey> {
        self.get(idx).map(|r| r.info.key)
    }

    /// Live records.
    pub(super) fn iter(&self) -> impl Iterator<Item = &ProcRecord> {
        self.recs.iter().flatten()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Adds a socket to a process's index.
    pub(super) fn link(&mut self, idx: u32, st: TcpState, entered: u64, slot: u32, peer: IpAddr) {
        if let Some(rec) = self.recs.get_mut(idx as usize).and_then(Option::as_mut) {
            rec.states[state_index(st)].insert(entered, slot, peer);
            rec.total += 1;
        }
    }

    /// Removes a socket from a process's index. A process left with no socket is dropped (its
    /// record is rebuilt by the next `set_owners` that names it); returns its key then.
    pub(super) fn unlink(
        &mut self,
        idx: u32,
        st: TcpState,
        entered: u64,
        slot: u32,
        peer: IpAddr,
    ) -> Option<ProcessKey> {
        let rec = self.recs.get_mut(idx as usize).and_then(Option::as_mut)?;
        rec.states[state_index(st)].remove(entered, slot, peer);
        rec.total = rec.total.saturating_sub(1);
        if rec.total == 0 {
            return self.remove(idx).map(|r| r.info.key);
        }
        None
    }

    /// Moves a socket within a process's index (state, entry time or peer changed).
    pub(super) fn relink(
        &mut self,
        idx: u32,
        from: (TcpState, u64, IpAddr),
        to: (TcpState, u64, IpAddr),
        slot: u32,
    ) {
        if let Some(rec) = self.recs.get_mut(idx as usize).and_then(Option::as_mut) {
            rec.states[state_index(from.0)].remove(from.1, slot, from.2);
            rec.states[state_index(to.0)].insert(to.1, slot, to.2);
        }
    }

    pub(super) fn remove(&mut self, idx: u32) -> Option<ProcRecord> {
        let rec = self.recs.get_mut(idx as usize)?.take()?;
        self.by_key.remove(&rec.info.key);
        self.free.push(idx);
        Some(rec)
    }
}
