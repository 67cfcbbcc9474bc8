//! Debian kernel packages for the VM matrix: fetched with `apt-get download` through an apt
//! configuration of its own under `.build/vm/apt/` (so the host's apt state is untouched and
//! bullseye's archive is reachable from a bookworm host), unpacked once into
//! `.build/vm/kernels/<series>/`: `vmlinuz`, the modules the guest needs (decompressed: 6.12
//! ships them xz-compressed) and the order to load them in. A kernel whose directory is complete
//! is not fetched again; neither apt nor the network is touched then.
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// A kernel series of the matrix: the Debian release that carries it and how its image
/// package is named (the newest matching version is taken).
pub struct Series {
    /// Short name: the directory under `.build/vm/kernels/` and the table's first column.
    pub name: &'static str,
    /// `apt-cache search` regular expression for the image package (signed, generic flavour).
    pub package: &'static str,
}

/// Debian's LTS kernels: bullseye's 5.10, bookworm's 6.1 and the 6.12 that bookworm carries
/// for trixie's kernel (`+deb12`).
pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64$",
    },
    Series {
        name: "6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    },
    Series {
        name: "6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
    },
];

/// Modules the guest loads (with their dependencies, from `modules.dep`): the 9p root share
/// over virtio, and inet_diag for the agent's socket dumps (`ss` and the daemon use it).
/// A name absent from `modules.dep` is taken as built in (checked in `modules.builtin`).
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "inet_diag", "tcp_diag"];

/// A kernel ready to boot.
pub struct Kernel {
    /// The series name (`5.10`, …).
    pub series: &'static str,
    /// `vmlinuz`.
    pub image: PathBuf,
    /// Module files in load order.
    pub modules: Vec<PathBuf>,
}

/// The private apt configuration: sources for bookworm and bullseye, lists and archive cache
/// under `dir`, an empty status file, no lock on the host's apt directories.
fn apt_args(dir: &Path) -> Vec<String> {
    let d = |p: &str| dir.join(p).display().to_string();
    vec![
        format!("-oDir::Etc::SourceList={}", d("etc/sources.list")),
        "-oDir::Etc::SourceParts=/dev/null".into(),
        format!("-oDir::State::Lists={}", d("lists")),
        format!("-oDir::Cache={}", d("cache")),
        format!("-oDir::State::status={}", d("status")),
        "-oDebug::NoLocking=1".into(),
        // The build area belongs to root, not to apt's sandbox user `_apt`.
        "-oAPT::Sandbox::User=root".into(),
        "-oAPT::Get::List-Cleanup=0".into(),
    ]
}

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";

/// Fetches (once) and unpacks (once) every series and busybox-static; returns the kernels and
/// the busybox binary. `fetched` is set when anything was downloaded.
pub fn prepare(vm: &Path, fetched: &mut bool) -> Result<(Vec<Kernel>, PathBuf)> {
    let busybox = vm.join("busybox");
    let need_apt = !busybox.exists()
        || SERIES
            .iter()
            .any(|s| !vm.join("kernels").join(s.name).join("ready").exists());
    let apt = vm.join("apt");
    if need_apt {
        for d in ["etc", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(apt.join(d))?;
        }
        fs::write(apt.join("etc/sources.list"), SOURCES)?;
        fs::write(apt.join("status"), "")?;
        eprintln!(
            "xtask vm: apt-get update (private configuration in {})",
            apt.display()
        );
        run(Command::new("apt-get")
            .args(apt_args(&apt))
            .args(["update", "-qq"]))?;
        *fetched = true;
    }
    let debs = vm.join("debs");
    fs::create_dir_all(&debs)?;
    if !busybox.exists() {
        let deb = download(&apt, &debs, "busybox-static")?;
        let tmp = vm.join("tmp-busybox");
        unpack(&deb, &tmp)?;
        fs::copy(tmp.join("bin/busybox"), &busybox).context("busybox-static has bin/busybox")?;
        fs::remove_dir_all(&tmp)?;
    }
    let mut kernels = Vec::new();
    for s in SERIES {
        let dir = vm.join("kernels").join(s.name);
        if !dir.join("ready").exists() {
            let pkg = newest(&apt, s.package)?;
            let deb = download(&apt, &debs, &pkg)?;
            extract(&deb, &dir, vm)?;
        }
        let order = fs::read_to_string(dir.join("modules.order"))
            .with_context(|| format!("read {}", dir.join("modules.order").display()))?;
        kernels.push(Kernel {
            series: s.name,
            image: dir.join("vmlinuz"),
            modules: order.lines().map(|m| dir.join(m)).collect(),
        });
    }
    Ok((kernels, busybox))
}

/// The newest package whose name matches `regex`.
fn newest(apt: &Path, regex: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(apt_args(apt))
        .args(["search", "--names-only", regex])
        .output()
        .context("run apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = text.lines().filter_map(|l| l.split(" - ").next()).collect();
    // Version order: compare the digit runs as numbers.
    names.sort_by_key(|n| {
        n.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u64>().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    names
        .last()
        .map(|n| (*n).to_owned())
        .with_context(|| format!("no Debian package matches {regex}"))
}

/// `apt-get download`s `pkg` into `debs` unless a file of it is already there.
fn download(apt: &Path, debs: &Path, pkg: &str) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        let prefix = format!("{}_", pkg);
        Ok(fs::read_dir(debs)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            }))
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    eprintln!("xtask vm: apt-get download {pkg}");
    run(Command::new("apt-get")
        .args(apt_args(apt))
        .args(["download", "-qq", pkg])
        .current_dir(debs))?;
    find()?.with_context(|| format!("apt-get download {pkg} left no file"))
}

fn unpack(deb: &Path, into: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(into);
    fs::create_dir_all(into)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
}

/// Unpacks `deb`, keeps vmlinuz and the modules [`MODULES`] needs, in load order.
fn extract(deb: &Path, dir: &Path, vm: &Path) -> Result<()> {
    eprintln!("xtask vm: unpacking {}", deb.display());
    let tmp = vm.join("tmp-kernel");
    unpack(deb, &tmp)?;
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let boot = tmp.join("boot");
    let image = fs::read_dir(&boot)?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .context("the package has /boot/vmlinuz-*")?;
    fs::copy(image.path(), dir.join("vmlinuz"))?;
    let release = image.file_name().to_string_lossy()["vmlinuz-".len()..].to_owned();
    // Debian's package leaves modules.dep to depmod at install time: run it on the unpacked tree.
    let base = if tmp.join("usr/lib/modules").join(&release).is_dir() {
        tmp.join("usr")
    } else {
        tmp.clone()
    };
    run(Command::new("depmod").arg("-b").arg(&base).arg(&release))?;
    let moddir = base.join("lib/modules").join(&release);
    let dep_text = fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("read {}", moddir.join("modules.dep").display()))?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let deps: HashMap<String, (String, Vec<String>)> = dep_text
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((
                module_name(m),
                (
                    m.to_owned(),
                    d.split_whitespace().map(str::to_owned).collect(),
                ),
            ))
        })
        .collect();
    let by_path: HashMap<&str, &str> = deps
        .iter()
        .map(|(name, (path, _))| (path.as_str(), name.as_str()))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for want in MODULES {
        if deps.contains_key(*want) {
            visit(want, &deps, &by_path, &mut seen, &mut order);
        } else if !builtin.lines().any(|l| module_name(l) == *want) {
            bail!("{release}: module {want} is neither in modules.dep nor built in");
        }
    }
    let mut names = String::new();
    for path in &order {
        let src = moddir.join(path);
        let name = format!("{}.ko", module_name(path));
        let dst = dir.join(&name);
        if path.ends_with(".xz") {
            let out = Command::new("xz").arg("-dc").arg(&src).output()?;
            if !out.status.success() {
                bail!("xz -dc {} failed", src.display());
            }
            fs::write(&dst, out.stdout)?;
        } else if path.ends_with(".zst") {
            let out = Command::new("zstd").arg("-dc").arg(&src).output()?;
            if !out.status.success() {
                bail!("zstd -dc {} failed", src.display());
            }
            fs::write(&dst, out.stdout)?;
        } else {
            fs::copy(&src, &dst)?;
        }
        names.push_str(&name);
        names.push('\n');
    }
    fs::write(dir.join("modules.order"), names)?;
    fs::write(dir.join("release"), &release)?;
    fs::remove_dir_all(&tmp)?;
    fs::write(dir.join("ready"), "")?;
    Ok(())
}

/// Depth first: a module's dependencies load before it (modules.dep lists them).
fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    by_path: &HashMap<&str, &str>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(name.to_owned()) {
        return;
    }
    let (path, ds) = &deps[name];
    for d in ds.iter().rev() {
        if let Some(n) = by_path.get(d.as_str()) {
            visit(n, deps, by_path, seen, order);
        }
    }
    order.push(path.clone());
}

/// `kernel/net/ipv4/tcp_diag.ko.xz` → `tcp_diag` (modules.dep spells `-` and `_` as in the file).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
