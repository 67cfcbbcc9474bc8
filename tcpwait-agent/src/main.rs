//! The `tcpwait` binary: parse arguments, set up logging, run a command, map errors to an
//! exit code (1 for runtime errors, 2 for usage errors — clap's own).
use std::process::ExitCode;

use clap::Parser as _;

mod api;
mod cli;
mod client;
mod config;
mod daemon;
mod event;
mod filter;
mod model;
mod output;
mod owners;
mod probe;
mod trace;
mod tracker;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
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
    match runtime.block_on(run(cli)) {
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
        cli::Command::Status(args) => client::status(&args.socket, args.json).await,
        cli::Command::Tail(args) => {
            let format = if args.json {
                output::Format::Json
            } else {
                output::Format::Text
            };
            client::tail(&args.socket, args.filter.to_filter(), format).await
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::{
        EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
    };
    let default = match verbose {
        // aya warns when it cannot raise RLIMIT_MEMLOCK after a refused map (kernels before
        // 5.11, unprivileged): the load error that follows names the cause in one line.
        0 => "warn,aya::sys::bpf=error",
        1 => "tcpwait=debug,info",
        _ => "trace",
    };
    let filter =
        || EnvFilter::try_from_env("TCPWAIT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Under systemd (JOURNAL_STREAM is set for the service's stderr), log to the journal with
    // structured fields; elsewhere, to stderr.
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|l| l.with_filter(filter()));
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(journald)
        .with(stderr)
        .init();
}
