//! Fuzz target: ring-buffer records through the event decoder and the reorder buffer. Invariants:
//! `tcpwait_agent::fuzzing::event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcpwait_agent::fuzzing::event::run(data));
