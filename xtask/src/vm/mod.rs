//! `cargo xtask vm-test`: the kernel tiers of the test suite on Debian's LTS kernels (5.10,
//! 6.1, 6.12) under qemu, and on the host's kernel, one result line per kernel.
//!
//! Modelled on aya's integration harness (aya-rs/aya `xtask/src/run.rs`: Debian kernel
//! packages, a small initramfs, the test binaries run inside, results read back). Here the guest
//! mounts the host's root read-only over 9p instead of receiving copies of the binaries
//! (DESIGN.md, "Testing tiers", says why), and writes its results to a second, writable 9p
//! share. KVM where a probe boot shows it works, software emulation (TCG) otherwise: this
//! machine's `/dev/kvm` is a paravirtual KVM on which these kernels stop in their decompressor
//! (DESIGN.md).
mod boot;
mod initramfs;
mod kernels;
mod results;
mod script;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use results::{Row, read_results, table};

/// What marks a test that exercises the kernel (its `#[ignore]` reason). Every test target of
/// `tcpwait-agent/tests/` with such a test runs in the matrix, all its tests: a test or a file
/// added there joins without touching this file.
const KERNEL_MARK: &str = "needs root and the real kernel";

/// Test targets with kernel tests that stay on the host, and why. The last two failed in the
/// guests on 2026-12-05 on deadlines that software emulation on two busy cores does not meet;
/// they join once their deadlines allow for it.
const HOST_ONLY: &[(&str, &str)] = &[
    (
        "monitoring",
        "tier 3, starts Prometheus and Alertmanager; the daemon tier covers its kernel side",
    ),
    (
        "files",
        "SIGTERM must exit within 2 s, too tight under emulation",
    ),
    (
        "tail",
        "a stuck client's delay is timed, too tight under emulation",
    ),
    (
        "stall",
        "100,000 connections and status answers timed within 1 s: minutes and too tight under \
         emulation; the daemon tier covers its kernel side",
    ),
    (
        "timewait",
        "3,000 connections, then waits for 5 s censuses: slow under emulation; the kernel \
         facts it needs (timewait sockets in inet_diag, SOCK_DESTROY) are the host's",
    ),
    (
        "budget",
        "1,100 connections to the metrics port, timed: the agent's own limits, not the kernel's",
    ),
    (
        "delivery",
        "retry and shutdown timing of alert delivery: nothing kernel-specific",
    ),
    (
        "inputs",
        "bounded inputs (config, API, clients): nothing kernel-specific",
    ),
    (
        "escaping",
        "text escaping of process names: nothing kernel-specific",
    ),
];

/// The test targets the guests run (see [`KERNEL_MARK`]), sorted.
fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("tcpwait-agent/tests");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = e?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rs"))
        else {
            continue;
        };
        if HOST_ONLY.iter().any(|(t, _)| *t == name) {
            continue;
        }
        if std::fs::read_to_string(&path)?.contains(KERNEL_MARK) {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Options of `cargo xtask vm-test`.
pub struct Options {
    /// Kernel series to boot (`5.10`, `6.1`, `6.12`); empty: all.
    pub only: Vec<String>,
    /// Accelerator: KVM, TCG, or KVM where it boots these kernels (probed once).
    pub accel: Accel,
    /// Add a row for the host's kernel (the same tiers run directly).
    pub host: bool,
    /// Only these test files (`trace`, `sockfile`); empty: every kernel tier.
    pub tests: Vec<String>,
}

/// Which qemu accelerator to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM where a probe boot reaches the guest's init, software emulation (TCG) otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// Runs the matrix; fails when any kernel's tests fail or a guest does not finish. Prints why
/// and returns Ok when the matrix cannot run at all here (no qemu, no Debian archive).
pub fn vm_test(root: &Path, opts: &Options) -> Result<()> {
    let started = Instant::now();
    if !crate::setup::on_path("qemu-system-x86_64") {
        eprintln!(
            "xtask vm: SKIPPED the kernel matrix (5.10, 6.1, 6.12): qemu-system-x86_64 is not \
             installed (Debian package qemu-system-x86; `cargo xtask test` installs it)"
        );
        return Ok(());
    }
    let vm = root.join(".build/vm");
    std::fs::create_dir_all(&vm)?;
    let mut fetched = false;
    let (kernels, busybox) = match kernels::prepare(&vm, &mut fetched) {
        Ok(k) => k,
        Err(e) => {
            eprintln!(
                "xtask vm: SKIPPED the kernel matrix: cannot fetch Debian's kernel packages: {e:#}"
            );
            return Ok(());
        }
    };
    eprintln!(
        "xtask vm: kernels ready in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        if fetched {
            "downloaded"
        } else {
            "cached in .build/vm, nothing downloaded"
        }
    );
    crate::cargo(root, &["build", "--release", "--package", "tcpwait-agent"])?;
    let mut targets = targets(root)?;
    if let Some(bad) = opts.tests.iter().find(|t| !targets.contains(t)) {
        bail!(
            "--tests {bad}: not a kernel tier; the tiers are {}",
            targets.join(", ")
        );
    }
    if !opts.tests.is_empty() {
        targets.retain(|t| opts.tests.contains(t));
    }
    eprintln!(
        "xtask vm: test targets in the guests: {} (on the host only: {})",
        targets.join(", "),
        HOST_ONLY
            .iter()
            .map(|(t, why)| format!("{t}, {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let bins = test_binaries(root, &targets)?;
    let script = script::run_script(root, &bins);
    let kvm = match opts.accel {
        Accel::Kvm => true,
        Accel::Tcg => false,
        Accel::Auto => {
            let (works, why) = boot::kvm_works(&vm, &kernels[0], &busybox)?;
            eprintln!(
                "xtask vm: {}: {why}",
                if works {
                    "using KVM"
                } else {
                    "using software emulation (TCG), not KVM"
                }
            );
            works
        }
    };
    let mut rows = Vec::new();
    if opts.host {
        rows.push(host_row(&vm, &script)?);
    }
    for k in &kernels {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == k.series) {
            continue;
        }
        rows.push(boot::run(&vm, k, &busybox, &script, kvm)?);
    }
    println!("{}", table(&rows));
    println!(
        "xtask vm: matrix took {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| r.broken.is_some() || !r.failed.is_empty())
        .map(|r| r.kernel.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("kernel tiers failed on {}", bad.join(", "));
    }
    Ok(())
}

/// Builds the test binaries of `targets` (and the release `tcpwait` they run); returns their
/// paths.
fn test_binaries(root: &Path, targets: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut args = vec![
        "test",
        "--no-run",
        // Release: the tests then run the release `tcpwait`, the binary users run, and under
        // software emulation a debug agent's start-up (the BTF parse) takes seconds.
        "--release",
        "--message-format=json",
        "--package",
        "tcpwait-agent",
    ];
    for t in targets {
        args.extend(["--test", t.as_str()]);
    }
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bins = Vec::new();
    for t in targets {
        // cargo's JSON messages: one compiler-artifact line per target; the executable's path
        // has no quote in it.
        let line = text
            .lines()
            .find(|l| {
                l.contains("\"reason\":\"compiler-artifact\"")
                    && l.contains(&format!(
                        "\"kind\":[\"test\"],\"crate_types\":[\"bin\"],\"name\":\"{t}\""
                    ))
            })
            .with_context(|| format!("no test executable for {t} in cargo's output"))?;
        let exe = line
            .split("\"executable\":\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .with_context(|| format!("no executable path for {t}"))?;
        bins.push((t.clone(), PathBuf::from(exe)));
    }
    Ok(bins)
}

/// The host's own kernel, running the same script directly.
fn host_row(vm: &Path, script: &str) -> Result<Row> {
    let out = vm.join("run/host");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("run.sh"), script)?;
    eprintln!("xtask vm: host kernel: running the kernel tiers");
    let t = Instant::now();
    let status = Command::new("sh")
        .arg(out.join("run.sh"))
        .arg(&out)
        .status()
        .context("run the host script")?;
    let mut row = read_results(&out, t.elapsed().as_secs_f64());
    if !status.success() && row.broken.is_none() {
        row.broken = Some(format!("script exited with {status}"));
    }
    row.kernel = format!("host {}", row.kernel);
    Ok(row)
}
