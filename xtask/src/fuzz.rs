//! `cargo xtask fuzz`: builds the fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer, AddressSanitizer)
//! and runs each for a time budget; `cargo xtask test` runs each briefly.
//!
//! No nightly toolchain is needed: the pinned toolchain ships the sanitizer runtimes, and
//! `RUSTC_BOOTSTRAP=1` (as the eBPF build already sets for its own child build) lets it take
//! cargo-fuzz's `-Z` flags. cargo-fuzz itself is installed once into `.build/tools`.
//!
//! Each run reads the committed seeds (`fuzz/corpus/<target>/`) and a working corpus that grows
//! across runs (`.build/fuzz/corpus/<target>/`, where libFuzzer writes what it finds); a
//! failing input is written under `.build/fuzz/artifacts/<target>/` and named in the error.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// The cargo-fuzz release installed by [`ensure_cargo_fuzz`].
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &["event", "inet_diag", "proc", "config", "api_request"];

/// One target's run, from libFuzzer's own report.
#[derive(Debug, Default)]
struct RunStats {
    seconds: f64,
    execs: u64,
    cov: u64,
    features: u64,
    corpus_units: u64,
    corpus_bytes: String,
    new_units: u64,
}

/// Builds the targets and runs each of `targets` for `seconds`; fails on the first finding,
/// naming the input that reproduces it. Prints one line per target.
pub fn fuzz(root: &Path, targets: &[String], seconds: u64) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "no fuzz target {t:?}: the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let cargo_fuzz = ensure_cargo_fuzz(root)?;
    super::setup::run(
        cargo_fuzz_cmd(root, &cargo_fuzz)
            .arg("build")
            .args(common_args(root)),
    )?;
    let mut lines = Vec::new();
    for target in targets {
        let stats = run_one(root, &cargo_fuzz, target, seconds)?;
        lines.push(format!(
            "xtask: fuzz {target}: {:.0} s, {} executions, cov {}, ft {}, corpus {} units ({}), {} new, no crash",
            stats.seconds,
            stats.execs,
            stats.cov,
            stats.features,
            stats.corpus_units,
            stats.corpus_bytes,
            stats.new_units
        ));
    }
    for line in lines {
        eprintln!("{line}");
    }
    Ok(())
}

fn common_args(root: &Path) -> Vec<String> {
    vec![
        "--fuzz-dir".into(),
        root.join("fuzz").display().to_string(),
        "--target-dir".into(),
        root.join("target/fuzz").display().to_string(),
    ]
}

fn cargo_fuzz_cmd(root: &Path, cargo_fuzz: &Path) -> Command {
    let mut cmd = Command::new(cargo_fuzz);
    // The binary is a cargo subcommand: its first argument is its own name.
    cmd.arg("fuzz")
        .current_dir(root)
        .env("RUSTC_BOOTSTRAP", "1");
    cmd
}

/// Runs one target for `seconds`, echoing libFuzzer's messages but not its progress lines.
fn run_one(root: &Path, cargo_fuzz: &Path, target: &str, seconds: u64) -> Result<RunStats> {
    let work = root.join(".build/fuzz/corpus").join(target);
    let artifacts = root.join(".build/fuzz/artifacts").join(target);
    for dir in [&work, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let started = Instant::now();
    let mut child = cargo_fuzz_cmd(root, cargo_fuzz)
        .arg("run")
        .args(common_args(root))
        .arg(target)
        .arg(&work)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // A unit that takes this long is a finding (a hang), not a slow machine.
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped())
        .spawn()
        .context("start cargo fuzz run")?;
    let mut stats = RunStats::default();
    let mut finding: Option<PathBuf> = None;
    let stderr = child.stderr.take().context("piped stderr")?;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("read cargo fuzz's output")?;
        if line.starts_with('#') {
            progress(&line, &mut stats);
            continue;
        }
        if let Some(path) = line.split("Test unit written to ").nth(1) {
            finding = Some(PathBuf::from(path.trim()));
        }
        let stat = |key: &str| line.strip_prefix(key).and_then(|v| v.trim().parse().ok());
        if let Some(n) = stat("stat::number_of_executed_units:") {
            stats.execs = n;
        } else if let Some(n) = stat("stat::new_units_added:") {
            stats.new_units = n;
        }
        eprintln!("{line}");
    }
    let status = child.wait().context("wait for cargo fuzz run")?;
    stats.seconds = started.elapsed().as_secs_f64();
    if let Some(input) = finding {
        bail!(
            "fuzz target {target} found a failing input: {input}\n  reproduce: RUSTC_BOOTSTRAP=1 \
             .build/tools/bin/cargo-fuzz fuzz run --fuzz-dir fuzz --target-dir target/fuzz {target} {input}\n  \
             then fix it and keep the input as a regression test: copy it into fuzz/regressions/{target}/ \
             (the agent's unit tests replay it)",
            input = input.display()
        );
    }
    if !status.success() {
        bail!("cargo fuzz run {target} failed: {status}");
    }
    Ok(stats)
}

/// Reads a libFuzzer progress line: `#4096 pulse  cov: 512 ft: 900 corp: 40/2Kb ...`.
fn progress(line: &str, stats: &mut RunStats) {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        match w {
            "cov:" => {
                stats.cov = words
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(stats.cov)
            }
            "ft:" => {
                stats.features = words
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(stats.features)
            }
            "corp:" => {
                if let Some((units, bytes)) = words.next().and_then(|v| v.split_once('/')) {
                    stats.corpus_units = units.parse().unwrap_or(stats.corpus_units);
                    stats.corpus_bytes = bytes.to_owned();
                }
            }
            _ => {}
        }
    }
}

/// Installs cargo-fuzz into `.build/tools` unless that release is there.
fn ensure_cargo_fuzz(root: &Path) -> Result<PathBuf> {
    let tools = root.join(".build/tools");
    let bin = tools.join("bin/cargo-fuzz");
    if bin.exists()
        && let Ok(v) = super::setup::output(Command::new(&bin).args(["fuzz", "--version"]))
        && v.contains(CARGO_FUZZ_VERSION)
    {
        return Ok(bin);
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    super::setup::run(
        Command::new("cargo")
            .args(["install", "--locked", "--force"])
            .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"))
            .arg("--root")
            .arg(&tools)
            .current_dir(root),
    )?;
    Ok(bin)
}
