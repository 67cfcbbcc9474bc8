//! `tcpwait status` and `tcpwait tail`: clients of the daemon's API socket.
use std::{
    io::{self, Write as _},
    path::Path,
    process::ExitCode,
    time::Duration,
};

mod timewait;

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use crate::{
    api::{ProcessReport, Request, SocketReport, StatusReport, TailLine},
    filter::Filter,
    output::{Clock, Format, TEXT_HEADER, escape_control, write_record},
};

/// Failure to reach the daemon.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the tcpwait daemon at {path}: start it with `sudo tcpwait run` (or pass the \
     --socket it listens on)"
)]
pub struct NotRunning {
    path: String,
    #[source]
    source: io::Error,
}

/// The agent did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "the tcpwait daemon at {path} did not answer within {}: it may be stopped (SIGSTOP) or \
     overloaded; check it with `systemctl status tcpwait` or pass a longer --timeout",
    humantime::format_duration(*timeout)
)]
pub struct NoAnswer {
    path: String,
    timeout: Duration,
}

/// Runs `f` within `timeout`, or fails with [`NoAnswer`].
async fn within<T>(
    path: &Path,
    timeout: Duration,
    f: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| NoAnswer {
            path: path.display().to_string(),
            timeout,
        })?
}

/// Fails with the agent's own words when it refused the request (`{"error": "…"}`: too many
/// clients, busy, request too large).
fn refused(path: &Path, line: &str) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Refusal {
        error: String,
    }
    match serde_json::from_str::<Refusal>(line.trim()) {
        Ok(r) => anyhow::bail!(
            "the tcpwait daemon at {} refused the request: {}",
            path.display(),
            escape_control(&r.error)
        ),
        Err(_) => Ok(()),
    }
}

async fn connect(path: &Path, request: &Request) -> anyhow::Result<UnixStream> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| NotRunning {
            path: path.display().to_string(),
            source,
        })?;
    let mut line = serde_json::to_vec(request).context("encode request")?;
    line.push(b'\n');
    match stream.write_all(&line).await {
        // The agent may have answered and closed before reading (a refusal): read it.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(stream),
        r => r.context("send request to the daemon").map(|()| stream),
    }
}

/// `tcpwait status` (`--port P`: what holds local port P).
pub async fn status(
    path: &Path,
    json: bool,
    port: Option<u16>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let request = match port {
        Some(port) => Request::PortStatus { port },
        None => Request::Status,
    };
    let line = within(path, timeout, async {
        let stream = connect(path, &request).await?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .await
            .context("read the daemon's answer")?;
        Ok(line)
    })
    .await?;
    refused(path, &line)?;
    let report: StatusReport = serde_json::from_str(&line)
        .with_context(|| format!("unexpected answer from the daemon: {}", line.trim()))?;
    let mut out = io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&report)?;
        writeln!(out, "{}", crate::output::escape_json(&text))?;
    } else if let Some(p) = &report.port {
        timewait::print_port(&mut out, p)?;
    } else {
        print_status(&mut out, &report)?;
        if let Some(tw) = &report.timewait {
            timewait::print_timewait(&mut out, tw)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn age(s: f64, lower_bound: bool) -> String {
    let ge = if lower_bound { "≥" } else { "" };
    match s {
        s if s < 120.0 => format!("{ge}{s:.1}s"),
        s if s < 7200.0 => format!("{ge}{:.1}m", s / 60.0),
        s => format!("{ge}{:.1}h", s / 3600.0),
    }
}

fn print_status(out: &mut impl io::Write, r: &StatusReport) -> io::Result<()> {
    writeln!(
        out,
        "tcpwait: up {}, {} sockets tracked, {} transitions, lost: ring {} recursion {} malformed {}",
        age(r.uptime_s, false),
        r.tracked_sockets,
        r.counters.transitions,
        r.counters.lost_ring_full,
        crate::probe::count_or_unknown(r.counters.lost_recursion_misses),
        r.counters.malformed
    )?;
    for (what, counts) in [
        ("dropped (queue full)", &r.counters.sink_dropped),
        ("failed to write", &r.counters.sink_failed),
    ] {
        let lost: Vec<String> = counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(sink, n)| format!("{} {n}", escape_control(sink)))
            .collect();
        if !lost.is_empty() {
            writeln!(out, "output lines {what}: {}", lost.join(", "))?;
        }
    }
    for a in &r.alerts {
        writeln!(
            out,
            "ALERT {} pid {} ({}) {} {} sockets, oldest {}, firing for {}",
            a.rule,
            a.pid,
            escape_control(&a.comm),
            a.count,
            a.state,
            age(a.oldest_age_s, false),
            age(a.firing_for_s, false)
        )?;
    }
    for h in &r.host_rules {
        let threshold: Vec<String> = h
            .max_count
            .map(|n| format!("more than {n}"))
            .into_iter()
            .chain(h.max_age_s.map(|s| format!("oldest {}", age(s, false))))
            .collect();
        writeln!(
            out,
            "{}host rule {}: {} {} sockets on the host{}; fires at {}",
            if h.firing { "ALERT " } else { "" },
            h.rule,
            h.count,
            h.state,
            h.oldest_age_s.map_or_else(String::new, |s| format!(
                ", oldest {}",
                age(s, h.oldest_age_is_lower_bound)
            )),
            threshold.join(" or ")
        )?;
    }
    // An agent older than `watched_states` watched CLOSE_WAIT only.
    let states = if r.watched_states.is_empty() {
        vec!["CLOSE_WAIT".to_owned()]
    } else {
        r.watched_states.clone()
    };
    for state in &states {
        // A report without per-entry states (an older agent) is one CLOSE_WAIT section.
        let of = |s: &str| s == state || s.is_empty();
        let procs: Vec<&ProcessReport> = r.processes.iter().filter(|p| of(&p.state)).collect();
        let unowned: Vec<&SocketReport> = r.unowned.iter().filter(|s| of(&s.state)).collect();
        print_section(out, state, &procs, &unowned)?;
    }
    if let Some(aborts) = &r.aborts {
        aborts.write_text(out)?;
    }
    Ok(())
}

/// One watched state: its holders, most sockets first, then the sockets with no known holder.
fn print_section(
    out: &mut impl io::Write,
    state: &str,
    procs: &[&ProcessReport],
    unowned: &[&SocketReport],
) -> io::Result<()> {
    if procs.is_empty() && unowned.is_empty() {
        return writeln!(out, "no process holds {state} sockets");
    }
    writeln!(
        out,
        "{:<8} {:<16} {:>6} {:>9}  PEERS / COMMAND",
        "PID",
        "COMM",
        short(state),
        "OLDEST"
    )?;
    for p in procs {
        let peers: Vec<String> = p
            .peers
            .iter()
            .map(|x| format!("{}×{}", x.addr, x.count))
            .collect();
        writeln!(
            out,
            "{:<8} {:<16} {:>6} {:>9}  {}",
            p.pid,
            escape_control(&p.comm),
            p.count,
            age(p.oldest_age_s, p.oldest_age_is_lower_bound),
            peers.join(" ")
        )?;
        writeln!(out, "{:44}{}", "", escape_control(&p.cmdline))?;
        let mut context = Vec::new();
        if let Some(ns) = p.netns {
            context.push(format!("netns {ns}"));
        }
        if let Some(uid) = &p.pod_uid {
            context.push(format!("pod {}", escape_control(uid)));
        }
        if let Some(c) = &p.container {
            context.push(format!("container {}", escape_control(c)));
        }
        if !context.is_empty() {
            writeln!(out, "{:44}{}", "", context.join("  "))?;
        }
        for s in &p.sockets {
            let recv_q = s.recv_q.map_or_else(|| "?".to_owned(), |q| q.to_string());
            writeln!(
                out,
                "    {} -> {}  age {}  recv-q {recv_q}",
                s.local,
                s.remote,
                age(s.age_s, s.age_is_lower_bound)
            )?;
        }
    }
    for s in unowned {
        writeln!(
            out,
            "?        (owner unknown)          {} -> {}  age {}",
            s.local,
            s.remote,
            age(s.age_s, s.age_is_lower_bound)
        )?;
    }
    Ok(())
}

/// A state's column header: its initials (`CLOSE_WAIT` → `CW`, `SYN_SENT` → `SS`,
/// `FIN_WAIT2` → `FW2`).
fn short(state: &str) -> String {
    state
        .split('_')
        .map(|w| {
            let digits: String = w.chars().filter(char::is_ascii_digit).collect();
            format!("{}{digits}", w.chars().next().unwrap_or('?'))
        })
        .collect()
}

/// `tcpwait tail`.
pub async fn tail(
    path: &Path,
    filter: Filter,
    format: Format,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    // The first line, `{"subscribed":true}`, comes at once from a running agent.
    let (mut reader, first) = within(path, timeout, async {
        let stream = connect(path, &Request::Tail { filter }).await?;
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        let mut first = String::new();
        reader
            .read_line(&mut first)
            .await
            .context("read from the daemon")?;
        Ok((reader, first))
    })
    .await?;
    // Only the first line can be a refusal (too many clients, request too large).
    refused(path, &first)?;
    let clock = Clock::now();
    let mut out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    if format == Format::Text {
        writeln!(out, "{TEXT_HEADER}")?;
        out.flush()?;
    }
    let mut missed = 0u64;
    let mut line = first;
    let mut pending_first = true;
    loop {
        let n = if std::mem::take(&mut pending_first) {
            line.len()
        } else {
            line.clear();
            tokio::select! {
                n = reader.read_line(&mut line) => n.context("read from the daemon")?,
                _ = tokio::signal::ctrl_c() => 0,
            }
        };
        if n == 0 {
            break;
        }
        let text = line.trim_end();
        // Records are by far the most frequent line: in JSON mode they pass through as they
        // came; only control lines and text output need parsing.
        let control = text.starts_with("{\"missed\"") || text.starts_with("{\"subscribed\"");
        let written = if format == Format::Json && !control {
            writeln!(out, "{}", crate::output::escape_json(text))
        } else {
            match serde_json::from_str::<TailLine<'_>>(text) {
                Ok(TailLine::Subscribed { .. }) => {
                    eprintln!(
                        "tcpwait: following the agent's transitions at {}; Ctrl-C to stop",
                        path.display()
                    );
                    Ok(())
                }
                Ok(TailLine::Missed { missed: n }) => {
                    missed += n;
                    eprintln!("tcpwait: this client fell behind and missed {n} transitions");
                    Ok(())
                }
                Ok(TailLine::Record(r)) => write_record(&mut out, format, &clock, &r),
                Ok(TailLine::Reset(r)) => crate::resets::write_reset(&mut out, format, &clock, &r),
                Err(e) => anyhow::bail!("unexpected line from the daemon ({e}): {text}"),
            }
        };
        // Flush once nothing more is buffered: live, without a write per line in a burst.
        let flushed = written.and_then(|()| {
            if reader.buffer().is_empty() {
                out.flush()
            } else {
                Ok(())
            }
        });
        match flushed {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break,
            r => r.context("write to stdout")?,
        }
    }
    let _ = out.flush();
    if missed > 0 {
        eprintln!("tcpwait: {missed} transitions missed in total");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Counters;

    #[test]
    fn status_text_has_a_section_per_watched_state() {
        let r = StatusReport {
            watched_states: vec!["SYN_SENT".into(), "FIN_WAIT2".into(), "CLOSE_WAIT".into()],
            processes: vec![ProcessReport {
                state: "SYN_SENT".into(),
                pid: 7,
                comm: "curl".into(),
                cmdline: "curl http://10.9.9.9/".into(),
                count: 1,
                oldest_age_s: 2.0,
                sockets: vec![SocketReport {
                    state: "SYN_SENT".into(),
                    local: "10.0.0.1:4000".into(),
                    remote: "10.9.9.9:80".into(),
                    age_s: 2.0,
                    ..SocketReport::default()
                }],
                ..ProcessReport::default()
            }],
            unowned: vec![SocketReport {
                state: "CLOSE_WAIT".into(),
                local: "10.0.0.1:80".into(),
                remote: "10.0.0.2:5000".into(),
                age_s: 0.5,
                ..SocketReport::default()
            }],
            ..StatusReport::default()
        };
        let mut out = Vec::new();
        print_status(&mut out, &r).expect("write to a Vec");
        let text = String::from_utf8(out).expect("utf-8");
        let body: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            body,
            [
                "PID      COMM                 SS    OLDEST  PEERS / COMMAND",
                "7        curl                  1      2.0s  ",
                "                                            curl http://10.9.9.9/",
                "    10.0.0.1:4000 -> 10.9.9.9:80  age 2.0s  recv-q ?",
                "no process holds FIN_WAIT2 sockets",
                "PID      COMM                 CW    OLDEST  PEERS / COMMAND",
                "?        (owner unknown)          10.0.0.1:80 -> 10.0.0.2:5000  age 0.5s",
            ]
        );
        assert_eq!(short("FIN_WAIT2"), "FW2");
    }

    #[test]
    fn status_text_shows_output_losses_and_escapes_process_text() {
        let report = StatusReport {
            processes: vec![ProcessReport {
                pid: 7,
                comm: "a\u{202e}b".into(),
                cmdline: "x\u{2028}y\u{1b}".into(),
                count: 1,
                ..Default::default()
            }],
            counters: Counters {
                sink_dropped: [("stdout".to_owned(), 49), ("stderr".to_owned(), 0)].into(),
                sink_failed: [("transition_log".to_owned(), 3)].into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut out = Vec::new();
        print_status(&mut out, &report).expect("print");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "output lines dropped (queue full): stdout 49");
        assert_eq!(lines[2], "output lines failed to write: transition_log 3");
        assert!(text.contains("a\\u{202e}b"), "{text}");
        assert!(text.contains("x\\u{2028}y\\x1b"), "{text}");
    }

    #[test]
    fn status_text_shows_host_rules_with_their_thresholds() {
        let report = StatusReport {
            host_rules: vec![crate::api::host::HostRuleReport {
                rule: "connects_piling_up".into(),
                state: "SYN_SENT".into(),
                count: 25,
                max_count: Some(20),
                oldest_age_s: Some(3.25),
                oldest_age_is_lower_bound: false,
                max_age_s: Some(30.0),
                firing: true,
            }],
            ..Default::default()
        };
        let mut out = Vec::new();
        print_status(&mut out, &report).expect("print");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text.lines().nth(1),
            Some(
                "ALERT host rule connects_piling_up: 25 SYN_SENT sockets on the host, oldest \
                 3.2s; fires at more than 20 or oldest 30.0s"
            )
        );
    }
}
