//! The `tcpwait` agent as a library: the module tree and the whole command line behind
//! [`main`]. `src/main.rs` is only the binary's entry point; the library exists so the fuzz
//! targets under `fuzz/` can reach the parsers (`fuzzing`, built for them and for tests only).
//! Nothing else is public, so the dead-code lints still see every unused item.
use std::process::ExitCode;

use clap::Parser as _;

mod api;
mod cli;
mod client;
mod config;
mod daemon;
mod docs;
mod event;
mod filter;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod logging;
mod model;
mod output;
mod owners;
mod probe;
mod resets;
mod trace;
mod tracker;

/// Parses the arguments, sets up logging, runs the command and maps its error to an exit code
/// (1 for runtime errors, 2 for usage errors — clap's own).
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcpwait: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Log lines still queued for stderr get a moment to be written (never a hang).
    logging::flush(std::time::Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the cause and its fix, then the chain of underlying errors.
            eprintln!("tcpwait: {e:#}");
            // A bad configuration is a usage error, like a bad flag.
            if e.downcast_ref::<config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        cli::Command::Trace(args) => trace::run(args).await,
        cli::Command::Run(args) => daemon::run(args).await,
        cli::Command::Config(args) => match args.check {
            Some(path) => {
                config::Config::load(Some(&path))?;
                println!("{}: valid", path.display());
                Ok(ExitCode::SUCCESS)
            }
            None => {
                print!("{}", config::DEFAULT_CONFIG);
                Ok(ExitCode::SUCCESS)
            }
        },
        cli::Command::Completions(args) => {
            docs::completions(args.shell, &mut std::io::stdout().lock());
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Man(args) => {
            use anyhow::Context as _;
            match args.dir {
                Some(dir) => {
                    let written = docs::man_pages_to(&dir).with_context(|| {
                        format!(
                            "cannot write the manual pages into {}: check the directory exists and is writable",
                            dir.display()
                        )
                    })?;
                    for path in written {
                        println!("{}", path.display());
                    }
                }
                None => docs::man_page(&mut std::io::stdout().lock())
                    .context("cannot write the manual page to stdout")?,
            }
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Status(args) => {
            client::status(&args.socket, args.json, args.port, args.timeout).await
        }
        cli::Command::Tail(args) => {
            let format = if args.json {
                output::Format::Json
            } else {
                output::Format::Text
            };
            client::tail(&args.socket, args.filter.to_filter(), format, args.timeout).await
        }
    }
}
