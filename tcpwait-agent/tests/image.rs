//! The container image, built by deploy/container/build-image.sh from the binary under test
//! and run with podman as deploy/kubernetes/daemonset.yaml runs it: the manifest's command,
//! ConfigMap, capabilities (drop ALL, add its list), host PID namespace, a network namespace
//! of its own (no hostNetwork: here one the test made, as a pod's), read-only root, the
//! tracefs and /run/tcpwait mounts, no privilege escalation. A process leaking CLOSE_WAIT
//! sockets in another namespace of the host is listed by `tcpwait status` run through the
//! container, and `/readyz`, polled from inside the pod's namespace from before the container
//! starts, answers 200 only once the probe is attached.
mod common;
#[path = "common/packaging.rs"]
mod packaging;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use yaml_rust2::Yaml;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// Capability numbers (linux/capability.h) of the names the manifest uses.
fn cap_bit(name: &str) -> u32 {
    match name {
        "DAC_READ_SEARCH" => 2,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} not known to this test"),
    }
}

/// A `CapXxx:` mask from /proc/<pid>/status.
fn caps(pid: u32, which: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{which}:\t")))
        .expect("cap line");
    u64::from_str_radix(line.trim(), 16).expect("hex mask")
}

fn podman(args: &[&str]) -> (bool, String) {
    let out = Command::new("podman").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run podman: {e}. Install the Debian packages podman and runc (cargo xtask test does)")
    });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Removes the container and the image on every way out.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.container]);
        let _ = podman(&["rmi", "-f", &self.image]);
    }
}

/// One answer of `/readyz`: the HTTP status (None: no answer), and whether the agent had its
/// program attached to the tracepoint when the answer was in.
#[derive(Debug, Clone)]
struct Observation {
    at: Duration,
    status: Option<u16>,
    attached_after: bool,
}

/// `GET path` on 127.0.0.1:port from the calling thread's network namespace.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// The agent: the process in namespace `inode` whose comm is `tcpwait`.
fn agent_pid(inode: u64) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (std::os::unix::fs::MetadataExt::ino(&ns) == inode && comm.trim() == "tcpwait")
            .then_some(pid)
    })
}

/// Whether `pid` holds a BPF link or perf event: its program attached to the tracepoint.
fn attached(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|l| {
            let l = l.to_string_lossy();
            l == "anon_inode:bpf_link" || l == "anon_inode:[perf_event]"
        })
}

#[test]
#[ignore = "needs root, the real kernel and podman; run by `cargo xtask test`"]
fn the_image_runs_as_the_daemonset_says_and_sees_the_hosts_leaks() {
    require_root();
    let docs = packaging::yaml(&packaging::deploy("kubernetes/daemonset.yaml"));
    let config = docs[1]["data"]["tcpwait.toml"].as_str().expect("ConfigMap");
    let spec = &docs[2]["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(spec["hostPID"], Yaml::Boolean(true));
    assert!(
        spec["hostNetwork"].is_badvalue(),
        "this test gives the pod its own namespace"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], Yaml::Boolean(true));
    assert_eq!(sc["allowPrivilegeEscalation"], Yaml::Boolean(false));
    assert_eq!(packaging::strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let add = packaging::strs(&sc["capabilities"]["add"]);
    let mut command = packaging::strs(&c["command"]);
    command.extend(packaging::strs(&c["args"]));
    let port = c["ports"][0]["containerPort"].as_i64().expect("port") as u16;
    let ready_path = c["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .expect("readiness")
        .to_owned();
    let live_path = c["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .expect("liveness")
        .to_owned();
    let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
    let mount_paths: Vec<&str> = mounts
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(
        mount_paths,
        ["/etc/tcpwait", "/sys/kernel/tracing", "/run/tcpwait"]
    );

    // The image, from the binary under test, by the script `cargo xtask image` runs.
    let tag = format!("localhost/tcpwait-test:{}", std::process::id());
    let name = format!("tcpwait-test-{}", std::process::id());
    let _cleanup = Cleanup {
        container: name.clone(),
        image: tag.clone(),
    };
    let started = Instant::now();
    let out = Command::new(packaging::root().join("deploy/container/build-image.sh"))
        .args([env!("CARGO_BIN_EXE_tcpwait"), &tag])
        .output()
        .expect("run build-image.sh");
    assert!(
        out.status.success(),
        "build-image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, size) = podman(&["image", "inspect", "--format", "{{.Size}}", &tag]);
    eprintln!(
        "image {tag}: {} bytes, built in {:.1} s",
        size.trim(),
        started.elapsed().as_secs_f64()
    );

    // A leak in a namespace of its own, as in another pod.
    let pod = NetNs::new("img-pod");
    let (mut srv, sport) = pod.server("tw-server", "127.0.0.1:0", 3);
    let (leaker, _) = client_in(
        Some(&pod),
        "tw-img-leak",
        format!("127.0.0.1:{sport}").parse().expect("addr"),
        3,
    );
    srv.expect_line("accepted");

    // The agent's pod namespace, and a poller inside it from before the container exists.
    let agent_ns = NetNs::new("img-agent");
    let inode = agent_ns.inode();
    let observations = Arc::new(Mutex::new(Vec::<Observation>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(None));
    let poller = {
        let (obs, stop, live) = (observations.clone(), stop.clone(), live.clone());
        let (ready_path, live_path) = (ready_path.clone(), live_path.clone());
        let ns_file = std::fs::File::open(agent_ns.path()).expect("open namespace");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a namespace fd it holds.
            let r = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let t0 = Instant::now();
            let mut pid = None;
            while !stop.load(Ordering::Relaxed) {
                let status = http_status(port, &ready_path);
                pid = pid.or_else(|| agent_pid(inode));
                let attached_after = pid.is_some_and(attached);
                obs.lock().expect("lock").push(Observation {
                    at: t0.elapsed(),
                    status,
                    attached_after,
                });
                if status == Some(200) {
                    *live.lock().expect("lock") = http_status(port, &live_path);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), || !observations
            .lock()
            .expect("lock")
            .is_empty()),
        "the poller never polled"
    );

    // The container, as the DaemonSet runs it.
    let cfg = tempfile::tempdir().expect("tempdir");
    std::fs::write(cfg.path().join("tcpwait.toml"), config).expect("write config");
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid struct.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) },
        0
    );
    let mut args: Vec<String> = [
        // crun refuses hosts with cgroup v1 and v2 mixed (this one); runc runs them.
        "--runtime=runc",
        "run",
        "--rm",
        "--pid=host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        "--mount=type=tmpfs,destination=/run/tcpwait,tmpfs-size=1m",
        "-v=/sys/kernel/tracing:/sys/kernel/tracing",
        // podman's default limits exceed this host's hard ones (Kubernetes sets none).
        "--ulimit=nproc=4096:4096",
    ]
    .map(str::to_owned)
    .into();
    args.push(format!("--ulimit=nofile={0}:{0}", nofile.rlim_max));
    args.push(format!("--name={name}"));
    args.push(format!("--network=ns:{}", agent_ns.path().display()));
    args.push(format!("-v={}:/etc/tcpwait:ro", cfg.path().display()));
    args.push(format!("--cap-add={}", add.join(",")));
    args.push(format!("--entrypoint={}", command[0]));
    args.push(tag.clone());
    args.extend(command[1..].iter().cloned());
    let mut container = Command::new("podman")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podman run");
    let stderr = Lines::default();
    stderr.spawn_reader(container.stderr.take().expect("stderr"));
    let ready = wait_until(Duration::from_secs(60), || poller.is_finished());
    stop.store(true, Ordering::Relaxed);
    assert!(
        ready,
        "never ready; container stderr: {:?}",
        stderr.snapshot()
    );
    poller.join().expect("poller");
    let obs = observations.lock().expect("lock").clone();
    let first_ok = obs
        .iter()
        .position(|o| o.status == Some(200))
        .expect("a 200 ends the polling");
    let before = &obs[..first_ok];
    let unreachable = before.iter().filter(|o| o.status.is_none()).count();
    let not_ready = before.iter().filter(|o| o.status == Some(503)).count();
    let detached_503 = before
        .iter()
        .filter(|o| o.status == Some(503) && !o.attached_after)
        .count();
    eprintln!(
        "/readyz: {} polls; {unreachable} unreachable, {not_ready} 503 ({detached_503} of them \
         with the probe not attached yet), then 200 at {:.3} s; attached when the 200 came: {}; \
         stderr: {:?}",
        obs.len(),
        obs[first_ok].at.as_secs_f64(),
        obs[first_ok].attached_after,
        stderr.snapshot()
    );
    // Before the 200: nothing but 503 or no answer; the first poll ran before the container.
    assert_eq!(unreachable + not_ready, before.len(), "{before:?}");
    assert!(obs[0].status.is_none(), "answered before the container ran");
    assert!(
        obs[first_ok].attached_after,
        "ready before the probe was attached"
    );
    assert_eq!(*live.lock().expect("lock"), Some(200), "{live_path}");

    // Its capabilities: exactly the manifest's, as far as this host's bounding set allows.
    let pid = agent_pid(inode).expect("agent process");
    let wanted: u64 = add.iter().map(|c| 1u64 << cap_bit(c)).sum();
    let ours = caps(std::process::id(), "CapBnd");
    assert_eq!(caps(pid, "CapEff"), wanted & ours);
    assert_eq!(caps(pid, "CapBnd"), wanted & ours);
    let missing: Vec<&String> = add
        .iter()
        .filter(|c| ours & (1 << cap_bit(c)) == 0)
        .collect();
    eprintln!(
        "agent pid {pid}: CapEff {:#x} = the manifest's {add:?}{}",
        caps(pid, "CapEff"),
        if missing.is_empty() {
            String::new()
        } else {
            format!(" but {missing:?}, which this host's bounding set lacks")
        }
    );

    // `status`, run through the container, lists the leak of the other namespace: right
    // after ready, since bootstrap found it.
    let (ok, text) = podman(&["exec", &name, &command[0], "status", "--json"]);
    assert!(ok, "{text}");
    let report: Value = serde_json::from_str(&text).expect("status --json");
    let p = process_in(&report, leaker.pid())
        .unwrap_or_else(|| panic!("leaker {} not in status: {text}", leaker.pid()));
    assert_eq!(p["comm"], "tw-img-leak");
    assert_eq!(p["count"], 3);
    assert_eq!(p["netns"], pod.inode());
    let (ok, text) = podman(&["exec", &name, &command[0], "status"]);
    assert!(ok && text.contains("tw-img-leak"), "{text}");
    eprintln!(
        "status through the container: pid {} tw-img-leak, 3 CLOSE_WAIT sockets in netns {}",
        leaker.pid(),
        pod.inode()
    );

    // SIGTERM through the runtime: the agent stops cleanly, exit 0.
    let (ok, text) = podman(&["stop", "-t", "10", &name]);
    assert!(ok, "{text}");
    let status = container.wait().expect("podman run");
    assert_eq!(status.code(), Some(0), "{:?}", stderr.snapshot());
    assert!(
        stderr
            .snapshot()
            .iter()
            .any(|l| l.starts_with("tcpwait: stopped;")),
        "{:?}",
        stderr.snapshot()
    );
}
