//! Idempotent installation of what the eBPF build and the tests need.
//!
//! bpf-linker must link the same LLVM major as rustc, so it is built against the pinned
//! toolchain's own `libLLVM` (DESIGN.md, "Toolchain"): `LLVM_PREFIX` points at a directory whose
//! `lib/` holds `libLLVM.so` and the soname file, both symlinks to the toolchain's library.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The bpf-linker release that supports LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests use, by a command each provides: iproute2 (`ss`), util-linux
/// (`setpriv`), Prometheus with promtool, Alertmanager with amtool, systemd (`systemd-analyze`),
/// qemu (the kernel matrix, `cargo xtask vm-test`), zsh and fish (the completion scripts' syntax
/// check), man-db and groff-base (`man -l` renders the pages), podman with runc (the container
/// image is built and run; runc because crun refuses hybrid cgroup hosts such as this one).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("prometheus-alertmanager", "prometheus-alertmanager"),
    ("amtool", "prometheus-alertmanager"),
    ("systemd-analyze", "systemd"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("zsh", "zsh"),
    ("fish", "fish"),
    ("man", "man-db"),
    ("nroff", "groff-base"),
    ("podman", "podman"),
    ("runc", "runc"),
];

pub fn setup(root: &Path) -> Result<()> {
    let sysroot = output(
        Command::new("rustc")
            .args(["--print", "sysroot"])
            .current_dir(root),
    )?;
    let sysroot = PathBuf::from(sysroot.trim());
    ensure_rust_src(root, &sysroot)?;
    ensure_bpf_linker(root, &sysroot)
}

fn ensure_rust_src(root: &Path, sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    let toolchain = sysroot
        .file_name()
        .context("sysroot has a name")?
        .to_string_lossy()
        .into_owned();
    eprintln!("xtask: installing rust-src for {toolchain}");
    run(Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", &toolchain])
        .current_dir(root))
}

fn ensure_bpf_linker(root: &Path, sysroot: &Path) -> Result<()> {
    let tools = root.join(".build/tools");
    let bin = tools.join("bin/bpf-linker");
    if bin.exists()
        && let Ok(v) = output(Command::new(&bin).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("read {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is this a rustup toolchain?",
                lib.display()
            )
        })?;
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .context("LLVM version in library name")?
        .to_owned();
    let prefix = root.join(".build/llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    run(Command::new("cargo")
        .args(["install", "--locked", "--force", "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .arg("--root")
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .current_dir(root))
}

/// Refuses to start when the file system holding `root` has less than `need` bytes free: a
/// build that runs out of space part-way fails deep inside a compiler (`No space left on
/// device` from `cc`, say), many minutes in, and leaves a half-written target directory.
/// `what` names the command for the error.
pub fn ensure_free_space(root: &Path, need: u64, what: &str) -> Result<()> {
    let free = free_bytes(root).with_context(|| format!("statvfs {}", root.display()))?;
    if free < need {
        bail!(
            "{what} needs about {} GiB free on the file system of {}, which has {:.1} GiB: \
             free some (old clones, `cargo clean`, /tmp) and run it again",
            need >> 30,
            root.display(),
            free as f64 / f64::from(1u32 << 30)
        );
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: all-zero bytes are a valid `statvfs` (plain integers).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer, both live for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail * st.f_frsize)
}

/// Installs the Debian packages the privileged tests use, when a command is missing.
pub fn install_test_packages() -> Result<()> {
    let mut missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).exists()))
        .unwrap_or(false)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_little_free_space_is_one_line_that_says_what_to_do() {
        let err = ensure_free_space(Path::new("/"), u64::MAX, "cargo xtask test")
            .expect_err("no file system has 16 EiB free");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("cargo xtask test needs about 17179869183 GiB free on the file system of /, which has ")
                && msg.ends_with(" GiB: free some (old clones, `cargo clean`, /tmp) and run it again")
                && !msg.contains('\n'),
            "{msg}"
        );
        ensure_free_space(Path::new("/"), 0, "cargo xtask test").expect("0 bytes are always free");
        let err = ensure_free_space(Path::new("/no/such/dir"), 0, "x").expect_err("no such path");
        assert_eq!(
            format!("{err:#}"),
            "statvfs /no/such/dir: No such file or directory (os error 2)"
        );
    }
}
