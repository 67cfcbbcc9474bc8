//! The event decoder (`event::decode`) over ring-buffer records, split into events and put in
//! time order as `Probe::drain` does (`probe::reorder`).
use tcpwait_common::{AF_INET, AF_INET6, TRANSITION_EVENT_SIZE, TransitionEvent};

use crate::{
    event::{DecodeError, TcpState, Transition, decode},
    probe::reorder::Reorder,
};

/// One ring-buffer record. Invariants: a record of exactly one event decodes to a transition
/// that encodes back to the same bytes (less those the decoder ignores), or to the typed error
/// that names the bad field's value; every other length is refused with that length; a record
/// of whole events is handed on complete, in `ts_ns` order, with `late` counting exactly the
/// events that arrived after a later one was handed on.
pub fn run(record: &[u8]) {
    check_one(record);
    // `Probe::drain`: a record that is not whole events goes to the decoder as it is.
    let events = record.chunks_exact(TRANSITION_EVENT_SIZE);
    if record.is_empty() || !events.remainder().is_empty() {
        return;
    }
    let events: Vec<[u8; TRANSITION_EVENT_SIZE]> = events
        .map(|e| e.try_into().expect("a whole chunk"))
        .collect();
    for e in &events {
        check_one(e);
    }
    // The first half arrives, the watermark reaches the first event's time, then the rest
    // arrives and everything is released (as at stop).
    let ts = |e: &[u8]| u64::from_ne_bytes(e[..8].try_into().expect("8 bytes"));
    let (first, second) = events.split_at(events.len().div_ceil(2));
    let upto = ts(&events[0]);
    let mut reorder = Reorder::default();
    let mut released: Vec<Vec<u8>> = Vec::new();
    first.iter().for_each(|e| reorder.push(e));
    let n1 = reorder.release(upto, |e| released.push(e.to_vec()));
    let due = first.iter().filter(|e| ts(&e[..]) <= upto).count();
    assert_eq!(n1, due, "every held event up to the watermark, no other");
    assert_eq!(released.len(), n1);
    let max1 = released.iter().map(|e| ts(e)).max().unwrap_or(0);
    second.iter().for_each(|e| reorder.push(e));
    let n2 = reorder.release(u64::MAX, |e| released.push(e.to_vec()));
    assert_eq!(n1 + n2, events.len(), "everything is handed on at the end");
    for part in [&released[..n1], &released[n1..]] {
        assert!(
            part.windows(2).all(|w| ts(&w[0]) <= ts(&w[1])),
            "each release is in time order"
        );
    }
    let late = second.iter().filter(|e| ts(&e[..]) < max1).count() as u64;
    assert_eq!(
        reorder.late(),
        late,
        "late counts exactly the overtaken events"
    );
    // Nothing lost, nothing duplicated: the same multiset of events.
    let mut sent: Vec<&[u8]> = events.iter().map(|e| &e[..]).collect();
    let mut got: Vec<&[u8]> = released.iter().map(Vec::as_slice).collect();
    sent.sort_unstable();
    got.sort_unstable();
    assert_eq!(sent, got);
}

/// Decodes one record and checks the outcome against its bytes.
fn check_one(bytes: &[u8]) {
    let len = bytes.len();
    match decode(bytes) {
        Ok(t) => {
            assert_eq!(encode(&t), canonical(bytes), "decode then encode: {t:?}");
            assert_eq!(decode(&encode(&t)), Ok(t));
        }
        Err(DecodeError::Truncated(n)) => assert!(n == len && n < TRANSITION_EVENT_SIZE),
        Err(DecodeError::Oversize(n)) => assert!(n == len && n > TRANSITION_EVENT_SIZE),
        Err(DecodeError::UnknownFamily(f)) => {
            assert_eq!(len, TRANSITION_EVENT_SIZE);
            assert_eq!(f, u16::from_ne_bytes([bytes[76], bytes[77]]));
            assert!(f != AF_INET && f != AF_INET6);
        }
        Err(DecodeError::UnknownState(s)) => {
            assert_eq!(len, TRANSITION_EVENT_SIZE);
            assert!(s == bytes[78] || s == bytes[79]);
            assert!(TcpState::try_from(s).is_err());
        }
    }
}

/// The bytes the kernel program would write for `t` (the wire layout of `TransitionEvent`).
fn encode(t: &Transition) -> Vec<u8> {
    let addr = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        std::net::IpAddr::V6(a) => a.octets(),
    };
    let ev = TransitionEvent {
        ts_ns: t.ts_ns,
        skaddr: t.sock.0,
        pid_tgid: (u64::from(t.task.pid) << 32) | u64::from(t.task.tid),
        saddr: addr(t.saddr),
        daddr: addr(t.daddr),
        comm: t.task.comm.0,
        sport: t.sport,
        dport: t.dport,
        family: if t.saddr.is_ipv4() { AF_INET } else { AF_INET6 },
        oldstate: t.old as u8,
        newstate: t.new as u8,
        netns: t.netns,
        reserved: 0,
    };
    // SAFETY: `TransitionEvent` is `repr(C)`, integers only, without implicit padding (its
    // size is asserted to be the sum of its fields), so all its bytes are initialized.
    unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), TRANSITION_EVENT_SIZE)
    }
    .to_vec()
}

/// `bytes` with the fields the decoder ignores zeroed: the reserved word, and for IPv4 the
/// address bytes past the first four.
fn canonical(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[84..88].fill(0);
    if u16::from_ne_bytes([b[76], b[77]]) == AF_INET {
        b[28..40].fill(0);
        b[44..56].fill(0);
    }
    b
}
