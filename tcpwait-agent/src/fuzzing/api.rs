//! The API socket's request parser (`api::parse_request`), and the client's parsers of the
//! daemon's answers (`tail` lines, the `status` report) over the same line.
use std::net::{IpAddr, Ipv4Addr};

use crate::{
    api::{MAX_REQUEST, Request, RequestError, StatusReport, TailLine, parse_request},
    event::{Comm, SocketId, Task, TcpState, Transition},
};

/// One line, as the daemon reads it. Invariants: a line over [`MAX_REQUEST`] bytes is refused
/// as too long, any other is a request or a one-line `bad request` message; a request encodes
/// back to a line that parses to the same request; its filter can be applied.
pub fn run(bytes: &[u8]) {
    // The daemon reads the line as UTF-8 (`read_line`); other bytes end the client there.
    let Ok(line) = std::str::from_utf8(bytes) else {
        return;
    };
    match parse_request(line) {
        Ok(request) => {
            assert!(line.len() <= MAX_REQUEST);
            let encoded = serde_json::to_string(&request).expect("a request encodes");
            let again = parse_request(&encoded).expect("an encoded request parses");
            assert_eq!(
                serde_json::to_string(&again).expect("a request encodes"),
                encoded
            );
            if let Request::Tail { filter } = request {
                let t = transition();
                let _ = filter.matches(&t, Some((4242, "leaky")));
                let _ = filter.matches(&t, None);
            }
        }
        Err(RequestError::TooLong) => assert!(line.len() > MAX_REQUEST),
        Err(e @ RequestError::Bad(_)) => {
            assert!(line.len() <= MAX_REQUEST);
            let message = e.to_string();
            assert!(message.starts_with("bad request: ") && !message.contains('\n'));
        }
    }
    // The client side: whatever the daemon sent, parsing it returns.
    let _ = serde_json::from_str::<TailLine<'_>>(line);
    let _ = serde_json::from_str::<StatusReport>(line);
}

/// A transition to apply filters to.
fn transition() -> Transition {
    let mut comm = [0u8; 16];
    comm[..5].copy_from_slice(b"leaky");
    Transition {
        ts_ns: 1,
        sock: SocketId(0xffff_8880_0000_0001),
        netns: 4_026_531_833,
        saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        sport: 8080,
        daddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        dport: 40000,
        old: TcpState::Established,
        new: TcpState::CloseWait,
        task: Task {
            pid: 4242,
            tid: 4242,
            comm: Comm(comm),
        },
    }
}
