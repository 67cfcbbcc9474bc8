//! A socket's namespace and 4-tuple as the table stores it (flat, 44 bytes), and the index
//! from tuple to slot: a keyed 64-bit hash per tuple, the real tuple compared in the slot.
use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use foldhash::fast::RandomState;

use super::Slot;
use crate::model::Tuple;

/// A network namespace inode and a 4-tuple, stored flat (44 bytes, no enum padding): the same
/// 4-tuple can live in two namespaces at once (each has its own 127.0.0.1). IPv4 addresses are
/// stored IPv4-mapped and flagged, so an IPv4 socket and a dual-stack IPv6 socket with a mapped
/// address differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(in crate::tracker) struct CompactTuple {
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Network namespace inode (0: unknown).
    pub(in crate::tracker) netns: u32,
    sport: u16,
    dport: u16,
    v4: bool,
}

impl CompactTuple {
    pub(in crate::tracker) fn new(
        netns: u32,
        saddr: IpAddr,
        sport: u16,
        daddr: IpAddr,
        dport: u16,
    ) -> Self {
        let flat = |a: IpAddr| match a {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Self {
            saddr: flat(saddr),
            daddr: flat(daddr),
            netns,
            sport,
            dport,
            v4: saddr.is_ipv4(),
        }
    }

    pub(in crate::tracker) fn from_tuple(netns: u32, t: &Tuple) -> Self {
        Self::new(netns, t.saddr, t.sport, t.daddr, t.dport)
    }

    /// The local port (listeners are found by namespace and port).
    pub(in crate::tracker) fn local_port(&self) -> u16 {
        self.sport
    }

    fn addr(&self, octets: [u8; 16]) -> IpAddr {
        let v6 = Ipv6Addr::from(octets);
        match (self.v4, v6.to_ipv4_mapped()) {
            (true, Some(v4)) => IpAddr::V4(v4),
            (true, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (false, _) => IpAddr::V6(v6),
        }
    }

    /// The remote address (the "peer" of per-process aggregates).
    pub(in crate::tracker) fn peer(&self) -> IpAddr {
        self.addr(self.daddr)
    }

    pub(in crate::tracker) fn to_tuple(self) -> Tuple {
        Tuple {
            saddr: self.addr(self.saddr),
            sport: self.sport,
            daddr: self.addr(self.daddr),
            dport: self.dport,
        }
    }

    /// The same connection seen from the other end, in the same namespace: the peer's socket
    /// when both ends are on this host (loopback, or two local addresses).
    pub(in crate::tracker) fn reversed(self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            ..self
        }
    }

    /// The tuple with local port 0: what a connecting socket's CLOSE→SYN_SENT transition
    /// carries, before `inet_hash_connect` picks its port.
    pub(in crate::tracker) fn portless(self) -> Self {
        Self { sport: 0, ..self }
    }

    /// Only connected sockets are indexed: a listener has dport 0, and a connecting socket has
    /// sport 0 until `inet_hash_connect` picks a port, after CLOSE→SYN_SENT.
    pub(in crate::tracker) fn indexable(&self) -> bool {
        self.sport != 0 && self.dport != 0
    }
}

/// Hasher for keys that already are uniform 64-bit hashes: passes them through.
#[derive(Default)]
pub(in crate::tracker) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Tuple → slot, keyed by a keyed 64-bit hash of the tuple. Generic over the hasher so a test
/// can force collisions.
pub(in crate::tracker) struct TupleIndex<S = RandomState> {
    hasher: S,
    main: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
    /// Tuples whose hash slot in `main` holds another tuple (≈ n²/2⁶⁵ of them: none in practice).
    spill: HashMap<CompactTuple, u32>,
}

impl<S: BuildHasher> TupleIndex<S> {
    pub(in crate::tracker) fn with_hasher(hasher: S) -> Self {
        Self {
            hasher,
            main: HashMap::default(),
            spill: HashMap::new(),
        }
    }

    pub(in crate::tracker) fn get(&self, slots: &[Slot], t: &CompactTuple) -> Option<u32> {
        let h = self.hasher.hash_one(t);
        if let Some(&s) = self.main.get(&h)
            && slots[s as usize].tuple == *t
        {
            return Some(s);
        }
        self.spill.get(t).copied()
    }

    /// Indexes `t` → `slot`; returns the slot that was indexed under the same tuple before (a
    /// duplicate tuple: another network namespace, or a missed CLOSE). The newer one wins.
    pub(in crate::tracker) fn insert(
        &mut self,
        slots: &[Slot],
        t: CompactTuple,
        slot: u32,
    ) -> Option<u32> {
        let h = self.hasher.hash_one(t);
        match self.main.get_mut(&h) {
            None => {
                self.main.insert(h, slot);
                self.spill.remove(&t)
            }
            Some(s) if slots[*s as usize].tuple == t => Some(std::mem::replace(s, slot)),
            Some(_) => self.spill.insert(t, slot),
        }
    }

    /// Removes `t` → `slot` if that is what is indexed (a duplicate may have replaced it).
    pub(in crate::tracker) fn remove(&mut self, t: &CompactTuple, slot: u32) {
        let h = self.hasher.hash_one(t);
        if self.main.get(&h) == Some(&slot) {
            self.main.remove(&h);
        } else if self.spill.get(t) == Some(&slot) {
            self.spill.remove(t);
        }
    }

    #[cfg(test)]
    pub(in crate::tracker) fn len(&self) -> usize {
        self.main.len() + self.spill.len()
    }

    #[cfg(test)]
    pub(in crate::tracker) fn approx_heap_bytes(&self) -> usize {
        super::bucket_bytes(self.main.capacity(), 16)
            + super::bucket_bytes(self.spill.capacity(), 48)
    }
}
