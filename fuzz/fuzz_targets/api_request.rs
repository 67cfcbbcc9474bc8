//! Fuzz target: API request lines through the request parser (and the client's answer parsers).
//! Invariants: `tcpwait_agent::fuzzing::api`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcpwait_agent::fuzzing::api::run(data));
