//! Candidate owners: whose fd table the owner resolver reads first for a socket. The kernel
//! event names the task on CPU, which is the owner only for transitions that run in the
//! caller's context: `connect()` (CLOSE → SYN_SENT, kept as the socket's hint) and `listen()`
//! (CLOSE → LISTEN, kept per listener: the candidate owner of the sockets it accepts). Neither
//! is trusted: the resolver confirms a candidate in its fd table before naming it.
use super::Tracker;
use crate::{event::SocketId, model::OwnerQuery};

impl Tracker {
    /// What the owner resolver needs to find the holders of `sock`: its namespace and tuple, and
    /// the pids to check first — the process that called `connect()` on it, then the one that
    /// called `listen()` on the listener it came from (same namespace and local port). Neither
    /// is trusted: the resolver confirms a candidate in its fd table before naming it.
    pub fn owner_query(&self, sock: SocketId) -> Option<OwnerQuery> {
        let slot = self.table.slot_of(sock)?;
        let s = self.table.get(slot);
        let mut candidates = Vec::with_capacity(2);
        candidates.extend(self.table.hint(slot));
        if let Some(pid) = self
            .listeners
            .open
            .get(&(s.tuple.netns, s.tuple.local_port()))
            .map(|l| l.pid)
            && !candidates.contains(&pid)
        {
            candidates.push(pid);
        }
        Some(OwnerQuery {
            netns: s.tuple.netns,
            tuple: s.tuple.to_tuple(),
            candidates,
        })
    }
}
