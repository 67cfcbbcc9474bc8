//! Fuzz target: inet_diag datagrams through the answer parser. Invariants:
//! `tcpwait_agent::fuzzing::diag`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcpwait_agent::fuzzing::diag::run(data));
