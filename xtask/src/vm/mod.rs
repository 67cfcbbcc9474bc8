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
mod script;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

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

/// One kernel's result.
struct Row {
    kernel: String,
    programs: String,
    passed: usize,
    failed: Vec<String>,
    secs: f64,
    /// Warnings and the start-up line of the release binary, shown under the table.
    notes: Vec<String>,
    /// Set when the guest never reached or never finished the tests.
    broken: Option<String>,
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

/// The message a failed test panicked with, from libtest's `---- NAME stdout ----` section of
/// `log`: the lines after "panicked at", joined, at most 600 characters (the whole log stays in
/// the run directory; CI shows only this row).
fn panic_message(log: &str, name: &str) -> Option<String> {
    let section = log.split(&format!("---- {name} stdout ----")).nth(1)?;
    let after = section.split_once("panicked at ")?.1;
    let mut why = after
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("note: ") && !l.starts_with("---- "))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if why.chars().count() > 600 {
        why = why.chars().take(600).collect::<String>() + " …";
    }
    (!why.is_empty()).then_some(why)
}

/// Reads what a run left in `out`.
fn read_results(out: &Path, secs: f64) -> Row {
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap_or_default();
    let mut logs: Vec<String> = std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("tests-") && n.ends_with(".log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    let startup = read("startup.log");
    let programs = startup
        .lines()
        .find_map(|l| {
            let rest = l.split("tracing TCP state transitions (").nth(1)?;
            let inner = rest.rsplit_once(')')?.0;
            Some(inner.split_once(", ").map_or(inner, |x| x.1).to_owned())
        })
        // The start-up line names only what is missing; the table says both ways.
        .map(|p| {
            let btf = p.starts_with("BTF tracepoint");
            format!(
                "{}, {}, {}",
                if btf {
                    "BTF tracepoint"
                } else {
                    "classic tracepoint"
                },
                if btf && !p.contains("unbatched") {
                    "batched"
                } else {
                    "unbatched"
                },
                if p.contains("no rescue") {
                    "no rescue"
                } else {
                    "rescue"
                }
            )
        })
        .unwrap_or_else(|| "did not start".to_owned());
    let startup = strip_ansi(&startup);
    let notes = startup
        .lines()
        .filter(|l| {
            l.contains("WARN")
                || l.contains("transitions seen")
                || l.contains("exit status")
                || l.contains("did not exit")
        })
        .filter(|l| !l.ends_with("exit status 0"))
        .map(|l| l.trim().to_owned())
        // Where a `tcpwait trace` that ignored SIGINT was stuck, thread by thread.
        .chain(
            read("hung-stacks")
                .lines()
                .filter(|l| l.starts_with("thread "))
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        )
        // Where its start-up went (debug lines `start-up: <phase> ms=<since start>`).
        .chain({
            let phases: Vec<String> = startup
                .lines()
                .filter_map(|l| {
                    let rest = l.split("start-up: ").nth(1)?;
                    let (what, ms) = rest.rsplit_once(" ms=")?;
                    Some(format!("{what} {ms}"))
                })
                .collect();
            (!phases.is_empty())
                .then(|| format!("start-up phases (ms since start): {}", phases.join(", ")))
        })
        // What the verifier went through per program (debug line `start-up: instructions
        // verified: <program> <count>, …`).
        .chain(startup.lines().find_map(|l| {
            l.split("start-up: instructions verified: ")
                .nth(1)
                .map(|rest| format!("instructions verified: {}", rest.trim()))
        }))
        // How long `tcpwait trace` took from exec to its "tracing" line (guest uptime).
        .chain(
            read("startup-time")
                .split_whitespace()
                .collect::<Vec<_>>()
                .get(1..3)
                .and_then(|t| {
                    let (a, b) = (t[0].parse::<f64>().ok()?, t[1].parse::<f64>().ok()?);
                    Some(format!("start-up of `tcpwait trace`: {:.1} s", b - a))
                }),
        )
        // What the tests print about the kernel (the stress test: nested transitions seen).
        .chain(logs.iter().flat_map(|log| {
            read(log)
                .lines()
                .filter(|l| l.starts_with("stress: "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        }))
        .collect();
    let (mut passed, mut failed) = (0, Vec::new());
    for log in &logs {
        let t = log.trim_start_matches("tests-").trim_end_matches(".log");
        let text = read(log);
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("test ") else {
                continue;
            };
            if rest.ends_with(" ... ok") {
                passed += 1;
            } else if rest.ends_with(" ... FAILED") {
                let name = rest.trim_end_matches(" ... FAILED");
                failed.push(match panic_message(&text, name) {
                    Some(why) => format!("{t}::{name}: {why}"),
                    None => format!("{t}::{name}"),
                });
            }
        }
    }
    let broken = if read("finished").is_empty() {
        Some("the tests did not finish".to_owned())
    } else if passed == 0 && failed.is_empty() {
        Some("no test ran".to_owned())
    } else {
        None
    };
    Row {
        kernel: read("kernel").trim().to_owned(),
        programs,
        passed,
        failed,
        secs,
        notes,
        broken,
    }
}

/// Drops terminal colour sequences (`ESC [ … m`) from tracing's output.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn table(rows: &[Row]) -> String {
    let mut t = format!(
        "{:<24} {:<58} {:<22} {:>6}\n",
        "KERNEL", "PROGRAMS", "TESTS", "TIME"
    );
    for r in rows {
        let tests = match &r.broken {
            Some(why) => format!("BROKEN: {why}"),
            None => format!("{} passed, {} failed", r.passed, r.failed.len()),
        };
        let _ = writeln!(
            t,
            "{:<24} {:<58} {:<22} {:>5.0}s",
            r.kernel, r.programs, tests, r.secs
        );
        for f in &r.failed {
            let _ = writeln!(t, "    FAILED {f}");
        }
        for n in &r.notes {
            let _ = writeln!(t, "    {n}");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::panic_message;

    #[test]
    fn the_panic_message_of_a_failed_test_is_found() {
        let log = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                   ---- b stdout ----\nsome output\n\nthread 'b' panicked at tests/x.rs:3:5:\n\
                   assertion `left == right` failed: table has 79\n  left: 1\n right: 2\n\
                   note: run with `RUST_BACKTRACE=1`\n\n\nfailures:\n    b\n";
        assert_eq!(
            panic_message(log, "b").as_deref(),
            Some("assertion `left == right` failed: table has 79 left: 1 right: 2")
        );
        assert_eq!(panic_message(log, "a"), None);
    }
}
