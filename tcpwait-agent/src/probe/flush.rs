//! The flush program, seen from the agent: it runs `flush_stage` on every CPU so that what a
//! quiet CPU has staged reaches the ring buffer (see `tcpwait_common::Stage`).
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Ebpf, maps::Array, programs::RawTracePoint, util::online_cpus};
use tcpwait_common::{FLUSH_BUSY, FLUSH_DONE, STAGE_MAX_AGE_NS};
use tracing::warn;

/// The flush program (`flush_stage`), loaded but never attached: the agent runs it on each
/// CPU in turn with `BPF_PROG_TEST_RUN` (`BPF_F_TEST_RUN_ON_CPU`, Linux 5.10), which hands
/// that CPU's staged events to the ring buffer before it returns.
pub(super) struct Flush {
    prog_fd: i32,
    cpus: Vec<u32>,
    /// When it last ran (CLOCK_MONOTONIC ns).
    pub(super) last_ns: u64,
    /// A failure was logged already.
    warned: bool,
}

impl Flush {
    /// Loads the program and runs it once on every online CPU; if that works, lets the main
    /// program stage events (`STAGE_AGE` in the kernel program). A CPU brought online later is
    /// not flushed by the agent: its staged events go with its next transition once they are
    /// `STAGE_MAX_AGE_NS` old, and at the latest when tcpwait stops.
    pub(super) fn load(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let program: &mut RawTracePoint = ebpf
            .program_mut("flush_stage")
            .expect("the object defines flush_stage")
            .try_into()
            .expect("flush_stage is a raw tracepoint program");
        program.load()?;
        let flush = Self {
            prog_fd: program.fd()?.as_fd().as_raw_fd(),
            cpus: online_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?,
            last_ns: 0,
            warned: false,
        };
        for &cpu in &flush.cpus {
            flush.run_on(cpu)?;
        }
        let mut age: Array<_, u64> = Array::try_from(
            ebpf.map_mut("STAGE_AGE")
                .expect("the object defines STAGE_AGE"),
        )?;
        age.set(0, STAGE_MAX_AGE_NS, 0)?;
        Ok(flush)
    }

    /// Runs the program on every CPU (again, up to twice, on one where it found the main
    /// program busy).
    pub(super) fn all_cpus(&mut self) -> Flushed {
        let mut outcome = Flushed::All;
        for i in 0..self.cpus.len() {
            let cpu = self.cpus[i];
            let mut result = self.run_on(cpu);
            for _ in 0..2 {
                if !matches!(result, Ok(false)) {
                    break;
                }
                result = self.run_on(cpu);
            }
            match result {
                Ok(true) => {}
                Ok(false) => outcome = Flushed::Busy,
                Err(e) => {
                    if outcome == Flushed::All {
                        outcome = Flushed::Failed;
                    }
                    if !self.warned {
                        self.warned = true;
                        warn!(
                            error = %e,
                            cpu,
                            "cannot flush a CPU's staged events: they go with its next \
                             transitions, and may reach tcpwait out of order (counted)"
                        );
                    }
                }
            }
        }
        outcome
    }

    /// Runs the program on `cpu`; true if it flushed, false if it found the main program busy.
    fn run_on(&self, cpu: u32) -> io::Result<bool> {
        // `union bpf_attr` for BPF_PROG_TEST_RUN: prog_fd at 0, retval at 4, flags at 64, cpu
        // at 68; everything else zero (no data, no context: the program reads neither).
        let mut attr = [0u32; 20];
        attr[0] = self.prog_fd as u32;
        attr[16] = BPF_F_TEST_RUN_ON_CPU;
        attr[17] = cpu;
        // SAFETY: `attr` is a valid, zero-filled prefix of `union bpf_attr`, sized as passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        match attr[1] as i32 {
            FLUSH_DONE => Ok(true),
            FLUSH_BUSY => Ok(false),
            other => Err(io::Error::other(format!("flush program returned {other}"))),
        }
    }
}

/// What a flush of every CPU found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flushed {
    /// Every CPU's stage went to the ring.
    All,
    /// The main program was busy on a CPU each time: its stage may still hold older events.
    Busy,
    /// The program could not run on a CPU.
    Failed,
}

/// `BPF_PROG_TEST_RUN`, the `bpf(2)` command.
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Run the program on the CPU given (in interrupt context there, unless it is this one).
const BPF_F_TEST_RUN_ON_CPU: u32 = 1;
