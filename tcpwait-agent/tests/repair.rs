//! After real loss, reconciliation repairs the table in every state, not only the watched ones.
//!
//! Kernel behaviour exercised: a ring buffer of one page (`--test-ring-bytes 4096`, a hidden
//! test flag) holds one batch of events; a burst of connections fills it between two drains,
//! and the kernel drops what does not fit (counted as ring full). Sockets whose later
//! transitions were dropped stay in the table in the state of the last one it got (FIN_WAIT1,
//! ESTABLISHED, LAST_ACK, ...): phantoms. The loss makes the daemon reconcile with inet_diag at
//! once; the table must then equal `ss` for the test's namespace.
mod common;

use std::{
    collections::BTreeSet, io::Read as _, os::fd::AsRawFd as _, process::Command, time::Duration,
};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// `(state, local, remote)` of every socket `ss` shows in `ns`, listeners and TIME_WAIT aside
/// (the table tracks neither), with the kernel's state names.
fn ss(ns: &NetNs) -> BTreeSet<(String, String, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-Htan"])
        .args(["exclude", "time-wait", "exclude", "listening"])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let state = match *f.first()? {
                "ESTAB" => "ESTABLISHED".to_owned(),
                s => s.replace('-', "_").replace("WAIT_", "WAIT"),
            };
            Some((state, f.get(3)?.to_string(), f.get(4)?.to_string()))
        })
        .collect()
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn phantom_entries_in_every_state_are_repaired_within_one_reconciliation() {
    require_root();
    const HELD: usize = 20;
    const CHURN: usize = 4000;
    let ns = NetNs::new("repair");
    let sock = api_socket("repair");
    let _tw = daemon(
        &sock,
        &["--test-ring-bytes", "4096", "--reconcile-interval", "2"],
    );
    let counter = |k: &str| status(&sock)["counters"][k].as_u64().expect("counter");
    // In the namespace: HELD established pairs, HELD pairs whose server end closed (FIN_WAIT2
    // and CLOSE_WAIT), then a burst of connections the server closes first.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let ns_path = ns.path();
    let worker = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns_path).expect("open the namespace");
        // SAFETY: setns on an fd this closure owns.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut held = Vec::new();
        for i in 0..2 * HELD {
            let c = std::net::TcpStream::connect(addr).expect("connect");
            let (a, _) = listener.accept().expect("accept");
            held.push(c);
            if i < HELD {
                held.push(a);
            } // else: the server end closes, the client end stays in CLOSE_WAIT
        }
        for _ in 0..CHURN {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            drop(listener.accept().expect("accept"));
            assert_eq!(c.read(&mut [0u8; 1]).expect("read"), 0);
        }
        done_tx.send(()).expect("say done");
        // Ended by the test, or by its failure (the sender dropped).
        let _ = rx.recv();
        drop((held, listener));
    });
    done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the burst ends");
    // The burst's last transitions have run once the namespace holds only the held sockets.
    let settled = wait_until(Duration::from_secs(30), || ss(&ns).len() == 4 * HELD);
    assert!(settled, "ss: {:?}", ss(&ns));
    let lost = counter("lost_ring_full");
    assert!(lost > 0, "no loss: the test would prove nothing");
    let truth = ss(&ns);
    let inode = ns.inode();
    // Reconciliations run every 2 s and on every new loss (other traffic on the host can keep
    // losing into a one-page ring): the second to complete from here started after the
    // namespace settled. Right after it, the table must be the kernel's.
    let before = counter("reconciliations");
    assert!(
        wait_until(Duration::from_secs(20), || counter("reconciliations")
            >= before + 2),
        "no reconciliation after the loss"
    );
    let t: BTreeSet<_> = table(&sock, inode)
        .into_iter()
        .filter(|(state, ..)| state != "LISTEN")
        .collect();
    if t != truth {
        // What a failure needs to be understood (seen once in CI, never reproduced since):
        // whether the kernel's lists moved after the namespace settled, and the counters.
        let after = ss(&ns);
        let report = status(&sock);
        panic!(
            "table has {} sockets, ss {}: extra {:?}, missing {:?}; ss now {} sockets (changed \
             since settled: {:?}); lost {lost} at settle, counters now {}",
            t.len(),
            truth.len(),
            t.difference(&truth).take(5).collect::<Vec<_>>(),
            truth.difference(&t).take(5).collect::<Vec<_>>(),
            after.len(),
            after
                .symmetric_difference(&truth)
                .take(5)
                .collect::<Vec<_>>(),
            report["counters"]
        );
    }
    let states: BTreeSet<&str> = truth.iter().map(|(s, ..)| s.as_str()).collect();
    eprintln!(
        "repair: {lost} transitions lost (ring full), the namespace's {} sockets ({states:?}) \
         equal in the table after one reconciliation",
        truth.len()
    );
    tx.send(()).expect("end the worker");
    worker.join().expect("worker");
}
