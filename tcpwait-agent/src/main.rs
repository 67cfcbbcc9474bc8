//! The `tcpwait` binary: the whole command line lives in the library (`src/lib.rs`), which the
//! fuzz targets share; this is only its entry point.
use std::process::ExitCode;

fn main() -> ExitCode {
    tcpwait_agent::main()
}
