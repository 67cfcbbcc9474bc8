//! The files under deploy/ and the checkers that judge them (promtool, amtool, systemd-analyze),
//! shared by the deploy test binaries. No root needed; a missing checker fails the test.
#![allow(
    dead_code,
    reason = "each deploy test binary uses a different part of this module"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use yaml_rust2::{Yaml, YamlLoader};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn utf8(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs a checker and returns (success, stdout + stderr). A missing checker fails the test
/// with the package to install: these tests must not pass by skipping.
pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let package = match cmd {
        "promtool" => "prometheus",
        "amtool" => "prometheus-alertmanager",
        "systemd-analyze" => "systemd",
        _ => "?",
    };
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {cmd}: {e}. Install the Debian package `{package}` \
             (apt-get install prometheus prometheus-alertmanager systemd; \
             `cargo xtask test` does it)"
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a checker that must succeed.
pub fn check(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = run(cmd, args);
    assert!(ok, "{cmd} {args:?} failed:\n{text}");
    text
}

pub fn yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

pub fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap_or_else(|| panic!("not a list: {y:?}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v:?}"))
                .to_owned()
        })
        .collect()
}
