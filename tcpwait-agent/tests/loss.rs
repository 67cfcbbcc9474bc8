//! Exact loss accounting on the real kernel: every transition the tracepoint fired while the
//! agent listened is delivered once or counted, in `trace` and in `run`.
//!
//! Kernel behaviour exercised: at the maximum connection rate, transitions that run in softirq
//! (the peer's FIN and ACK processing) nest into the program already running on that CPU for
//! a transition of process context; the kernel skips the main program for them (a recursion
//! miss, Linux ≥ 6.10 for BTF tracepoints; a re-entered run before) and the rescue program
//! records them. On loopback the softirq runs on the sending CPU at `local_bh_enable`; across a
//! veth pair between two namespaces the packet goes through the receive backlog (`netif_rx`),
//! processed in the NET_RX softirq like a NIC's.
//!
//! What is exact, and why it holds with other tests' TCP traffic on the machine: the agent's
//! summary counts the kernel's own hits of the tracepoint (the main program's `run_cnt` plus
//! `recursion_misses`, for exactly the window it was attached, host-wide) against its
//! outcomes, so other traffic enters both sides; the test's own transitions (in its own
//! namespaces) are checked apart, edge by edge, to the exact number of connections.
mod common;

use std::{
    collections::HashMap,
    io::BufRead as _,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::{tpcount::TracepointCount, *};

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

#[path = "loss/workload.rs"]
mod workload;

use workload::{Path, Topology, churn, connections, settle};

/// The accounting clause of an exit summary (`accounting: …`), checked exact: returns the
/// kernel's hits and the counts of seen, malformed, ring full, lost to nesting and not TCP.
fn identity(summary: &str) -> [u64; 6] {
    let clause = summary
        .split("accounting: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no accounting clause: {summary}"));
    let numbers = |n: usize| -> Vec<u64> {
        clause
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(n)
            .map(|s| s.parse().expect("a count"))
            .collect()
    };
    if !kernel_counts_recursion() {
        // Linux < 5.12: no recursion count, so no count of hits either; never a false 0. What
        // was read, the ring's losses and the not-TCP runs stand for the hits, a lower bound.
        let unknown = "tracepoint hits unknown (this kernel keeps no recursion count): ";
        assert!(clause.starts_with(unknown), "{clause}");
        let [read, ring, not_tcp] = numbers(3)[..] else {
            panic!("accounting clause: {clause}")
        };
        assert!(
            clause.starts_with(&format!(
                "{unknown}{read} read + {ring} ring buffer full + {not_tcp} not TCP, nested \
                 transitions lost uncounted"
            )),
            "{clause}"
        );
        return [read + ring + not_tcp, read, 0, ring, 0, not_tcp];
    }
    let [hits, seen, malformed, ring, nested, not_tcp] = numbers(6)[..] else {
        panic!("accounting clause: {clause}")
    };
    assert!(
        clause.contains(" not TCP (exact)") && !clause.contains("copies"),
        "{clause}"
    );
    assert_eq!(hits, seen + malformed + ring + nested + not_tcp, "{clause}");
    [hits, seen, malformed, ring, nested, not_tcp]
}

/// The edges of the workload's transitions (its namespaces only), counted, and how many
/// transition records were read (reset records, which `trace` prints too, are shown apart).
/// Panics on a copy: a record equal to the previous record of its socket
/// address (same ports, same old and new state, same task; only the time differs), which no socket can
/// make twice in a row (it would have to leave the new state and come back to the old one),
/// and which is what a rescued copy of a sent transition looks like. Only where nothing was
/// lost (`complete`): a lost record (ring full) lets a later socket at the same address, with
/// the same ports, look like a repeat of the earlier one (seen: `CLOSE -> SYN_SENT` twice 8 ms
/// apart, port 0 before connect() picks one, the first connection's other records lost to a
/// full ring). The accounting identity counts copies either way.
fn own_edges(
    lines: impl Iterator<Item = String>,
    netns: &[u64],
    complete: bool,
) -> (HashMap<String, usize>, usize) {
    let mut edges = HashMap::new();
    let mut all = 0;
    let mut last: HashMap<String, (String, String)> = HashMap::new();
    let mut copies = Vec::new();
    let mut foreign = Vec::new();
    let mut resets = Vec::new();
    for line in lines {
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v.get("kind").is_some() {
            // A reset (an abort, or one received), which `trace` prints beside the
            // transitions; not one of them. Shown: the workload closes gracefully, so one of
            // its own says what the kernel did (seen once on 5.10 under emulation).
            resets.push(line);
            continue;
        }
        all += 1;
        // With the task: the rescue program's copy runs in the context of the transition it
        // copies; a socket freed and its address reused by another thread's is not a copy.
        let key = format!(
            "{} {} {} {} {}",
            v["sport"], v["dport"], v["old"], v["new"], v["tid"]
        );
        let sk = v["skaddr"].as_str().expect("skaddr").to_owned();
        if let Some((prev, prev_line)) = last.insert(sk, (key.clone(), line.clone()))
            && prev == key
            && v["old"] != v["new"]
        {
            copies.push(format!("{prev_line} then {line}"));
        }
        if v["netns"].as_u64().is_some_and(|n| netns.contains(&n)) {
            let edge = format!(
                "{}>{}",
                v["old"].as_str().expect("old"),
                v["new"].as_str().expect("new")
            );
            *edges.entry(edge).or_default() += 1;
        } else {
            // Another namespace's (other traffic of the host), or one of ours misread: a
            // shortfall's message shows them.
            *edges.entry("(other namespaces)".to_owned()).or_default() += 1;
            if foreign.len() < 3 {
                foreign.push(line.clone());
            }
        }
    }
    if !foreign.is_empty() {
        eprintln!(
            "loss: records of other namespaces, first {}: {foreign:?}",
            foreign.len()
        );
    }
    if !resets.is_empty() {
        eprintln!(
            "loss: {} reset records, first {:?}",
            resets.len(),
            &resets[..resets.len().min(3)]
        );
    }
    assert!(
        copies.is_empty() || !complete,
        "{} records repeat the previous one of their socket, first: {:?}",
        copies.len(),
        copies.first()
    );
    (edges, all)
}

/// Checks the workload's edges against `n` connections and one listener: none more often
/// than it happened (a copy), and every one there or within the transitions counted lost
/// (host-wide, so they bound the workload's own loss): with nothing lost, exactly.
fn check_edges(
    edges: &HashMap<String, usize>,
    n: usize,
    lost: u64,
    summary: &str,
) -> Result<(), String> {
    let expected = expected_edges(n);
    for (edge, &count) in edges.iter().filter(|(e, _)| *e != "(other namespaces)") {
        let want = expected.get(edge).copied().unwrap_or(0);
        if count > want {
            return Err(format!("{edge}: {count} of {want}; {summary}"));
        }
    }
    let seen: usize = edges
        .iter()
        .filter(|(e, _)| *e != "(other namespaces)")
        .map(|(_, n)| n)
        .sum();
    let total: usize = expected.values().sum();
    if seen as u64 + lost < total as u64 {
        return Err(format!(
            "{seen} of the workload's {total} transitions seen, {lost} counted lost: \
             {edges:?}; {summary}"
        ));
    }
    Ok(())
}

/// The workload's exact edges: `n` connections, one listener.
fn expected_edges(n: usize) -> HashMap<String, usize> {
    [
        ("CLOSE>SYN_SENT", n),
        ("SYN_SENT>ESTABLISHED", n),
        ("ESTABLISHED>CLOSE_WAIT", n),
        ("CLOSE_WAIT>LAST_ACK", n),
        ("LAST_ACK>CLOSE", n),
        ("LISTEN>SYN_RECV", n),
        ("SYN_RECV>ESTABLISHED", n),
        ("ESTABLISHED>FIN_WAIT1", n),
        ("FIN_WAIT1>FIN_WAIT2", n),
        ("FIN_WAIT2>CLOSE", n),
        ("CLOSE>LISTEN", 1),
        ("LISTEN>CLOSE", 1),
    ]
    .into_iter()
    .map(|(e, k)| (e.to_owned(), k))
    .collect()
}

/// `tcpwait trace --json` (stdout to a file) around the workload: the summary's identity is
/// exact, every transition of the workload is printed exactly once, and no printed record
/// repeats one of its socket.
fn trace(path: Path, threads: usize) -> Result<(), String> {
    require_root();
    let Some(topo) = Topology::new(path) else {
        return Ok(());
    };
    let topo = Arc::new(topo);
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut perf = independent_count();
    let mut child = Command::new(TCPWAIT)
        .args(["trace", "--json"])
        .stdout(Stdio::from(out.reopen().expect("reopen")))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpwait");
    let stderr = Lines::default();
    stderr.spawn_reader(child.stderr.take().expect("piped stderr"));
    assert!(
        stderr.wait_for("tracing TCP state transitions", Duration::from_secs(20)),
        "{:?}",
        stderr.snapshot()
    );
    let n = connections();
    churn(&topo, n, threads);
    settle(&topo);
    // SAFETY: kill our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("wait tcpwait");
    let fired = perf.as_mut().map(TracepointCount::total);
    assert!(stderr.wait_for("accounting: ", Duration::from_secs(10)));
    let summary = stderr.snapshot().join("\n");
    assert!(status.success(), "{summary}");
    let [hits, seen, _, ring, nested, _] = identity(&summary);
    let summary = with_perf(&summary, hits, fired);
    let file = std::io::BufReader::new(out.reopen().expect("reopen"));
    let (edges, printed) = own_edges(
        file.lines().map(|l| l.expect("read")),
        &topo.inodes(),
        ring + nested == 0,
    );
    assert_eq!(
        printed as u64, seen,
        "every transition seen is printed; {summary}"
    );
    // The rescue program records every nested transition: none is lost to nesting. The ring
    // can fill when the reader is starved of CPU (a loaded machine): counted, exactly.
    if kernel_counts_recursion() {
        assert_eq!(nested, 0, "{summary}");
    }
    check_edges(&edges, n, ring + nested, &summary)
        .map_err(|e| silent_loss_or(e, hits, fired, 10 * n as u64 + 2))?;
    eprintln!(
        "trace {path:?}, {threads} client thread(s), {n} connections: {hits} hits; {summary}"
    );
    Ok(())
}

/// `tcpwait run` around the workload: the exit summary's identity is exact.
fn run(path: Path, threads: usize) -> Result<(), String> {
    require_root();
    let Some(topo) = Topology::new(path) else {
        return Ok(());
    };
    let topo = Arc::new(topo);
    let socket = api_socket(&format!("loss-{path:?}-{threads}"));
    let mut perf = independent_count();
    let mut tw = daemon(&socket, &[]);
    let n = connections();
    churn(&topo, n, threads);
    settle(&topo);
    assert_eq!(tw.stop(libc::SIGTERM), 0);
    let fired = perf.as_mut().map(TracepointCount::total);
    assert!(tw.stderr.wait_for("accounting: ", Duration::from_secs(10)));
    let summary = tw.stderr.snapshot().join("\n");
    let [hits, seen, _, ring, nested, _] = identity(&summary);
    let summary = with_perf(&summary, hits, fired);
    if kernel_counts_recursion() {
        assert_eq!(nested, 0, "{summary}");
    }
    if seen + ring + nested < 10 * n as u64 + 2 {
        return Err(silent_loss_or(
            format!(
                "{} transitions seen or counted lost host-wide, the workload made {}; {summary}",
                seen + ring + nested,
                10 * n + 2
            ),
            hits,
            fired,
            10 * n as u64 + 2,
        ));
    }
    eprintln!("run {path:?}, {threads} client thread(s), {n} connections: {hits} hits; {summary}");
    Ok(())
}

/// A perf counter on the tracepoint, started before tcpwait (`None`, said once, where the
/// kernel offers none).
fn independent_count() -> Option<TracepointCount> {
    match TracepointCount::start() {
        Ok(c) => Some(c),
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("loss: no independent count of tracepoint hits: {e}"));
            None
        }
    }
}

/// `summary` with perf's count next to tcpwait's. perf counts from before tcpwait attaches to
/// after it detaches, so it can only count more (other traffic of the host around tcpwait's
/// window); fewer would mean tcpwait counts hits that never happened.
fn with_perf(summary: &str, hits: u64, fired: Option<u64>) -> String {
    let Some(fired) = fired else {
        return summary.to_owned();
    };
    assert!(
        fired >= hits,
        "tcpwait counted {hits} hits, perf {fired} over a wider window; {summary}"
    );
    format!("{summary}; perf counted {fired} tracepoint hits around it")
}

/// A shortfall against the workload (`why`) is the known defect only if the tracepoint itself
/// fired fewer times than the workload makes (perf's count, around tcpwait's window, short
/// too): then no transition was lost, the kernel made fewer. If perf counted the workload's
/// transitions and tcpwait's own count of hits did not, transitions were lost without being
/// counted: that panics at once — where the kernel counts recursion misses; before 5.12 the
/// hits are a lower bound and nested transitions are lost uncounted by design (README).
fn silent_loss_or(why: String, hits: u64, fired: Option<u64>, workload: u64) -> String {
    if let Some(fired) = fired.filter(|_| kernel_counts_recursion()) {
        assert!(
            !(fired >= workload && hits < workload),
            "perf counted {fired} tracepoint hits (the workload made {workload}), tcpwait's \
             count {hits}: hits lost uncounted; {why}"
        );
    }
    why
}

/// Runs a loss scenario; if the kernel's count of the workload's transitions falls short of
/// what the workload made while tcpwait's identity against that count stays exact, and perf's
/// own count of the tracepoint is short too (the tracepoint fired fewer times: seen about once
/// in 100 runs on 6.18 with the host loaded, by 2; not once in 296 runs with perf beside), says so
/// on stderr and runs the scenario once more, which must pass. A failure of the identity, or a
/// shortfall perf does not share (transitions lost uncounted), panics at once.
fn at_most_one_kernel_shortfall(name: &str, scenario: impl Fn() -> Result<(), String>) {
    if let Err(first) = scenario() {
        eprintln!(
            "KERNEL SHORTFALL: {name}: the kernel counted fewer hits than the workload makes \
             transitions, and tcpwait accounted for every hit it counted (perf's own count, \
             where the kernel offers one, is in the summary and agrees): {first}; once more"
        );
        if let Err(second) = scenario() {
            panic!("{second}\n(the run before: {first})");
        }
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn trace_accounts_for_every_hit_on_loopback_one_client_thread() {
    at_most_one_kernel_shortfall(
        "trace_accounts_for_every_hit_on_loopback_one_client_thread",
        || trace(Path::Loopback, 1),
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn trace_accounts_for_every_hit_on_loopback_two_client_threads() {
    at_most_one_kernel_shortfall(
        "trace_accounts_for_every_hit_on_loopback_two_client_threads",
        || trace(Path::Loopback, 2),
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn trace_accounts_for_every_hit_across_veth_one_client_thread() {
    at_most_one_kernel_shortfall(
        "trace_accounts_for_every_hit_across_veth_one_client_thread",
        || trace(Path::Veth, 1),
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn trace_accounts_for_every_hit_across_veth_two_client_threads() {
    at_most_one_kernel_shortfall(
        "trace_accounts_for_every_hit_across_veth_two_client_threads",
        || trace(Path::Veth, 2),
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn run_accounts_for_every_hit_on_loopback_one_client_thread() {
    at_most_one_kernel_shortfall(
        "run_accounts_for_every_hit_on_loopback_one_client_thread",
        || run(Path::Loopback, 1),
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn run_accounts_for_every_hit_on_loopback_two_client_threads() {
    at_most_one_kernel_shortfall(
        "run_accounts_for_every_hit_on_loopback_two_client_threads",
        || run(Path::Loopback, 2),
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn run_accounts_for_every_hit_across_veth_one_client_thread() {
    at_most_one_kernel_shortfall(
        "run_accounts_for_every_hit_across_veth_one_client_thread",
        || run(Path::Veth, 1),
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn run_accounts_for_every_hit_across_veth_two_client_threads() {
    at_most_one_kernel_shortfall(
        "run_accounts_for_every_hit_across_veth_two_client_threads",
        || run(Path::Veth, 2),
    );
}
