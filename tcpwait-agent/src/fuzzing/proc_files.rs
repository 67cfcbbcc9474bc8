//! The `/proc` parsers the owner lookup uses: fd links (`socket:[N]`), namespace links
//! (`net:[N]`), `cmdline`, `stat` (through the `procfs` crate: the start time guards against
//! pid reuse), `cgroup` (container, pod and runtime), and a BPF program's `fdinfo`.
//!
//! An input is `<kind>\n<file>`, kind one of [`KINDS`]; any other first line runs every parser
//! on the whole input.
use procfs::FromRead as _;

use crate::owners::{
    cgroup,
    netns::parse_ns_link,
    procs::{join_cmdline, socket_inode},
};

/// The kinds of file, as an input's first line names them.
pub const KINDS: &[&str] = &["fd", "ns", "cmdline", "stat", "cgroup", "fdinfo"];

/// One input. Invariants: each parser returns what the text holds or nothing, never a panic;
/// what the kernel writes for a value parses back to that value.
pub fn run(input: &[u8]) {
    let (kind, file) = match input.iter().position(|&b| b == b'\n') {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (input, &[][..]),
    };
    match kind {
        b"fd" => fd_link(file),
        b"ns" => ns_link(file),
        b"cmdline" => cmdline(file),
        b"stat" => stat(file),
        b"cgroup" => cgroup_file(file),
        b"fdinfo" => fdinfo(file),
        _ => {
            for parse in [fd_link, ns_link, cmdline, stat, cgroup_file, fdinfo] {
                parse(input);
            }
        }
    }
}

/// The number at the start of `bytes`, for round trips (0 if too short).
fn number(bytes: &[u8]) -> u64 {
    let mut n = [0u8; 8];
    let len = bytes.len().min(8);
    n[..len].copy_from_slice(&bytes[..len]);
    u64::from_le_bytes(n)
}

fn fd_link(link: &[u8]) {
    if let Some(inode) = socket_inode(link) {
        let digits = &link[b"socket:[".len()..link.len() - 1];
        assert!(digits.iter().all(u8::is_ascii_digit), "{link:?}");
        assert_eq!(
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok()),
            Some(inode)
        );
    }
    let n = number(link);
    assert_eq!(socket_inode(format!("socket:[{n}]").as_bytes()), Some(n));
    assert_eq!(socket_inode(format!("pipe:[{n}]").as_bytes()), None);
}

fn ns_link(link: &[u8]) {
    if let Some(inode) = parse_ns_link(link) {
        assert!(link.starts_with(b"net:[") && link.ends_with(b"]"));
        assert!(inode.to_string().len() < link.len());
    }
    let n = number(link) as u32;
    assert_eq!(parse_ns_link(format!("net:[{n}]").as_bytes()), Some(n));
}

fn cmdline(raw: &[u8]) {
    let line = join_cmdline(raw);
    assert!(!line.contains('\0'), "{line:?}");
    if let Ok(text) = std::str::from_utf8(raw) {
        let expected = text.trim_end_matches('\0').replace('\0', " ");
        assert_eq!(line, expected);
    }
}

/// `stat` as the kernel writes it (`do_task_stat`: `"%d (%s) %c ..."`), with the input as the
/// process name: up to the kernel's 15 bytes, any byte but NUL (`)`, spaces, newlines and
/// invalid UTF-8 included). The parser gives back that name, lossily decoded, and the start
/// time. Only kernel-shaped lines are fed to it: `procfs` 0.18 slices the text by the parens'
/// positions and panics on text the kernel never writes (no `(`, or a multi-byte character
/// right after the last `)`).
fn stat(file: &[u8]) {
    let comm: Vec<u8> = file.iter().copied().filter(|&b| b != 0).take(15).collect();
    let start = number(file);
    let mut line = b"4242 (".to_vec();
    line.extend_from_slice(&comm);
    line.extend_from_slice(
        format!(
            ") S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 50 \
             18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
        .as_bytes(),
    );
    let stat = procfs::process::Stat::from_read(&line[..])
        .unwrap_or_else(|e| panic!("a kernel-formed stat line is refused: {e}: {line:?}"));
    let expected = String::from_utf8_lossy(&comm);
    // The parser trims the line: a name can only lose what `trim` takes from the whole line,
    // which starts with the pid and ends with the newline.
    assert_eq!(
        (stat.pid, stat.comm.as_str(), stat.starttime),
        (4242, &*expected, start)
    );
    assert_eq!(stat.state, 'S');
}

fn cgroup_file(file: &[u8]) {
    let text = String::from_utf8_lossy(file);
    let context = cgroup::from_proc_cgroup(&text);
    if let Some(path) = cgroup::unified_path(&text) {
        assert!(text.contains(path));
    }
    for ctx in [context, cgroup::parse(&text)] {
        if let Some(id) = &ctx.container_id {
            assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(text.contains(id.as_str()));
        } else {
            assert_eq!(ctx.runtime, None, "a runtime without a container");
        }
        if let Some(uid) = &ctx.pod_uid {
            let shape: String = uid
                .chars()
                .map(|c| if c.is_ascii_hexdigit() { 'x' } else { c })
                .collect();
            assert!(
                shape == "x".repeat(32) || shape == "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
                "{uid:?}"
            );
        }
    }
}

fn fdinfo(file: &[u8]) {
    let text = String::from_utf8_lossy(file);
    let info = crate::probe::parse_fdinfo(&text);
    for (key, value) in &info {
        assert!(!key.contains('\n') && !key.contains(':'));
        assert!(text.contains(&value.to_string()));
    }
    let n = number(file);
    let again = format!("prog_type:\t26\nrun_cnt:\t{n}\nrecursion_misses:\t{n}\n");
    let info = crate::probe::parse_fdinfo(&again);
    assert_eq!((info["run_cnt"], info["recursion_misses"]), (n, n));
}
