//! Builds the eBPF object (`tcpwait-ebpf`) for the BPF target and leaves it in `OUT_DIR`,
//! where `src/probe/mod.rs` embeds it with `include_bytes_aligned!`.
//!
//! The nested build uses the workspace's pinned toolchain with `RUSTC_BOOTSTRAP=1` (needed by
//! `-Z build-std=core`), set for that child build only, and the bpf-linker that
//! `cargo xtask setup` installs under `.build/tools/bin`, built against the same LLVM.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("agent crate has a parent")?;
    let tools = root.join(".build/tools/bin");
    println!(
        "cargo:rerun-if-changed={}",
        tools.join("bpf-linker").display()
    );
    if !tools.join("bpf-linker").exists() && which_on_path("bpf-linker").is_none() {
        return Err(anyhow!(
            "bpf-linker not found in {} nor on PATH: run `cargo xtask setup` first",
            tools.display()
        ));
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools];
    paths.extend(env::split_paths(&path));
    // SAFETY: the build script is single-threaded here; the variables are read by the child
    // cargo that `build_ebpf` spawns.
    unsafe {
        env::set_var("PATH", env::join_paths(paths).context("PATH")?);
        env::set_var("RUSTC_BOOTSTRAP", "1");
    }
    // aya-build watches the eBPF crate's directory; the wire types it compiles in live in
    // tcpwait-common, so a change there must rebuild the object too.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("tcpwait-common").display()
    );
    let toolchain = rustc_toolchain(root)?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tcpwait-ebpf",
            root_dir: root.join("tcpwait-ebpf").to_str().context("utf-8 path")?,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// The channel pinned in `rust-toolchain.toml`, so the eBPF crate is built by the same
/// toolchain (and LLVM) as everything else.
fn rustc_toolchain(root: &std::path::Path) -> anyhow::Result<String> {
    let file = root.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", file.display());
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"').to_owned())
        .ok_or_else(|| anyhow!("no channel in {}", file.display()))
}

fn which_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|p| p.join(name))
        .find(|p| p.exists())
}
