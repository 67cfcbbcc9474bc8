//! Build and setup helpers, so a fresh machine needs two commands (see README.md):
//! `cargo xtask run` (setup, build, start tcpwait) and `cargo xtask test` (setup, all tests,
//! short fuzz runs).
//!
//! `setup` is idempotent: it installs the pinned toolchain's `rust-src` and a bpf-linker built
//! against that toolchain's own LLVM into the ignored `.build/` area, and does nothing (in well
//! under a second) when both are already there.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod setup;
mod vm;

#[derive(Parser)]
#[command(about = "tcpwait build and setup helpers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install rust-src and bpf-linker (idempotent).
    Setup,
    /// Setup, build in release mode, and run `tcpwait` with the given arguments (as root).
    Run {
        /// Arguments for `tcpwait` (default: `run`, the agent with embedded defaults).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build in release mode, and build the container image (FROM scratch, no registry
    /// pull) with podman: deploy/container/build-image.sh. Push it with `podman push TAG`.
    Image {
        /// The image's name and tag.
        #[arg(long, default_value = "localhost/tcpwait:latest")]
        tag: String,
    },
    /// Setup, build in release mode, and measure loss, overhead, CPU and memory (as root).
    Bench {
        /// Runs per mode (the table shows medians).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds of workload per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Modes to compare, in the order each round runs them: `none` (no tracer), `floor`
        /// (bpftrace counting on the classic tracepoint: what any program there costs), `trace`
        /// (`tcpwait trace --json` to a file), `run` (the daemon). Default: all four, `floor`
        /// only if bpftrace is installed.
        #[arg(long, value_delimiter = ',')]
        modes: Option<Vec<String>>,
        /// Also run `trace` and `run` as built from this commit (`trace@base`, `run@base`, each
        /// just before its current form in every round), to measure a change against the code
        /// before it in the same run. Built once into target/bench/baseline/.
        #[arg(long, value_name = "REV", conflicts_with = "baseline_bin")]
        baseline_rev: Option<String>,
        /// As --baseline-rev, with a `tcpwait` binary already built from the commit to compare
        /// against (no build).
        #[arg(long, value_name = "FILE")]
        baseline_bin: Option<std::path::PathBuf>,
    },
    /// Setup, build in release mode, and measure owner attribution latency and agent CPU on a
    /// host with ~110,000 fds, in the host namespace and over network namespaces (as root).
    BenchOwners(bench::owners::Args),
    /// Setup, build in release mode, and measure the TIME_WAIT census at 100,000 TIME_WAIT
    /// sockets: its duration, agent CPU and RSS, and `status` answer times (as root).
    BenchTimewait(bench::timewait::Args),
    /// Setup, then run every test: unit tests and the privileged tests on the real kernel, a
    /// short run of each fuzz target, then the kernel tiers on Debian's 5.10, 6.1 and 6.12 under
    /// qemu (`vm-test`).
    Test {
        /// Skip the kernel matrix (said in the output).
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for the test harness (e.g. a test name filter; the matrix is
        /// skipped then: it runs whole tiers).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer, AddressSanitizer, on the pinned
    /// toolchain) and run each for a time; fails on a finding and names the input (README,
    /// "Fuzzing").
    Fuzz {
        /// Only this target (repeatable): event, inet_diag, proc, config, api_request.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Setup, then boot Debian's 5.10, 6.1 and 6.12 kernels under qemu and run the privileged
    /// tests that exercise the kernel inside each, plus the same on the host's kernel; one line
    /// per kernel (as root).
    VmTest {
        /// Only these kernel series (e.g. `--kernel 5.10`); default all.
        #[arg(long = "kernel")]
        only: Vec<String>,
        /// qemu accelerator: `auto` (KVM if a probe boot reaches the guest's init, remembered
        /// in .build/vm/kvm-probe; else software emulation), `kvm` or `tcg`. This machine's
        /// /dev/kvm stops inside these kernels' decompressors (DESIGN.md).
        #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
        accel: String,
        /// No row for the host's kernel.
        #[arg(long)]
        no_host: bool,
        /// Only these test files (e.g. `--tests trace,sockfile`); default every kernel tier.
        #[arg(long, value_delimiter = ',')]
        tests: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().command {
        Cmd::Setup => setup::setup(&root),
        Cmd::Run { args } => {
            setup::setup(&root)?;
            cargo(&root, &["build", "--release", "--package", "tcpwait-agent"])?;
            let args = if args.is_empty() {
                vec!["run".to_owned()]
            } else {
                args
            };
            let bin = root.join("target/release/tcpwait");
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("start {}", bin.display()))?;
            if !status.success() {
                bail!("tcpwait exited with {status}");
            }
            Ok(())
        }
        Cmd::Image { tag } => {
            setup::setup(&root)?;
            cargo(&root, &["build", "--release", "--package", "tcpwait-agent"])?;
            let script = root.join("deploy/container/build-image.sh");
            let status = Command::new(&script)
                .arg(root.join("target/release/tcpwait"))
                .arg(&tag)
                .status()
                .with_context(|| format!("start {}", script.display()))?;
            if !status.success() {
                bail!("{} failed: {status}", script.display());
            }
            eprintln!("xtask: built {tag}; push it with `podman push {tag}`");
            Ok(())
        }
        Cmd::Bench {
            runs,
            seconds,
            modes,
            baseline_rev,
            baseline_bin,
        } => {
            let modes =
                bench::check_modes(modes, baseline_rev.is_some() || baseline_bin.is_some())?;
            if let Some(bin) = &baseline_bin
                && !bin.is_file()
            {
                bail!("--baseline-bin {}: no such file", bin.display());
            }
            setup::setup(&root)?;
            cargo(&root, &["build", "--release", "--package", "tcpwait-agent"])?;
            let baseline = match baseline_bin {
                Some(bin) => Some(bin),
                None => baseline_rev
                    .map(|rev| bench::build_baseline(&root, &rev))
                    .transpose()?,
            };
            bench::bench(
                &root,
                &bench::Settings {
                    runs,
                    seconds,
                    modes,
                    baseline,
                },
            )
        }
        Cmd::BenchOwners(args) => bench::owners::main(&root, args),
        Cmd::BenchTimewait(args) => bench::timewait::main(&root, args),
        Cmd::VmTest {
            only,
            accel,
            no_host,
            tests,
        } => {
            setup::setup(&root)?;
            setup::install_test_packages()?;
            vm::vm_test(
                &root,
                &vm::Options {
                    only,
                    accel: match accel.as_str() {
                        "kvm" => vm::Accel::Kvm,
                        "tcg" => vm::Accel::Tcg,
                        _ => vm::Accel::Auto,
                    },
                    host: !no_host,
                    tests,
                },
            )
        }
        Cmd::Fuzz { targets, seconds } => {
            setup::setup(&root)?;
            let targets = if targets.is_empty() {
                fuzz::TARGETS.iter().map(|t| (*t).to_owned()).collect()
            } else {
                targets
            };
            fuzz::fuzz(&root, &targets, seconds)
        }
        Cmd::Test { no_vm, args } => {
            setup::ensure_free_space(&root, TEST_FREE_BYTES, "cargo xtask test")?;
            setup::setup(&root)?;
            setup::install_test_packages()?;
            // Privileged tests are `#[ignore]`d so a plain `cargo test` (no root) runs the unit
            // tier only; this command runs every tier.
            // The default members: every crate but the eBPF one, which only builds for the BPF target.
            // One test at a time: every privileged test attaches its own program to the same
            // tracepoint, and parallel runs would share the kernel's per-CPU recursion guard
            // (and two cores) with each other.
            let mut cmd = vec!["test", "--", "--include-ignored", "--test-threads=1"];
            cmd.extend(args.iter().map(String::as_str));
            cargo(&root, &cmd)?;
            if args.is_empty() {
                let all: Vec<String> = fuzz::TARGETS.iter().map(|t| (*t).to_owned()).collect();
                fuzz::fuzz(&root, &all, FUZZ_TEST_SECONDS)?;
            } else {
                eprintln!("xtask: SKIPPED the fuzz targets' short runs: a test filter was given");
            }
            if no_vm || !args.is_empty() {
                eprintln!(
                    "xtask: SKIPPED the kernel matrix (5.10, 6.1, 6.12): {}",
                    if no_vm {
                        "--no-vm"
                    } else {
                        "a test filter was given"
                    }
                );
                return Ok(());
            }
            // The host's kernel ran every tier above; its row is the same tiers again, which
            // also names the programs it attached.
            vm::vm_test(
                &root,
                &vm::Options {
                    only: Vec::new(),
                    accel: vm::Accel::Auto,
                    host: true,
                    tests: Vec::new(),
                },
            )
        }
    }
}

/// Free space `cargo xtask test` needs on a fresh clone: every tier's build (debug, release,
/// the fuzz targets' sanitizer build) came to 5.0 GiB, and the compilers' temporary files,
/// the kernel images and the container image need room beside it.
const TEST_FREE_BYTES: u64 = 7 << 30;

/// Seconds each fuzz target runs in `cargo xtask test` (5 targets: under 2 minutes, plus the
/// targets' first build).
const FUZZ_TEST_SECONDS: u64 = 20;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}
