//! Resets as users see them: the record `trace` and `tail` print (a JSON object with `kind`
//! `abort` or `reset_received`, beside the transitions, which carry no `kind`), its text line,
//! and which ones a filter lets through. Per-process tallies and the abort rule live in
//! [`tally`].
use std::{borrow::Cow, io};

use serde::{Deserialize, Serialize};

use crate::{
    event::reset::{Reset, ResetKind},
    filter::Filter,
    output::{
        Clock, Format, OwnerFields, OwnerView, WallTime, endpoint, escape_control, time_of_day,
        write_json_line,
    },
};

pub mod report;
pub mod tally;

/// One reset as printed; the schema of `trace --json` / `tail --json` lines whose `kind` is
/// `abort` or `reset_received`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResetRecord<'a> {
    /// `abort` (the socket reset its connection) or `reset_received`.
    pub kind: Cow<'a, str>,
    /// CLOCK_MONOTONIC ns.
    pub ts_ns: u64,
    /// `ts_ns` as wall-clock time; `null` in a record of an agent that predates it.
    #[serde(default)]
    pub time: Option<WallTime>,
    /// Kernel socket address, hex.
    pub skaddr: String,
    /// Network namespace inode; `null` when unknown.
    pub netns: Option<u32>,
    /// The process that caused the reset (the closing process), `null` when the kernel ran it
    /// outside any process's context (a softirq or timer: then the on-CPU task is unrelated).
    pub pid: Option<u32>,
    /// That process's task name.
    pub comm: Option<String>,
    /// 4 or 6.
    pub family: u8,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    /// Why (aborts): `linger_0`, `unread_data`, or the kernel's reason in lower case.
    pub reason: Option<String>,
    /// The kernel's own `enum sk_rst_reason` name (6.10 and later), as it spells it.
    pub kernel_reason: Option<String>,
    /// Bytes written and not acknowledged by the peer (`SIOCOUTQ`); `null` when unknown.
    pub unsent_bytes: Option<u32>,
    /// Bytes received and not read (`SIOCINQ`); `null` when unknown.
    pub unread_bytes: Option<u32>,
    /// `unsent_bytes + unread_bytes`: what the abort threw away.
    pub discarded_bytes: u64,
    /// Holder of the socket, when known (the daemon's `tail`).
    #[serde(flatten)]
    pub owner: OwnerFields,
}

impl ResetRecord<'static> {
    /// The record of `r`; `names` is the kernel's `enum sk_rst_reason`.
    pub fn new(
        r: &Reset,
        names: &[(String, u32)],
        owner: Option<&OwnerView>,
        time: WallTime,
    ) -> Self {
        let kernel_reason = r.kernel_reason.map(|v| {
            names
                .iter()
                .find(|(_, n)| *n == u32::from(v))
                .map_or_else(|| format!("reason_{v}"), |(s, _)| s.clone())
        });
        Self {
            kind: Cow::Borrowed(r.kind.name()),
            ts_ns: r.ts_ns,
            time: Some(time),
            skaddr: r.sock.to_string(),
            netns: (r.netns != 0).then_some(r.netns),
            pid: r.caller().map(|c| c.0),
            comm: r.caller().map(|c| c.1.to_string_lossy().into_owned()),
            family: r.family(),
            saddr: r.saddr.to_string(),
            sport: r.sport,
            daddr: r.daddr.to_string(),
            dport: r.dport,
            reason: (r.kind == ResetKind::Abort).then(|| r.reason(names).label().to_owned()),
            kernel_reason,
            unsent_bytes: r.unsent,
            unread_bytes: r.unread,
            discarded_bytes: r.discarded(),
            owner: OwnerFields::new(owner),
        }
    }
}

/// Writes one reset in the chosen format, newline-terminated. Text: the transition columns,
/// with `ABORT <reason>` or `RESET RECEIVED` in the state column and what was thrown away.
pub fn write_reset(
    w: &mut impl io::Write,
    format: Format,
    clock: &Clock,
    r: &ResetRecord<'_>,
) -> io::Result<()> {
    if format == Format::Json {
        let mut line = Vec::with_capacity(400);
        write_json_line(&mut line, r).map_err(io::Error::other)?;
        return w.write_all(&line);
    }
    let ip = |a: &str| {
        a.parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad address {a:?}")))
    };
    let what = match &r.reason {
        Some(reason) => format!("ABORT {reason}"),
        None => "RESET RECEIVED".to_owned(),
    };
    let bytes = |b: Option<u32>| b.map_or_else(|| "?".to_owned(), |b| b.to_string());
    let owner = r.owner.text();
    writeln!(
        w,
        "{} {:<7} {:<16} {:<47} {:<26} discarded={} (unsent {}, unread {}){owner}",
        time_of_day(clock.wall_ns(r.ts_ns)),
        r.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        escape_control(r.comm.as_deref().unwrap_or("(softirq)")),
        format!(
            "{} -> {}",
            endpoint(ip(&r.saddr)?, r.sport),
            endpoint(ip(&r.daddr)?, r.dport)
        ),
        what,
        r.discarded_bytes,
        bytes(r.unsent_bytes),
        bytes(r.unread_bytes),
    )
}

/// What `trace` saw of resets, for its summary.
#[derive(Debug, Default)]
pub struct ResetStats {
    pub aborts: u64,
    pub received: u64,
    pub printed: u64,
}

impl ResetStats {
    /// Counts one reset, `shown` if it was printed.
    pub fn seen(&mut self, r: &Reset, shown: bool) {
        match r.kind {
            ResetKind::Abort => self.aborts += 1,
            ResetKind::Received => self.received += 1,
        }
        self.printed += u64::from(shown);
    }

    /// The summary line's second half: resets seen and lost in the kernel. Malformed records
    /// are counted once, with the transitions' (a record that cannot be decoded has no kind).
    pub fn summary(&self, k: &crate::probe::resets::ResetCounters) -> String {
        let at_least = if k.recursion_misses.is_none() {
            "at least "
        } else {
            ""
        };
        format!(
            "{} aborts and {} resets received seen, {} printed, {at_least}{} lost (ring buffer \
             full: {}, kernel recursion misses: {})",
            self.aborts,
            self.received,
            self.printed,
            k.lost(),
            k.aborts_ring_full + k.received_ring_full,
            crate::probe::count_or_unknown(k.recursion_misses),
        )
    }
}

/// Whether a filter lets `r` through, given its owner. Pids and comms match the caller (when
/// the reset ran in its context) or the owner; ports, family and namespace as for transitions.
/// A reset has no state: a `--state` filter shows transitions only.
pub fn matches(f: &Filter, r: &Reset, owner: Option<(u32, &str)>) -> bool {
    let caller = r.caller();
    (f.pids.is_empty()
        || caller.is_some_and(|(pid, _)| f.pids.contains(&pid))
        || owner.is_some_and(|(pid, _)| f.pids.contains(&pid)))
        && (f.comms.is_empty()
            || caller.is_some_and(|(_, c)| f.comms.iter().any(|x| x.as_bytes() == c.as_bytes()))
            || owner.is_some_and(|(_, comm)| f.comms.iter().any(|c| c == comm)))
        && (f.ports.is_empty() || f.ports.contains(&r.sport) || f.ports.contains(&r.dport))
        && f.states.is_empty()
        && f.family.is_none_or(|fam| fam == r.family())
        && (f.netns.is_empty() || (r.netns != 0 && f.netns.contains(&r.netns)))
}

#[cfg(test)]
mod tests {
    use tcpwait_common::reset::{KIND_ABORT, KIND_RESET_RECEIVED, flag};

    use super::*;
    use crate::event::{TcpState, reset::decode, reset::tests::wire};

    fn abort() -> Reset {
        decode(&wire(KIND_ABORT, 2, 14, flag::IN_TASK | flag::LINGER_ZERO)).expect("valid")
    }

    #[test]
    fn json_names_the_kind_reason_and_bytes() {
        let names = vec![("SK_RST_REASON_TCP_STATE".to_owned(), 14)];
        let owner = OwnerView {
            pid: 4242,
            comm: "login-srv".into(),
            container: None,
            pod_uid: None,
        };
        let clock = Clock::with_offset(0);
        let rec = ResetRecord::new(&abort(), &names, Some(&owner), clock.wall(abort().ts_ns));
        let mut out = Vec::new();
        write_reset(&mut out, Format::Json, &clock, &rec).expect("written");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["kind"], "abort");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000007Z");
        assert_eq!(v["reason"], "linger_0");
        assert_eq!(v["kernel_reason"], "SK_RST_REASON_TCP_STATE");
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["comm"], "login-srv");
        assert_eq!(v["daddr"], "10.0.0.2");
        assert_eq!(v["dport"], 40000);
        assert_eq!(
            (v["unsent_bytes"].clone(), v["unread_bytes"].clone()),
            (123_456.into(), 10_000.into())
        );
        assert_eq!(v["discarded_bytes"], 133_456);
        assert_eq!(v["owner_pid"], 4242);
        let back: ResetRecord<'_> = serde_json::from_slice(&out).expect("round trip");
        assert_eq!(back, rec);
    }

    #[test]
    fn text_never_trusts_a_softirq_task() {
        let r = decode(&wire(KIND_RESET_RECEIVED, 2, 0xff, 0)).expect("valid");
        let rec = ResetRecord::new(&r, &[], None, WallTime(0));
        assert_eq!(
            (rec.pid, rec.comm.as_deref(), rec.reason.as_deref()),
            (None, None, None)
        );
        let mut out = Vec::new();
        write_reset(&mut out, Format::Text, &Clock::with_offset(0), &rec).expect("written");
        let line = String::from_utf8(out).expect("utf-8");
        assert!(line.contains("RESET RECEIVED"), "{line}");
        assert!(line.contains("(softirq)"), "{line}");
        assert!(line.contains("10.0.0.1:7000 -> 10.0.0.2:40000"), "{line}");
    }

    #[test]
    fn filters_apply() {
        let r = abort();
        let f = |f: Filter| matches(&f, &r, None);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            pids: vec![4242],
            ..Default::default()
        }));
        assert!(!f(Filter {
            pids: vec![1],
            ..Default::default()
        }));
        assert!(f(Filter {
            comms: vec!["login-srv".into()],
            ..Default::default()
        }));
        assert!(f(Filter {
            ports: vec![40000],
            ..Default::default()
        }));
        assert!(!f(Filter {
            ports: vec![1],
            ..Default::default()
        }));
        assert!(!f(Filter {
            states: vec![TcpState::Close],
            ..Default::default()
        }));
        assert!(!f(Filter {
            family: Some(6),
            ..Default::default()
        }));
        assert!(f(Filter {
            netns: vec![4_026_532_301],
            ..Default::default()
        }));
        // A received reset's on-CPU task is never matched; its owner is.
        let rx = decode(&wire(KIND_RESET_RECEIVED, 2, 0xff, 0)).expect("valid");
        let pid = Filter {
            pids: vec![4242],
            ..Default::default()
        };
        assert!(!matches(&pid, &rx, None));
        assert!(matches(&pid, &rx, Some((4242, "x"))));
    }
}
