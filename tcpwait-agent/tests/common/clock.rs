//! Checks of the wall-clock `time` keys of the agent's JSON records against this machine's
//! clocks, measured by the test itself.
use std::time::UNIX_EPOCH;

use serde_json::Value;

/// How far a record's `time` may be from the system clock's reading for its monotonic stamp.
pub const WALL_TOLERANCE_NS: i128 = 50_000_000;

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now, as this test reads them.
pub fn realtime_offset_ns() -> i128 {
    let before = clock_ns(libc::CLOCK_MONOTONIC);
    let real = clock_ns(libc::CLOCK_REALTIME);
    let after = clock_ns(libc::CLOCK_MONOTONIC);
    real - (before + after) / 2
}

/// Parses a `time` value: RFC 3339, UTC (`Z`), exactly six fractional digits. Returns ns since
/// the epoch.
pub fn parse_wall(v: &Value) -> i128 {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("time is not a string: {v}"));
    // 2026-12-05T22:07:15.493015Z
    assert_eq!(
        (text.len(), &text[10..11], &text[19..20], &text[26..]),
        (27, "T", ".", "Z"),
        "not RFC 3339 UTC with µs: {text}"
    );
    let t = humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    i128::try_from(t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos()).expect("fits")
}

/// Asserts that `time` is the wall-clock time of CLOCK_MONOTONIC `mono_ns` by this machine's
/// clocks (`offset_ns`, from [`realtime_offset_ns`]), within [`WALL_TOLERANCE_NS`]. Returns
/// the difference, ns.
pub fn assert_wall_time(what: &str, mono: &Value, time: &Value, offset_ns: i128) -> i128 {
    let mono = i128::from(
        mono.as_u64()
            .unwrap_or_else(|| panic!("{what}: no monotonic stamp: {mono}")),
    );
    let diff = parse_wall(time) - (mono + offset_ns);
    assert!(
        diff.abs() <= WALL_TOLERANCE_NS,
        "{what}: time {time} is {} ms off the system clock for {mono} ns",
        diff as f64 / 1e6
    );
    diff
}
