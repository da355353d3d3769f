//! The load side of a benchmark run: a back-end publisher, listeners that
//! timestamp what they receive (the agent's acks, or the bare QoS 1
//! subscriber that gives the broker's ceiling), task builders, and the
//! disk's fsync rate. Each rumqttc event loop is owned by one spawned task.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Our publish requests rumqttc may queue; the publisher waits beyond.
const REQUEST_CAPACITY: usize = 1000;
/// QoS 1 publishes the back end keeps unacknowledged at the broker. Large,
/// so the publisher is never the bottleneck it is measuring against.
const PUBLISHER_INFLIGHT: u16 = 1000;

fn options(port: u16, client_id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(PUBLISHER_INFLIGHT);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_clean_session(true);
    o
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A task (PROTOCOL §4) for `tag`, valid for an hour.
pub fn task(task_id: &str, tag: usize, seq: u64) -> Vec<u8> {
    json!({
        "v": 1,
        "task_id": task_id,
        "tag_id": format!("SIM{tag:06}"),
        "seq": seq,
        "issued_at": now_ms(),
        "ttl_ms": 3_600_000u64,
        "content": {"name": format!("Item {tag}"), "price": "9.90", "currency": "CNY", "ref": task_id},
    })
    .to_string()
    .into_bytes()
}

/// A task the agent acks `expired` at once: proves the agent is subscribed
/// and measures the way to a first PUBACK (its ack leaves in the same flush).
pub fn probe(task_id: &str) -> Vec<u8> {
    json!({
        "v": 1, "task_id": task_id, "tag_id": "PROBE", "issued_at": 1u64, "ttl_ms": 1u64,
        "content": {"probe": true},
    })
    .to_string()
    .into_bytes()
}

/// The back end's publishing client.
pub struct Publisher {
    client: AsyncClient,
    driver: JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(port: u16, client_id: &str) -> anyhow::Result<Publisher> {
        let (client, mut eventloop) = AsyncClient::new(options(port, client_id), REQUEST_CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        let driver = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("bench publisher: {e}");
                        return;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("publisher CONNACK")??;
        Ok(Publisher { client, driver })
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        if self.driver.is_finished() {
            bail!("the publisher's connection ended");
        }
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One message a listener received, with when.
pub struct Received {
    pub at: Instant,
    pub payload: bytes::Bytes,
}

/// A QoS 1 subscriber that timestamps every message (rumqttc PUBACKs it at
/// once: no storage, the broker's ceiling).
pub struct Listener {
    pub rx: mpsc::UnboundedReceiver<Received>,
    driver: JoinHandle<()>,
}

impl Listener {
    /// Connects and returns once the broker confirmed the subscription.
    pub async fn subscribe(port: u16, client_id: &str, topic: &str) -> anyhow::Result<Listener> {
        let (client, mut eventloop) = AsyncClient::new(options(port, client_id), REQUEST_CAPACITY);
        client.subscribe(topic, QoS::AtLeastOnce).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let driver = tokio::spawn(async move {
            let _client = client; // the event loop ends when every client is gone
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let received = Received {
                            at: Instant::now(),
                            payload: p.payload,
                        };
                        if tx.send(received).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("bench listener: {e}");
                        return;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("listener SUBACK")??;
        Ok(Listener { rx, driver })
    }

    /// The next message, or an error at `deadline`.
    pub async fn next_until(&mut self, deadline: Instant) -> anyhow::Result<Received> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => bail!("the listener's connection ended"),
            Err(_) => bail!("timed out"),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An ack as the back end reads it.
pub struct AckSeen {
    pub task_id: String,
    pub status: String,
    pub at: Instant,
}

pub fn parse_ack(r: &Received) -> Option<AckSeen> {
    let v: Value = serde_json::from_slice(&r.payload).ok()?;
    if v["type"] != "ack" {
        return None;
    }
    Some(AckSeen {
        task_id: v["task_id"].as_str()?.to_owned(),
        status: v["status"].as_str()?.to_owned(),
        at: r.at,
    })
}

/// Appends 4 KiB and `fdatasync`s, for about `span`, in `dir`: the disk's
/// synchronous write rate, the most a one-flush-per-task store could do.
pub fn fsync_rate(dir: &Path, span: Duration) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let started = std::time::Instant::now();
    let mut n = 0u64;
    while started.elapsed() < span {
        file.write_all(&block)?;
        file.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}
