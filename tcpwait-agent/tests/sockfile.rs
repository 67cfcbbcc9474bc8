//! The files the daemon creates: it never replaces a file that is not a stale socket of its
//! own, creates the socket's directory 0700 and the socket 0600 whatever the umask, removes the
//! socket on exit, and creates the transition log and the alert file 0600.
mod common;

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `tcpwait run --socket <path>` until it exits (it must refuse): exit code and stderr.
fn refused(socket: &Path) -> (i32, String) {
    let out = Command::new(TCPWAIT)
        .args(["run", "--metrics-listen", "", "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .expect("run tcpwait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_socket_path_that_is_not_a_stale_socket_is_refused_and_left_intact() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("precious");
    std::fs::write(&file, "precious data").expect("write");
    let (code, stderr) = refused(&file);
    assert_eq!(code, 1, "{stderr}");
    // The refusal is the last line (a kernel warning at start, such as 5.10's about recursion
    // counts, may precede it).
    assert_eq!(
        stderr.trim_end().lines().last().unwrap_or_default(),
        format!(
            "tcpwait: {} exists and is not a socket (a regular file): tcpwait replaces only a \
             stale socket of its own; move the file away or choose another --socket",
            file.display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "precious data"
    );

    let (code, stderr) = refused(dir.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("exists and is not a socket (a directory)"),
        "{stderr}"
    );
    // One line of refusal (a kernel warning at start, such as 5.10's, may precede it).
    assert_eq!(
        stderr.lines().filter(|l| !l.contains("WARN")).count(),
        1,
        "{stderr}"
    );

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    let (code, stderr) = refused(&link);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("(a symbolic link)"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "precious data"
    );
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn under_umask_000_the_files_are_private_and_the_socket_goes_on_exit() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    // A stale socket of ours (bound, then its listener gone) is replaced.
    let run_dir = dir.path().join("run");
    let socket = run_dir.join("sub/tcpwait.sock");
    let log = dir.path().join("transitions.jsonl");
    let alerts = dir.path().join("alerts.jsonl");
    let mut cmd = Command::new(TCPWAIT);
    cmd.args([
        "run",
        "--json",
        "--metrics-listen",
        "",
        "--close-wait-count",
        "1",
    ])
    .arg("--socket")
    .arg(&socket)
    .arg("--alert-file")
    .arg(&alerts)
    .arg("--config")
    .arg(dir.path().join("tcpwait.toml"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    std::fs::write(
        dir.path().join("tcpwait.toml"),
        format!(
            "[transition_log]\npath = {:?}\nmode = \"0640\"\n",
            log.to_str().expect("utf-8")
        ),
    )
    .expect("config");
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let start = |cmd: &mut Command| {
        let mut child = cmd.spawn().expect("start tcpwait");
        let (stdout, stderr) = (Lines::default(), Lines::default());
        stdout.spawn_reader(child.stdout.take().expect("stdout"));
        stderr.spawn_reader(child.stderr.take().expect("stderr"));
        let tw = Tcpwait {
            child,
            stdout,
            stderr,
        };
        assert!(
            tw.stderr.wait_for(AGENT_READY, Duration::from_secs(20)),
            "{:?}",
            tw.stderr.snapshot()
        );
        tw
    };
    let mut tw = start(&mut cmd);
    assert_eq!(mode(&run_dir), 0o700, "created socket directory");
    assert_eq!(
        mode(&run_dir.join("sub")),
        0o700,
        "created socket directory"
    );
    assert_eq!(mode(&socket), 0o600, "socket");
    assert_eq!(mode(&log), 0o640, "transition log, as configured");
    let (_srv, cli) = leak("tw-modes", 2);
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&alerts)
            .is_ok_and(|a| a.contains(&format!("\"pid\":{}", cli.pid())))),
        "alert written"
    );
    assert_eq!(mode(&alerts), 0o600, "alert file, by default");
    assert_eq!(tw.stop(libc::SIGTERM), 0);
    assert!(!socket.exists(), "socket removed on exit");

    // A stale socket of ours is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a stale socket"));
    assert!(socket.exists());
    let mut tw = start(&mut cmd);
    assert!(status(socket.to_str().expect("utf-8"))["processes"].is_array());
    assert_eq!(tw.stop(libc::SIGTERM), 0);
    assert!(!socket.exists(), "socket removed on exit");
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn sighup_and_sigusr_do_not_stop_the_agent_and_sigquit_stops_it_gracefully() {
    require_root();
    let sock = api_socket("signals");
    let mut tw = daemon(&sock, &[]);
    let pid = tw.child.id() as i32;
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGHUP] {
        // SAFETY: a signal to the agent we started.
        unsafe { libc::kill(pid, sig) };
        // Handled and answered (status goes through the same loop as the signals).
        assert!(status(&sock)["processes"].is_array());
        assert!(
            tw.child.try_wait().expect("wait").is_none(),
            "signal {sig} stopped the agent"
        );
    }
    // SIGHUP reloads (tests/reload.rs): here the embedded defaults, no file.
    assert!(tw.stderr.wait_for(
        "SIGHUP: configuration reloaded from",
        Duration::from_secs(5)
    ));
    for name in ["SIGUSR1", "SIGUSR2"] {
        assert!(tw.stderr.wait_for(
            &format!("{name} received: it has no use yet; ignored"),
            Duration::from_secs(5)
        ));
    }
    let hups = tw
        .stderr
        .snapshot()
        .iter()
        .filter(|l| l.contains("SIGHUP: configuration reloaded"))
        .count();
    assert_eq!(hups, 2, "one line per SIGHUP");
    assert_eq!(tw.stop(libc::SIGQUIT), 0, "SIGQUIT stops gracefully");
    assert!(
        tw.stderr
            .snapshot()
            .iter()
            .any(|l| l.starts_with("tcpwait: stopped;")),
        "{:?}",
        tw.stderr.snapshot()
    );
    assert!(!Path::new(&sock).exists(), "socket removed");
}
