//! Shell completions and manual pages from the real binary: each completion script is
//! syntax-checked by its own shell (`bash -n`, `zsh -n`, `fish -n`), and every page renders
//! through `man -l` without a groff warning. No root needed; the shells and man-db come from
//! Debian packages that `cargo xtask test` installs.
use std::{
    path::Path,
    process::{Command, Stdio},
};

fn tcpwait(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpwait"))
        .args(args)
        .output()
        .expect("run tcpwait");
    assert!(
        out.status.success(),
        "tcpwait {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Runs `cmd`; (success, stderr). A missing tool fails the test with its Debian package.
fn run(cmd: &str, args: &[&str], package: &str) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .env("MANWIDTH", "80")
        .stdout(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd}: {e}. Install the Debian package `{package}` (`cargo xtask test` does)")
        });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs bash, zsh and fish (Debian packages); run by `cargo xtask test`, which installs them"]
fn completion_scripts_parse_in_their_shells() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (shell, check) in [
        ("bash", ["-n"]),
        ("zsh", ["-n"]),
        ("fish", ["--no-execute"]),
    ] {
        let script = tcpwait(&["completions", shell]);
        // Every command, and a flag (fish spells it without the dashes).
        for word in [
            "trace",
            "run",
            "status",
            "tail",
            "config",
            "man",
            "close-wait-age",
        ] {
            assert!(script.contains(word), "{shell}: {word} not completed");
        }
        let path = dir.path().join(format!("tcpwait.{shell}"));
        std::fs::write(&path, &script).expect("write");
        let mut args: Vec<&str> = check.to_vec();
        args.push(path.to_str().expect("UTF-8"));
        let (ok, err) = run(shell, &args, shell);
        assert!(ok && err.is_empty(), "{shell} {args:?}: {err}");
        // The check is a real parse: a broken script fails it.
        std::fs::write(&path, format!("{script}\n{{ (\n")).expect("write");
        let (ok, _) = run(shell, &args, shell);
        assert!(!ok, "{shell} {check:?} accepts a broken script");
        eprintln!(
            "completions {shell}: {} bytes, {shell} {check:?} clean",
            script.len()
        );
    }
    let err = Command::new(env!("CARGO_BIN_EXE_tcpwait"))
        .args(["completions", "tcsh"])
        .output()
        .expect("run");
    assert_eq!(
        err.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

fn man(page: &Path) -> (bool, String) {
    run(
        "man",
        &["--warnings", "-l", page.to_str().expect("UTF-8")],
        "man-db",
    )
}

#[test]
#[ignore = "needs man-db and groff-base (Debian packages); run by `cargo xtask test`, which installs them"]
fn man_pages_render_without_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listed = tcpwait(&["man", "--dir", dir.path().to_str().expect("UTF-8")]);
    let mut names: Vec<String> = listed
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .expect("file")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "tcpwait-completions.1",
            "tcpwait-config.1",
            "tcpwait-man.1",
            "tcpwait-run.1",
            "tcpwait-status.1",
            "tcpwait-tail.1",
            "tcpwait-trace.1",
            "tcpwait.1"
        ]
    );
    for name in &names {
        let (ok, err) = man(&dir.path().join(name));
        assert!(ok && err.is_empty(), "man -l {name}: {err}");
    }
    // `tcpwait man` prints the same top page as the one written.
    let top = tcpwait(&["man"]);
    assert_eq!(
        top,
        std::fs::read_to_string(dir.path().join("tcpwait.1")).expect("read")
    );
    let rendered = Command::new("man")
        .args(["-l", dir.path().join("tcpwait.1").to_str().expect("UTF-8")])
        .env("MANWIDTH", "200")
        .output()
        .expect("man");
    let text = String::from_utf8_lossy(&rendered.stdout);
    for needle in [
        "EXAMPLES",
        "tcpwait status",
        "tcpwait tail --port 8080",
        "tcpwait config --check /etc/tcpwait/tcpwait.toml",
        "tcpwait-run(1)",
    ] {
        assert!(text.contains(needle), "{needle} not in the page:\n{text}");
    }
    // Silence means something: a page with an undefined macro is warned about.
    let broken = dir.path().join("broken.1");
    std::fs::write(&broken, format!("{top}.XX undefined\n")).expect("write");
    let (_, err) = man(&broken);
    assert!(err.contains("macro 'XX' not defined"), "{err}");
}

#[test]
fn help_gives_examples_of_the_common_tasks() {
    let help = tcpwait(&["--help"]);
    for example in [
        "tcpwait status",
        "tcpwait tail --port 8080",
        "tcpwait config --check /etc/tcpwait/tcpwait.toml",
    ] {
        assert!(help.contains(example), "{example} not in:\n{help}");
    }
}
