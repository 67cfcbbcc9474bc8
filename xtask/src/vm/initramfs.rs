//! The guest's initramfs: busybox-static, the kernel's modules, and an `/init` that mounts the
//! host's root read-only over 9p and runs the test script there (DESIGN.md, "Testing tiers":
//! the test binaries, the agent and the tools the tests call — `ss`, `setpriv` — run from the
//! host's own files at their own paths, with their own shared libraries, so nothing is copied
//! and nothing can be left out of a list). Written as a `newc` cpio archive, which the kernel
//! unpacks itself (no cpio tool needed).
use std::path::Path;

use anyhow::{Context as _, Result};

/// The 9p tags: the host's root (read-only) and the run's output directory (read-write).
pub const ROOT_TAG: &str = "hostroot";
pub const OUT_TAG: &str = "vmout";
/// Where the output share appears inside the chroot.
pub const GUEST_OUT: &str = "/tmp/vmout";

/// `/init`: mount the pseudo-filesystems, load the modules, mount the host root and the output
/// share, bring up loopback, chroot and run `run.sh` from the output share, power off.
/// Markers on the console (`TCPWAIT-VM …`) let the host tell a boot that never reached the
/// tests from a test failure.
fn init_script(modules: &[String], workspace: &Path) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs dev /dev\n\
         echo TCPWAIT-VM init $(uname -r)\n",
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /modules/{m} || echo TCPWAIT-VM insmod {m} failed\n"
        ));
    }
    s.push_str(&format!(
        "mkdir -p /host\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 {ROOT_TAG} /host \
           || {{ echo TCPWAIT-VM cannot mount the host root; poweroff -f; }}\n\
         mkdir -p /ws && mount -o bind /host{ws} /ws\n\
         mount -t proc proc /host/proc\n\
         mount -t sysfs sysfs /host/sys\n\
         mount -t devtmpfs dev /host/dev\n\
         mount -t tmpfs tmp /host/tmp\n\
         mount -t tmpfs run /host/run\n\
         mkdir -p /host{ws} 2>/dev/null; mount -o bind /ws /host{ws} \
           || {{ echo TCPWAIT-VM cannot show the workspace {ws}; poweroff -f; }}\n\
         mkdir -p /host{GUEST_OUT}\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {OUT_TAG} /host{GUEST_OUT} \
           || {{ echo TCPWAIT-VM cannot mount the output share; poweroff -f; }}\n\
         ip link set lo up\n\
         echo TCPWAIT-VM tests start\n\
         chroot /host /bin/sh {GUEST_OUT}/run.sh {GUEST_OUT}\n\
         echo TCPWAIT-VM tests done $?\n\
         sync\n\
         poweroff -f\n",
        ws = workspace.display()
    ));
    s
}

/// Writes the initramfs for one kernel to `out`.
/// `workspace` (the checkout whose test binaries run) is bound back into the guest after its
/// fresh /tmp and /run are mounted: a clone under /tmp stays visible there.
pub fn build(
    busybox: &Path,
    modules: &[std::path::PathBuf],
    workspace: &Path,
    out: &Path,
) -> Result<()> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "modules"] {
        c.dir(d);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    c.entry("dev/console", 0o020600, &[], (5, 1));
    let bb = std::fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?;
    c.file("bin/busybox", 0o755, &bb);
    let mut names = Vec::new();
    for m in modules {
        let name = m
            .file_name()
            .context("module file name")?
            .to_string_lossy()
            .into_owned();
        let data = std::fs::read(m).with_context(|| format!("read {}", m.display()))?;
        c.file(&format!("modules/{name}"), 0o644, &data);
        names.push(name);
    }
    c.file("init", 0o755, init_script(&names, workspace).as_bytes());
    std::fs::write(out, c.finish()).with_context(|| format!("write {}", out.display()))
}

/// A `newc` ("070701") cpio archive, as the kernel's initramfs unpacker reads it
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).expect("initramfs files are < 4 GiB"),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short name"),
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}
