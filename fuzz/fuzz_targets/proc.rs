//! Fuzz target: /proc files (fd and namespace links, cmdline, stat, cgroup, fdinfo) through their
//! parsers. Invariants: `tcpwait_agent::fuzzing::proc_files`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcpwait_agent::fuzzing::proc_files::run(data));
