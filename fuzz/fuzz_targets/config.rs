//! Fuzz target: configuration files (TOML) through the loader and its validation. Invariants:
//! `tcpwait_agent::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcpwait_agent::fuzzing::config::run(data));
