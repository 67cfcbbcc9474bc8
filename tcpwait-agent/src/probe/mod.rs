//! The kernel side, seen from the agent: load and attach the eBPF program, read the ring
//! buffer, read the kernel's loss counters. The only module that uses aya.
//!
//! Errors a user can meet (no privileges, no BPF, no tracefs, no tracepoint) become
//! [`ProbeError`] variants whose message names the cause and the fix (see `attach`).
use std::{collections::HashMap, io};

pub use attach::ProbeError;
use attach::{
    attach_btf, attach_classic, check_layout, ensure_tracefs, parse_format, raise_memlock,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::RawTracePoint,
};
use flush::{Flush, Flushed};
use tcpwait_common::{
    FLUSH_INTERVAL_NS, IN_FLIGHT_NS, SockOffsets, Stage, TRANSITION_EVENT_SIZE, counter,
};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, warn};

mod attach;
pub mod btf;
mod flush;
pub(crate) mod reorder;

/// The tracepoint tcpwait attaches to.
pub const TRACEPOINT: (&str, &str) = ("sock", "inet_sock_set_state");

/// Counters the kernel keeps about the program: what it sent, what it could not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events submitted to the ring buffer (all CPUs).
    pub sent: u64,
    /// Events dropped because the ring buffer was full (all CPUs).
    pub reserve_failed: u64,
    /// Transitions lost to the kernel's recursion guard: runs of the main program the kernel
    /// skipped because the tracepoint fired while it was running on that CPU
    /// (`recursion_misses` in its fdinfo, kernel ≥ 5.12), less those the raw-tracepoint
    /// program rescued. `None` where the kernel keeps no such count (before 5.12): unknown,
    /// never 0.
    pub recursion_misses: Option<u64>,
    /// Nested transitions the raw-tracepoint program recorded in the main program's place.
    pub rescued: u64,
    /// Total program run time, when BPF statistics are enabled (`kernel.bpf_stats_enabled`).
    pub run_time_ns: u64,
    /// Program runs counted with `run_time_ns`.
    pub run_count: u64,
    /// Transitions that reached the agent after a later one had been handed on, so out of time
    /// order (one that reached the ring after the agent's flush of every CPU; see
    /// `probe::reorder`).
    pub late: u64,
}

/// Test-only changes to how the probe loads (hidden `trace` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestModes {
    /// Attach the main program both as a BTF and as a classic tracepoint, and make the rescue
    /// program record every transition too, so each transition arrives three times: for the
    /// test that compares their decoding.
    pub compare: bool,
    /// Withhold the network namespace offsets, as on a kernel whose BTF lacks them: for the
    /// test of the "namespaces unknown" path.
    pub no_netns: bool,
}

/// How the programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The main program is a BTF tracepoint (`tp_btf`), not the classic tracepoint.
    pub btf: bool,
    /// The rescue program records nested transitions; without it they are counted as lost.
    pub rescue: bool,
    /// The main program sends events in per-CPU batches (the agent can run the flush program
    /// on every CPU); without it, one by one.
    pub batched: bool,
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.btf {
            "BTF tracepoint"
        } else {
            "classic tracepoint"
        })?;
        if !self.rescue {
            f.write_str(", no rescue of nested transitions")?;
        }
        if self.btf && !self.batched {
            f.write_str(", unbatched")?;
        }
        Ok(())
    }
}

/// The loaded, attached kernel program and its ring buffer.
pub struct Probe {
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    stage: PerCpuArray<MapData, Stage>,
    reorder: reorder::Reorder,
    /// The flush program, run on every CPU, when events are batched.
    flush: Option<Flush>,
    /// Every event up to this `ts_ns` has reached the ring.
    watermark: u64,
    prog_fd: i32,
    attachment: Attachment,
    /// Events carry their socket's network namespace (the kernel's BTF gave its offsets).
    reads_netns: bool,
    /// The kernel counts the main program's recursion misses (see [`Probe::attach`]); if not,
    /// they are reported as unknown.
    counts_recursion: bool,
    /// The main program's statistics, kept by [`Probe::stop`] when it closes the program.
    stopped: Option<ProgStats>,
    /// Dropping `Ebpf` detaches the programs; the maps taken out of it live on.
    ebpf: Option<Ebpf>,
}

/// The eBPF object built by `build.rs` from `tcpwait-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpwait"));

impl Probe {
    /// Loads the programs and attaches them to `category:name` (normally [`TRACEPOINT`]; tests
    /// point it elsewhere to exercise the "tracepoint absent" path). Must run inside a tokio
    /// runtime (the ring buffer registers with its reactor).
    ///
    /// The main program is the BTF tracepoint; where the kernel has no BTF or refuses it, the
    /// classic tracepoint takes its place. `test` changes that for tests only (see
    /// [`TestModes`]); everything else passes `TestModes::default()`.
    pub fn attach(category: &str, name: &str, test: TestModes) -> Result<Self, ProbeError> {
        let TestModes { compare, no_netns } = test;
        raise_memlock();
        let (offsets, netns) = match btf::Btf::from_sys_fs() {
            Ok(b) => {
                let netns = if no_netns {
                    Err("withheld for a test (--test-no-netns)".to_owned())
                } else {
                    b.netns_offsets().map_err(|e| e.to_string())
                };
                (b.sock_offsets(), netns)
            }
            Err(e) => {
                let why = e.to_string();
                (Err(e), Err(why))
            }
        };
        // The BTF parse and aya's own kernel-BTF load allocate and free several MiB; glibc
        // keeps freed heap memory unless asked to give it back.
        // SAFETY: malloc_trim only releases free heap pages.
        let trim = || unsafe { libc::malloc_trim(0) };
        // The namespace offsets serve every program, the classic one included, so they are
        // passed even where the `struct sock` ones are missing.
        let global = (offsets.is_ok() || netns.is_ok()).then(|| {
            let (net, net_inum) = netns.clone().unwrap_or_default();
            SockOffsets {
                net,
                net_inum,
                always: u32::from(compare),
                ..offsets.as_ref().copied().unwrap_or_default()
            }
        });
        if let Err(e) = &netns {
            // Said once, at start: a 0 must never pass for a namespace.
            warn!(
                error = %e,
                "socket network namespaces are unknown (netns null in --json): sockets of \
                 other namespaces (containers, `ip netns`) cannot be told apart from the \
                 host's, nor attributed to their namespace"
            );
        }
        let mut loader = EbpfLoader::new();
        if let Some(g) = &global {
            loader.override_global("SOCK_OFFSETS", g, true);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| ProbeError::classify(e.into(), ProbeError::Load))?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf) {
            // The program logs nothing on its per-event path; no log map is the normal case.
            debug!(error = %e, "aya-log not initialised");
        }
        let tracefs = ensure_tracefs()?;
        let dir = tracefs.join("events").join(category).join(name);
        let format = std::fs::read_to_string(dir.join("format")).map_err(|_| {
            ProbeError::TracepointAbsent {
                category: category.into(),
                name: name.into(),
                tracefs: tracefs.clone(),
            }
        })?;
        let default = (category, name) == TRACEPOINT;
        let btf_main = match (&offsets, default) {
            (Ok(_), true) => attach_btf(&mut ebpf, name),
            (Ok(_), false) => Err(anyhow::anyhow!("not the default tracepoint")),
            (Err(e), _) => Err(anyhow::anyhow!("no kernel BTF offsets: {e}")),
        };
        let mut attachment = Attachment {
            btf: true,
            rescue: true,
            batched: false,
        };
        let prog_fd = match btf_main {
            Ok(fd) if !compare => fd,
            btf_main => {
                if let (Err(e), true) = (&btf_main, default) {
                    // The first line: a verifier refusal carries the whole log after it.
                    let e = e.to_string();
                    let e = e.lines().next().unwrap_or_default();
                    warn!(
                        error = e,
                        "BTF tracepoint unavailable, using the classic tracepoint"
                    );
                }
                if btf_main.is_err() {
                    attachment.btf = false;
                }
                if default {
                    check_layout(&parse_format(&format))?;
                }
                let classic = attach_classic(&mut ebpf, category, name)?;
                btf_main.unwrap_or(classic)
            }
        };
        // The rescue program is optional: without it, nested transitions are counted as lost.
        // It relies on the kernel's per-program recursion guard, which came in Linux 5.12 with
        // the per-program `recursion_misses` count: a main program without that count in its
        // fdinfo runs on a kernel without the guard, where the rescue program's marks would
        // not tell a nested run from a handled one (it would record duplicates).
        let has_guard = std::fs::read_to_string(format!("/proc/self/fdinfo/{prog_fd}"))
            .map(|t| parse_fdinfo(&t).contains_key("recursion_misses"))
            .unwrap_or(false);
        // The classic tracepoint's guard (`bpf_prog_active` in `trace_call_bpf`) counts what it
        // skips only from 6.7 (dd8657894c11, "bpf: Count missed stats in trace_call_bpf");
        // before, its `recursion_misses` reads 0 whatever was skipped.
        let counts_recursion = has_guard && (attachment.btf || kernel_version() >= (6, 7));
        match offsets {
            Ok(_) if !has_guard && !compare => {
                warn!(
                    "this kernel keeps no per-program recursion count (Linux < 5.12): kernel \
                     recursion misses are reported as unknown, and the rescue program is not \
                     attached (it needs the per-program recursion guard that came with the \
                     count); transitions the kernel skips as nested, if any, are lost uncounted"
                );
                attachment.rescue = false;
            }
            Ok(_) => {
                let rescue: &mut RawTracePoint = ebpf
                    .program_mut("inet_sock_set_state_nested")
                    .expect("the object defines inet_sock_set_state_nested")
                    .try_into()
                    .expect("inet_sock_set_state_nested is a raw tracepoint program");
                if let Err(e) = rescue.load().map_err(anyhow::Error::from).and_then(|()| {
                    rescue.attach(name)?;
                    Ok(())
                }) {
                    let e = e.to_string();
                    let e = e.lines().next().unwrap_or_default();
                    warn!(
                        error = e,
                        "cannot attach the raw tracepoint: transitions the kernel skips as nested are counted as lost"
                    );
                    attachment.rescue = false;
                }
            }
            Err(e) if counts_recursion => {
                warn!(error = %e, "no kernel BTF: transitions the kernel skips as nested are counted as lost");
                attachment.rescue = false;
            }
            Err(e) => {
                warn!(error = %e, "no kernel BTF: transitions the kernel skips as nested are lost uncounted (before Linux 6.7 the classic tracepoint's recursion misses are not counted)");
                attachment.rescue = false;
            }
        }
        let flush = if attachment.btf {
            match Flush::load(&mut ebpf) {
                Ok(f) => {
                    attachment.batched = true;
                    Some(f)
                }
                Err(e) => {
                    warn!(error = %e, "cannot run the flush program: events are sent one by one");
                    None
                }
            }
        } else {
            None
        };
        trim();
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").expect("the object defines EVENTS"))
            .map_err(|e| ProbeError::Load(e.into()))?;
        // SAFETY: the ring buffer owns its fd, and the AsyncFd owns the ring buffer until drop.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| ProbeError::Load(anyhow::anyhow!("register ring buffer: {e}")))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .expect("the object defines COUNTERS"),
        )
        .map_err(|e| ProbeError::Load(e.into()))?;
        let stage =
            PerCpuArray::try_from(ebpf.take_map("STAGE").expect("the object defines STAGE"))
                .map_err(|e| ProbeError::Load(e.into()))?;
        Ok(Self {
            ring,
            counters,
            stage,
            reorder: reorder::Reorder::default(),
            flush,
            watermark: 0,
            prog_fd,
            attachment,
            reads_netns: netns.is_ok(),
            counts_recursion,
            stopped: None,
            ebpf: Some(ebpf),
        })
    }

    /// Makes the next [`Probe::drain`] flush every CPU's stage whatever the time since the
    /// last flush, so that it hands on every transition up to now (less `IN_FLIGHT_NS`).
    pub fn flush_now(&mut self) {
        if let Some(flush) = &mut self.flush {
            flush.last_ns = 0;
        }
    }

    /// Detaches the programs; the next [`Probe::drain`] then hands on everything left,
    /// the events still staged on each CPU included. Counters stay readable.
    pub fn stop(&mut self) {
        if self.stopped.is_some() {
            return;
        }
        self.stopped = Some(self.prog_stats().unwrap_or_default());
        self.flush = None;
        self.ebpf = None;
        // A program already running on another CPU when its link went finishes within
        // microseconds; give it that before reading the stages it may be writing.
        std::thread::sleep(std::time::Duration::from_millis(5));
        match self.stage.get(&0, 0) {
            Ok(stages) => {
                for stage in stages.iter() {
                    let n = (stage.len as usize).min(stage.events.len());
                    for ev in &stage.events[..n] {
                        // SAFETY: `TransitionEvent` is plain integers without padding (Pod).
                        let bytes: &[u8; TRANSITION_EVENT_SIZE] =
                            unsafe { &*std::ptr::from_ref(ev).cast() };
                        self.reorder.push(bytes);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read the events staged at exit"),
        }
    }

    /// Whether events carry their socket's network namespace. Without it every event says 0,
    /// and the owner resolver dumps only the agent's own namespace (said once at start).
    pub fn reads_netns(&self) -> bool {
        self.reads_netns
    }

    /// How the main program is attached.
    pub fn attachment(&self) -> Attachment {
        self.attachment
    }

    /// Waits until the kernel signals data (it does so once per batch, see
    /// `tcpwait_common::WAKEUP_BYTES`); callers also drain on a timer.
    pub async fn readable(&mut self) -> io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Hands every event that is due to `f`, one event's bytes at a time, in time order: those
    /// up to the last flush that reached every CPU (see `probe::reorder`), or all of them after
    /// [`Probe::stop`].
    /// A record that is not whole events is handed on as it is, for the decoder to count.
    /// Returns how many were handed on.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let now = crate::output::clock_ns(libc::CLOCK_MONOTONIC);
        match (&mut self.flush, &self.ebpf) {
            _ if self.stopped.is_some() => self.watermark = u64::MAX,
            (Some(flush), Some(ebpf)) => {
                if now >= flush.last_ns + FLUSH_INTERVAL_NS {
                    flush.last_ns = now;
                    // The CPUs' stages are in the ring once this returns, unless one was busy (its
                    // older events may still be staged: wait for the next flush). If flushing
                    // fails, events are handed on all the same, the late ones counted.
                    if flush.all_cpus(ebpf) != Flushed::Busy {
                        self.watermark = now.saturating_sub(IN_FLIGHT_NS);
                    }
                }
            }
            _ => self.watermark = now.saturating_sub(IN_FLIGHT_NS),
        }
        let Self { ring, reorder, .. } = self;
        let ring = ring.get_mut();
        let mut n = 0;
        while let Some(item) = ring.next() {
            let events = item.chunks_exact(TRANSITION_EVENT_SIZE);
            if item.is_empty() || !events.remainder().is_empty() {
                f(&item);
                n += 1;
                continue;
            }
            for ev in events {
                reorder.push(ev.try_into().expect("whole chunk"));
            }
        }
        n + self.reorder.release(self.watermark, f)
    }

    /// Reads the kernel-side counters.
    pub fn counters(&self) -> io::Result<KernelCounters> {
        let sum = |index: u32| -> io::Result<u64> {
            let values = self.counters.get(&index, 0).map_err(io::Error::other)?;
            Ok(values.iter().sum())
        };
        let prog = match self.stopped {
            Some(saved) => saved,
            None => self.prog_stats()?,
        };
        Ok(KernelCounters {
            sent: sum(counter::SENT)? + sum(counter::FLUSHED)?,
            reserve_failed: sum(counter::RESERVE_FAILED)?
                + sum(counter::RESCUE_RESERVE_FAILED)?
                + sum(counter::FLUSH_RESERVE_FAILED)?,
            // Every run of the main program the kernel skipped went to the rescue program,
            // which recorded it, failed to reserve ring space for it (counted above), or found
            // it not TCP; what is left was lost to nesting.
            recursion_misses: match prog.recursion_misses {
                Some(m) => Some(
                    m.saturating_sub(sum(counter::RESCUED)?)
                        .saturating_sub(sum(counter::RESCUE_RESERVE_FAILED)?)
                        .saturating_sub(sum(counter::NESTED_NOT_TCP)?),
                ),
                None => None,
            },
            rescued: sum(counter::RESCUED)?,
            run_time_ns: prog.run_time_ns,
            run_count: prog.run_count,
            late: self.reorder.late(),
        })
    }

    /// The main program's statistics from its fdinfo.
    fn prog_stats(&self) -> io::Result<ProgStats> {
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.prog_fd))?;
        let info = parse_fdinfo(&text);
        let get = |k: &str| info.get(k).copied().unwrap_or(0);
        Ok(ProgStats {
            // Absent before Linux 5.12 (the per-program recursion count came with it).
            recursion_misses: info
                .get("recursion_misses")
                .copied()
                .filter(|_| self.counts_recursion),
            run_time_ns: get("run_time_ns"),
            run_count: get("run_cnt"),
        })
    }
}

/// A BPF program's statistics, as its fdinfo gives them (`run_time_ns`, `run_cnt` only while
/// `kernel.bpf_stats_enabled` is on).
#[derive(Clone, Copy, Debug, Default)]
struct ProgStats {
    recursion_misses: Option<u64>,
    run_time_ns: u64,
    run_count: u64,
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease`; (0, 0) if unreadable.
fn kernel_version() -> (u32, u32) {
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
}
