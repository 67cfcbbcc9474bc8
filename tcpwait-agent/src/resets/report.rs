//! The `aborts` section of `tcpwait status`: per process, aborts by reason, bytes thrown away,
//! top peers, when the last one happened; resets received per process and peer; what was
//! lost. Built from the [`Tally`] at a time given as an argument, printed by the client.
use std::{collections::BTreeMap, io};

use serde::{Deserialize, Serialize};

use super::tally::Tally;
use crate::{output::escape_control, probe::resets::ResetCounters};

/// Peers shown per process.
const TOP_PEERS: usize = 5;
/// (process, peer) pairs of received resets shown.
const TOP_RECEIVED: usize = 20;

/// The `aborts` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AbortsReport {
    /// Where aborts are seen on this kernel (`tcp:tcp_send_reset`, ...), or why they are not.
    pub source: String,
    /// The rule: its name, threshold and window.
    pub rule: String,
    /// Aborts by reason, every process.
    pub by_reason: BTreeMap<String, u64>,
    /// Aborts that ran outside any process's context and whose socket holder was unknown.
    pub unattributed: u64,
    /// Bytes thrown away: written and never acknowledged, received and never read.
    pub unsent_bytes: u64,
    pub unread_bytes: u64,
    /// Processes, most aborts first.
    pub processes: Vec<AbortProcess>,
    /// Resets received, by holder and peer, most first.
    pub received: Vec<ReceivedReport>,
    pub received_total: u64,
    /// Resets lost in the kernel: ring full, and recursion misses (`null`: not counted by this
    /// kernel).
    pub lost_ring_full: u64,
    pub lost_recursion_misses: Option<u64>,
}

/// One process that aborted connections.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AbortProcess {
    pub pid: u32,
    pub comm: String,
    pub aborts: u64,
    pub by_reason: BTreeMap<String, u64>,
    pub unsent_bytes: u64,
    pub unread_bytes: u64,
    pub discarded_bytes: u64,
    /// `(peer address, aborts)`.
    pub top_peers: Vec<(String, u64)>,
    /// Seconds since its last abort.
    pub last_s_ago: f64,
    /// The abort rule fires for it now.
    pub alert: bool,
}

/// Resets received by one holder from one peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceivedReport {
    /// The socket's holder; `null` when unknown.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub peer: String,
    pub count: u64,
}

impl AbortsReport {
    /// The section at `now_ns`.
    pub fn new(t: &Tally, source: &str, lost: &ResetCounters, now_ns: u64) -> Self {
        let rule = t.rule();
        let processes = t
            .processes()
            .into_iter()
            .map(|p| AbortProcess {
                pid: p.pid,
                comm: p.comm.clone(),
                aborts: p.total(),
                by_reason: p.by_reason.clone(),
                unsent_bytes: p.unsent_bytes,
                unread_bytes: p.unread_bytes,
                discarded_bytes: p.unsent_bytes + p.unread_bytes,
                top_peers: p.top_peers(TOP_PEERS),
                last_s_ago: now_ns.saturating_sub(p.last_ns) as f64 / 1e9,
                alert: p.is_firing(),
            })
            .collect();
        let mut received: Vec<ReceivedReport> = t
            .received
            .iter()
            .map(|((who, peer), n)| ReceivedReport {
                pid: who.as_ref().map(|w| w.key.pid),
                comm: who.as_ref().map(|w| w.comm.clone()),
                peer: peer.to_string(),
                count: *n,
            })
            .collect();
        received.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (a.pid, &a.peer).cmp(&(b.pid, &b.peer)))
        });
        received.truncate(TOP_RECEIVED);
        Self {
            source: source.to_owned(),
            rule: format!(
                "{}: more than {} aborts ({}) within {}s",
                rule.name,
                rule.count,
                if rule.reasons.is_empty() {
                    "any reason".to_owned()
                } else {
                    rule.reasons.join(", ")
                },
                rule.window_ns / 1_000_000_000
            ),
            by_reason: t.by_reason.clone(),
            unattributed: t.unattributed,
            unsent_bytes: t.unsent_bytes,
            unread_bytes: t.unread_bytes,
            processes,
            received,
            received_total: t.received_total,
            lost_ring_full: lost.aborts_ring_full + lost.received_ring_full,
            lost_recursion_misses: lost.recursion_misses,
        }
    }

    /// The section as `tcpwait status` prints it.
    pub fn write_text(&self, w: &mut impl io::Write) -> io::Result<()> {
        let total: u64 = self.by_reason.values().sum();
        writeln!(
            w,
            "\nAborted on close ({}; rule {}): {total} aborts, {} bytes unsent and {} unread \
             thrown away; {} resets received; lost: ring {} recursion {}",
            self.source,
            self.rule,
            self.unsent_bytes,
            self.unread_bytes,
            self.received_total,
            self.lost_ring_full,
            crate::probe::count_or_unknown(self.lost_recursion_misses),
        )?;
        for p in &self.processes {
            let reasons: Vec<String> = p
                .by_reason
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            let peers: Vec<String> = p
                .top_peers
                .iter()
                .map(|(a, n)| format!("{a}x{n}"))
                .collect();
            writeln!(
                w,
                "  pid {} {}: {} aborts ({}), {} bytes discarded (unsent {}, unread {}), last \
                 {:.1}s ago, peers {}{}",
                p.pid,
                escape_control(&p.comm),
                p.aborts,
                reasons.join(" "),
                p.discarded_bytes,
                p.unsent_bytes,
                p.unread_bytes,
                p.last_s_ago,
                peers.join(" "),
                if p.alert { "  ALERT" } else { "" },
            )?;
        }
        if self.unattributed > 0 {
            writeln!(
                w,
                "  {} aborts outside any process (timers)",
                self.unattributed
            )?;
        }
        for r in &self.received {
            let who = match (&r.pid, &r.comm) {
                (Some(pid), Some(comm)) => format!("pid {pid} {}", escape_control(comm)),
                _ => "holder unknown".to_owned(),
            };
            writeln!(w, "  reset received: {who} from {} x{}", r.peer, r.count)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tcpwait_common::reset::{KIND_ABORT, flag};

    use super::*;
    use crate::{
        event::reset::{decode, tests::wire},
        model::ProcessKey,
        resets::tally::{AbortRule, Aborter},
    };

    #[test]
    fn reports_each_process_with_its_reasons_bytes_peers_and_age() {
        let mut t = Tally::new(AbortRule {
            count: 1,
            ..AbortRule::discard_on_close()
        });
        let r = decode(&wire(KIND_ABORT, 2, 14, flag::IN_TASK | flag::LINGER_ZERO)).expect("ok");
        let caller = Some(Aborter {
            key: ProcessKey {
                pid: 4242,
                start_ticks: 500,
            },
            comm: "login-srv".into(),
        });
        t.add(&r, "linger_0", caller.clone(), None);
        t.add(&r, "linger_0", caller, None);
        t.evaluate(r.ts_ns);
        let lost = ResetCounters {
            aborts_ring_full: 2,
            recursion_misses: None,
            ..Default::default()
        };
        let rep = AbortsReport::new(&t, "tcp:tcp_send_reset", &lost, r.ts_ns + 1_500_000_000);
        assert_eq!(rep.processes.len(), 1);
        let p = &rep.processes[0];
        assert_eq!((p.pid, p.comm.as_str(), p.aborts), (4242, "login-srv", 2));
        assert_eq!(
            (p.unsent_bytes, p.unread_bytes, p.discarded_bytes),
            (246_912, 20_000, 266_912)
        );
        assert_eq!(p.top_peers, [("10.0.0.2".to_owned(), 2)]);
        assert!((p.last_s_ago - 1.5).abs() < 1e-9);
        assert!(p.alert);
        assert_eq!((rep.lost_ring_full, rep.lost_recursion_misses), (2, None));
        let mut text = Vec::new();
        rep.write_text(&mut text).expect("written");
        let text = String::from_utf8(text).expect("utf-8");
        assert!(
            text.contains("pid 4242 login-srv: 2 aborts (linger_0=2), 266912 bytes discarded"),
            "{text}"
        );
        assert!(text.contains("ALERT"), "{text}");
        assert!(text.contains("recursion unknown"), "{text}");
    }
}
