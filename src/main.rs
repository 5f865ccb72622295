//! The `credvault` binary: parses the command line and dispatches. `serve` runs the
//! daemon; everything else is a gRPC client of one.

use std::process::ExitCode;

use clap::Parser as _;
use secrecy::ExposeSecret as _;

use credvault::cli::{run_client, Cli, Command};
use credvault::config::{LogFormat, ServeArgs, Settings};
use credvault::server::Daemon;

/// mimalloc instead of the system allocator: see Cargo.toml and BENCHMARKS.md (tuning).
/// Which buffers are zeroized before they are freed does not depend on the allocator
/// (ARCHITECTURE.md, secrets in memory).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Agent(args) => agent(args),
        Command::Run(args) => {
            init_tracing(LogFormat::Text);
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(credvault::cli::run::run_command(*args)) {
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
                }
            }
        }
        Command::Client(cmd) => {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run_client(cmd)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
                }
            }
        }
    }
}

/// `credvault agent`: a bad configuration exits with code 2 and names the field.
fn agent(args: credvault::cli::agent::AgentArgs) -> ExitCode {
    let config = match credvault::cli::agent::AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    init_tracing(LogFormat::Text);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(credvault::cli::agent::run_agent(config, signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let settings = match Settings::load(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Everything secret is in `settings` now: take it out of the environment while this is
    // still the only thread (before the runtime starts its workers).
    let scrubbed = credvault::unlock::scrub_environment(credvault::unlock::SECRET_ENV_VARS);
    init_tracing(settings.log_format);
    if !scrubbed.is_empty() {
        tracing::info!(variables = ?scrubbed, "removed secret variables from the process environment");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = settings.worker_threads {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let mut daemon = Daemon::build(settings).await?;
    if let Some(token) = daemon.take_root_token() {
        // Printed once, to the terminal only (never to the log): only its hash is stored.
        println!("Root token (shown only once; store it safely):\n\n    {}\n", token.expose_secret());
        println!("export CREDVAULT_TOKEN={}", token.expose_secret());
    }
    daemon.run_until(shutdown_signal()).await?;
    Ok(())
}

/// Completes on the first Ctrl-C or SIGTERM. A second one exits at once (code 130),
/// for an operator who will not wait for the drain.
async fn shutdown_signal() {
    signal().await;
    tracing::info!("shutdown requested; finishing in-flight requests");
    tokio::spawn(async {
        signal().await;
        tracing::warn!("second shutdown signal: exiting at once");
        eprintln!("second shutdown signal: exiting at once");
        std::process::exit(130);
    });
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
