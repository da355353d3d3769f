//! The demo's embedded MQTT broker: rumqttd inside this process, on a free
//! 127.0.0.1 port, so `esl-agent demo` needs no broker installed.
//!
//! Owns the broker thread and nothing else. rumqttd takes its port from the
//! config and `Broker::start` blocks for good, so the port is found by
//! binding port 0 and releasing it, and the broker runs on its own std
//! thread. If another process grabs the port in between, rumqttd's listener
//! fails, its thread ends and [`EmbeddedBroker::failed`] says so; the caller
//! then starts another one. rumqttd has no stop: the thread ends with the
//! process.
//!
//! Readiness is not probed here with a bare TCP connect: rumqttd logs every
//! connection that never sends CONNECT as an error. The back end's first
//! CONNACK is the probe.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::thread::JoinHandle;

use anyhow::Context;
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// rumqttd keeps each topic's messages in memory segments; the oldest
/// segment is dropped when a topic has more than `SEGMENT_COUNT`. 4 MiB × 8
/// bounds memory to 32 MiB per topic yet holds far more than a subscriber
/// that keeps up can lag behind (a task is a few hundred bytes).
const SEGMENT_SIZE: usize = 4 * 1024 * 1024;
const SEGMENT_COUNT: usize = 8;
/// Agent, back end and room for a second look with `mosquitto_sub`.
const MAX_CONNECTIONS: usize = 16;
/// Packets rumqttd reads from one connection before it hands them to its
/// router. (Its QoS 1 window towards a subscriber is fixed at 100 messages,
/// and it insists on PUBACKs in the order it sent them.)
const READ_BATCH: usize = 100;
/// QoS 0 messages the router reads for a subscriber at once.
const QOS0_BATCH: u64 = 200;

pub(crate) struct EmbeddedBroker {
    pub(crate) port: u16,
    thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts a broker that accepts packets of `max_packet` bytes (the
    /// agent's payload limit plus headers) on a free loopback port.
    pub(crate) fn start(max_packet: usize) -> anyhow::Result<EmbeddedBroker> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("cannot find a free port on 127.0.0.1 for the embedded broker")?
            .port();
        let config = config(port, max_packet);
        let thread = std::thread::Builder::new()
            .name("demo-broker".into())
            .spawn(move || {
                // Returns only when its listener failed (port taken).
                if let Err(e) = rumqttd::Broker::new(config).start() {
                    tracing::warn!(error = %e, "embedded broker stopped");
                }
            })
            .context("cannot start the embedded broker thread")?;
        Ok(EmbeddedBroker { port, thread })
    }

    /// The broker thread has ended: it could not listen on its port.
    pub(crate) fn failed(&self) -> bool {
        self.thread.is_finished()
    }
}

fn config(port: u16, max_packet: usize) -> Config {
    let server = ServerSettings {
        name: "demo".into(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: max_packet,
            max_inflight_count: READ_BATCH,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: QOS0_BATCH,
            max_segment_size: SEGMENT_SIZE,
            max_segment_count: SEGMENT_COUNT,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("demo".to_owned(), server)])),
        ..Config::default()
    }
}
