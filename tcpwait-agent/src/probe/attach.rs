//! Loading and attaching the main program, and the errors a user can meet doing it (no
//! privileges, no BPF, no tracefs, no tracepoint, another record layout), each with its fix.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{BtfTracePoint, TracePoint},
};
use tcpwait_common::record;
use tracing::debug;

/// Where tracefs is mounted, or may be mounted, in the order the kernel documents.
const TRACEFS_PATHS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Failures of loading or attaching the kernel program, each with its fix.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "permission denied loading the BPF program: run tcpwait as root (sudo), or grant it \
         CAP_BPF and CAP_PERFMON (and CAP_SYS_ADMIN if tracefs is not mounted)"
    )]
    PermissionDenied(#[source] anyhow::Error),
    #[error(
        "this kernel does not provide BPF (the bpf() system call is unavailable): tcpwait needs \
         Linux 5.8 or newer built with CONFIG_BPF_SYSCALL=y"
    )]
    BpfUnavailable(#[source] anyhow::Error),
    #[error(
        "tracefs is not mounted and mounting it failed: run `mount -t tracefs tracefs \
         /sys/kernel/tracing` (needs CAP_SYS_ADMIN), or run tcpwait as root"
    )]
    TracefsUnavailable(#[source] io::Error),
    #[error(
        "tracepoint {category}:{name} not found under {}: tcpwait needs Linux 4.16 or newer \
         built with CONFIG_TRACEPOINTS=y", tracefs.display()
    )]
    TracepointAbsent {
        category: String,
        name: String,
        tracefs: PathBuf,
    },
    #[error(
        "tracepoint record layout differs from the one tcpwait was built for: field `{field}` \
         is at offset {found:?}, expected {expected:?} (offset, size); please report this kernel \
         version"
    )]
    LayoutMismatch {
        field: &'static str,
        expected: (usize, usize),
        found: Option<(usize, usize)>,
    },
    #[error("failed to load the BPF program")]
    Load(#[source] anyhow::Error),
    #[error("failed to attach to tracepoint {0}")]
    Attach(String, #[source] anyhow::Error),
}

impl ProbeError {
    /// Classifies a load/attach failure by the OS error inside it.
    pub(super) fn classify(
        err: anyhow::Error,
        otherwise: impl FnOnce(anyhow::Error) -> Self,
    ) -> Self {
        match errno_in_chain(&*err) {
            // Unprivileged bpf() fails with EPERM; EACCES is the verifier's refusal, not a privilege.
            Some(libc::EPERM) => Self::PermissionDenied(err),
            Some(libc::ENOSYS) => Self::BpfUnavailable(err),
            _ => otherwise(err),
        }
    }
}

/// The first OS error code found walking an error's source chain.
fn errno_in_chain(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(code) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(code);
        }
        cur = e.source();
    }
    None
}

/// Loads and attaches the main program as a BTF tracepoint; returns its fd.
pub(super) fn attach_btf(ebpf: &mut Ebpf, name: &str, btf: &aya::Btf) -> anyhow::Result<i32> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut("inet_sock_set_state_btf")
        .expect("the object defines inet_sock_set_state_btf")
        .try_into()
        .expect("inet_sock_set_state_btf is a BTF tracepoint program");
    program.load(name, btf)?;
    program.attach()?;
    Ok(program.fd()?.as_fd().as_raw_fd())
}

/// Loads and attaches the main program as a classic tracepoint; returns its fd.
pub(super) fn attach_classic(
    ebpf: &mut Ebpf,
    category: &str,
    name: &str,
) -> Result<i32, ProbeError> {
    let program: &mut TracePoint = ebpf
        .program_mut("inet_sock_set_state")
        .expect("the object defines inet_sock_set_state")
        .try_into()
        .expect("inet_sock_set_state is a tracepoint program");
    program
        .load()
        .map_err(|e| ProbeError::classify(e.into(), ProbeError::Load))?;
    program.attach(category, name).map_err(|e| {
        ProbeError::classify(e.into(), |e| {
            ProbeError::Attach(format!("{category}:{name}"), e)
        })
    })?;
    Ok(program
        .fd()
        .map_err(|e| ProbeError::Load(e.into()))?
        .as_fd()
        .as_raw_fd())
}

/// BPF memory is charged to the cgroup on kernels ≥ 5.11; older ones need RLIMIT_MEMLOCK
/// raised. Where it cannot be raised (some hosts forbid it), go on: load errors will tell.
pub(super) fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// Returns where tracefs is mounted, mounting it at `/sys/kernel/tracing` if it is not.
pub(super) fn ensure_tracefs() -> Result<PathBuf, ProbeError> {
    for p in TRACEFS_PATHS {
        if Path::new(p).join("events").is_dir() {
            return Ok(p.into());
        }
    }
    let target = TRACEFS_PATHS[0];
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in literal");
    let (src, dst, fstype) = (c("tracefs"), c(target), c("tracefs"));
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ProbeError::TracefsUnavailable(io::Error::last_os_error()));
    }
    debug!(path = target, "mounted tracefs");
    Ok(target.into())
}

/// Parses a tracepoint `format` file into field name → (offset, size).
pub(super) fn parse_format(text: &str) -> HashMap<String, (usize, usize)> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                size = s.parse().ok();
            }
        }
        if let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) {
            let last = decl.rsplit([' ', '*']).next().unwrap_or(decl);
            let name = last.split('[').next().unwrap_or(last);
            fields.insert(name.to_owned(), (offset, size));
        }
    }
    fields
}

/// Checks the running kernel's record layout against the one the program reads.
pub(super) fn check_layout(found: &HashMap<String, (usize, usize)>) -> Result<(), ProbeError> {
    for (field, offset, size) in record::FIELDS {
        let got = found.get(field).copied();
        if got != Some((offset, size)) {
            return Err(ProbeError::LayoutMismatch {
                field,
                expected: (offset, size),
                found: got,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file of Linux 6.18, as read on the project's machines.
    const FORMAT_6_18: &str = include_str!("../../tests/fixtures/inet_sock_set_state.format");

    #[test]
    fn parses_the_kernel_format_file() {
        let f = parse_format(FORMAT_6_18);
        assert_eq!(f["skaddr"], (8, 8));
        assert_eq!(f["saddr_v6"], (40, 16));
        assert_eq!(f["common_pid"], (4, 4));
        assert_eq!(f.len(), 15);
        check_layout(&f).expect("6.18 matches the built-in layout");
    }

    #[test]
    fn layout_mismatch_names_the_field() {
        let mut f = parse_format(FORMAT_6_18);
        f.insert("sport".into(), (26, 2));
        let err = check_layout(&f).expect_err("moved field");
        assert!(
            matches!(err, ProbeError::LayoutMismatch { field: "sport", .. }),
            "{err}"
        );
        f.remove("daddr_v6");
        f.insert("sport".into(), (24, 2));
        let err = check_layout(&f).expect_err("missing field");
        assert!(
            err.to_string().contains("`daddr_v6` is at offset None"),
            "{err}"
        );
    }

    #[test]
    fn errno_is_found_in_the_chain() {
        let inner = io::Error::from_raw_os_error(libc::EPERM);
        let err = anyhow::Error::new(inner).context("load map");
        assert!(matches!(
            ProbeError::classify(err, ProbeError::Load),
            ProbeError::PermissionDenied(_)
        ));
        let err = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(matches!(
            ProbeError::classify(err, ProbeError::Load),
            ProbeError::BpfUnavailable(_)
        ));
    }
}
