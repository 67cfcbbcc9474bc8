//! Privileged tests: sockets in network namespaces other than the agent's, as every pod
//! without `hostNetwork` and every bridged container holds them. The agent runs in the host
//! namespace; peers run inside fresh named namespaces (`ip netns add`, as a CNI plugin makes
//! them), where each has its own 127.0.0.1, so the same 4-tuple can exist in several at once.
//!
//! Kernel behaviour exercised: the event carries `sk->__sk_common.skc_net.net->ns.inum`; an
//! inet_diag dump answers only for the namespace of the netlink socket that asks, so the agent
//! must dump from inside each namespace; sockets of a deleted namespace close (their processes
//! die) and leave through their own transitions.
mod common;

use std::time::Duration;

use common::{Peer, Value, daemon, netns::NetNs, process_in, require_root, status, wait_until};

#[test]
fn common_role_entry() {
    common::role_main();
}

/// The first of `n` consecutive loopback ports below the ephemeral range (32768 and up on
/// Linux by default), each free now: ports that connect() never picks for other sockets of
/// the host meanwhile.
fn free_block(n: u16) -> u16 {
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    (start..30_000)
        .step_by(usize::from(n))
        .find(|&p| (p..p + n).all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()))
        .expect("a free block of loopback ports below 30000")
}

/// Firing alert lines for `pid`.
fn firing_for(tw: &common::Tcpwait, pid: u32) -> Vec<Value> {
    common::alerts(tw)
        .into_iter()
        .filter(|a| a["pid"] == pid && a["alert"] == "firing")
        .collect()
}

fn resolved_for(tw: &common::Tcpwait, pid: u32) -> usize {
    common::alerts(tw)
        .iter()
        .filter(|a| a["pid"] == pid && a["alert"] == "resolved")
        .count()
}

fn count_of(st: &Value, pid: u32) -> Option<u64> {
    process_in(st, pid).and_then(|p| p["count"].as_u64())
}

/// A server and a leaking client (own comm) in one namespace, the agent in the host's.
#[test]
#[ignore = "needs root and the real kernel: real kernel program, network namespaces"]
fn a_leak_inside_a_namespace_is_attributed_and_alerted() {
    require_root();
    let ns = NetNs::new("leak");
    let socket = common::api_socket("netns-leak");
    let tw = daemon(
        &socket,
        &["--close-wait-age", "2", "--reconcile-interval", "1s"],
    );
    let (mut srv, port) = ns.server("tw-ns-server", "127.0.0.1:0", 5);
    let cli = ns.spawn(
        "client",
        "tw-ns-leaker",
        &[format!("127.0.0.1:{port}"), "5".to_owned()],
    );
    let mut cli = cli;
    cli.expect_line("connected");
    srv.expect_line("accepted");
    let (pid, server_pid) = (cli.pid(), srv.pid());
    assert!(
        wait_until(Duration::from_secs(6), || count_of(&status(&socket), pid)
            == Some(5)),
        "client never listed with 5: {}",
        status(&socket)
    );
    let st = status(&socket);
    let p = process_in(&st, pid).expect("listed");
    assert_eq!(p["comm"], "tw-ns-leaker");
    assert_eq!(p["netns"], ns.inode(), "the client's namespace: {p}");
    for s in p["sockets"].as_array().expect("sockets") {
        assert_eq!(s["netns"], ns.inode(), "{s}");
    }
    assert_eq!(
        process_in(&st, server_pid),
        None,
        "the server holds nothing"
    );
    assert!(
        wait_until(Duration::from_secs(5), || firing_for(&tw, pid).len() == 1),
        "no alert: {:?}",
        tw.stdout.snapshot()
    );
    // Two more reconciliations: the namespace is dumped, nothing is removed as "gone".
    let before = status(&socket)["counters"]["reconciliations"]
        .as_u64()
        .expect("counter");
    assert!(wait_until(Duration::from_secs(8), || {
        status(&socket)["counters"]["reconciliations"]
            .as_u64()
            .expect("counter")
            >= before + 2
    }));
    let st = status(&socket);
    assert_eq!(st["counters"]["reconcile_removed"], 0, "{st}");
    assert_eq!(count_of(&st, pid), Some(5));
    assert_eq!(firing_for(&tw, pid).len(), 1, "exactly one alert");
    assert!(
        common::alerts(&tw).iter().all(|a| a["pid"] != server_pid),
        "the server is never blamed"
    );
}

/// Two namespaces hold the very same 4-tuples (server port P, client ports L..): 3 in one, 5
/// in the other.
#[test]
#[ignore = "needs root and the real kernel: real kernel program, network namespaces"]
fn the_same_four_tuple_in_two_namespaces_is_attributed_to_each_holder() {
    require_root();
    let (a, b) = (NetNs::new("tuple-a"), NetNs::new("tuple-b"));
    let socket = common::api_socket("netns-tuple");
    let tw = daemon(&socket, &["--close-wait-age", "2"]);
    let (mut srv_a, _) = a.server("tw-srv-a", "127.0.0.1:7070", 3);
    let (mut srv_b, _) = b.server("tw-srv-b", "127.0.0.1:7070", 5);
    let mut cli_a = a.bound_client("tw-cli-a", "127.0.0.1:7070", 3, 41000);
    let mut cli_b = b.bound_client("tw-cli-b", "127.0.0.1:7070", 5, 41000);
    srv_a.expect_line("accepted");
    srv_b.expect_line("accepted");
    let (pa, pb) = (cli_a.pid(), cli_b.pid());
    assert!(
        wait_until(Duration::from_secs(6), || {
            let st = status(&socket);
            count_of(&st, pa) == Some(3) && count_of(&st, pb) == Some(5)
        }),
        "{}",
        status(&socket)
    );
    let st = status(&socket);
    assert_eq!(process_in(&st, pa).expect("a")["netns"], a.inode());
    assert_eq!(process_in(&st, pb).expect("b")["netns"], b.inode());
    assert!(wait_until(Duration::from_secs(5), || {
        firing_for(&tw, pa).len() == 1 && firing_for(&tw, pb).len() == 1
    }));
    let counts: Vec<(u64, u64)> = [pa, pb]
        .iter()
        .map(|&p| {
            (
                u64::from(p),
                firing_for(&tw, p)[0]["count"].as_u64().expect("count"),
            )
        })
        .collect();
    assert_eq!(counts, [(u64::from(pa), 3), (u64::from(pb), 5)]);
    // A closes: only A resolves, B keeps its 5.
    cli_a.send("close");
    cli_a.expect_line("closed");
    assert!(
        wait_until(Duration::from_secs(5), || resolved_for(&tw, pa) == 1),
        "{:?}",
        tw.stdout.snapshot()
    );
    let st = status(&socket);
    assert_eq!((count_of(&st, pa), count_of(&st, pb)), (None, Some(5)));
    assert_eq!(resolved_for(&tw, pb), 0);
    cli_b.send("close");
    cli_b.expect_line("closed");
    assert!(wait_until(Duration::from_secs(5), || resolved_for(&tw, pb) == 1));
}

/// A host process and a namespaced one each hold 3 CLOSE_WAIT sockets with the same 4-tuple.
#[test]
#[ignore = "needs root and the real kernel: real kernel program, network namespaces"]
fn a_host_process_and_a_pod_with_the_same_tuples_are_each_listed_with_their_own() {
    require_root();
    let ns = NetNs::new("host-pod");
    let socket = common::api_socket("netns-host-pod");
    let _tw = daemon(&socket, &["--close-wait-age", "30"]);
    let port = common::free_port();
    let lport = free_block(3);
    let (mut host_srv, _) = common::server("tw-host-srv", &format!("127.0.0.1:{port}"), 3);
    let mut host_cli = Peer::spawn(
        "client_bound",
        "tw-host-cli",
        &[format!("127.0.0.1:{port}"), "3".into(), lport.to_string()],
    );
    host_cli.expect_line("connected");
    host_srv.expect_line("accepted");
    let (mut pod_srv, _) = ns.server("tw-pod-srv", &format!("127.0.0.1:{port}"), 3);
    let pod_cli = ns.bound_client("tw-pod-cli", &format!("127.0.0.1:{port}"), 3, lport);
    pod_srv.expect_line("accepted");
    let (h, p) = (host_cli.pid(), pod_cli.pid());
    assert!(
        wait_until(Duration::from_secs(6), || {
            let st = status(&socket);
            count_of(&st, h) == Some(3) && count_of(&st, p) == Some(3)
        }),
        "{}",
        status(&socket)
    );
    // Stays so through a full reconciliation (the bug: the host's dump matched the pod's
    // tuples and blamed the host process for 6).
    let st = status(&socket);
    assert_eq!((count_of(&st, h), count_of(&st, p)), (Some(3), Some(3)));
    assert_eq!(
        process_in(&st, h).expect("host")["netns"],
        common::netns::own_inode()
    );
    assert_eq!(process_in(&st, p).expect("pod")["netns"], ns.inode());
}

/// Sockets that were in CLOSE_WAIT inside a namespace before the agent started.
#[test]
#[ignore = "needs root and the real kernel: real kernel program, network namespaces"]
fn sockets_that_predate_the_agent_in_a_namespace_are_listed_with_an_age_bound() {
    require_root();
    let ns = NetNs::new("pre");
    let (mut srv, port) = ns.server("tw-pre-srv", "127.0.0.1:0", 4);
    let cli = ns.bound_client("tw-pre-cli", &format!("127.0.0.1:{port}"), 4, 42000);
    srv.expect_line("accepted");
    let socket = common::api_socket("netns-pre");
    let _tw = daemon(&socket, &["--close-wait-age", "60"]);
    assert!(
        wait_until(Duration::from_secs(3), || count_of(
            &status(&socket),
            cli.pid()
        ) == Some(4)),
        "{}",
        status(&socket)
    );
    let p = process_in(&status(&socket), cli.pid()).expect("listed");
    assert_eq!(p["comm"], "tw-pre-cli");
    assert_eq!(p["oldest_age_is_lower_bound"], true, "{p}");
    assert_eq!(p["netns"], ns.inode());
}

/// A namespace goes away (its processes killed, then `ip netns del`) while tracked.
#[test]
#[ignore = "needs root and the real kernel: real kernel program, network namespaces"]
fn a_namespace_that_goes_away_takes_its_sockets_and_leaves_the_others() {
    require_root();
    let (mut gone, stays) = (NetNs::new("gone"), NetNs::new("stays"));
    let socket = common::api_socket("netns-gone");
    let tw = daemon(
        &socket,
        &["--close-wait-age", "60", "--reconcile-interval", "1s"],
    );
    let (mut srv_g, port_g) = gone.server("tw-gone-srv", "127.0.0.1:0", 2);
    let mut cli_g = gone.bound_client("tw-gone-cli", &format!("127.0.0.1:{port_g}"), 2, 43000);
    let (mut srv_s, port_s) = stays.server("tw-stay-srv", "127.0.0.1:0", 3);
    let cli_s = stays.bound_client("tw-stay-cli", &format!("127.0.0.1:{port_s}"), 3, 43000);
    srv_g.expect_line("accepted");
    srv_s.expect_line("accepted");
    assert!(wait_until(Duration::from_secs(6), || {
        let st = status(&socket);
        count_of(&st, cli_g.pid()) == Some(2) && count_of(&st, cli_s.pid()) == Some(3)
    }));
    let gone_inode = gone.inode();
    // Kill everything in the namespace, then delete it.
    for p in [&mut cli_g, &mut srv_g] {
        p.child.kill().expect("kill");
        p.child.wait().expect("reap");
    }
    gone.delete();
    // Its 2 CLOSE_WAIT sockets, its listener, and the server's accepted sockets (already
    // closed) are gone; the other namespace keeps its 3.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let st = status(&socket);
            count_of(&st, cli_g.pid()).is_none() && count_of(&st, cli_s.pid()) == Some(3)
        }),
        "{}",
        status(&socket)
    );
    let st = status(&socket);
    // The namespace's own entries, not the host-wide count (reconciliations add sockets of
    // other namespaces meanwhile): its CLOSE_WAIT and ESTABLISHED sockets are gone; orphaned
    // FIN_WAIT ends of the killed server may live out tcp_fin_timeout.
    let left = common::table(&socket, gone_inode);
    assert!(
        left.iter()
            .all(|(state, ..)| state != "CLOSE_WAIT" && state != "ESTABLISHED"),
        "{left:?}"
    );
    // (Other namespaces of the machine may hold sockets of unknown holders; none of the
    // deleted one's is left.)
    assert!(
        st["unowned"]
            .as_array()
            .expect("unowned")
            .iter()
            // CLOSE_WAIT: the server's orphaned FIN_WAIT2 ends (watched by the default
            // fin_wait2_held rule, no holder) live out tcp_fin_timeout on their own.
            .all(|s| s["netns"] != gone_inode || s["state"] != "CLOSE_WAIT"),
        "{st}"
    );
    // Two reconciliations later nothing came back, and nothing was logged as an error.
    let seen = st["counters"]["reconciliations"].as_u64().expect("counter");
    assert!(wait_until(Duration::from_secs(8), || {
        status(&socket)["counters"]["reconciliations"]
            .as_u64()
            .expect("counter")
            >= seen + 2
    }));
    assert_eq!(count_of(&status(&socket), cli_s.pid()), Some(3));
    // (A kernel warning at start, such as 5.10's about recursion counts, is not about this.)
    let errors: Vec<String> = tw
        .stderr
        .snapshot()
        .into_iter()
        .filter(|l| l.contains("ERROR") || (l.contains("WARN") && l.contains("namespace")))
        .collect();
    assert_eq!(errors, Vec::<String>::new());
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on
/// a hybrid one), from /proc/self/mountinfo.
fn cgroup2_root() -> Option<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split(' ').nth(4).map(std::path::PathBuf::from))?
        })
}

/// A kubelet-shaped cgroup (systemd driver, containerd), removed on drop: the leaf a pod's
/// container's processes live in.
struct PodCgroup {
    top: std::path::PathBuf,
    leaf: std::path::PathBuf,
}

impl PodCgroup {
    fn new(root: &std::path::Path, uid: &str, container: &str) -> Self {
        let top = root.join(format!("kubepods-tw{}.slice", std::process::id()));
        let leaf = top
            .join(format!(
                "kubepods-tw{}-pod{}.slice",
                std::process::id(),
                uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{container}.scope"));
        std::fs::create_dir_all(&leaf).expect("create the pod's cgroup");
        Self { top, leaf }
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.leaf.join("cgroup.procs"), pid.to_string()).expect("move into it");
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Deepest first; each is empty once its processes are gone.
        let mut dir = Some(self.leaf.as_path());
        while let Some(d) = dir {
            let _ = std::fs::remove_dir(d);
            dir = d.parent().filter(|p| p.starts_with(&self.top));
        }
    }
}

/// A pod: its own network namespace and a kubelet cgroup. Its leak names the pod everywhere.
#[test]
#[ignore = "needs root and the real kernel: real kernel program, network namespaces, cgroup v2"]
fn a_pods_leak_carries_its_pod_uid_container_and_namespace() {
    require_root();
    let Some(root) = cgroup2_root() else {
        eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted here (the pod's cgroup needs one)");
        return;
    };
    const UID: &str = "2792948f-f6ca-4171-a1fd-7f4e1857c471";
    let container = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xc0ffee);
    let pod = PodCgroup::new(&root, UID, &container);
    let ns = NetNs::new("pod");
    let socket = common::api_socket("netns-pod");
    let tw = daemon(&socket, &["--close-wait-age", "2"]);
    let mut tail = common::Tcpwait::start(
        &[
            "tail",
            "--json",
            "--socket",
            &socket,
            "--netns",
            &ns.inode().to_string(),
        ],
        "following",
    );
    let (mut srv, port) = ns.server("tw-pod-srv", "127.0.0.1:0", 2);
    let mut cli = ns.spawn(
        "client",
        "tw-pod-app",
        &[format!("127.0.0.1:{port}"), "2".to_owned()],
    );
    pod.enter(cli.pid());
    cli.expect_line("connected");
    srv.expect_line("accepted");
    let pid = cli.pid();
    assert!(
        wait_until(Duration::from_secs(6), || firing_for(&tw, pid).len() == 1),
        "{}",
        status(&socket)
    );
    let p = process_in(&status(&socket), pid).expect("listed");
    assert_eq!(
        (&p["pod_uid"], &p["container"], &p["runtime"], &p["netns"]),
        (
            &Value::from(UID),
            &Value::from(container.as_str()),
            &Value::from("containerd"),
            &Value::from(ns.inode())
        ),
        "{p}"
    );
    let a = &firing_for(&tw, pid)[0];
    assert_eq!(
        (&a["pod_uid"], &a["container"], &a["netns"]),
        (
            &Value::from(UID),
            &Value::from(container.as_str()),
            &Value::from(ns.inode())
        )
    );
    // The owner's pod in the live log: the owner's own close() (CLOSE_WAIT -> LAST_ACK).
    cli.send("close");
    cli.expect_line("closed");
    let owned = |tail: &common::Tcpwait| -> Vec<Value> {
        tail.json()
            .into_iter()
            .filter(|r| r["old"] == "CLOSE_WAIT" && r["owner_pid"] == pid)
            .collect()
    };
    assert!(wait_until(Duration::from_secs(5), || owned(&tail).len() == 2));
    for r in owned(&tail) {
        assert_eq!(
            (&r["owner_pod_uid"], &r["owner_container"], &r["netns"]),
            (
                &Value::from(UID),
                &Value::from(container.as_str()),
                &Value::from(ns.inode())
            ),
            "{r}"
        );
    }
    let _ = tail.stop(libc::SIGINT);
    drop(cli);
}
