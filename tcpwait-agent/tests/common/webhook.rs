//! A minimal HTTP receiver for the webhook sink's tests: the agent's POSTs reach a real
//! socket, and each body is handed over as it arrived.

/// A webhook receiver on loopback: answers 200 to every request and hands each body over.
pub fn receiver() -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead as _, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
                let mut writer = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    // Request line and headers, until the empty line (keep-alive: repeat).
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                    let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, rx)
}
