//! Loss accounting: what the kernel side counted, and the identity that ties every transition
//! the tracepoint fired to one outcome.
//!
//! The kernel's own count of tracepoint hits, for the window tcpwait listened in, is the main
//! program's: the tracepoint calls every attached program on every hit, and the kernel either
//! runs it (`run_cnt` in its fdinfo, kept while BPF statistics are enabled: the probe holds a
//! `BPF_ENABLE_STATS` descriptor from before it attaches until it has read the count) or skips
//! it as nested (`recursion_misses`, Linux ≥ 5.12). Those are counted in the kernel, per
//! program, so traffic before or after the window, and other tracers, never enter it. The
//! window closes exactly: the probe detaches the rescue program, then the main one, then waits
//! for an RCU grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)`), after which no run of either
//! is in flight, and only then reads the counts. Every run of the main program ends in one of
//! its counters (sent, ring full, not TCP, left to the rescue program), and every hit the main
//! program did not handle reaches the rescue program, which records it or counts it; what the
//! rescue program did not record of those is lost to nesting. So, per run:
//!
//! `hits = seen + malformed + ring full + lost to nesting + not TCP`
//!
//! where `seen + malformed` is what the agent read out of the ring (all of it, after the stop).
//! See DESIGN.md, "Loss accounting".
use std::{collections::HashMap, io, os::fd::OwnedFd};

use tcpwait_common::counter;

/// Counters the kernel keeps about the programs: what they sent, what they could not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events submitted to the ring buffer (all CPUs, every program).
    pub sent: u64,
    /// Events dropped because the ring buffer was full (all CPUs, every program).
    pub reserve_failed: u64,
    /// Transitions lost to the kernel's recursion guard: hits the main program was skipped for
    /// (`recursion_misses` in its fdinfo, kernel ≥ 5.12) or left to the rescue program, less
    /// those the rescue program recorded, lost to a full ring, or found not to be TCP. `None`
    /// where the kernel keeps no such count (before 5.12, or a classic tracepoint before
    /// 6.7): unknown, never 0.
    pub recursion_misses: Option<u64>,
    /// Transitions the rescue program recorded in the main program's place.
    pub rescued: u64,
    /// Transitions of other protocols (SCTP, MPTCP) the programs saw and passed over.
    pub not_tcp: u64,
    /// The kernel's count of tracepoint hits while the main program was attached: its runs
    /// plus its recursion misses. `None` if either is unknown (no BPF statistics, or no
    /// recursion count).
    pub hits: Option<u64>,
    /// Transitions the rescue program recorded beyond the hits the main program did not
    /// handle: copies of transitions the main program sent. 0 by design (it records only
    /// what the main program did not take on); counted so that a copy can never hide a loss.
    pub excess: u64,
    /// Total program run time, when BPF statistics are enabled.
    pub run_time_ns: u64,
    /// Program runs counted with `run_time_ns`.
    pub run_count: u64,
    /// Transitions that reached the agent after a later one had been handed on, so out of time
    /// order (see `probe::reorder`).
    pub late: u64,
}

impl KernelCounters {
    /// Builds the counters from the per-CPU sums (`sum(index)`) and the main program's
    /// statistics.
    pub(super) fn new(sum: impl Fn(u32) -> u64, prog: ProgStats, late: u64) -> Self {
        let rescue_took = sum(counter::RESCUED)
            + sum(counter::RESCUE_RESERVE_FAILED)
            + sum(counter::NESTED_NOT_TCP);
        // Hits the main program did not handle, all of which went to the rescue program.
        let unhandled = prog.recursion_misses;
        Self {
            sent: sum(counter::SENT) + sum(counter::FLUSHED) + sum(counter::RESCUED),
            reserve_failed: sum(counter::RESERVE_FAILED)
                + sum(counter::RESCUE_RESERVE_FAILED)
                + sum(counter::FLUSH_RESERVE_FAILED),
            recursion_misses: unhandled.map(|u| u.saturating_sub(rescue_took)),
            rescued: sum(counter::RESCUED),
            not_tcp: sum(counter::NOT_TCP) + sum(counter::NESTED_NOT_TCP),
            hits: match (prog.stats, prog.recursion_misses) {
                (true, Some(m)) => Some(prog.run_count + m),
                _ => None,
            },
            excess: unhandled.map_or(0, |u| rescue_took.saturating_sub(u)),
            run_time_ns: prog.run_time_ns,
            run_count: prog.run_count,
            late,
        }
    }

    /// The accounting identity for `received` events read from the ring (decoded or not) and
    /// `malformed` of them that could not be decoded: `Some(difference)` of hits against
    /// outcomes (0: exact), `None` if the kernel's count of hits is unknown.
    pub fn unaccounted(&self, received: u64, malformed: u64) -> Option<i128> {
        let _ = malformed; // part of `received`; named for the reader of the identity
        let outcomes = i128::from(received)
            + i128::from(self.reserve_failed)
            + i128::from(self.recursion_misses?)
            + i128::from(self.not_tcp)
            - i128::from(self.excess);
        Some(i128::from(self.hits?) - outcomes)
    }

    /// The identity in words, for the exit summaries of `trace` and `run`: `received` events
    /// read (`malformed` of them undecodable).
    pub fn identity(&self, received: u64, malformed: u64) -> String {
        let Some(hits) = self.hits else {
            return format!(
                "tracepoint hits unknown ({}): {} read + {} ring buffer full + {} not TCP, \
                 nested transitions lost uncounted",
                if self.run_count == 0 {
                    "no BPF statistics"
                } else {
                    "this kernel keeps no recursion count"
                },
                received,
                self.reserve_failed,
                self.not_tcp
            );
        };
        let diff = self.unaccounted(received, malformed).unwrap_or_default();
        format!(
            "{hits} tracepoint hits = {} seen + {malformed} malformed + {} ring buffer full + \
             {} lost to nesting + {} not TCP{}{}",
            received - malformed,
            self.reserve_failed,
            self.recursion_misses.unwrap_or_default(),
            self.not_tcp,
            if self.excess > 0 {
                format!(" - {} copies", self.excess)
            } else {
                String::new()
            },
            if diff == 0 {
                " (exact)".to_owned()
            } else {
                format!(" (off by {diff})")
            }
        )
    }
}

/// A BPF program's statistics, as its fdinfo gives them.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ProgStats {
    /// Absent before Linux 5.12, and not trusted for a classic tracepoint before 6.7.
    pub recursion_misses: Option<u64>,
    pub run_time_ns: u64,
    pub run_count: u64,
    /// BPF statistics were on for the whole window (`run_cnt` counts every run).
    pub stats: bool,
}

/// Turns on the kernel's BPF run statistics (`run_cnt`, `run_time_ns` of every program) for as
/// long as the returned descriptor is open (`BPF_ENABLE_STATS`, Linux 5.8). A reference, not a
/// switch: `sysctl kernel.bpf_stats_enabled=0` by someone else does not turn them off under it.
pub(super) fn enable_stats() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // `union bpf_attr` for BPF_ENABLE_STATS: `type` (BPF_STATS_RUN_TIME = 0) at 0.
    let mut attr = [0u32; 2];
    // SAFETY: `attr` is a valid, zero-filled prefix of `union bpf_attr`, sized as passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_ENABLE_STATS`, the `bpf(2)` command.
const BPF_ENABLE_STATS: libc::c_long = 32;

/// Waits until no program run that started before now is still in flight: tracepoints call
/// BPF programs with preemption disabled, so an RCU grace period covers them, and
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for one (`synchronize_rcu`). Where it is refused
/// (`nohz_full` kernels), a pause far longer than any program run.
pub(super) fn wait_for_runs_in_flight() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease`; (0, 0) if unreadable.
pub(super) fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// A count the kernel may not keep, for people: the number, or `unknown`.
pub fn count_or_unknown(n: Option<u64>) -> String {
    n.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
}

/// Parses `/proc/<pid>/fdinfo/<fd>` of a BPF program: `key:\tvalue` lines, numeric ones kept.
pub fn parse_fdinfo(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim(), v.trim().parse().ok()?))
        })
        .collect()
}

/// What the verifier went through for each loaded program (`verified_insns` in its fdinfo,
/// Linux 5.16 and later; "unknown" before), for the start-up log: where start-up time goes on
/// older kernels, and how far each program is from the verifier's limit (1,000,000).
pub(super) fn verified_instructions(ebpf: &aya::Ebpf) -> String {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut counts: Vec<String> = ebpf
        .programs()
        .filter_map(|(name, p)| {
            let fd = p.fd().ok()?.as_fd().as_raw_fd();
            let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            Some(match parse_fdinfo(&text).get("verified_insns") {
                Some(n) => format!("{name} {n}"),
                None => format!("{name} unknown"),
            })
        })
        .collect();
    counts.sort();
    counts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prog_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1053\nprog_type:\t5\n\
                    prog_jited:\t1\nprog_tag:\t3b185187f1855c4c\nmemlock:\t4096\nprog_id:\t42\n\
                    run_time_ns:\t1500\nrun_cnt:\t3\nrecursion_misses:\t7\nverified_insns:\t90\n";
        let m = parse_fdinfo(text);
        assert_eq!(m["recursion_misses"], 7);
        assert_eq!(m["run_time_ns"], 1500);
        assert_eq!(m["run_cnt"], 3);
        assert!(!m.contains_key("prog_tag"));
    }

    /// Per-CPU sums by counter index.
    fn sums(pairs: &[(u32, u64)]) -> impl Fn(u32) -> u64 + '_ {
        move |i| pairs.iter().filter(|(k, _)| *k == i).map(|(_, v)| v).sum()
    }

    fn prog(runs: u64, misses: Option<u64>) -> ProgStats {
        ProgStats {
            recursion_misses: misses,
            run_time_ns: 0,
            run_count: runs,
            stats: true,
        }
    }

    #[test]
    fn every_hit_has_one_outcome() {
        use counter::*;
        // 100 runs: 65 sent, 20 flushed, 5 ring full, 10 not TCP; 7 misses. The rescue
        // program took 6 nested ones: 4 recorded, 1 ring full, 1 not TCP; 1 lost.
        let s = [
            (SENT, 65),
            (FLUSHED, 20),
            (RESERVE_FAILED, 5),
            (NOT_TCP, 10),
            (RESCUED, 4),
            (RESCUE_RESERVE_FAILED, 1),
            (NESTED_NOT_TCP, 1),
        ];
        let k = KernelCounters::new(sums(&s), prog(100, Some(7)), 0);
        assert_eq!(k.hits, Some(107));
        assert_eq!(k.recursion_misses, Some(1));
        assert_eq!((k.reserve_failed, k.not_tcp, k.excess), (6, 11, 0));
        // The agent read all 89 events sent.
        assert_eq!(k.sent, 89);
        assert_eq!(k.unaccounted(89, 0), Some(0));
        assert_eq!(k.unaccounted(88, 0), Some(1));
        assert_eq!(
            k.identity(89, 2),
            "107 tracepoint hits = 87 seen + 2 malformed + 6 ring buffer full + 1 lost to \
             nesting + 11 not TCP (exact)"
        );
    }

    #[test]
    fn a_rescued_copy_is_counted_not_hidden() {
        use counter::*;
        // 10 runs, all sent, 0 misses; the rescue program recorded 1 anyway: a copy.
        let k = KernelCounters::new(sums(&[(SENT, 10), (RESCUED, 1)]), prog(10, Some(0)), 0);
        assert_eq!((k.recursion_misses, k.excess), (Some(0), 1));
        assert_eq!(k.unaccounted(11, 0), Some(0));
        assert!(k.identity(11, 0).ends_with(" - 1 copies (exact)"));
    }

    #[test]
    fn unknown_misses_make_hits_unknown() {
        let k = KernelCounters::new(sums(&[(counter::SENT, 10)]), prog(10, None), 0);
        assert_eq!((k.hits, k.recursion_misses), (None, None));
        assert_eq!(k.unaccounted(10, 0), None);
        assert!(
            k.identity(10, 0)
                .starts_with("tracepoint hits unknown (this kernel keeps no")
        );
    }
}
