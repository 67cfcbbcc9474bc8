//! The table's slots kept in step with the per-process indices and the alert engine: every
//! change to a socket's state, tuple or owners goes through these, so a process's counts,
//! ages and peers never disagree with the table.
use super::{Tracker, table::CompactTuple};
use crate::{
    event::{SocketId, TcpState},
    model::ProcessInfo,
};

impl Tracker {
    pub(super) fn insert_slot(
        &mut self,
        id: SocketId,
        state: TcpState,
        entered_ns: u64,
        lower_bound: bool,
        tuple: CompactTuple,
    ) -> u32 {
        let (slot, displaced) = self.table.insert(id, state, entered_ns, lower_bound, tuple);
        if displaced.is_some() {
            self.counters.tuple_conflicts += 1;
        }
        slot
    }

    /// Changes a slot's state, entry time and tuple, and moves it in its owners' indices.
    pub(super) fn move_slot(
        &mut self,
        slot: u32,
        state: TcpState,
        entered: u64,
        lb: bool,
        tuple: CompactTuple,
    ) {
        let before = *self.table.get(slot);
        if self.table.set_tuple(slot, tuple).is_some() {
            self.counters.tuple_conflicts += 1;
        }
        self.table.set_state(slot, state, entered, lb);
        let Some(old_state) = before.state else {
            return;
        };
        let from = (old_state, before.entered_ns, before.tuple.peer());
        let to = (state, entered, tuple.peer());
        if from == to {
            return;
        }
        for p in self.table.owners(slot) {
            self.procs.relink(p, from, to, slot);
            if let Some(key) = self.procs.key_of(p) {
                self.engine.touch(key, self.procs.get(p));
            }
        }
    }

    /// Removes a slot and unlinks it from its owners.
    pub(super) fn drop_slot(&mut self, slot: u32) {
        let (s, owners) = self.table.remove(slot);
        let Some(state) = s.state else {
            return;
        };
        for p in owners {
            let Some(key) = self.procs.key_of(p) else {
                continue;
            };
            self.procs
                .unlink(p, state, s.entered_ns, slot, s.tuple.peer());
            self.engine.touch(key, self.procs.by_key(&key));
        }
    }

    /// Replaces a slot's owners and keeps the per-process indices in step.
    pub(super) fn assign_owners(&mut self, slot: u32, owners: Vec<ProcessInfo>) {
        let mut new: Vec<u32> = Vec::with_capacity(owners.len());
        for info in owners {
            let idx = self.procs.intern(info);
            if !new.contains(&idx) {
                new.push(idx);
            }
        }
        let old = self.table.owners(slot);
        let s = *self.table.get(slot);
        let Some(state) = s.state else {
            return;
        };
        let peer = s.tuple.peer();
        self.table.set_owners(slot, &new);
        for &p in old.iter().filter(|p| !new.contains(p)) {
            let Some(key) = self.procs.key_of(p) else {
                continue;
            };
            self.procs.unlink(p, state, s.entered_ns, slot, peer);
            self.engine.touch(key, self.procs.by_key(&key));
        }
        for &p in &new {
            if !old.contains(&p) {
                self.procs.link(p, state, s.entered_ns, slot, peer);
            }
            // Touch even a known owner: its process info may have changed.
            if let Some(key) = self.procs.key_of(p) {
                self.engine.touch(key, self.procs.get(p));
            }
        }
    }
}
