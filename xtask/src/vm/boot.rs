//! Boots one kernel under qemu with the initramfs and the two 9p shares, waits for it to power
//! off (or kills it at the deadline), and reads its results.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    Row,
    initramfs::{self, OUT_TAG, ROOT_TAG},
    kernels::Kernel,
    read_results,
};

/// The checkout: `vm` is its `.build/vm`.
fn workspace(vm: &Path) -> &Path {
    vm.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| Path::new("/"))
}

/// A guest that has not powered off by then is killed and reported broken. Under TCG on two
/// shared cores a kernel's tiers take 2–3 minutes (11 test files, the three guests side by
/// side; until d0e90c5 the verifier's walk of the reset programs made it 11–13 minutes on
/// 5.10 and 6.1); the deadline only catches a guest that hangs.
const DEADLINE: Duration = Duration::from_secs(2400);

pub(super) fn run(vm: &Path, k: &Kernel, busybox: &Path, script: &str, kvm: bool) -> Result<Row> {
    let out = vm.join("run").join(k.series);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("run.sh"), script)?;
    let initrd = vm.join("kernels").join(k.series).join("initramfs.cpio");
    initramfs::build(busybox, &k.modules, workspace(vm), &initrd)?;
    let console = out.join("console.log");
    eprintln!(
        "xtask vm: booting Debian {} ({}), console in {}",
        k.series,
        if kvm { "KVM" } else { "TCG" },
        console.display()
    );
    let t = Instant::now();
    let mut qemu = Command::new("nice");
    qemu.args(["-n", "10", "qemu-system-x86_64"])
        .args(if kvm {
            ["-accel", "kvm", "-cpu", "host"]
        } else {
            ["-accel", "tcg,thread=multi", "-cpu", "max"]
        })
        // Two vCPUs: batching, the flush program and nesting are per CPU.
        .args(["-smp", "2", "-m", "1536", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&k.image)
        .arg("-initrd")
        .arg(&initrd)
        // `tcpwait.vm`: tests that size a workload for the host scale it down under
        // emulation (tests/loss.rs reads /proc/cmdline).
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init loglevel=4 tsc=reliable tcpwait.vm",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag={OUT_TAG},security_model=none",
            out.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out.join("qemu.log"))?);
    let mut child = qemu.spawn().context("start qemu-system-x86_64")?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut row = read_results(&out, t.elapsed().as_secs_f64());
    if row.kernel.is_empty() {
        row.kernel = format!("{} (did not boot)", k.series);
    }
    if row.broken.is_some() {
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        let qemu_err = std::fs::read_to_string(out.join("qemu.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(8).collect();
        let why = match status {
            None => format!("killed after {} s", DEADLINE.as_secs()),
            Some(s) if !s.success() => format!("qemu exited with {s}: {}", qemu_err.trim()),
            Some(_) => "guest powered off".to_owned(),
        };
        row.notes.push(why);
        row.notes
            .extend(tail.into_iter().rev().map(|l| format!("console: {l}")));
    }
    Ok(row)
}

/// Whether KVM boots these kernels here: `/dev/kvm` must open, and a kernel must reach the
/// initramfs's `/init` under it within [`KVM_PROBE`] (this machine's paravirtual KVM stops
/// in the kernels' decompressor, DESIGN.md). The answer is kept in `.build/vm/kvm-probe` for
/// this host kernel, so the probe's seconds are spent once. Returns the answer and why.
pub(super) fn kvm_works(vm: &Path, k: &Kernel, busybox: &Path) -> Result<(bool, String)> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Ok((false, format!("/dev/kvm cannot be opened ({e})")));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let cache = vm.join("kvm-probe");
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Some((answer, release)) = text.split_once(' ')
        && release.trim() == host.trim()
    {
        return Ok((
            answer == "works",
            format!(
                "{answer} here (cached in {}; delete it to probe again)",
                cache.display()
            ),
        ));
    }
    let dir = vm.join("run/kvm-probe");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initramfs.cpio");
    initramfs::build(busybox, &k.modules, workspace(vm), &initrd)?;
    let console = dir.join("console.log");
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "512"])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&k.image)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-system-x86_64 (KVM probe)")?;
    let t = Instant::now();
    let reached = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("TCPWAIT-VM init") {
            break true;
        }
        if t.elapsed() > KVM_PROBE || child.try_wait()?.is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    let answer = if reached { "works" } else { "fails" };
    std::fs::write(&cache, format!("{answer} {}", host.trim()))?;
    Ok((
        reached,
        if reached {
            format!("KVM booted Debian {} to its init", k.series)
        } else {
            format!(
                "KVM did not bring Debian {} to its init within {} s (console: {})",
                k.series,
                KVM_PROBE.as_secs(),
                console.display()
            )
        },
    ))
}

/// How long the KVM probe waits for the guest's init (KVM boots in 1–3 s).
const KVM_PROBE: Duration = Duration::from_secs(15);
