//! The flush program, seen from the agent: it runs `flush_stage` on every CPU so that what a
//! quiet CPU has staged reaches the ring buffer (see `tcpwait_common::Stage`).
use aya::{
    Ebpf,
    maps::Array,
    programs::{ProgramError, RawTracePoint, RawTracePointRunOptions, TestRun as _},
    util::online_cpus,
};
use tcpwait_common::{FLUSH_BUSY, FLUSH_DONE, STAGE_MAX_AGE_NS};
use tracing::warn;

/// The name of the flush program in the object.
const PROGRAM: &str = "flush_stage";

/// The flush program (`flush_stage`), loaded but never attached: the agent runs it on each
/// CPU in turn with `BPF_PROG_TEST_RUN` (`BPF_F_TEST_RUN_ON_CPU`, Linux 5.10; aya's
/// [`TestRun`](aya::programs::TestRun) with [`RawTracePointRunOptions::cpu`]), which hands that
/// CPU's staged events to the ring buffer before it returns. The program itself stays in the
/// [`Ebpf`] object, which is passed to each run.
pub(super) struct Flush {
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
            .program_mut(PROGRAM)
            .expect("the object defines flush_stage")
            .try_into()
            .expect("flush_stage is a raw tracepoint program");
        program.load()?;
        let flush = Self {
            cpus: online_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?,
            last_ns: 0,
            warned: false,
        };
        let program = program_of(ebpf);
        for &cpu in &flush.cpus {
            run_on(program, cpu)?;
        }
        let mut age: Array<_, u64> = Array::try_from(
            ebpf.map_mut("STAGE_AGE")
                .expect("the object defines STAGE_AGE"),
        )?;
        age.set(0, STAGE_MAX_AGE_NS, 0)?;
        Ok(flush)
    }

    /// Runs the program (loaded in `ebpf` by [`Flush::load`]) on every CPU (again, up to
    /// twice, on one where it found the main program busy).
    pub(super) fn all_cpus(&mut self, ebpf: &Ebpf) -> Flushed {
        let program = program_of(ebpf);
        let mut outcome = Flushed::All;
        for &cpu in &self.cpus {
            let mut result = run_on(program, cpu);
            for _ in 0..2 {
                if !matches!(result, Ok(false)) {
                    break;
                }
                result = run_on(program, cpu);
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
}

/// The flush program in `ebpf`.
fn program_of(ebpf: &Ebpf) -> &RawTracePoint {
    ebpf.program(PROGRAM)
        .expect("the object defines flush_stage")
        .try_into()
        .expect("flush_stage is a raw tracepoint program")
}

/// Runs the program on `cpu`; true if it flushed, false if it found the main program busy.
/// No arguments: the program reads none.
fn run_on(program: &RawTracePoint, cpu: u32) -> Result<bool, FlushError> {
    let mut options = RawTracePointRunOptions::new();
    options.cpu = Some(cpu);
    match program.test_run(options)?.return_value as i32 {
        FLUSH_DONE => Ok(true),
        FLUSH_BUSY => Ok(false),
        other => Err(FlushError::Returned(other)),
    }
}

/// Why the flush program could not run on a CPU.
#[derive(Debug, thiserror::Error)]
pub(super) enum FlushError {
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("run the flush program: {0}")]
    Run(#[from] ProgramError),
    /// The program returned neither `FLUSH_DONE` nor `FLUSH_BUSY`.
    #[error("the flush program returned {0}")]
    Returned(i32),
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
