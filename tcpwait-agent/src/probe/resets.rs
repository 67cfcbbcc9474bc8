//! The reset programs (`tcpwait-ebpf/src/resets.rs`), seen from the agent: where aborts can be
//! seen on this kernel, attaching them, and their loss counters. Their events share the
//! transitions' ring, drain and reorder; the decoder tells them apart (`event::reset`).
//!
//! Where an abort is seen, by kernel (verified under qemu on Debian's 5.10, 6.1 and 6.12, and
//! on 6.18): from 6.10, `tcp:tcp_send_reset` (BTF tracepoint) with the kernel's reason; before,
//! the entry of `tcp_send_active_reset` (fentry, else a kprobe), the reason then told from the
//! socket (`SO_LINGER` 0, unread bytes). Where none attaches (no kernel BTF, fentry refused and
//! no kprobes), aborts are not recorded, and the agent says so once at start.
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Btf, Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{BtfTracePoint, FEntry, KProbe},
};
use tcpwait_common::reset::{ResetOffsets, counter};
use tracing::{debug, warn};

/// What the kernel's BTF says the reset programs need: their offsets and `enum sk_rst_reason`.
pub type Plan = Result<(ResetOffsets, Vec<(String, u32)>), String>;

/// Reads the reset programs' offsets and the reset reasons from the kernel's BTF.
pub fn plan(btf: &super::btf::Btf) -> Plan {
    let offsets = btf.reset_offsets().map_err(|e| e.to_string())?;
    Ok((offsets, btf.enumerators("sk_rst_reason")))
}

/// Where aborts are seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortPoint {
    /// `tcp:tcp_send_reset`, which carries the kernel's reason (6.10 and later).
    Tracepoint,
    /// fentry on `tcp_send_active_reset`.
    Fentry,
    /// kprobe on `tcp_send_active_reset`.
    Kprobe,
}

impl AbortPoint {
    /// As the start-up line names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tracepoint => "tcp:tcp_send_reset",
            Self::Fentry => "fentry/tcp_send_active_reset",
            Self::Kprobe => "kprobe/tcp_send_active_reset",
        }
    }
}

/// Loss and delivery counters of the reset programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetCounters {
    /// Aborts submitted to the ring.
    pub aborts_sent: u64,
    /// Aborts lost to a full ring.
    pub aborts_ring_full: u64,
    /// Received resets submitted.
    pub received_sent: u64,
    /// Received resets lost to a full ring.
    pub received_ring_full: u64,
    /// Runs of the reset programs the kernel skipped as nested (their fdinfo), or `None` where
    /// the kernel does not count them (before 5.12, or a kprobe).
    pub recursion_misses: Option<u64>,
}

impl ResetCounters {
    /// Every reset lost in the kernel (recursion misses counted where known).
    pub fn lost(&self) -> u64 {
        self.aborts_ring_full + self.received_ring_full + self.recursion_misses.unwrap_or(0)
    }
}

/// The attached reset programs.
pub struct Resets {
    /// Where aborts are seen, or why they are not.
    pub aborts: Result<AbortPoint, String>,
    /// Whether received resets are seen, or why not.
    pub received: Result<(), String>,
    counters: Option<PerCpuArray<MapData, u64>>,
    /// Attached programs, for their recursion misses; `false`: the kernel does not count them.
    prog_fds: Vec<(i32, bool)>,
    /// Recursion misses read when the programs were detached.
    stopped: Option<Option<u64>>,
    /// `enum sk_rst_reason`, `(name, value)`, where the kernel passes it.
    pub reasons: Vec<(String, u32)>,
}

impl Resets {
    /// Attaches what `plan` allows, and says once at start what is not recorded.
    pub fn attach_planned(ebpf: &mut Ebpf, plan: Plan, btf: Option<&Btf>) -> Self {
        let this = match (plan, btf) {
            (Ok((offsets, reasons)), Some(btf)) => {
                Self::attach(ebpf, btf, offsets.has_reason != 0, reasons)
            }
            (Err(e), _) => Self::none(&e),
            (Ok(_), None) => Self::none("no kernel BTF"),
        };
        if let Err(e) = &this.aborts {
            warn!(error = %e, "connections aborted on close (SO_LINGER 0, unread data) are not recorded on this kernel");
        }
        if let Err(e) = &this.received {
            warn!(error = %e, "resets received are not recorded on this kernel");
        }
        this
    }

    /// Nothing attached, for `why`.
    pub fn none(why: &str) -> Self {
        Self {
            aborts: Err(why.to_owned()),
            received: Err(why.to_owned()),
            counters: None,
            prog_fds: Vec::new(),
            stopped: None,
            reasons: Vec::new(),
        }
    }

    /// Attaches the reset programs of a loaded object whose `RESET_OFFSETS` were set from
    /// `offsets` (the kernel's BTF). Never fails: what cannot attach is named in `aborts` /
    /// `received`.
    pub fn attach(
        ebpf: &mut Ebpf,
        btf: &Btf,
        has_reason: bool,
        reasons: Vec<(String, u32)>,
    ) -> Self {
        let mut this = Self::none("");
        this.reasons = reasons;
        let counts = |fd: i32| {
            std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .map(|t| super::parse_fdinfo(&t).contains_key("recursion_misses"))
                .unwrap_or(false)
        };
        let mut fds = Vec::new();
        this.aborts = if has_reason {
            tp_btf(ebpf, "tcp_send_reset_btf", "tcp_send_reset", btf)
                .map(|fd| {
                    fds.push((fd, counts(fd)));
                    AbortPoint::Tracepoint
                })
                .map_err(|e| format!("tcp:tcp_send_reset: {}", first_line(&e)))
        } else {
            let fentry = (|| -> anyhow::Result<i32> {
                let p: &mut FEntry = ebpf
                    .program_mut("tcp_send_active_reset_fentry")
                    .expect("the object defines tcp_send_active_reset_fentry")
                    .try_into()?;
                p.load("tcp_send_active_reset", btf)?;
                debug!("start-up: fentry program loaded");
                p.attach()?;
                debug!("start-up: fentry program attached");
                Ok(p.fd()?.as_fd().as_raw_fd())
            })();
            match fentry {
                Ok(fd) => {
                    fds.push((fd, counts(fd)));
                    Ok(AbortPoint::Fentry)
                }
                Err(fe) => {
                    let kprobe = (|| -> anyhow::Result<i32> {
                        let p: &mut KProbe = ebpf
                            .program_mut("tcp_send_active_reset_kprobe")
                            .expect("the object defines tcp_send_active_reset_kprobe")
                            .try_into()?;
                        p.load()?;
                        p.attach("tcp_send_active_reset", 0)?;
                        Ok(p.fd()?.as_fd().as_raw_fd())
                    })();
                    kprobe
                        .map(|fd| {
                            // A kprobe's nested runs are skipped by `bpf_prog_active`, and not
                            // counted per program before 6.7: unknown.
                            fds.push((fd, false));
                            AbortPoint::Kprobe
                        })
                        .map_err(|ke| {
                            format!(
                                "this kernel's tcp:tcp_send_reset does not fire for aborts \
                                 (before 6.10), and neither fentry ({}) nor a kprobe ({}) on \
                                 tcp_send_active_reset attaches",
                                first_line(&fe),
                                first_line(&ke)
                            )
                        })
                }
            }
        };
        this.received = tp_btf(ebpf, "tcp_receive_reset_btf", "tcp_receive_reset", btf)
            .map(|fd| fds.push((fd, counts(fd))))
            .map_err(|e| format!("tcp:tcp_receive_reset: {}", first_line(&e)));
        this.prog_fds = fds;
        this.counters = ebpf
            .take_map("RESET_COUNTERS")
            .and_then(|m| PerCpuArray::try_from(m).ok());
        this
    }

    /// Keeps the programs' recursion misses before they are detached (their fds close).
    pub fn stop(&mut self) {
        if self.stopped.is_none() {
            self.stopped = Some(self.recursion_misses());
        }
    }

    fn recursion_misses(&self) -> Option<u64> {
        let mut sum = 0;
        for &(fd, counted) in &self.prog_fds {
            if !counted {
                return None;
            }
            let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            sum += super::parse_fdinfo(&text)
                .get("recursion_misses")
                .copied()?;
        }
        Some(sum)
    }

    /// Reads the counters (zeros where nothing is attached).
    pub fn counters(&self) -> ResetCounters {
        let Some(map) = &self.counters else {
            return ResetCounters::default();
        };
        let sum = |i: u32| {
            map.get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or_default()
        };
        ResetCounters {
            aborts_sent: sum(counter::ABORT_SENT),
            aborts_ring_full: sum(counter::ABORT_RESERVE_FAILED),
            received_sent: sum(counter::RECEIVED_SENT),
            received_ring_full: sum(counter::RECEIVED_RESERVE_FAILED),
            recursion_misses: match self.stopped {
                Some(saved) => saved,
                None => self.recursion_misses(),
            },
        }
    }

    /// For the start-up line: where aborts are seen.
    pub fn describe(&self) -> String {
        match &self.aborts {
            Ok(p) => format!("aborts from {}", p.name()),
            Err(_) => "aborts not recorded".to_owned(),
        }
    }
}

/// Loads and attaches a reset program as a BTF tracepoint; returns its fd.
fn tp_btf(ebpf: &mut Ebpf, prog: &str, tracepoint: &str, btf: &Btf) -> anyhow::Result<i32> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| anyhow::anyhow!("the object has no {prog}"))?
        .try_into()?;
    p.load(tracepoint, btf)?;
    p.attach()?;
    Ok(p.fd()?.as_fd().as_raw_fd())
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}
