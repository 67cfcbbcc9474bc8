//! The kernel side, seen from the agent: load and attach the eBPF program, read the ring
//! buffer, read the kernel's loss counters. The only module that uses aya.
//!
//! Errors a user can meet (no privileges, no BPF, no tracefs, no tracepoint) become
//! [`ProbeError`] variants whose message names the cause and the fix (see `attach`).
use std::io;

pub use account::{KernelCounters, count_or_unknown, parse_fdinfo};
use account::{ProgStats, kernel_version, verified_instructions};
pub use attach::ProbeError;
use attach::{check_layout, ensure_tracefs, parse_format, raise_memlock};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
};
use flush::{Flush, Flushed};
use programs::Programs;
use tcpwait_common::{FLUSH_INTERVAL_NS, IN_FLIGHT_NS, SockOffsets, Stage, TRANSITION_EVENT_SIZE};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, warn};

mod account;
mod attach;
pub mod btf;
mod flush;
mod programs;
pub(crate) mod reorder;
pub mod resets;

/// The tracepoint tcpwait attaches to.
pub const TRACEPOINT: (&str, &str) = ("sock", "inet_sock_set_state");

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
    /// A ring buffer of this many bytes (a power of two, at least a page) instead of
    /// `RING_BYTES`: for the tests that need real loss.
    pub ring_bytes: Option<u32>,
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
    /// The attached programs, detached in order by [`Probe::stop`].
    programs: Programs,
    /// Holds BPF run statistics on (`account::enable_stats`); `None` if the kernel refused.
    stats: Option<std::os::fd::OwnedFd>,
    attachment: Attachment,
    /// Events carry their socket's network namespace (the kernel's BTF gave its offsets).
    reads_netns: bool,
    /// The kernel counts the main program's recursion misses (see [`Probe::attach`]); if not,
    /// they are reported as unknown.
    counts_recursion: bool,
    /// The main program's statistics, kept by [`Probe::stop`] when it closes the program.
    stopped: Option<ProgStats>,
    /// The reset programs (aborts and received resets).
    resets: resets::Resets,
    /// Dropping `Ebpf` detaches the programs; the maps taken out of it live on.
    ebpf: Option<Ebpf>,
}

/// What the running kernel's BTF tells the loader, read once ([`btf::read_kernel`]) and parsed
/// twice from the same bytes: by our parser for the offsets, by aya's for the BTF programs.
struct KernelBtf {
    offsets: Result<SockOffsets, btf::BtfError>,
    netns: Result<(u32, u32), String>,
    reset_plan: resets::Plan,
    /// aya's parse, which loads the BTF programs (it names the types they attach to).
    programs: Result<aya::Btf, String>,
}

impl KernelBtf {
    /// Reads and parses the kernel's BTF; `no_netns` withholds the namespace offsets (see
    /// [`TestModes`]). Our parse is dropped before aya's is made.
    fn read(no_netns: bool) -> Self {
        let parsed = btf::read_kernel().and_then(|bytes| Ok((btf::Btf::parse(&bytes)?, bytes)));
        let (ours, bytes) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                let why = e.to_string();
                return Self {
                    offsets: Err(e),
                    netns: Err(why.clone()),
                    reset_plan: Err("no kernel BTF".to_owned()),
                    programs: Err(why),
                };
            }
        };
        let netns = if no_netns {
            Err("withheld for a test (--test-no-netns)".to_owned())
        } else {
            ours.netns_offsets().map_err(|e| e.to_string())
        };
        let (offsets, reset_plan) = (ours.sock_offsets(), resets::plan(&ours));
        drop(ours);
        Self {
            offsets,
            netns,
            reset_plan,
            programs: aya::Btf::parse(&bytes, aya::Endianness::default())
                .map_err(|e| e.to_string()),
        }
    }
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
        let TestModes {
            compare,
            no_netns,
            ring_bytes,
        } = test;
        raise_memlock();
        // Each phase's duration, at debug level (`TCPWAIT_LOG=debug`): start-up takes seconds
        // under emulation, and this says where.
        let started = std::time::Instant::now();
        let phase = |what: &str| {
            debug!(
                ms = started.elapsed().as_millis() as u64,
                "start-up: {what}"
            )
        };
        // aya 0.14's `EbpfLoader::new()` parses /sys/kernel/btf/vmlinux itself, whatever is
        // passed to it later (aya-rs/aya#1172): that parse, which cannot be avoided, runs on a
        // second thread while this one reads the BTF once and parses it for the offsets and,
        // from the same bytes, for the BTF programs (each parse takes seconds under emulation).
        let (
            mut loader,
            KernelBtf {
                offsets,
                netns,
                reset_plan,
                programs: kernel_btf,
            },
        ) = std::thread::scope(|s| {
            let loader = s.spawn(EbpfLoader::new);
            let btf = KernelBtf::read(no_netns);
            let loader = loader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (loader, btf)
        });
        phase("kernel BTF parsed (offsets, programs, loader)");
        // The BTF parses and aya's loading allocate and free several MiB; glibc keeps freed
        // heap memory unless asked to give it back.
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
        // The loader's own parse is dropped for the programs' one: the BTF it relocates
        // against (the object has no CO-RE relocations today) is then the file that
        // `TCPWAIT_KERNEL_BTF` names, as for every other use.
        loader.btf(kernel_btf.as_ref().ok());
        if let Some(bytes) = ring_bytes {
            loader.map_max_entries("EVENTS", bytes);
        }
        if let Some(g) = &global {
            loader.override_global("SOCK_OFFSETS", g, true);
        }
        if let Ok((reset_offsets, _)) = &reset_plan {
            loader.override_global("RESET_OFFSETS", reset_offsets, true);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| ProbeError::classify(e.into(), ProbeError::Load))?;
        drop(loader);
        phase("object loaded (maps created)");
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
        // Statistics on before the main program is attached: its `run_cnt` then counts every
        // run of the window (see `account`).
        let stats = account::enable_stats()
            .inspect_err(
                |e| warn!(error = %e, "cannot enable BPF statistics: tracepoint hits are unknown"),
            )
            .ok();
        let default = (category, name) == TRACEPOINT;
        let btf = match (&offsets, default) {
            (Ok(_), true) => kernel_btf.as_ref().map_err(Clone::clone),
            (Ok(_), false) => Err("not the default tracepoint".to_owned()),
            (Err(e), _) => Err(format!("no kernel BTF offsets: {e}")),
        };
        let check_classic = || {
            if default {
                check_layout(&parse_format(&format))?;
            }
            Ok(())
        };
        let programs = Programs::attach(&mut ebpf, (category, name), btf, compare, check_classic)?;
        let prog_fd = programs.main_fd;
        phase("main programs loaded and attached");
        let mut attachment = programs.attachment;
        // The kernel counts skipped runs per program from Linux 5.12 (`recursion_misses` in
        // the fdinfo). The classic tracepoint's guard (`bpf_prog_active` in `trace_call_bpf`)
        // counts what it skips only from 6.7 (dd8657894c11, "bpf: Count missed stats in
        // trace_call_bpf"); before, its `recursion_misses` reads 0 whatever was skipped.
        let has_count = std::fs::read_to_string(format!("/proc/self/fdinfo/{prog_fd}"))
            .map(|t| parse_fdinfo(&t).contains_key("recursion_misses"))
            .unwrap_or(false);
        let counts_recursion = has_count && (attachment.btf || kernel_version() >= (6, 7));
        if !counts_recursion {
            warn!(
                "this kernel keeps no recursion count for the main program (Linux < 5.12, or a classic tracepoint before 6.7): kernel recursion misses and tracepoint hits are reported as unknown; transitions the kernel skips as nested, if any, are lost uncounted"
            );
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
        phase("flush program loaded and run");
        let resets =
            resets::Resets::attach_planned(&mut ebpf, reset_plan, kernel_btf.as_ref().ok());
        phase("reset programs loaded and attached");
        debug!(
            "start-up: instructions verified: {}",
            verified_instructions(&ebpf)
        );
        drop(kernel_btf);
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
            programs,
            stats,
            attachment,
            reads_netns: netns.is_ok(),
            counts_recursion,
            stopped: None,
            resets,
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
        // The rescue program first, then the main one; then no run of either is in flight, and
        // the main program's counts (read through its fd, still open) are final.
        self.programs.detach();
        account::wait_for_runs_in_flight();
        self.stopped = Some(self.prog_stats().unwrap_or_default());
        self.resets.stop();
        self.stats = None;
        self.flush = None;
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
        self.ebpf = None;
    }

    /// Whether events carry their socket's network namespace. Without it every event says 0,
    /// and the owner resolver dumps only the agent's own namespace (said once at start).
    pub fn reads_netns(&self) -> bool {
        self.reads_netns
    }

    /// The reset programs: where aborts are seen, their counters.
    pub fn resets(&self) -> &resets::Resets {
        &self.resets
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
        let mut values = [0u64; tcpwait_common::counter::COUNT as usize];
        for (i, v) in values.iter_mut().enumerate() {
            *v = sum(i as u32)?;
        }
        Ok(KernelCounters::new(
            |i| values[i as usize],
            prog,
            self.reorder.late(),
        ))
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
            stats: self.stats.is_some() || self.stopped.is_some_and(|s| s.stats),
        })
    }
}
