//! Tests of the holder scan over fake `/proc` trees made in a temporary directory: `stat`,
//! `comm`, `cmdline`, `cgroup` files and `fd/` symlinks, laid out as the kernel shows them.
use std::{fs, os::unix::fs::symlink, path::Path};

use super::*;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const ID2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const ID3: &str = "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd";

/// One fake `/proc/<pid>`.
struct Fake<'a> {
    pid: u32,
    comm: &'a str,
    state: char,
    start: u64,
    cmdline: &'a [u8],
    cgroup: &'a str,
    fds: &'a [&'a str],
}

impl Default for Fake<'_> {
    fn default() -> Self {
        Self {
            pid: 0,
            comm: "proc",
            state: 'S',
            start: 1000,
            cmdline: b"proc\0",
            cgroup: "0::/\n",
            fds: &[],
        }
    }
}

/// A `/proc/<pid>/stat` line (proc_pid_stat(5)): starttime is field 22.
fn stat_line(pid: u32, comm: &str, state: char, start: u64) -> String {
    format!(
        "{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} \
         1000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
    )
}

fn fds(dir: &Path, targets: &[&str]) {
    fs::create_dir_all(dir).expect("mkdir fd");
    for (i, target) in targets.iter().enumerate() {
        symlink(target, dir.join(i.to_string())).expect("fd link");
    }
}

fn write(root: &Path, f: Fake<'_>) {
    let dir = root.join(f.pid.to_string());
    fs::create_dir_all(&dir).expect("mkdir pid");
    fs::write(dir.join("stat"), stat_line(f.pid, f.comm, f.state, f.start)).expect("stat");
    fs::write(dir.join("comm"), format!("{}\n", f.comm)).expect("comm");
    fs::write(dir.join("cmdline"), f.cmdline).expect("cmdline");
    fs::write(dir.join("cgroup"), f.cgroup).expect("cgroup");
    fds(&dir.join("fd"), f.fds);
}

fn key(pid: u32, start_ticks: u64) -> ProcessKey {
    ProcessKey { pid, start_ticks }
}

fn pids(holders: &[ProcessInfo]) -> Vec<u32> {
    holders.iter().map(|p| p.key.pid).collect()
}

#[test]
fn a_socket_shared_by_two_processes_lists_both_once() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = d.path();
    // fork: parent and child hold inode 11; the parent also dup()ed it (fds 0 and 2).
    let parent = ["socket:[11]", "socket:[12]", "socket:[11]", "/dev/null"];
    write(
        r,
        Fake {
            pid: 100,
            start: 5000,
            fds: &parent,
            ..Fake::default()
        },
    );
    write(
        r,
        Fake {
            pid: 101,
            start: 6000,
            fds: &["socket:[11]"],
            ..Fake::default()
        },
    );
    // Not sockets, or sockets not asked about.
    let other = [
        "socket:[99]",
        "pipe:[11]",
        "socket:[11",
        "socket:[]",
        "/tmp/socket:[11]",
    ];
    write(
        r,
        Fake {
            pid: 200,
            fds: &other,
            ..Fake::default()
        },
    );
    let mut s = ProcScanner::new(r);
    let found = s.holders(&HashSet::from([11, 12, 13]));
    assert_eq!(pids(&found[&11]), [100, 101]);
    assert_eq!(pids(&found[&12]), [100]);
    assert_eq!(found[&11][0].key, key(100, 5000));
    assert_eq!(found[&11][1].key, key(101, 6000));
    assert!(!found.contains_key(&13));
    assert_eq!(found.len(), 2);
    let stats = s.last_scan();
    assert_eq!((stats.processes, stats.fds), (3, 10));
    assert_eq!((stats.vanished, stats.denied, stats.failed), (0, 0, 0));
}

#[test]
fn threads_are_not_scanned_separately() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = d.path();
    // A process with two threads: the listing of /proc has the process only; its threads
    // appear under task/ (and the same fd table shows through each of them).
    write(
        r,
        Fake {
            pid: 300,
            fds: &["socket:[31]"],
            ..Fake::default()
        },
    );
    for tid in [300, 301] {
        let task = r.join("300/task").join(tid.to_string());
        fs::create_dir_all(&task).expect("mkdir task");
        fs::write(task.join("stat"), stat_line(tid, "proc", 'S', 1000)).expect("task stat");
        fds(&task.join("fd"), &["socket:[31]"]);
    }
    let found = ProcScanner::new(r).holders(&HashSet::from([31]));
    assert_eq!(pids(&found[&31]), [300]);
}

#[test]
fn vanished_processes_are_skipped_and_counted() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = d.path();
    write(
        r,
        Fake {
            pid: 100,
            fds: &["socket:[11]"],
            ..Fake::default()
        },
    );
    // Exited after its fds were read: the fd table is there, stat is gone.
    fds(&r.join("400/fd"), &["socket:[11]"]);
    // Exited before: the directory is listed, its fd table is gone.
    fs::create_dir_all(r.join("401")).expect("mkdir");
    // Not processes.
    fs::create_dir_all(r.join("self")).expect("mkdir");
    fs::write(r.join("uptime"), "1.0 1.0\n").expect("uptime");
    let mut s = ProcScanner::new(r);
    let found = s.holders(&HashSet::from([11]));
    assert_eq!(pids(&found[&11]), [100]);
    let stats = s.last_scan();
    assert_eq!((stats.processes, stats.vanished), (3, 2));
}

#[test]
fn pid_reuse_is_detected_by_start_time() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = d.path();
    let leaky = Fake {
        pid: 100,
        comm: "leaky",
        start: 5000,
        cmdline: b"leaky\0",
        fds: &["socket:[11]"],
        ..Fake::default()
    };
    write(r, leaky);
    let mut s = ProcScanner::new(r);
    let first = s.holders(&HashSet::from([11]));
    assert_eq!(first[&11][0].key, key(100, 5000));
    assert!(!s.has_exited(key(100, 5000)));
    assert!(s.has_exited(key(100, 4999)), "another start time");
    assert!(s.has_exited(key(555, 5000)), "no such pid");

    // Details are read once per process: a changed cmdline with the same start time is not
    // read again.
    fs::write(r.join("100/cmdline"), b"rewritten\0").expect("cmdline");
    let again = s.holders(&HashSet::from([11]));
    assert_eq!(again[&11][0].cmdline, "leaky");
    assert_eq!(s.last_scan().cached, 1);

    // The process exits and its pid is reused: same pid, later start time, new details.
    fs::remove_dir_all(r.join("100")).expect("rm");
    let reborn = Fake {
        pid: 100,
        comm: "other",
        start: 9000,
        cmdline: b"other\0",
        fds: &["socket:[11]"],
        ..Fake::default()
    };
    write(r, reborn);
    let reused = s.holders(&HashSet::from([11]));
    assert_eq!(reused[&11][0].key, key(100, 9000));
    assert_eq!(reused[&11][0].comm, "other");
    assert_eq!(reused[&11][0].cmdline, "other");
    assert_eq!(s.last_scan().cached, 0);
    assert!(s.has_exited(key(100, 5000)));
    assert!(!s.has_exited(key(100, 9000)));

    // A stat that cannot be read proves nothing: the holder is kept.
    fs::write(r.join("100/stat"), "garbage").expect("stat");
    assert!(!s.has_exited(key(100, 9000)));

    // A zombie has closed its fds: exited, for ownership.
    fs::write(r.join("100/stat"), stat_line(100, "other", 'Z', 9000)).expect("stat");
    assert!(s.has_exited(key(100, 9000)));
}

/// An abort's caller is named by pid alone: its start time is read afterwards, and a process
/// that started after the abort (at 100 ticks per second, tick 5000 is 50 s after boot)
/// reused the pid.
#[test]
fn start_time_before_a_moment() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = d.path();
    write(
        r,
        Fake {
            pid: 100,
            start: 5000,
            ..Fake::default()
        },
    );
    let s = 1_000_000_000;
    assert_eq!(start_ticks_before(r, 100, 50 * s, 100), Some(5000));
    assert_eq!(start_ticks_before(r, 100, 60 * s, 100), Some(5000));
    assert_eq!(
        start_ticks_before(r, 100, 50 * s - 1, 100),
        None,
        "started later"
    );
    assert_eq!(start_ticks_before(r, 101, 60 * s, 100), None, "no such pid");
    fs::write(r.join("100/stat"), "garbage").expect("stat");
    assert_eq!(start_ticks_before(r, 100, 60 * s, 100), None, "unreadable");
}

#[test]
fn details_are_filled_and_kept_raw() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = d.path();
    let cgroups = [
        format!("0::/system.slice/docker-{ID}.scope\n"),
        format!("0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-{ID2}.scope\n"),
        format!("12:pids:/docker/{ID3}\n1:name=systemd:/docker/{ID3}\n0::/\n"),
        "0::/user.slice/user-1000.slice/session-2.scope\n".to_owned(),
    ];
    // Control characters are kept (escaped when shown); setproctitle pads with NULs.
    let cmdlines: [&[u8]; 4] = [
        b"leaky\0--port\x1b[2J\0",
        b"nginx: worker process\0\0\0\0",
        b"a\tb\0\0c\0",
        b"",
    ];
    for (i, (cgroup, cmdline)) in cgroups.iter().zip(cmdlines).enumerate() {
        let i = u32::try_from(i).expect("small");
        let fd = format!("socket:[{}]", 50 + i);
        let comm = if i == 0 { "le\x07ky" } else { "proc" };
        write(
            r,
            Fake {
                pid: 500 + i,
                comm,
                cmdline,
                cgroup,
                fds: &[&fd],
                ..Fake::default()
            },
        );
    }
    let found = ProcScanner::new(r).holders(&HashSet::from([50, 51, 52, 53]));
    let info = |inode: u64| found[&inode][0].clone();
    assert_eq!(info(50).comm, "le\x07ky");
    assert_eq!(info(50).cmdline, "leaky --port\x1b[2J");
    assert_eq!(info(51).cmdline, "nginx: worker process");
    assert_eq!(info(52).cmdline, "a\tb  c", "an empty argument stays");
    assert_eq!(info(53).cmdline, "", "kernel threads and zombies have none");
    let docker = format!("/system.slice/docker-{ID}.scope");
    assert_eq!(info(50).cgroup.as_deref(), Some(docker.as_str()));
    assert_eq!(info(50).container.as_deref(), Some(ID));
    assert_eq!(info(51).container.as_deref(), Some(ID2));
    assert_eq!(info(52).cgroup.as_deref(), Some("/"));
    assert_eq!(
        info(52).container.as_deref(),
        Some(ID3),
        "from a cgroup v1 line"
    );
    assert_eq!(info(53).container, None);
}

#[test]
fn socket_links_are_parsed_exactly() {
    assert_eq!(socket_inode(b"socket:[0]"), Some(0));
    assert_eq!(socket_inode(b"socket:[4294967295]"), Some(4_294_967_295));
    assert_eq!(
        socket_inode(b"socket:[18446744073709551615]"),
        Some(u64::MAX)
    );
    assert_eq!(
        socket_inode(b"socket:[18446744073709551616]"),
        None,
        "overflow"
    );
    for bad in [
        &b"socket:[]"[..],
        b"socket:[1a]",
        b"socket:[-1]",
        b"pipe:[1]",
        b"socket:[1",
    ] {
        assert_eq!(socket_inode(bad), None, "{}", String::from_utf8_lossy(bad));
    }
}
