//! The loopback load generator: a client/server pair on 127.0.0.1 that opens and closes
//! connections for a bounded time.
use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// Runs the loopback workload for `secs`; returns (connections, elapsed).
pub(super) fn workload(secs: u64) -> Result<(u64, Duration)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let port = listener.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(s);
            }
        })
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut n = 0u64;
    let mut buf = [0u8; 1];
    while Instant::now() < deadline {
        let mut c = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
        // EOF: the server closed first, so this socket goes through CLOSE_WAIT.
        let _ = c.read(&mut buf);
        drop(c);
        n += 1;
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(("127.0.0.1", port)).map(|mut c| c.read(&mut buf));
    let _ = server.join();
    // The wake-up connection above is one more.
    Ok((n + 1, elapsed))
}
