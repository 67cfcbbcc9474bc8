//! How transitions are shown: one text line or one JSON object per transition.
//!
//! Anything that comes from a process (its `comm`, later its command line) is escaped before it
//! reaches a terminal: a task can name itself with escape sequences.
use std::{borrow::Cow, fmt::Write as _, io, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::event::Transition;

mod owner;
pub use owner::{OwnerFields, OwnerView};

/// How often [`Clock::refresh`] measures the offset again: NTP slews CLOCK_REALTIME by at most
/// 500 ppm (0.5 ms per second), and a step (`date -s`, a resumed VM) shows within a second.
pub const CLOCK_REFRESH_NS: u64 = 1_000_000_000;

/// Converts kernel CLOCK_MONOTONIC timestamps (`bpf_ktime_get_ns`) to wall-clock time, with
/// one CLOCK_REALTIME − CLOCK_MONOTONIC offset measured at start and again at most every
/// [`CLOCK_REFRESH_NS`] by [`Clock::refresh`]: two clock reads per refresh, none per event.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, in ns.
    offset_ns: i128,
    /// When the offset was measured (CLOCK_MONOTONIC ns).
    measured_ns: u64,
}

impl Clock {
    /// Measures the offset between the two clocks now.
    pub fn now() -> Self {
        // The realtime read between two monotonic ones: the midpoint of those is the
        // monotonic time it matches, within half their gap (tens of ns).
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_MONOTONIC);
        let mono = before + (after - before) / 2;
        Self {
            offset_ns: i128::from(real) - i128::from(mono),
            measured_ns: mono,
        }
    }

    /// Measures the offset again if it is [`CLOCK_REFRESH_NS`] old at `mono_now_ns`
    /// (CLOCK_MONOTONIC ns): called once per batch of events, not per event.
    pub fn refresh(&mut self, mono_now_ns: u64) {
        if mono_now_ns >= self.measured_ns + CLOCK_REFRESH_NS {
            *self = Self::now();
        }
    }

    /// A clock with a given offset, for tests.
    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self {
            offset_ns,
            measured_ns: 0,
        }
    }

    /// Wall-clock ns since the Unix epoch for a monotonic timestamp.
    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }

    /// The wall-clock time of a monotonic timestamp.
    pub fn wall(&self, mono_ns: u64) -> WallTime {
        WallTime(self.wall_ns(mono_ns))
    }
}

/// A wall-clock time (ns since the Unix epoch) that serializes as RFC 3339, UTC, with
/// microseconds (`2026-12-05T22:07:15.493015Z`): the `time` key of every JSON record, next to
/// its CLOCK_MONOTONIC `ts_ns`, so a record can be placed in time after a reboot or on
/// another machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallTime(pub i128);

impl WallTime {
    /// As a [`std::time::SystemTime`] (the epoch for a time before it, which no clock gives).
    pub fn system_time(self) -> std::time::SystemTime {
        let ns = u64::try_from(self.0).unwrap_or(0);
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns)
    }
}

impl std::fmt::Display for WallTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        humantime::format_rfc3339_micros(self.system_time()).fmt(f)
    }
}

impl Serialize for WallTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WallTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<'de, str>::deserialize(d)?;
        let t = humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)?;
        let ns = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(serde::de::Error::custom)?
            .as_nanos();
        Ok(Self(i128::try_from(ns).map_err(serde::de::Error::custom)?))
    }
}

/// Reads a clock in ns.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether `c` must not reach a terminal or a log line raw: control characters (C0, DEL, C1:
/// cursor movement, colours, forged lines), format characters (Unicode category Cf: the bidi
/// overrides and isolates that reorder what a reader sees, zero-width characters that hide
/// text, the BOM) and the line and paragraph separators U+2028/U+2029 (a new line to many
/// viewers and to JavaScript).
pub fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}')
        // Unicode 16 category Cf.
        || matches!(c as u32,
            0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x890..=0x891 | 0x8E2 | 0x180E
            | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF
            | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

/// Escapes the characters of [`must_escape`] as `\xNN` (below U+0100) or `\u{NNNN}`, and a
/// backslash as `\\`, so process-supplied text (comm, command line, cgroup) cannot move the
/// cursor, recolour, reorder or forge lines on a terminal. The one escaping of every text
/// output: status, alert lines, tail/trace text, metric label values.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| must_escape(c) || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x100 && must_escape(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if must_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Re-escapes a serialized JSON text so that it holds none of the [`must_escape`] characters
/// raw: serde_json escapes C0 controls only, and leaves DEL, C1, bidi overrides and U+2028 in
/// strings as they are. They become `\uXXXX` escapes (a surrogate pair above U+FFFF), which
/// decode to the same string: a JSON consumer sees no difference, a terminal sees no control.
pub fn escape_json(json: &str) -> Cow<'_, str> {
    // JSON whitespace outside strings (pretty printing) stays: serde_json escapes it inside.
    let bad = |c: char| must_escape(c) && !matches!(c, '\n' | '\r' | '\t');
    if !json.chars().any(bad) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    let mut units = [0u16; 2];
    for c in json.chars() {
        if bad(c) {
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Appends `value` as one JSON line (newline-terminated), escaped by [`escape_json`].
pub fn write_json_line(buf: &mut Vec<u8>, value: &impl Serialize) -> serde_json::Result<()> {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, value)?;
    // ASCII-only output (the common case) needs no second look.
    if !buf[start..].is_ascii() {
        let text = std::str::from_utf8(&buf[start..]).expect("serde_json writes UTF-8");
        if let Cow::Owned(escaped) = escape_json(text) {
            buf.truncate(start);
            buf.extend_from_slice(escaped.as_bytes());
        }
    }
    buf.push(b'\n');
    Ok(())
}

/// `addr:port`, with IPv6 addresses in brackets.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// `HH:MM:SS.uuuuuu` UTC for a wall-clock time in ns since the epoch: the time of day of its
/// RFC 3339 form (`2026-12-05T01:02:03.000004Z`).
pub fn time_of_day(wall_ns: i128) -> String {
    let rfc3339 = WallTime(wall_ns).to_string();
    rfc3339[11..26].to_owned()
}

/// One transition as printed, text or JSON; the schema of `trace --json` and `tail --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TransitionRecord<'a> {
    /// CLOCK_MONOTONIC ns (the kernel's timestamp).
    pub ts_ns: u64,
    /// `ts_ns` as wall-clock time; `null` in a record of an agent that predates it.
    #[serde(default)]
    pub time: Option<WallTime>,
    /// Kernel socket address, hex.
    pub skaddr: String,
    /// Inode number of the socket's network namespace; `null` when unknown (absent from a
    /// record of an agent that predates it, hence the default).
    #[serde(default)]
    pub netns: Option<u32>,
    /// On-CPU process id (not necessarily the owner).
    pub pid: u32,
    /// On-CPU thread id.
    pub tid: u32,
    /// On-CPU task name.
    pub comm: Cow<'a, str>,
    /// 4 or 6.
    pub family: u8,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    /// Old state, kernel spelling (`ESTABLISHED`).
    pub old: Cow<'a, str>,
    /// New state.
    pub new: Cow<'a, str>,
    /// Milliseconds spent in `old`, when the socket was seen entering it.
    pub ms_in_old: Option<f64>,
    /// Holder of the socket (the daemon's `tail`; absent from `trace`).
    #[serde(flatten)]
    pub owner: OwnerFields,
}

impl<'a> TransitionRecord<'a> {
    /// Builds the record of a transition that happened at `time` (its `ts_ns` by a
    /// [`Clock`]).
    pub fn new(
        t: &'a Transition,
        ns_in_old: Option<u64>,
        owner: Option<&OwnerView>,
        time: WallTime,
    ) -> Self {
        Self {
            ts_ns: t.ts_ns,
            time: Some(time),
            skaddr: t.sock.to_string(),
            netns: (t.netns != 0).then_some(t.netns),
            pid: t.task.pid,
            tid: t.task.tid,
            comm: t.task.comm.to_string_lossy(),
            family: t.family(),
            saddr: t.saddr.to_string(),
            sport: t.sport,
            daddr: t.daddr.to_string(),
            dport: t.dport,
            old: Cow::Borrowed(t.old.name()),
            new: Cow::Borrowed(t.new.name()),
            ms_in_old: ns_in_old.map(|ns| ns as f64 / 1e6),
            owner: OwnerFields::new(owner),
        }
    }
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// The header line of the text format.
pub const TEXT_HEADER: &str = "TIME(UTC)        PID     COMM             LOCAL -> REMOTE                                 OLD -> NEW                 MS";

/// Writes one transition in the chosen format, newline-terminated.
pub fn write_record(
    w: &mut impl io::Write,
    format: Format,
    clock: &Clock,
    r: &TransitionRecord<'_>,
) -> io::Result<()> {
    match format {
        Format::Json => {
            let mut line = Vec::with_capacity(320);
            write_json_line(&mut line, r).map_err(io::Error::other)?;
            w.write_all(&line)
        }
        Format::Text => {
            let ms = r
                .ms_in_old
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}"));
            // The record may come from a daemon over the API socket: a bad address is an
            // error to report, not a reason to panic.
            let ip = |a: &str| {
                a.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad address {a:?}"))
                })
            };
            let (s, d) = (
                endpoint(ip(&r.saddr)?, r.sport),
                endpoint(ip(&r.daddr)?, r.dport),
            );
            let owner = r.owner.text();
            writeln!(
                w,
                "{} {:<7} {:<16} {:<47} {:<26} {ms}{owner}",
                // The record's own time when it has one (a daemon's clock), else this one's.
                time_of_day(r.time.map_or_else(|| clock.wall_ns(r.ts_ns), |t| t.0)),
                r.pid,
                escape_control(&r.comm),
                format!("{s} -> {d}"),
                format!("{} -> {}", r.old, r.new),
            )
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Comm, SocketId, Task, TcpState};

    /// A transition whose task names itself with an escape sequence.
    pub(crate) fn sample() -> Transition {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"evil\x1b[");
        Transition {
            ts_ns: 5_000_000_000,
            sock: SocketId(0xffff_0000_0000_1000),
            netns: 4_026_532_301,
            saddr: "::1".parse().expect("literal"),
            sport: 8080,
            daddr: "::1".parse().expect("literal"),
            dport: 40000,
            old: TcpState::Established,
            new: TcpState::CloseWait,
            task: Task {
                pid: 10,
                tid: 11,
                comm: Comm(comm),
            },
        }
    }

    #[test]
    fn escapes_control_characters() {
        assert_eq!(escape_control("plain"), "plain");
        assert_eq!(
            escape_control("a\x1b[31mb\n\u{85}\\"),
            "a\\x1b[31mb\\x0a\\x85\\\\"
        );
    }

    #[test]
    fn escapes_format_and_separator_characters() {
        // BEL, DEL, soft hyphen, bidi override, zero-width space, line and paragraph
        // separators, word joiner, BOM, a tag character; accents and CJK pass.
        assert_eq!(
            escape_control(
                "\x07\x7f\u{ad}gnp\u{202e}txt\u{200b}\u{2028}\u{2029}\u{2060}\u{feff}\u{e0041}é漢"
            ),
            "\\x07\\x7f\\xadgnp\\u{202e}txt\\u{200b}\\u{2028}\\u{2029}\\u{2060}\\u{feff}\\u{e0041}é漢"
        );
    }

    #[test]
    fn json_lines_hold_no_raw_control_format_or_separator() {
        let v = serde_json::json!({ "comm": "a\u{1b}\u{7}\u{85}\u{202e}\u{2028}\u{e0041}é" });
        let mut buf = Vec::new();
        write_json_line(&mut buf, &v).expect("write");
        assert_eq!(
            String::from_utf8(buf.clone()).expect("utf-8"),
            "{\"comm\":\"a\\u001b\\u0007\\u0085\\u202e\\u2028\\udb40\\udc41é\"}\n"
        );
        let back: serde_json::Value = serde_json::from_slice(&buf).expect("still JSON");
        assert_eq!(back, v, "decodes to the same string");
        // Pretty-printed: the structural newlines stay.
        let pretty = serde_json::to_string_pretty(&v).expect("pretty");
        let escaped = escape_json(&pretty);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&escaped).expect("still JSON"),
            v
        );
        assert!(escaped.contains('\n') && !escaped.contains('\u{202e}'));
    }

    #[test]
    fn json_has_the_documented_keys() {
        let t = sample();
        // 2026-12-05 22:07:15.493015 UTC at ts_ns 5 s, 789 ns more than whole µs: truncated.
        let clock = Clock::with_offset(1_796_508_435_493_015_789 - 5_000_000_000);
        let r = TransitionRecord::new(&t, Some(1_500_000), None, clock.wall(t.ts_ns));
        let mut buf = Vec::new();
        write_record(&mut buf, Format::Json, &Clock::with_offset(0), &r).expect("write");
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("valid JSON");
        assert_eq!(v["ts_ns"], 5_000_000_000u64);
        assert_eq!(v["time"], "2026-12-05T22:07:15.493015Z");
        assert_eq!(v["pid"], 10);
        assert_eq!(v["comm"], "evil\u{1b}[");
        assert_eq!(v["family"], 6);
        assert_eq!(v["saddr"], "::1");
        assert_eq!(v["sport"], 8080);
        assert_eq!(v["dport"], 40000);
        assert_eq!(v["old"], "ESTABLISHED");
        assert_eq!(v["new"], "CLOSE_WAIT");
        assert_eq!(v["ms_in_old"], 1.5);
        assert_eq!(v["skaddr"], "0xffff000000001000");
        assert_eq!(v["netns"], 4_026_532_301u32);
        assert!(v.get("owner_pid").is_none());
        // serde_json escapes the ESC byte itself: the raw line holds no control character.
        assert!(!buf[..buf.len() - 1].iter().any(|b| b.is_ascii_control()));
    }

    #[test]
    fn unknown_namespace_is_null_in_json() {
        let t = Transition {
            netns: 0,
            ..sample()
        };
        let mut buf = Vec::new();
        let r = TransitionRecord::new(&t, None, None, WallTime(0));
        write_record(&mut buf, Format::Json, &Clock::with_offset(0), &r).expect("write");
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("valid JSON");
        assert_eq!(v.get("netns"), Some(&serde_json::Value::Null));
        // A record from an agent without the key reads as unknown.
        let mut old = v.clone();
        old.as_object_mut().expect("object").remove("netns");
        let back: TransitionRecord<'_> = serde_json::from_value(old).expect("old record");
        assert_eq!(back.netns, None);
    }

    #[test]
    fn text_line_is_escaped_and_complete() {
        let t = sample();
        // 1 h 2 min 3.000004 s after midnight, by the record's clock (the reader's differs).
        let clock = Clock::with_offset(3_723_000_004_000 - 5_000_000_000);
        let r = TransitionRecord::new(&t, None, None, clock.wall(t.ts_ns));
        let mut buf = Vec::new();
        write_record(&mut buf, Format::Text, &Clock::with_offset(0), &r).expect("write");
        let line = String::from_utf8(buf).expect("utf-8");
        assert!(
            line.starts_with("01:02:03.000004 10      evil\\x1b[ "),
            "{line}"
        );
        assert!(line.contains("[::1]:8080 -> [::1]:40000"), "{line}");
        assert!(line.contains("ESTABLISHED -> CLOSE_WAIT"), "{line}");
        assert!(line.trim_end().ends_with(" -"), "{line}");
    }
}
