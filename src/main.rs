//! The `raft-elector` binary: parses flags, sets up logging, runs a subcommand.

use clap::Parser;
use raft_elector::cli::{exit_code_for, Cli, Command, LogFormat};
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Demo(args) => demo(args),
        Command::Crd => crd(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft-elector: {e:#}");
            ExitCode::from(exit_code_for(e.as_ref()) as u8)
        }
    }
}

fn run(args: raft_elector::cli::RunArgs) -> anyhow::Result<()> {
    let cfg = args.validate()?;
    init_logging(cfg.log_format, &cfg.log_level);
    // One thread: a sidecar's work is a few small messages every heartbeat,
    // and cross-thread wakeups would cost more CPU than the work itself.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(raft_elector::app::run(cfg, shutdown_signal()))
}

fn crd() -> anyhow::Result<()> {
    print!("{}", raft_elector::kube::crd::crd_yaml()?);
    Ok(())
}

fn demo(args: raft_elector::cli::DemoArgs) -> anyhow::Result<()> {
    let cfg = args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(raft_elector::demo::run_demo(cfg))
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: files, pipes and `kubectl logs`
    // get plain text, and NO_COLOR (no-color.org) turns it off everywhere.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
