//! The `esl-agent` command: argument parsing, logging, signals, exit codes.
//! Everything else lives in the library (`lib.rs` has the map).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use esl_agent::cli;
use esl_agent::identity::Identity;
use esl_agent::report;
use esl_agent::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "esl-agent",
    version,
    about = "Edge agent for electronic shelf label access points",
    long_about = "Edge agent for electronic shelf label access points: receives price-change \
tasks over MQTT, stores them durably, delivers them to the tags through a radio backend and \
acks every task to the back end. Exit codes: 0 success, 1 runtime failure, 2 config or \
start-up problem, 3 (status, tags, tasks) no agent running. Documentation: \
/usr/share/doc/esl-agent/ (README, INSTALL, CONFIG, PROTOCOL, COMMANDS, SECURITY, ZIGBEE, BLE)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground until SIGTERM or SIGINT.
    Run {
        /// The config file (TOML; docs/CONFIG.md).
        #[arg(long, short, default_value = "/etc/esl-agent/agent.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective config (secrets redacted).
    CheckConfig {
        /// The config file (TOML; docs/CONFIG.md).
        #[arg(long, short, default_value = "/etc/esl-agent/agent.toml")]
        config: PathBuf,
    },
    /// Show the running agent's state: link, radio, queues, counters.
    Status {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// List the tags the running agent knows: battery, signal, last seen, content.
    Tags {
        #[command(flatten)]
        target: ControlTarget,
        /// Show at most this many tags.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// List tasks in the running agent's store.
    Tasks {
        #[command(flatten)]
        target: ControlTarget,
        /// Only tasks in this state: pending, final or all.
        #[arg(long, default_value = "all")]
        state: String,
        /// Only tasks for this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Show at most this many tasks.
        #[arg(long, default_value_t = 1_000)]
        limit: usize,
    },
    /// ZigBee network operations on the running agent.
    #[command(subcommand)]
    Zigbee(ZigbeeCommand),
    /// Run broker, agent, simulated tags and back end on this machine and show what happens.
    #[cfg(feature = "demo")]
    Demo(esl_agent::demo::DemoOptions),
    /// Write the man pages (esl-agent.1, esl-agent-SUBCOMMAND.1) generated
    /// from these definitions into DIR; used by packaging/deb/build-deb.sh.
    #[command(hide = true)]
    Man {
        /// Directory to write the pages into (must exist).
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ZigbeeCommand {
    /// Open the network for new tags to join for SECONDS (at most 254; 0 closes it).
    PermitJoin {
        #[command(flatten)]
        target: ControlTarget,
        /// How long joining stays open.
        seconds: u64,
    },
    /// Move the running agent's network to CHANNEL (11-26): the coordinator
    /// and every device that hears the broadcast switch; sleepy tags that
    /// miss it must rejoin (docs/ZIGBEE.md, "Changing channel").
    ChangeChannel {
        #[command(flatten)]
        target: ControlTarget,
        /// The new channel.
        channel: u64,
    },
    /// Read the network on the stick into FILE (Open Coordinator Backup JSON,
    /// mode 0600: it holds the network key). Stop the agent first.
    Backup {
        /// The agent's config file (radio.zigbee: port, time-outs).
        #[arg(long, short, default_value = "/etc/esl-agent/agent.toml")]
        config: PathBuf,
        file: PathBuf,
    },
    /// Write the network in FILE (Open Coordinator Backup JSON, also from
    /// zigpy-znp or Zigbee2MQTT) to the stick and make it the agent's
    /// network. Stop the agent first.
    Restore {
        #[arg(long, short, default_value = "/etc/esl-agent/agent.toml")]
        config: PathBuf,
        file: PathBuf,
    },
}

/// Where the operator commands find the running agent.
#[derive(clap::Args)]
struct ControlTarget {
    /// The agent's config file (to find its control socket).
    #[arg(long, short, default_value = "/etc/esl-agent/agent.toml")]
    config: PathBuf,
    /// The control socket, instead of reading it from the config.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the agent's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Exit code when the operator commands find no running agent.
const EXIT_NOT_RUNNING: u8 = 3;

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
        Command::Man { dir } => match write_man_pages(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("esl-agent man: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
        Command::Status { target } => operate(&target, |client| {
            let status = client.call("agent.status", serde_json::json!({}))?;
            Ok((status.clone(), cli::render_status(&status)))
        }),
        Command::Tags { target, limit } => operate(&target, |client| {
            let tags = client.list_all(
                "tags.list",
                "tags",
                serde_json::json!({"limit": 500}),
                limit,
            )?;
            let table = cli::render_tags(&tags, esl_agent::clock::now_ms());
            Ok((serde_json::Value::Array(tags), table))
        }),
        Command::Tasks {
            target,
            state,
            tag,
            limit,
        } => operate(&target, |client| {
            let params = serde_json::json!({"limit": 500, "state": state, "tag_id": tag});
            let tasks = client.list_all("tasks.list", "tasks", params, limit)?;
            let table = cli::render_tasks(&tasks, esl_agent::clock::now_ms());
            Ok((serde_json::Value::Array(tasks), table))
        }),
        Command::Zigbee(ZigbeeCommand::PermitJoin { target, seconds }) => {
            operate(&target, |client| {
                let answer = client.call(
                    "network.permit_join",
                    serde_json::json!({"seconds": seconds}),
                )?;
                let text = if seconds == 0 {
                    "asked the radio to close the network for joining".to_owned()
                } else {
                    format!(
                        "asked the radio to open the network for joining for {seconds} s \
                         (the agent's log says when it is open)"
                    )
                };
                Ok((answer, text))
            })
        }
        Command::Zigbee(ZigbeeCommand::ChangeChannel { target, channel }) => {
            operate(&target, |client| {
                let answer = client.call(
                    "network.change_channel",
                    serde_json::json!({"channel": channel}),
                )?;
                let text = format!(
                    "asked the radio to move the network to channel {channel} \
                     (the agent's log says when the coordinator is there)"
                );
                Ok((answer, text))
            })
        }
        Command::Zigbee(ZigbeeCommand::Backup { config, file }) => {
            zigbee_offline(&config, |cfg| async move {
                let backup = esl_hal::zigbee::commission::backup_stick(&cfg)
                    .await?
                    .ok_or("the stick has no network to back up (blank or factory reset)")?;
                backup.save(&file).map_err(|e| e.to_string())?;
                Ok(format!(
                    "backed up the stick's network to {}",
                    file.display()
                ))
            })
        }
        Command::Zigbee(ZigbeeCommand::Restore { config, file }) => {
            zigbee_offline(&config, |cfg| async move {
                let backup = esl_hal::zigbee::backup::NetworkBackup::load(&file)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{}: no such backup", file.display()))?;
                esl_hal::zigbee::commission::restore_stick(&cfg, &backup).await?;
                Ok(format!(
                    "restored {} to the stick; the agent's network file is {}",
                    file.display(),
                    cfg.network_file.display()
                ))
            })
        }
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("esl-agent: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&config.log.level);
            limit_malloc_arenas();
            runtime().block_on(run(config))
        }
        #[cfg(feature = "demo")]
        Command::Demo(options) => {
            // The demo prints while it runs; its sockets are TCP, which
            // Rust and mio write with MSG_NOSIGNAL, so only stdout can
            // raise SIGPIPE.
            quiet_on_closed_stdout();
            // rumqttd logs routine disconnects as errors; the demo's summary
            // reports what matters, --verbose shows everything.
            init_logging(if options.verbose {
                "info"
            } else {
                "warn,rumqttd=off"
            });
            runtime().block_on(async {
                match esl_agent::demo::run(options).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("esl-agent demo: {}", report::chain(e.as_ref()));
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

/// Connects to the running agent, runs `f`, prints its JSON or table.
fn operate(
    target: &ControlTarget,
    f: impl FnOnce(&mut cli::Client) -> Result<(serde_json::Value, String), cli::CliError>,
) -> ExitCode {
    let socket = match &target.socket {
        Some(s) => s.clone(),
        None => match Config::load(&target.config) {
            Ok(c) => c.control_socket(),
            Err(e) => {
                eprintln!("esl-agent: {e} (or name the socket with --socket)");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let result = cli::Client::connect(&socket).and_then(|mut client| f(&mut client));
    match result {
        Ok((json, table)) => {
            quiet_on_closed_stdout();
            if target.json {
                println!("{json:#}");
            } else {
                print!("{table}");
            }
            ExitCode::SUCCESS
        }
        Err(e @ cli::CliError::NotRunning { .. }) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_NOT_RUNNING)
        }
        Err(e) => {
            eprintln!("esl-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a ZigBee stick operation that needs the serial port to itself (the
/// agent stopped): backup, restore. Exit 2 for a config problem, 1 when the
/// stick operation fails.
fn zigbee_offline<F, Fut>(path: &std::path::Path, op: F) -> ExitCode
where
    F: FnOnce(esl_hal::zigbee::ZigbeeConfig) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("esl-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.radio.kind != esl_agent::config::RadioKind::Zigbee {
        eprintln!(
            "esl-agent: {}: radio.kind is not \"zigbee\"",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("esl-agent: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = match esl_agent::security::zigbee_settings(&config.radio.zigbee) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("esl-agent: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match runtime.block_on(op(settings)) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("esl-agent: {e} (is the agent stopped? it holds the port while it runs)");
            ExitCode::FAILURE
        }
    }
}

/// Validates everything `run` would check before connecting, files
/// included (CA, client key, secrets): "is valid" is printed only when all
/// of it passed, and any problem exits with [`EXIT_CONFIG`] and prints
/// nothing on stdout.
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
    // Reads every CA, key and secret file, so their problems show here too.
    let security = match esl_agent::security::Prepared::load(&config, &identity) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("esl-agent: {}", report::chain(e.as_ref()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut out = format!("# {} is valid\n", path.display());
    out += &format!("# client id:    {}\n", identity.client_id);
    out += &format!("# task topic:   {}\n", identity.task_topic);
    out += &format!("# command topic:{}\n", identity.cmd_topic);
    out += &format!("# status topic: {}\n", identity.status_topic);
    out += &format!(
        "# ack topic:    {}\n",
        identity.reply_topic(&config.mqtt.ack_to)
    );
    for (what, value) in security.summary() {
        out += &format!("# {what:<13} {value}\n");
    }
    for w in identity.warnings.iter().chain(&config.warnings()) {
        out += &format!("# warning: {w}\n");
    }
    out += &config.redacted_toml();
    quiet_on_closed_stdout();
    print!("{out}");
    ExitCode::SUCCESS
}

/// `esl-agent.1` and one page per visible subcommand (`esl-agent-run.1`,
/// …, the way git splits its pages), from the same clap definitions as
/// `--help`, so the pages cannot drift from the binary they ship with.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    let cli = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cli.clone()).render(&mut page)?;
    std::fs::write(dir.join("esl-agent.1"), page)?;
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("esl-agent-{}", sub.get_name());
        // The page's NAME and SYNOPSIS show `esl-agent-run`; the binary
        // name keeps them readable as the command typed.
        let sub = sub
            .clone()
            .name(&name)
            .bin_name(format!("esl-agent {}", sub.get_name()))
            .version(env!("CARGO_PKG_VERSION"));
        let mut page = Vec::new();
        clap_mangen::Man::new(sub).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
    }
    Ok(())
}

/// Printing to a closed pipe (`esl-agent check-config | head`) ends the
/// process quietly, the way `cat` or `ls` end, instead of a panic in
/// `print!`. Rust ignores SIGPIPE, so this restores the default action.
/// Never for `run`, and for the operator commands only after their last
/// write to the control socket (a Unix socket write would raise it too).
fn quiet_on_closed_stdout() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_DFL installs no handler code; nothing in this process
    // relies on SIGPIPE being ignored from here on (only stdout is written).
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("esl-agent: cannot restore SIGPIPE: {e}");
    }
}

/// glibc gives every thread that allocates an arena of its own (up to 8
/// per core), and each keeps what its thread freed. The store's threads and
/// tokio's workers then hold several partly used arenas. One arena lowered
/// the peak RSS of the benchmark's agents by 3–9 MiB at no measurable CPU
/// cost (docs/BENCHMARKS.md). `MALLOC_ARENA_MAX` in the environment still
/// wins (glibc reads it first; this only runs when it is unset). musl has
/// one heap anyway.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator tunable; it is called
        // before the runtime starts any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

async fn run(config: Config) -> ExitCode {
    harden_process();
    let shutdown = CancellationToken::new();
    let agent = match esl_agent::start(config, shutdown.clone()).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("cannot start: {}", report::chain(e.as_ref()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
    let result = agent.wait().await;
    signals.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", report::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Process-wide hardening, before any file is created: files the agent
/// makes (store, journal) are private to its user, and the process is not
/// dumpable, so neither a core file nor another process of the same user
/// (`/proc/<pid>/mem`, `environ`) can read the secrets in its memory.
fn harden_process() {
    use nix::sys::stat::{umask, Mode};
    umask(Mode::from_bits_truncate(0o077));
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot mark the process non-dumpable");
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
