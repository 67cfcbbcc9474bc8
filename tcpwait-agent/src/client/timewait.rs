//! Text rendering of the TIME_WAIT section of `status` and of `status --port P`.
use std::io;

use super::age;
use crate::{
    api::timewait::{CloserReport, PortReport, TimeWaitReport},
    output::escape_control,
};

fn who(c: &[CloserReport]) -> String {
    if c.is_empty() {
        return "unknown".to_owned();
    }
    c.iter()
        .map(|c| format!("{} ({})", c.pid, escape_control(&c.comm)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// TIME_WAIT sockets per peer, most first.
pub(super) fn print_timewait(out: &mut impl io::Write, r: &TimeWaitReport) -> io::Result<()> {
    let Some(census_age) = r.census_age_s else {
        return writeln!(out, "TIME_WAIT: no census yet");
    };
    writeln!(
        out,
        "TIME_WAIT: {} sockets toward {} peers (census {} ago, took {:.3}s{})",
        r.sockets,
        r.peers_total,
        age(census_age, false),
        r.census_seconds,
        if r.census_failed_namespaces > 0 {
            format!(", {} namespaces not dumped", r.census_failed_namespaces)
        } else {
            String::new()
        }
    )?;
    if r.peers.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:<12} {:<40} {:>6} {:>7} {:>8}  CLOSED BY",
        "NETNS", "LOCAL -> REMOTE", "TW", "SHARE", "RATE/S"
    )?;
    for p in &r.peers {
        let remote = if p.remote.contains(':') {
            format!("[{}]:{}", p.remote, p.port)
        } else {
            format!("{}:{}", p.remote, p.port)
        };
        writeln!(
            out,
            "{:<12} {:<40} {:>6} {:>6.1}% {:>8}  {}{}",
            p.netns.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            format!("{} -> {remote}", p.local),
            p.count,
            p.share * 100.0,
            p.rate_per_s
                .map_or_else(|| "-".to_owned(), |x| format!("{x:.1}")),
            who(&p.closers),
            if p.alerts.is_empty() {
                String::new()
            } else {
                format!("  ALERT {}", p.alerts.join(","))
            }
        )?;
    }
    Ok(())
}

/// `status --port P`.
pub(super) fn print_port(out: &mut impl io::Write, r: &PortReport) -> io::Result<()> {
    writeln!(out, "port {}:", r.port)?;
    for l in &r.listeners {
        let netns = l.netns.map_or_else(String::new, |n| format!(" netns {n}"));
        if l.open {
            writeln!(
                out,
                "  LISTEN by pid {} ({}){netns}, for {}",
                l.pid,
                escape_control(&l.comm),
                age(l.listened_s, false)
            )?;
        } else {
            writeln!(
                out,
                "  listened by pid {} ({}){netns} for {}, closed {} ago",
                l.pid,
                escape_control(&l.comm),
                age(l.listened_s, false),
                age(l.closed_ago_s.unwrap_or(0.0), false)
            )?;
        }
    }
    for s in &r.sockets {
        let when = match (s.seconds_left, s.age_s) {
            (Some(left), _) => format!("expires in {left:.1}s"),
            (None, Some(a)) => format!("age {}", age(a, s.age_is_lower_bound)),
            (None, None) => String::new(),
        };
        let holders = if s.holders.is_empty() {
            String::new()
        } else {
            format!("  held by {}", who(&s.holders))
        };
        writeln!(
            out,
            "  {:<11} {} -> {}  {when}{holders}",
            s.state, s.local, s.remote
        )?;
    }
    for line in &r.explanation {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}
