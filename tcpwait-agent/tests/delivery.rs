//! Alert delivery keeps the latest state of every alert and retries each independently: a
//! change the receiver keeps failing never holds back another alert's; what is still owed at
//! shutdown is counted as dropped.
mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

/// A webhook receiver that answers 500 to every change of process `bad`, 200 to the others
/// (recorded as (pid, "firing"|"resolved")).
struct Receiver {
    port: u16,
    bad: Arc<AtomicU32>,
    refused: Arc<AtomicU64>,
    accepted: Arc<Mutex<Vec<(u64, String)>>>,
}

fn receiver() -> Receiver {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let bad = Arc::new(AtomicU32::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let (b, r, a) = (bad.clone(), refused.clone(), accepted.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut reader = BufReader::new(s.try_clone().expect("clone"));
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().expect("length");
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let v: Value = serde_json::from_slice(&body).expect("JSON body");
            let pid = v["pid"].as_u64().expect("pid");
            let status = if pid == u64::from(b.load(Ordering::Relaxed)) {
                r.fetch_add(1, Ordering::Relaxed);
                "500 Internal Server Error"
            } else {
                a.lock()
                    .expect("lock")
                    .push((pid, v["alert"].as_str().expect("alert").to_owned()));
                "200 OK"
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    Receiver {
        port,
        bad,
        refused,
        accepted,
    }
}

#[test]
#[ignore = "needs root and the real kernel; run by `cargo xtask test`"]
fn a_change_that_keeps_failing_never_holds_back_another_and_shutdown_drops_are_counted() {
    require_root();
    let rx = receiver();
    let sock = api_socket("delivery");
    let url = format!("http://127.0.0.1:{}/hook", rx.port);
    let mut tw = daemon(&sock, &["--close-wait-count", "1", "--webhook-url", &url]);
    // A fires first and is refused every time; B fires after it.
    let (mut srv_a, port_a) = server("tw-srv-a", "127.0.0.1:0", 2);
    let (a, _) = client(
        "tw-deliv-a",
        format!("127.0.0.1:{port_a}").parse().expect("addr"),
        2,
    );
    rx.bad.store(a.pid(), Ordering::Relaxed);
    srv_a.expect_line("accepted");
    assert!(
        wait_until(Duration::from_secs(5), || rx
            .refused
            .load(Ordering::Relaxed)
            >= 2),
        "A's change refused and retried"
    );
    let (_srv_b, b) = leak("tw-deliv-b", 2);
    assert!(
        wait_until(Duration::from_secs(5), || rx
            .accepted
            .lock()
            .expect("lock")
            .contains(&(u64::from(b.pid()), "firing".to_owned()))),
        "B delivered while A keeps failing"
    );
    // B resolves (its process exits): its latest state goes too.
    let b_pid = u64::from(b.pid());
    drop(b);
    assert!(
        wait_until(Duration::from_secs(5), || rx
            .accepted
            .lock()
            .expect("lock")
            .contains(&(b_pid, "resolved".to_owned()))),
        "B's resolution delivered: {:?}",
        rx.accepted.lock().expect("lock")
    );
    let refused_before_stop = rx.refused.load(Ordering::Relaxed);
    assert_eq!(tw.stop(libc::SIGTERM), 0);
    let stopped = tw
        .stderr
        .snapshot()
        .into_iter()
        .find(|l| l.starts_with("tcpwait: stopped;"))
        .expect("stopped line");
    eprintln!(
        "delivery: A refused {refused_before_stop} times before the stop, {} in all; {stopped}",
        rx.refused.load(Ordering::Relaxed)
    );
    // A's firing state was still owed: one last attempt, refused, counted.
    assert!(
        stopped.ends_with("alert changes dropped at shutdown 1"),
        "{stopped}"
    );
    assert!(
        rx.accepted
            .lock()
            .expect("lock")
            .iter()
            .all(|(p, _)| *p != u64::from(a.pid())),
        "A never accepted"
    );
}
