//! TIME_WAIT pile-ups per peer: how many TIME_WAIT sockets each (network namespace, local
//! address → remote address:port) holds, the share of that namespace's ephemeral port range
//! they occupy, which processes closed them and how fast they come. Pure like the rest of the
//! tracker: the daemon feeds it transitions and censuses, time is an argument.
//!
//! Two sources, because no transition enters TIME_WAIT (DESIGN.md: the full socket goes
//! FIN_WAIT2 → CLOSE and a timewait socket takes over):
//! - the **count** comes from the kernel's own lists: a census (inet_diag dump of TIME_WAIT
//!   sockets, namespace by namespace, `daemon::census`) replaces the previous one whole;
//! - the **closer** comes from the active close, ESTABLISHED → FIN_WAIT1, which runs in the
//!   closing process's own `close()`/`shutdown()`, so its on-CPU task is the process that
//!   produces the TIME_WAIT socket ([`PeerWatch::note_close`]). Only closes from a local port
//!   inside the namespace's ephemeral range are kept: an accepted socket's close (local port
//!   = the server's) consumes no ephemeral port, and its remote port differs per connection,
//!   which would make one entry per connection.
//!
//! Rules with [`Scope::Peer`] are evaluated here, at each census (the counts change nowhere
//! else): a peer matches when it holds more than `count` TIME_WAIT sockets or more than
//! `share` of the port range.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use foldhash::fast::RandomState;

use super::rules::{Rule, Scope};
use crate::{
    event::{TcpState, Transition},
    model::Tuple,
};

/// Peers whose active closes are remembered at most; past it a new peer's closes are counted
/// ([`PeerWatch::close_overflow`]) and its closer stays unknown. Entries leave at the census
/// after their TIME_WAIT sockets are gone (≈ 64 bytes + closers each).
pub const MAX_CLOSE_PEERS: usize = 65_536;
/// Peers whose full figures are kept per census (status and metrics show at most 20).
pub const KEPT_PEERS: usize = 64;
/// Closing processes remembered per peer (most closes first); the rest are summed.
pub const MAX_CLOSERS: usize = 4;
/// The kernel's default `net.ipv4.ip_local_port_range`, used for a namespace until a census
/// read its own.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (32768, 60999);

/// One peer of a namespace, as seen from the local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    /// Network namespace inode (0: unknown).
    pub netns: u32,
    /// Local address.
    pub local: IpAddr,
    /// Remote address.
    pub remote: IpAddr,
    /// Remote port.
    pub port: u16,
}

impl PeerKey {
    fn of(netns: u32, t: &Tuple) -> Self {
        Self {
            netns,
            local: t.saddr,
            remote: t.daddr,
            port: t.dport,
        }
    }
}

/// A process that closed connections toward a peer (on-CPU task of ESTABLISHED → FIN_WAIT1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closer {
    pub pid: u32,
    /// Task name, raw (escape before printing).
    pub comm: String,
    /// Active closes seen from it toward the peer since the agent started (or since the peer
    /// was last forgotten).
    pub closes: u64,
}

#[derive(Debug, Default)]
struct CloseRecord {
    closers: Vec<Closer>,
    /// Closes by processes past [`MAX_CLOSERS`].
    others: u64,
    total: u64,
    /// `total` at the last census (for the rate).
    at_census: u64,
    last_ns: u64,
}

/// One TIME_WAIT socket, from a census.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwSocket {
    pub netns: u32,
    pub tuple: Tuple,
    /// When the kernel's timewait timer fires (CLOCK_MONOTONIC ns): the dump's `idiag_expires`
    /// added to the census time.
    pub expires_ns: u64,
}

/// One namespace's part of a census.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NsCensus {
    pub netns: u32,
    /// Its `net.ipv4.ip_local_port_range`, if it could be read.
    pub port_range: Option<(u16, u16)>,
    pub sockets: Vec<TwSocket>,
}

/// The TIME_WAIT sockets of every namespace, as dumped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Census {
    /// CLOCK_MONOTONIC ns when the census started.
    pub taken_ns: u64,
    /// Wall time it took, s.
    pub seconds: f64,
    pub namespaces: Vec<NsCensus>,
    /// Namespaces that could not be dumped: their previous sockets are kept until they expire.
    pub failed: Vec<u32>,
}

/// A peer's TIME_WAIT sockets as of the last census.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerGroup {
    pub key: PeerKey,
    pub count: u32,
    /// The namespace's ephemeral port range (inclusive).
    pub range: (u16, u16),
    /// `count` / ports in `range`.
    pub share: f64,
    /// Active closes toward the peer per second between the last two censuses (each makes one
    /// TIME_WAIT socket); `None` after the first census.
    pub rate_per_s: Option<f64>,
    /// Who closed them, most closes first (empty: not seen, e.g. closed before the agent).
    pub closers: Vec<Closer>,
    /// When the first of them expires.
    pub first_expiry_ns: u64,
}

/// A (peer rule, peer) pair that matches or matched.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerAlert {
    /// The rule's name.
    pub rule: String,
    /// The figures of the last census at which it fired.
    pub group: PeerGroup,
    pub fired_at_ns: u64,
    /// `None` while firing.
    pub resolved_at_ns: Option<u64>,
}

/// What [`PeerWatch::apply_census`] reports.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerAlertChange {
    Firing(PeerAlert),
    Resolved(PeerAlert),
}

/// Per-peer TIME_WAIT state; see the module comment.
#[derive(Debug, Default)]
pub struct PeerWatch {
    rules: Vec<Rule>,
    // foldhash, not std's SipHash, for the two maps every active close looks up (a profile of
    // `run` under the bench's load put SipHash at 5 % of the agent's CPU); seeded per map,
    // as the socket table's (tracker/table.rs).
    ranges: HashMap<u32, (u16, u16), RandomState>,
    closes: HashMap<PeerKey, CloseRecord, RandomState>,
    /// Active closes not remembered because [`MAX_CLOSE_PEERS`] peers were.
    pub close_overflow: u64,
    groups: Vec<PeerGroup>,
    /// Peers with TIME_WAIT sockets as of the last census.
    pub peers_total: usize,
    sockets: Vec<TwSocket>,
    /// The last census's time, cost and failures.
    pub last: Option<(u64, f64, usize)>,
    firing: BTreeMap<(usize, PeerKey), PeerAlert>,
}

impl PeerWatch {
    /// Keeps the rules with [`Scope::Peer`] of `rules`.
    pub fn new(rules: &[Rule]) -> Self {
        Self {
            rules: rules
                .iter()
                .filter(|r| r.scope == Scope::Peer)
                .cloned()
                .collect(),
            ..Self::default()
        }
    }

    /// The peer rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Replaces the peer rules of `rules` at `now` (a configuration reload): alerts of rules
    /// still there keep firing (new thresholds apply at the next census); those of rules that
    /// went are resolved and returned.
    pub fn set_rules(&mut self, rules: &[Rule], now: u64) -> Vec<PeerAlertChange> {
        let new = Self::new(rules).rules;
        let mut gone = Vec::new();
        for ((i, key), mut a) in std::mem::take(&mut self.firing) {
            match new.iter().position(|r| r.name == self.rules[i].name) {
                Some(j) => {
                    self.firing.insert((j, key), a);
                }
                None => {
                    a.resolved_at_ns = Some(now);
                    gone.push(PeerAlertChange::Resolved(a));
                }
            }
        }
        self.rules = new;
        gone
    }

    /// Records the closer of an active close (ESTABLISHED → FIN_WAIT1). O(1), no allocation
    /// unless the peer or the closer is new.
    pub fn note_close(&mut self, t: &Transition) {
        if t.new != TcpState::FinWait1 || t.old != TcpState::Established {
            return;
        }
        let (lo, hi) = self.range_of(t.netns);
        if !(lo..=hi).contains(&t.sport) {
            return;
        }
        let key = PeerKey {
            netns: t.netns,
            local: t.saddr,
            remote: t.daddr,
            port: t.dport,
        };
        let full = self.closes.len() >= MAX_CLOSE_PEERS;
        let rec = match self.closes.get_mut(&key) {
            Some(r) => r,
            None if full => {
                self.close_overflow += 1;
                return;
            }
            None => self.closes.entry(key).or_default(),
        };
        rec.total += 1;
        rec.last_ns = rec.last_ns.max(t.ts_ns);
        if let Some(c) = rec.closers.iter_mut().find(|c| c.pid == t.task.pid) {
            c.closes += 1;
        } else if rec.closers.len() < MAX_CLOSERS {
            rec.closers.push(Closer {
                pid: t.task.pid,
                comm: t.task.comm.to_string_lossy().into_owned(),
                closes: 1,
            });
        } else {
            rec.others += 1;
        }
    }

    fn range_of(&self, netns: u32) -> (u16, u16) {
        self.ranges
            .get(&netns)
            .copied()
            .unwrap_or(DEFAULT_PORT_RANGE)
    }

    /// Replaces the counts with `census` and evaluates the peer rules at `census.taken_ns`.
    pub fn apply_census(&mut self, census: Census) -> Vec<PeerAlertChange> {
        let now = census.taken_ns;
        let since = self.last.map(|(t, _, _)| t);
        let failed: HashSet<u32> = census.failed.iter().copied().collect();
        let mut sockets: Vec<TwSocket> = std::mem::take(&mut self.sockets)
            .into_iter()
            .filter(|s| failed.contains(&s.netns) && s.expires_ns > now)
            .collect();
        self.ranges.retain(|ns, _| failed.contains(ns));
        for ns in census.namespaces {
            self.ranges
                .insert(ns.netns, ns.port_range.unwrap_or(DEFAULT_PORT_RANGE));
            sockets.extend(ns.sockets);
        }
        let mut agg: HashMap<PeerKey, (u32, u64)> = HashMap::new();
        for s in &sockets {
            let e = agg
                .entry(PeerKey::of(s.netns, &s.tuple))
                .or_insert((0, u64::MAX));
            e.0 += 1;
            e.1 = e.1.min(s.expires_ns);
        }
        // A peer's closes are kept while it has TIME_WAIT sockets, or closed since the last
        // census (its sockets may postdate the dump).
        self.closes
            .retain(|k, r| agg.contains_key(k) || since.is_none_or(|t| r.last_ns >= t));
        // The rules look at every peer; full figures (closers, rate) are built only for the
        // peers shown (the top KEPT_PEERS) and those a rule matches: a server that closes
        // first leaves one TIME_WAIT socket per client port, 100,000 peers of one socket.
        let mut matching: Vec<(usize, PeerKey)> = Vec::new();
        for (key, &(count, _)) in &agg {
            let range = self.range_of(key.netns);
            for (i, rule) in self.rules.iter().enumerate() {
                if matches_count(rule, count, range) {
                    matching.push((i, *key));
                }
            }
        }
        self.peers_total = agg.len();
        let mut top: Vec<(PeerKey, u32)> = agg.iter().map(|(k, &(n, _))| (*k, n)).collect();
        let order = |a: &(PeerKey, u32), b: &(PeerKey, u32)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        if top.len() > KEPT_PEERS {
            top.select_nth_unstable_by(KEPT_PEERS - 1, order);
            top.truncate(KEPT_PEERS);
        }
        top.sort_by(order);
        let group = |key: PeerKey| {
            let (count, first_expiry_ns) = agg[&key];
            let range = self.range_of(key.netns);
            let ports = u32::from(range.1.saturating_sub(range.0)) + 1;
            let rec = self.closes.get(&key);
            let mut closers = rec.map_or_else(Vec::new, |r| r.closers.clone());
            closers.sort_by(|a, b| b.closes.cmp(&a.closes).then(a.pid.cmp(&b.pid)));
            PeerGroup {
                key,
                count,
                range,
                share: f64::from(count) / f64::from(ports),
                rate_per_s: since.filter(|&t| now > t).map(|t| {
                    let closes = rec.map_or(0, |r| r.total - r.at_census);
                    closes as f64 / ((now - t) as f64 / 1e9)
                }),
                closers,
                first_expiry_ns,
            }
        };
        let groups: Vec<PeerGroup> = top.iter().map(|&(k, _)| group(k)).collect();
        let matched: Vec<(usize, PeerGroup)> =
            matching.into_iter().map(|(i, k)| (i, group(k))).collect();
        self.groups = groups;
        for r in self.closes.values_mut() {
            r.at_census = r.total;
        }
        self.sockets = sockets;
        self.last = Some((now, census.seconds, census.failed.len()));
        self.evaluate(matched, now)
    }

    fn evaluate(&mut self, matched: Vec<(usize, PeerGroup)>, now: u64) -> Vec<PeerAlertChange> {
        let mut changes = Vec::new();
        let mut matching: HashSet<(usize, PeerKey)> = HashSet::new();
        for (i, g) in matched {
            matching.insert((i, g.key));
            match self.firing.get_mut(&(i, g.key)) {
                Some(a) => a.group = g,
                None => {
                    let a = PeerAlert {
                        rule: self.rules[i].name.clone(),
                        group: g,
                        fired_at_ns: now,
                        resolved_at_ns: None,
                    };
                    self.firing.insert((i, a.group.key), a.clone());
                    changes.push(PeerAlertChange::Firing(a));
                }
            }
        }
        let ended: Vec<(usize, PeerKey)> = self
            .firing
            .keys()
            .filter(|k| !matching.contains(k))
            .copied()
            .collect();
        for k in ended {
            if let Some(mut a) = self.firing.remove(&k) {
                a.resolved_at_ns = Some(now);
                changes.push(PeerAlertChange::Resolved(a));
            }
        }
        changes
    }

    /// The peers with the most TIME_WAIT sockets as of the last census (at most
    /// [`KEPT_PEERS`]), most first.
    pub fn groups(&self) -> &[PeerGroup] {
        &self.groups
    }

    /// TIME_WAIT sockets as of the last census (every namespace).
    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// Peer alerts firing, by rule then peer.
    pub fn firing(&self) -> impl Iterator<Item = &PeerAlert> {
        self.firing.values()
    }

    /// The TIME_WAIT sockets whose local port is `port` that have not expired at `now`, soonest
    /// expiry first.
    pub fn on_port(&self, port: u16, now: u64) -> Vec<TwSocket> {
        let mut v: Vec<TwSocket> = self
            .sockets
            .iter()
            .filter(|s| s.tuple.sport == port && s.expires_ns > now)
            .copied()
            .collect();
        v.sort_by_key(|s| (s.expires_ns, s.netns, s.tuple));
        v
    }
}

/// Whether `g` matches a peer rule: more than `count` sockets, or more than `share` of the
/// port range.
#[cfg(test)]
pub fn matches(rule: &Rule, g: &PeerGroup) -> bool {
    matches_count(rule, g.count, g.range)
}

/// Whether `count` TIME_WAIT sockets in port `range` match a peer rule (exact integer
/// arithmetic: count × 10⁶ > share_ppm × ports).
fn matches_count(rule: &Rule, count: u32, range: (u16, u16)) -> bool {
    let by_count = rule.max_count.is_some_and(|max| count > max);
    let ports = u64::from(range.1.saturating_sub(range.0)) + 1;
    let by_share = rule
        .max_share_ppm
        .is_some_and(|ppm| u64::from(count) * 1_000_000 > u64::from(ppm) * ports);
    by_count || by_share
}

#[cfg(test)]
mod tests;
