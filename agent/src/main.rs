//! The `esl-agent` command: argument parsing, logging, signals, exit codes.
//! Everything else lives in the library (`lib.rs` has the map).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use esl_agent::identity::Identity;
use esl_agent::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "esl-agent",
    version,
    about = "Edge agent for electronic shelf label access points"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground until SIGTERM or SIGINT.
    Run {
        #[arg(long, short, default_value = "/etc/esl-agent/agent.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective config (secrets redacted).
    CheckConfig {
        #[arg(long, short, default_value = "/etc/esl-agent/agent.toml")]
        config: PathBuf,
    },
    /// Run broker, agent, simulated tags and back end on this machine and show what happens.
    #[cfg(feature = "demo")]
    Demo(esl_agent::demo::DemoOptions),
}

/// Exit code for a config or identity problem (nothing was started).
const EXIT_CONFIG: u8 = 2;

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Under systemd (journald) and procd (logd) stderr is no terminal:
        // colour codes would end up in the log as garbage.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("esl-agent: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&config.log.level);
            runtime().block_on(run(config))
        }
        #[cfg(feature = "demo")]
        Command::Demo(options) => {
            init_logging(if options.verbose { "info" } else { "warn" });
            runtime().block_on(async {
                match esl_agent::demo::run(options).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("esl-agent demo: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // Two worker threads are plenty for an AP; building a runtime only fails
    // when the OS refuses threads, and then nothing can run anyway.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("esl-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let identity = match Identity::resolve(&config) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("esl-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    println!("# {} is valid", path.display());
    println!("# client id:    {}", identity.client_id);
    println!("# task topic:   {}", identity.task_topic);
    println!("# command topic:{}", identity.cmd_topic);
    println!("# status topic: {}", identity.status_topic);
    println!(
        "# ack topic:    {}",
        identity.reply_topic(&config.mqtt.ack_to)
    );
    for w in &identity.warnings {
        println!("# warning: {w}");
    }
    print!("{}", config.redacted_toml());
    ExitCode::SUCCESS
}

async fn run(config: Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    let agent = match esl_agent::start(config, shutdown.clone()).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("cannot start: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
    let result = agent.wait().await;
    signals.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Only this function handles signals: SIGTERM or SIGINT → shutdown.
async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
    shutdown.cancel();
}
