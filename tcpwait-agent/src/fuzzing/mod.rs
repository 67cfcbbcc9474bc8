//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer): one per parser of
//! untrusted bytes. Each takes the fuzzer's input, runs the parser the agent runs and asserts
//! the invariants that must hold for any input; a panic is a finding. Built for `cfg(fuzzing)`
//! (cargo fuzz sets it) and for tests, where [`tests`] replays every committed seed and
//! regression input on the stable toolchain.
pub mod api;
pub mod config;
pub mod diag;
pub mod event;
pub mod proc_files;

/// A target's entry point: takes the fuzzer's input, panics on a finding.
pub type Target = fn(&[u8]);

/// The targets by name: `fuzz/fuzz_targets/<name>.rs`, seeds in `fuzz/corpus/<name>/`, inputs
/// that once failed in `fuzz/regressions/<name>/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("event", event::run),
    ("inet_diag", diag::run),
    ("proc", proc_files::run),
    ("config", config::run),
    ("api_request", api::run),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::TARGETS;

    /// The files of `dir` (none if it does not exist), sorted.
    fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Every seed and every past finding still passes its target's invariants (a finding fixed
    /// once stays fixed without the fuzzer).
    #[test]
    fn committed_inputs_pass() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        for (name, run) in TARGETS {
            let seeds = inputs(&fuzz.join("corpus").join(name));
            assert!(seeds.len() >= 3, "{name}: {} seeds", seeds.len());
            for file in seeds
                .iter()
                .chain(&inputs(&fuzz.join("regressions").join(name)))
            {
                let bytes = std::fs::read(file).expect("a committed input");
                if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                    panic!("{name} fails on {}", file.display());
                }
            }
        }
    }
}
