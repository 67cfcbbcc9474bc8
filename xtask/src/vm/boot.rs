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

/// A guest that has not powered off by then is killed and reported broken. Under TCG on two
/// shared cores a kernel's tiers take 1–2 minutes.
const DEADLINE: Duration = Duration::from_secs(420);

pub(super) fn run(vm: &Path, k: &Kernel, busybox: &Path, script: &str, kvm: bool) -> Result<Row> {
    let out = vm.join("run").join(k.series);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("run.sh"), script)?;
    let initrd = vm.join("kernels").join(k.series).join("initramfs.cpio");
    initramfs::build(busybox, &k.modules, &initrd)?;
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
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init loglevel=4 tsc=reliable",
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
