//! A kernel's results as the guest (or the host run) left them, read back into one row, and
//! the table of rows.
use std::{fmt::Write as _, path::Path};

/// One kernel's result.
pub(super) struct Row {
    pub(super) kernel: String,
    pub(super) programs: String,
    pub(super) passed: usize,
    pub(super) failed: Vec<String>,
    pub(super) secs: f64,
    /// Warnings and the start-up line of the release binary, shown under the table.
    pub(super) notes: Vec<String>,
    /// Set when the guest never reached or never finished the tests.
    pub(super) broken: Option<String>,
}

/// The message a failed test panicked with, from libtest's `---- NAME stdout ----` section of
/// `log`: the lines after "panicked at", joined, at most 600 characters (the whole log stays in
/// the run directory; CI shows only this row).
fn panic_message(log: &str, name: &str) -> Option<String> {
    let section = log.split(&format!("---- {name} stdout ----")).nth(1)?;
    let after = section.split_once("panicked at ")?.1;
    let mut why = after
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("note: ") && !l.starts_with("---- "))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if why.chars().count() > 600 {
        why = why.chars().take(600).collect::<String>() + " …";
    }
    (!why.is_empty()).then_some(why)
}

/// Reads what a run left in `out`.
pub(super) fn read_results(out: &Path, secs: f64) -> Row {
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap_or_default();
    let mut logs: Vec<String> = std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("tests-") && n.ends_with(".log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    let startup = read("startup.log");
    let programs = startup
        .lines()
        .find_map(|l| {
            let rest = l.split("tracing TCP state transitions (").nth(1)?;
            let inner = rest.rsplit_once(')')?.0;
            Some(inner.split_once(", ").map_or(inner, |x| x.1).to_owned())
        })
        // The start-up line names only what is missing; the table says both ways.
        .map(|p| {
            let btf = p.starts_with("BTF tracepoint");
            format!(
                "{}, {}, {}",
                if btf {
                    "BTF tracepoint"
                } else {
                    "classic tracepoint"
                },
                if btf && !p.contains("unbatched") {
                    "batched"
                } else {
                    "unbatched"
                },
                if p.contains("no rescue") {
                    "no rescue"
                } else {
                    "rescue"
                }
            )
        })
        .unwrap_or_else(|| "did not start".to_owned());
    let startup = strip_ansi(&startup);
    let notes = startup
        .lines()
        .filter(|l| {
            l.contains("WARN")
                || l.contains("transitions seen")
                || l.contains("exit status")
                || l.contains("did not exit")
        })
        .filter(|l| !l.ends_with("exit status 0"))
        .map(|l| l.trim().to_owned())
        // Where a `tcpwait trace` that ignored SIGINT was stuck, thread by thread.
        .chain(
            read("hung-stacks")
                .lines()
                .filter(|l| l.starts_with("thread "))
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        )
        // Where its start-up went (debug lines `start-up: <phase> ms=<since start>`).
        .chain({
            let phases: Vec<String> = startup
                .lines()
                .filter_map(|l| {
                    let rest = l.split("start-up: ").nth(1)?;
                    let (what, ms) = rest.rsplit_once(" ms=")?;
                    Some(format!("{what} {ms}"))
                })
                .collect();
            (!phases.is_empty())
                .then(|| format!("start-up phases (ms since start): {}", phases.join(", ")))
        })
        // What the verifier went through per program (debug line `start-up: instructions
        // verified: <program> <count>, …`).
        .chain(startup.lines().find_map(|l| {
            l.split("start-up: instructions verified: ")
                .nth(1)
                .map(|rest| format!("instructions verified: {}", rest.trim()))
        }))
        // How long `tcpwait trace` took from exec to its "tracing" line (guest uptime).
        .chain(
            read("startup-time")
                .split_whitespace()
                .collect::<Vec<_>>()
                .get(1..3)
                .and_then(|t| {
                    let (a, b) = (t[0].parse::<f64>().ok()?, t[1].parse::<f64>().ok()?);
                    Some(format!("start-up of `tcpwait trace`: {:.1} s", b - a))
                }),
        )
        // What the tests print about the kernel (the stress test: nested transitions seen).
        .chain(logs.iter().flat_map(|log| {
            read(log)
                .lines()
                .filter(|l| l.starts_with("stress: "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        }))
        .collect();
    let (mut passed, mut failed) = (0, Vec::new());
    for log in &logs {
        let t = log.trim_start_matches("tests-").trim_end_matches(".log");
        let text = read(log);
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("test ") else {
                continue;
            };
            if rest.ends_with(" ... ok") {
                passed += 1;
            } else if rest.ends_with(" ... FAILED") {
                let name = rest.trim_end_matches(" ... FAILED");
                failed.push(match panic_message(&text, name) {
                    Some(why) => format!("{t}::{name}: {why}"),
                    None => format!("{t}::{name}"),
                });
            }
        }
    }
    let broken = if read("finished").is_empty() {
        Some("the tests did not finish".to_owned())
    } else if passed == 0 && failed.is_empty() {
        Some("no test ran".to_owned())
    } else {
        None
    };
    Row {
        kernel: read("kernel").trim().to_owned(),
        programs,
        passed,
        failed,
        secs,
        notes,
        broken,
    }
}

/// Drops terminal colour sequences (`ESC [ … m`) from tracing's output.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(super) fn table(rows: &[Row]) -> String {
    let mut t = format!(
        "{:<24} {:<58} {:<22} {:>6}\n",
        "KERNEL", "PROGRAMS", "TESTS", "TIME"
    );
    for r in rows {
        let tests = match &r.broken {
            Some(why) => format!("BROKEN: {why}"),
            None => format!("{} passed, {} failed", r.passed, r.failed.len()),
        };
        let _ = writeln!(
            t,
            "{:<24} {:<58} {:<22} {:>5.0}s",
            r.kernel, r.programs, tests, r.secs
        );
        for f in &r.failed {
            let _ = writeln!(t, "    FAILED {f}");
        }
        for n in &r.notes {
            let _ = writeln!(t, "    {n}");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::panic_message;

    #[test]
    fn the_panic_message_of_a_failed_test_is_found() {
        let log = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                   ---- b stdout ----\nsome output\n\nthread 'b' panicked at tests/x.rs:3:5:\n\
                   assertion `left == right` failed: table has 79\n  left: 1\n right: 2\n\
                   note: run with `RUST_BACKTRACE=1`\n\n\nfailures:\n    b\n";
        assert_eq!(
            panic_message(log, "b").as_deref(),
            Some("assertion `left == right` failed: table has 79 left: 1 right: 2")
        );
        assert_eq!(panic_message(log, "a"), None);
    }
}
