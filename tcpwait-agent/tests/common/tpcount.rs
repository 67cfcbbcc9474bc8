//! An independent count of `sock:inet_sock_set_state` hits: a perf counter on the tracepoint
//! on every CPU (what `perf stat -a -e sock:inet_sock_set_state` counts), next to tcpwait's
//! own count (its main program's runs and recursion misses). Where the two differ over the
//! same work, one of them missed hits.
use perf_event::{Builder, Counter, events::Tracepoint};

const ID: &str = "events/sock/inet_sock_set_state/id";

/// Counters on the tracepoint, one per CPU, counting from [`TracepointCount::start`].
pub struct TracepointCount {
    counters: Vec<Counter>,
}

impl TracepointCount {
    /// Starts counting on every CPU; `Err` says why not (no tracefs, no perf events).
    pub fn start() -> Result<Self, String> {
        let id = tracepoint_id()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
        let cpus = parse_cpu_list(online.trim()).unwrap_or_else(|| (0..cpus).collect());
        let mut counters = Vec::with_capacity(cpus.len());
        for cpu in cpus {
            let mut c = Builder::new(Tracepoint::with_id(id))
                .any_pid()
                .one_cpu(cpu)
                .include_kernel()
                .build()
                .map_err(|e| format!("perf_event_open on the tracepoint, CPU {cpu}: {e}"))?;
            c.enable()
                .map_err(|e| format!("enable the perf counter: {e}"))?;
            counters.push(c);
        }
        Ok(Self { counters })
    }

    /// Hits on every CPU since [`TracepointCount::start`].
    pub fn total(&mut self) -> u64 {
        self.counters
            .iter_mut()
            .map(|c| c.read().expect("read the perf counter"))
            .sum()
    }
}

/// The tracepoint's id, from tracefs (mounted at /sys/kernel/tracing if it is not).
fn tracepoint_id() -> Result<u64, String> {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if let Ok(s) = std::fs::read_to_string(format!("{root}/{ID}")) {
            return s.trim().parse().map_err(|e| format!("{root}/{ID}: {e}"));
        }
    }
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        .status()
        .is_ok_and(|s| s.success());
    std::fs::read_to_string(format!("/sys/kernel/tracing/{ID}"))
        .map_err(|e| format!("tracefs (mounted now: {mounted}): {ID}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{ID}: {e}"))
}

/// `0-3,5` → [0, 1, 2, 3, 5].
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().ok()?..=b.parse().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}
