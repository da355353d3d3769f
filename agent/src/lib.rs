//! esl-agent: the edge agent of an electronic-shelf-label access point.
//!
//! It takes price-change tasks from the store's MQTT broker, keeps them on
//! disk before acknowledging them, hands the new content to tags through a
//! radio (see the `esl-hal` crate), and reports every task's end back to the
//! back end through a durable outbox. The wire contract is PROTOCOL.md.
//!
//! # Tasks and channels
//!
//! Six long-running tasks joined by bounded channels: the link and its
//! broker socket, the engine, the radio, status, the control server (and,
//! under systemd, a seventh: the notifier); ARCHITECTURE.md has the diagram
//! and a task's way through them. Their messages are in `msg`, below every task.
//!
//! ```text
//! broker ⇄ link::Link ──inbound_tx──▶ engine::Engine ──delivery_tx, control_tx──▶ radio::RadioTask ⇄ backend
//!              ▲  ▲ ◀──puback_tx, outbox_wake──┘  ▲  ▲ ◀──────────event_tx──────────────┘
//!              │  └──report_tx── status::StatusTask ─query_tx─┘  │        ▲
//!              └── link_tx (watch) ──▶ status, systemd           │        └─query_tx── control::ControlServer
//!                                                                └── store::Store (SQLite)
//! ```
//!
//! - `link::Link` — the only user of the rumqttc event loop. Routes
//!   incoming tasks and commands to the engine, sends PUBACKs the engine
//!   released, publishes the outbox (oldest first, windowed, decided by the
//!   sans-IO `link::outbox::Outbox`) and status reports, reconnects with
//!   backoff. It reaches the broker through `link::broker_io` (a private
//!   Unix socket whose other end opens TCP/TLS/wss), where
//!   `link::oversize` turns any PUBLISH over the size limit into a small
//!   stand-in.
//! - `engine::Engine` — decides every task's fate (PROTOCOL §4), schedules
//!   deliveries at check-ins, retries, expires (`engine::State`, split by
//!   concern into intake, delivery, acks and views); answers commands
//!   (`engine::commands`, bounded by `engine::limiter`); group-commits to
//!   the store, releasing PUBACKs only after the flush, through the sans-IO
//!   commit pipeline `engine::pipeline::Pipeline` (Idle / Flushing /
//!   Faulted).
//! - `radio::RadioTask` — owns the radio backend (`esl_hal::Radio`); takes
//!   deliveries and, on `control_tx`, requests such as
//!   `network.permit_join` and `network.change_channel`.
//! - `status::StatusTask` — hello and periodic status reports.
//! - `control::ControlServer` — the local Unix socket behind
//!   `esl-agent status|tags|tasks` ([`cli`] is its client); forwards
//!   requests to the engine.
//! - `systemd::SystemdTask` — only under systemd (`$NOTIFY_SOCKET`):
//!   READY after the first CONNACK, watchdog pings while the engine answers
//!   `Query::Ping` on `query_tx`, STOPPING at shutdown.
//!
//! `store::Store` is no task: the only opener of the SQLite database; its
//! checkpoint thread copies the WAL into the database file off the
//! engine's path, and `store::BleKeys` keeps the BLE radio's key material
//! in a database of its own beside it.
//!
//! # Layers
//!
//! Modules import only lower layers (ARCHITECTURE.md, "Source layout";
//! checked by the test `layering::modules_use_only_lower_layers`): leaves
//! ([`clock`], `ids`, [`counters`], [`report`]) → [`wire`] → [`config`] →
//! [`identity`] → [`security`] (tls, auth, signing, secrets) → `store` →
//! `msg` → `engine` → `link` → the other tasks → [`cli`], [`demo`] → this
//! file's wiring ([`start`]).
//!
//! Security (docs/SECURITY.md) is prepared before anything starts
//! ([`security::Prepared`]).
//!
//! Shutdown is one [`CancellationToken`] seen by every task. The engine
//! flushes and releases its last PUBACKs; the link sends them and
//! disconnects; [`Agent::wait`] joins everything within a deadline.

#![warn(unreachable_pub)]

pub mod cli;
pub mod clock;
pub mod config;
mod control;
pub mod counters;
#[cfg(feature = "demo")]
pub mod demo;
mod engine;
pub mod identity;
mod ids;
mod link;
mod msg;
mod radio;
pub mod report;
pub mod security;
mod status;
mod store;
mod systemd;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use esl_hal::ble::BleRadio;
use esl_hal::sim::SimRadio;
use esl_hal::zigbee::ZigbeeRadio;
use esl_hal::{Delivery, Radio, RadioEvent};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
use counters::Counters;
use identity::Identity;
use msg::LinkState;
use store::Store;

/// How long shutdown may take before tasks are abandoned (PROTOCOL §9: 5 s).
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_millis(4500);

/// A running agent.
pub struct Agent {
    pub identity: Identity,
    pub counters: Arc<Counters>,
    pub link: watch::Receiver<LinkState>,
    store: Arc<Store>,
    tasks: JoinSet<&'static str>,
    shutdown: CancellationToken,
}

/// Starts every task of the agent. Returns once the store is open and the
/// tasks run; the link connects in the background.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Agent> {
    let identity = Identity::resolve(&config).context("identity")?;
    for w in identity.warnings.iter().chain(&config.warnings()) {
        warn!("{w}");
    }
    let mut security = security::Prepared::load(&config, &identity)?;
    if config.control.enabled {
        // Before anything starts: a file that is not a socket at
        // `control.socket` is a config error, never replaced.
        control::check_path(&config.control_socket())?;
    }
    for (what, value) in security.summary() {
        info!("{what}: {value}");
    }
    let store_path = config.store.path.clone();
    let cache = config.store.cache_mb * 1024 * 1024;
    let store = match tokio::task::spawn_blocking(move || Store::open(&store_path, cache))
        .await
        .context("store open task")?
    {
        Ok(store) => store,
        Err(e) => return Err(report::store_open_error(&config.store.path, e)),
    };
    let store = Arc::new(store);
    let counters = Arc::new(Counters::default());

    let (inbound_tx, inbound_rx) = mpsc::channel(engine::INBOUND_CAPACITY);
    let (puback_tx, puback_rx) = mpsc::channel(link::PUBACK_CAPACITY);
    let (event_tx, radio_rx) = mpsc::channel(engine::RADIO_EVENT_CAPACITY);
    let (delivery_tx, delivery_rx) = mpsc::channel(radio::DELIVERY_CAPACITY);
    let (query_tx, query_rx) = mpsc::channel(engine::QUERY_CAPACITY);
    let (report_tx, report_rx) = mpsc::channel(status::REPORT_CAPACITY);
    let (link_tx, link_rx) = watch::channel(LinkState::default());
    let outbox_wake = Arc::new(Notify::new());

    let mut state = engine::State::load(
        engine::EngineSettings::from_config(&config),
        identity.clone(),
        store.clone(),
        counters.clone(),
    )
    .context("loading pending tasks from the store")?;
    state.set_verifier(security.verifier);

    state.set_link(link_rx.clone());
    let (control_tx, control_rx) = mpsc::channel(radio::CONTROL_CAPACITY);
    state.set_radio_control(control_tx);
    let mut tasks = JoinSet::new();
    let radio = RadioWiring {
        event_tx,
        delivery_rx,
        control_rx,
        shutdown: shutdown.clone(),
    };
    match config.radio.kind {
        config::RadioKind::Sim => {
            let backend = SimRadio::start(config.radio.sim.clone()).context("radio.sim")?;
            radio.spawn(backend, &mut state, &counters, &mut tasks);
        }
        config::RadioKind::Zigbee => {
            let settings = security.zigbee.take().context("radio.zigbee settings")?;
            let backend = ZigbeeRadio::start(settings).context("radio.zigbee")?;
            radio.spawn(backend, &mut state, &counters, &mut tasks);
        }
        config::RadioKind::Ble => {
            // Key material, tag Information and bonds survive restarts in
            // the store directory (store::BleKeys).
            let keys = store::BleKeys::open(&config.store.path).context("radio.ble keys")?;
            let backend =
                BleRadio::start_persisted(config.radio.ble.clone(), keys).context("radio.ble")?;
            radio.spawn(backend, &mut state, &counters, &mut tasks);
        }
    }

    let engine = engine::Engine::new(
        state,
        store.clone(),
        counters.clone(),
        engine::EngineChannels {
            inbound_rx,
            radio_rx,
            query_rx,
            delivery_tx,
            puback_tx,
            outbox_wake: outbox_wake.clone(),
        },
        shutdown.clone(),
    );
    tasks.spawn(async move {
        if let Err(e) = engine.run().await {
            tracing::error!(error = %e, "engine stopped with an error");
        }
        "engine"
    });

    let broker = link::BrokerSocket::new(
        security.transport.clone(),
        &config.mqtt,
        config.limits.max_payload,
    );
    let link = link::Link {
        url: security.transport.url.clone(),
        options: link::mqtt_options(
            &config.mqtt,
            &identity,
            config.limits.max_payload,
            &broker,
            security.credentials,
        ),
        broker,
        settings: link::LinkSettings::from_config(&config.mqtt),
        login: security.login,
        identity: identity.clone(),
        store: store.clone(),
        counters: counters.clone(),
        inbound_tx,
        puback_rx,
        report_rx,
        outbox_wake,
        link_tx,
        shutdown: shutdown.clone(),
    };
    tasks.spawn(async move {
        link.run().await;
        "link"
    });

    if config.control.enabled {
        let path = config.control_socket();
        match control::ControlServer::bind(
            &path,
            config.limits.max_payload,
            query_tx.clone(),
            shutdown.clone(),
        ) {
            Ok(server) => {
                tasks.spawn(async move {
                    server.run().await;
                    "control"
                });
            }
            // The agent's job does not depend on the local CLI: go on without.
            Err(e) => warn!("{e}; `esl-agent status|tags|tasks` will not work"),
        }
    }

    if let Some(socket) = systemd::NotifySocket::from_env() {
        let task = systemd::SystemdTask {
            socket,
            watchdog: systemd::watchdog_interval_from_env(),
            link_rx: link_rx.clone(),
            query_tx: query_tx.clone(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(async move {
            task.run().await;
            "systemd"
        });
    }

    let status = status::StatusTask {
        agent: identity.client_id.clone(),
        topic: identity.status_topic.clone(),
        interval: Duration::from_secs(config.status.interval_s),
        max_payload: config.limits.max_payload,
        store: store.clone(),
        counters: counters.clone(),
        link_rx: link_rx.clone(),
        query_tx,
        report_tx,
        shutdown: shutdown.clone(),
    };
    tasks.spawn(async move {
        status.run().await;
        "status"
    });

    info!(client_id = %identity.client_id, version = env!("CARGO_PKG_VERSION"), "agent started");
    Ok(Agent {
        identity,
        counters,
        link: link_rx,
        store,
        tasks,
        shutdown,
    })
}

/// The radio task's channel ends, waiting for the backend that
/// `config.radio.kind` picks.
struct RadioWiring {
    event_tx: mpsc::Sender<RadioEvent>,
    delivery_rx: mpsc::Receiver<Delivery>,
    control_rx: mpsc::Receiver<msg::RadioControl>,
    shutdown: CancellationToken,
}

impl RadioWiring {
    /// Registers what the engine and the counters learn from the backend up
    /// front, then spawns the radio task that owns it.
    fn spawn<R: Radio>(
        self,
        backend: R,
        state: &mut engine::State,
        counters: &Counters,
        tasks: &mut JoinSet<&'static str>,
    ) {
        let inventory = backend.inventory();
        state.add_known_tags(inventory.known_tags);
        state.set_content_check(inventory.content_check);
        if let Some(radio_counters) = inventory.counters {
            counters.attach_radio(radio_counters);
        }
        let task = radio::RadioTask {
            radio: backend,
            event_tx: self.event_tx,
            delivery_rx: self.delivery_rx,
            control_rx: self.control_rx,
            shutdown: self.shutdown,
        };
        tasks.spawn(async move {
            task.run().await;
            "radio"
        });
    }
}

impl Agent {
    /// Waits until every task has ended (after the shutdown token fired, or
    /// because one of them failed), then flushes the store. Once shutdown is
    /// asked for, tasks still running after [`SHUTDOWN_DEADLINE`] are
    /// abandoned.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut early_exit = None;
        loop {
            let next = if self.shutdown.is_cancelled() {
                match tokio::time::timeout(SHUTDOWN_DEADLINE, self.tasks.join_next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        warn!(
                            left = self.tasks.len(),
                            "shutdown deadline passed; abandoning tasks"
                        );
                        self.tasks.abort_all();
                        break;
                    }
                }
            } else {
                self.tasks.join_next().await
            };
            match next {
                None => break,
                Some(Ok(name)) => {
                    if !self.shutdown.is_cancelled() {
                        // One task ending on its own stops the agent: better a
                        // clean restart by the supervisor than a half agent.
                        warn!(task = name, "task ended unexpectedly; stopping the agent");
                        early_exit.get_or_insert(name);
                        self.shutdown.cancel();
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "task failed");
                    early_exit.get_or_insert("panicked task");
                    self.shutdown.cancel();
                }
            }
        }
        self.store.flush().await.context("final store flush")?;
        info!("agent stopped");
        match early_exit {
            Some(name) => anyhow::bail!("the {name} task ended unexpectedly"),
            None => Ok(()),
        }
    }
}

/// The import rule of ARCHITECTURE.md ("Source layout"), checked on the
/// source: a module may use only modules of a lower layer. Test modules
/// (which may use anything) and comments are left out.
#[cfg(test)]
mod layering {
    use std::path::Path;

    /// Top-level modules by layer, lowest first.
    const LAYERS: &[&[&str]] = &[
        &["ids", "clock", "counters", "report"],
        &["wire"],
        &["config"],
        &["identity"],
        &["security"],
        &["store"],
        &["msg"],
        &["engine"],
        &["link"],
        &["radio", "status", "control", "systemd"],
        &["cli"],
        &["demo"],
    ];

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&module))
    }

    /// The top-level modules `text` names through `crate::` paths
    /// (`crate::x::…`, and each name of a `crate::{x::…, y}` group), outside
    /// comments and the test module. `super::super` is reported as `super`:
    /// a path that climbs out of its own module must say `crate::`.
    fn uses(text: &str) -> Vec<String> {
        let code = match text.find("#[cfg(test)]\nmod ") {
            Some(at) => &text[..at],
            None => text,
        };
        let code: Vec<&str> = code
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .collect();
        let code = code.join("\n");
        let name = |s: &str| -> String {
            s.trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let mut found = Vec::new();
        if code.contains("super::super") {
            found.push("super".to_owned());
        }
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let Some(group) = rest.strip_prefix('{') else {
                found.push(name(rest));
                continue;
            };
            // Each item of the group at depth 1 starts with a module name.
            let (mut depth, mut item_start) = (1, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        let item = &group[item_start..i];
                        if !item.trim().is_empty() {
                            found.push(name(item));
                        }
                        item_start = i + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
        }
        found
    }

    fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }

    #[test]
    fn paths_are_read_in_groups_and_across_lines() {
        let text = "use crate::{\n    engine::State,\n    msg::{A, B}, wire,\n};\nfn f() { crate::ids::x(); } // crate::demo\n";
        assert_eq!(uses(text), ["engine", "msg", "wire", "ids"]);
        assert_eq!(uses("use super::super::x;"), ["super"]);
    }

    #[test]
    fn modules_use_only_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        visit(&src, &mut files);
        let mut wrong = Vec::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy();
            let top = top.trim_end_matches(".rs");
            if top == "lib" || top == "main" {
                continue;
            }
            let own = layer(top).unwrap_or_else(|| panic!("{top} is in no layer of LAYERS"));
            for used in uses(&std::fs::read_to_string(&file).unwrap()) {
                if used.is_empty() || used == "super" {
                    wrong.push(format!("{}: unreadable path {used:?}", rel.display()));
                    continue;
                }
                // Items of lib.rs itself (`start`, `Config`) are wiring.
                let Some(theirs) = layer(&used) else { continue };
                if used != top && theirs >= own {
                    wrong.push(format!("{}: crate::{used}", rel.display()));
                }
            }
        }
        assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
    }
}
