//! The errors a user meets, from the real binary: each is one line naming the cause and the
//! fix, exit code 1 (runtime) or 2 (usage), never a panic or a backtrace.
mod common;

use std::{os::unix::process::CommandExt as _, process::Command};

use common::*;

/// Runs tcpwait and returns (exit code, stderr).
fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("run tcpwait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line(stderr: &str, starts: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with(starts), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs root (to drop privileges with setpriv); run by `cargo xtask test`"]
fn without_privileges() {
    require_root();
    let (code, stderr) = run(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        TCPWAIT,
        "trace",
    ]));
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "tcpwait: permission denied loading the BPF program: run tcpwait as root (sudo), or \
         grant it CAP_BPF and CAP_PERFMON (and CAP_SYS_ADMIN if tracefs is not mounted)",
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn tracepoint_absent() {
    require_root();
    let (code, stderr) =
        run(Command::new(TCPWAIT).args(["trace", "--tracepoint", "sock:no_such_tracepoint"]));
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "tcpwait: tracepoint sock:no_such_tracepoint not found under /sys/kernel",
    );
    assert!(stderr.contains("needs Linux 4.16 or newer built with CONFIG_TRACEPOINTS=y"));
}

/// Installs a seccomp filter that makes bpf(2) fail with ENOSYS, as on a kernel built
/// without CONFIG_BPF_SYSCALL.
fn deny_bpf_syscall() -> std::io::Result<()> {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    let filter = [
        // A = seccomp_data.nr
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_bpf as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with valid arguments; `prog` outlives the call, the kernel copies it.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn bpf_unavailable() {
    require_root();
    let mut cmd = Command::new(TCPWAIT);
    cmd.arg("trace");
    // SAFETY: the closure only calls async-signal-safe prctl.
    unsafe { cmd.pre_exec(deny_bpf_syscall) };
    let (code, stderr) = run(&mut cmd);
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "tcpwait: this kernel does not provide BPF (the bpf() system call is unavailable): \
         tcpwait needs Linux 5.8 or newer built with CONFIG_BPF_SYSCALL=y",
    );
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        &["trace", "--state", "NOPE"][..],
        &["trace", "--port", "99999"],
        &["trace", "-4", "-6"],
        &["trace", "--frobnicate"],
        &["no-such-command"],
        &["run", "--close-wait-age", "1e30"],
        &["run", "--close-wait-age", "0"],
        &["run", "--close-wait-count", "-1"],
    ] {
        let (code, stderr) = run(Command::new(TCPWAIT).args(args));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}

#[test]
fn help_explains() {
    let out = Command::new(TCPWAIT)
        .args(["trace", "--help"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--json",
        "--pid",
        "--comm",
        "--port",
        "--state",
        "--ipv4",
        "--ipv6",
        "CLOSE_WAIT",
    ] {
        assert!(help.contains(needle), "{needle} missing from: {help}");
    }
    assert!(!help.contains("--tracepoint"), "test-only flag is hidden");
}

#[test]
fn status_and_tail_without_a_daemon_say_how_to_start_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("absent.sock");
    for cmd in ["status", "tail"] {
        let (code, stderr) =
            run(Command::new(TCPWAIT).args([cmd, "--socket", sock.to_str().expect("utf-8")]));
        assert_eq!(code, 1, "{cmd}: {stderr}");
        assert_one_line(
            &stderr,
            &format!(
                "tcpwait: cannot reach the tcpwait daemon at {}: start it with `sudo tcpwait run`",
                sock.display()
            ),
        );
    }
}
