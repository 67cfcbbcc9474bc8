//! The result table: medians of each mode's runs, formatted and printed one row per mode and
//! setting, with the per-run and per-round details under each row.
use super::Sample;

/// How a mode is shown in the table.
fn label(mode: &str) -> String {
    let (m, base) = match mode.strip_suffix(super::BASE_SUFFIX) {
        Some(m) => (m, " (baseline)"),
        None => (mode, ""),
    };
    let name = match m {
        "trace" => "trace --json",
        "floor" => "floor (count)",
        m => m,
    };
    format!("{name}{base}")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The table's header line.
pub(super) fn print_header() {
    println!(
        "{:<20} {:>9} {:>9} {:>11} {:>11} {:>11} {:>8} {:>9} {:>10} {:>11} {:>9}",
        "mode",
        "conn/s",
        "slowdown",
        "expected",
        "fired",
        "captured",
        "ring",
        "recursion",
        "bpf ns/ev",
        "agent µs/ev",
        "peak RSS"
    );
}

/// One row per mode and setting (`entries`, in the order they ran in each round), from the
/// samples of all rounds (`all`, one list per entry).
pub(super) fn print_rows(entries: &[(&str, bool)], all: Vec<Vec<Sample>>) {
    // The no-tracer rate of each round, if `none` ran.
    let baseline: Option<Vec<f64>> = entries
        .iter()
        .position(|&(m, _)| m == "none")
        .map(|i| all[i].iter().map(|x| x.conns_per_s).collect());
    for (&(mode, stats), samples) in entries.iter().zip(all) {
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let rate = m(|x| x.conns_per_s);
        // Each round's slowdown against the no-tracer run of the same round (the runs next to
        // each other in time, so that a drift of the machine cancels out), and their median.
        let per_round: Vec<f64> = match &baseline {
            Some(base) => samples
                .iter()
                .zip(base)
                .map(|(x, b)| (1.0 - x.conns_per_s / b) * 100.0)
                .collect(),
            None => Vec::new(),
        };
        let slowdown = median(per_round.clone());
        // With statistics: the kernel's count less what tcpwait captured, signed (a negative
        // figure is a transition delivered twice, or TCP traffic of another program after the
        // kernel's count was read). Without: what the agent counted as lost.
        let lost: Vec<String> = samples
            .iter()
            .map(|x| match (x.stats, mode) {
                (true, _) => (x.fired as i64 - x.captured as i64).to_string(),
                // bpftrace counts no loss of its own.
                (false, "floor") => "-".to_owned(),
                (false, _) => x.agent_lost.to_string(),
            })
            .collect();
        let dash = |v: String| if stats { v } else { "-".to_owned() };
        println!(
            "{:<20} {:>9.0} {:>8.1}% {:>11.0} {:>11} {:>11.0} {:>8.0} {:>9.0} {:>10} {:>11.2} {:>7} MiB   lost per run: {}",
            format!("{}{}", label(mode), if stats { " +stats" } else { "" }),
            rate,
            slowdown,
            m(|x| x.expected as f64),
            dash(format!("{:.0}", m(|x| x.fired as f64))),
            m(|x| x.captured as f64),
            m(|x| x.ring_full as f64),
            m(|x| x.recursion_misses as f64),
            dash(format!("{:.0}", m(|x| x.bpf_ns_per_event))),
            m(|x| x.agent_us_per_event),
            (m(|x| x.peak_rss_kib as f64) / 1024.0).round(),
            if mode == "none" {
                "-".into()
            } else {
                lost.join(" ")
            },
        );
        let rates: Vec<String> = samples
            .iter()
            .map(|x| format!("{:.0}", x.conns_per_s))
            .collect();
        println!("  conn/s per run: {}", rates.join(" "));
        if mode != "none" && !per_round.is_empty() {
            let rounds: Vec<String> = per_round.iter().map(|p| format!("{p:.1}%")).collect();
            println!(
                "  slowdown per round: {} (ratio of the medians: {:.1}%)",
                rounds.join(" "),
                baseline
                    .as_ref()
                    .map_or(0.0, |b| (1.0 - rate / median(b.clone())) * 100.0)
            );
        }
        for (i, x) in samples.iter().enumerate() {
            if mode != "none" && x.stats && x.fired != x.captured {
                // The agent's identity covers its whole life, the bench's read of the kernel's
                // count only the workload: exact there, the difference is other TCP traffic.
                let why = if x.summary.contains("(exact)") {
                    " (the agent's own accounting, over its whole run, is exact: the \
                     difference is TCP traffic outside the bench's reads of the kernel's count)"
                } else {
                    ""
                };
                println!(
                    "  run {i}: the tracepoint fired {} times, tcpwait captured {}{why}; agent: {}",
                    x.fired, x.captured, x.summary
                );
            }
            if mode != "none" && x.stats && x.fired != x.expected {
                println!(
                    "  run {i}: the workload's {} connections made {} transitions by the \
                     kernel's count, not {} (10 each, 2 for the listener)",
                    (x.expected - 2) / 10,
                    x.fired,
                    x.expected
                );
            }
        }
    }
}
