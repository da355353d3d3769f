//! [`FaultProxy`]: a TCP proxy on loopback between the agent and the broker
//! that breaks the link on command. It listens on a free port of 127.0.0.1
//! and connects only to the broker's loopback port.
//!
//! Faults (what a flaky store Wi-Fi or a carrier NAT does to an MQTT link):
//! - [`FaultProxy::drop_all`]: close every connection at once.
//! - [`FaultProxy::stall`]: stop moving bytes, both ways, on every
//!   connection (new ones too) without closing anything: a half-open link
//!   that only the agent's keepalive can detect. When the stall ends, the
//!   stalled connections are closed (a black-holed NAT entry does not come
//!   back to life).
//! - [`FaultProxy::set_delay`]: hold every chunk this long before passing it on.
//! - [`FaultProxy::cut_next`]: pass on only the first half of the next chunk
//!   in one direction, then close the connection: a packet cut in the middle.
//!
//! One task accepts; each connection has two pump tasks (one per
//! direction), both ended by the connection's token. Closing means dropping
//! the sockets, as a dying link does.
//!
//! It also watches the MQTT packets it carries ([`PubackTap`]): which task
//! each QoS 1 PUBLISH to the agent held, and which of them the agent
//! PUBACKed, the agent-independent record the power-cut runs check
//! against.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read per chunk: small enough that a task PUBLISH of a few hundred
/// bytes is often one chunk, so a cut lands inside a packet.
const CHUNK: usize = 16 * 1024;

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Agent to broker: CONNECT, SUBSCRIBE, PUBACKs, acks.
    Upstream,
    /// Broker to agent: CONNACK, tasks, PUBACKs of acks.
    Downstream,
}

#[derive(Default)]
struct Control {
    /// Cancelled to close every current connection; replaced after.
    generation: Mutex<CancellationToken>,
    stalled: AtomicBool,
    /// Wakes pumps waiting out a stall.
    unstalled: Notify,
    delay_ms: AtomicU64,
    cut_upstream: AtomicBool,
    cut_downstream: AtomicBool,
    accepted: AtomicUsize,
    cuts_done: AtomicUsize,
    tap: Arc<PubackTap>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    port: u16,
    control: Arc<Control>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:broker_port`.
    pub async fn start(broker_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the proxy");
        let port = listener.local_addr().expect("bound").port();
        let control = Arc::new(Control::default());
        let acceptor = tokio::spawn(accept(listener, broker_port, control.clone()));
        FaultProxy {
            port,
            control,
            acceptor,
        }
    }

    /// The port the agent connects to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far (the agent's connection attempts).
    pub fn accepted(&self) -> usize {
        self.control.accepted.load(Ordering::SeqCst)
    }

    /// The tasks the agent PUBACKed through this proxy.
    pub fn tap(&self) -> Arc<PubackTap> {
        self.control.tap.clone()
    }

    /// Cuts carried out so far.
    pub fn cuts_done(&self) -> usize {
        self.control.cuts_done.load(Ordering::SeqCst)
    }

    /// Closes every current connection.
    pub fn drop_all(&self) {
        let mut generation = self.control.generation.lock().expect("not poisoned");
        generation.cancel();
        *generation = CancellationToken::new();
    }

    /// Stalls every connection, or ends the stall (closing what was stalled).
    pub fn stall(&self, on: bool) {
        self.control.stalled.store(on, Ordering::SeqCst);
        if !on {
            self.drop_all();
            self.control.unstalled.notify_waiters();
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.control
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Arms a cut: the next chunk going `direction` is passed on halfway,
    /// then its connection is closed.
    pub fn cut_next(&self, direction: Direction) {
        let flag = match direction {
            Direction::Upstream => &self.control.cut_upstream,
            Direction::Downstream => &self.control.cut_downstream,
        };
        flag.store(true, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.drop_all();
    }
}

async fn accept(listener: TcpListener, broker_port: u16, control: Arc<Control>) {
    loop {
        let Ok((agent, _)) = listener.accept().await else {
            continue;
        };
        control.accepted.fetch_add(1, Ordering::SeqCst);
        let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
            // Broker down: the agent sees its connection closed at once.
            continue;
        };
        let _ = agent.set_nodelay(true);
        let _ = broker.set_nodelay(true);
        let conn = control
            .generation
            .lock()
            .expect("not poisoned")
            .child_token();
        let (agent_rx, agent_tx) = agent.into_split();
        let (broker_rx, broker_tx) = broker.into_split();
        // Packet ids are per connection: both directions share one map.
        let in_flight = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(pump(
            agent_rx,
            broker_tx,
            Direction::Upstream,
            control.clone(),
            conn.clone(),
            Framer::new(in_flight.clone()),
        ));
        tokio::spawn(pump(
            broker_rx,
            agent_tx,
            Direction::Downstream,
            control.clone(),
            conn,
            Framer::new(in_flight),
        ));
    }
}

/// Moves bytes one way until EOF, an error, a cut or the connection's
/// token; then ends the whole connection (both pumps).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    control: Arc<Control>,
    conn: CancellationToken,
    mut framer: Framer,
) {
    let mut buf = vec![0u8; CHUNK];
    let cut_flag = match direction {
        Direction::Upstream => &control.cut_upstream,
        Direction::Downstream => &control.cut_downstream,
    };
    loop {
        let n = tokio::select! {
            _ = conn.cancelled() => break,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        // Seen as soon as read: a PUBACK the agent wrote counts even if the
        // agent dies before the broker reads it (stricter, never looser).
        framer.feed(&buf[..n], direction, &control.tap);
        // A stall holds the chunk (and so, through TCP flow control, the
        // sender) until the stall ends, which closes the connection.
        while control.stalled.load(Ordering::SeqCst) {
            tokio::select! {
                _ = conn.cancelled() => break,
                _ = control.unstalled.notified() => {}
                // The flag may flip between the load and the wait.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        if conn.is_cancelled() {
            break;
        }
        let delay = control.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if n >= 2 && cut_flag.swap(false, Ordering::SeqCst) {
            let _ = to.write_all(&buf[..n / 2]).await;
            control.cuts_done.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Dropping both halves of both sockets closes the connection.
    conn.cancel();
}

/// What the proxy saw of the agent's PUBACKs: for every task whose QoS 1
/// PUBLISH the agent PUBACKed, when the PUBACK first went by. A PUBACK
/// means "stored" (PROTOCOL §4.1), so these are the tasks that must never
/// be lost. Only tasks that came with a `task_id` are recorded (commands
/// and malformed payloads are not).
#[derive(Default)]
pub struct PubackTap {
    pubacked: Mutex<HashMap<String, Instant>>,
}

impl PubackTap {
    /// Task id → the first PUBACK of it.
    pub fn pubacked(&self) -> HashMap<String, Instant> {
        self.pubacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.pubacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(task_id)
    }

    fn record(&self, task_id: String) {
        self.pubacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(task_id)
            .or_insert_with(Instant::now);
    }
}

/// Splits one direction of an MQTT 3.1.1 byte stream into packets: PUBLISH
/// packets going to the agent note their packet id's task in the
/// connection's `in_flight` map, PUBACKs coming from it take the task out
/// and record it. Anything unparsable ends the watching of this
/// connection, never the forwarding.
struct Framer {
    buf: Vec<u8>,
    in_flight: Arc<Mutex<HashMap<u16, String>>>,
    broken: bool,
}

impl Framer {
    fn new(in_flight: Arc<Mutex<HashMap<u16, String>>>) -> Framer {
        Framer {
            buf: Vec::new(),
            in_flight,
            broken: false,
        }
    }

    fn feed(&mut self, bytes: &[u8], direction: Direction, tap: &PubackTap) {
        if self.broken {
            return;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            // Fixed header: type and flags, then the remaining length as a
            // base-128 varint of at most 4 bytes.
            let mut len = 0usize;
            let mut at = 1;
            let complete = loop {
                let Some(&b) = self.buf.get(at) else {
                    break false;
                };
                len |= usize::from(b & 0x7f) << (7 * (at - 1));
                at += 1;
                if b & 0x80 == 0 {
                    break true;
                }
                if at > 4 {
                    self.broken = true;
                    return;
                }
            };
            if !complete || self.buf.len() < at + len {
                return;
            }
            let packet: Vec<u8> = self.buf.drain(..at + len).collect();
            self.packet(packet[0], &packet[at..], direction, tap);
        }
    }

    fn packet(&mut self, header: u8, body: &[u8], direction: Direction, tap: &PubackTap) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let u16_at = |i: usize| Some(u16::from_be_bytes([*body.get(i)?, *body.get(i + 1)?]));
        match (direction, header >> 4) {
            // PUBLISH with QoS 1 or 2: topic, packet id, payload.
            (Direction::Downstream, 3) if header & 0x06 != 0 => {
                let Some(topic_len) = u16_at(0).map(usize::from) else {
                    return;
                };
                let Some(pid) = u16_at(2 + topic_len) else {
                    return;
                };
                let task_id = serde_json::from_slice::<serde_json::Value>(&body[4 + topic_len..])
                    .ok()
                    .and_then(|v| v["task_id"].as_str().map(str::to_owned));
                match task_id {
                    Some(id) => in_flight.insert(pid, id),
                    None => in_flight.remove(&pid),
                };
            }
            (Direction::Upstream, 4) => {
                if let Some(id) = u16_at(0).and_then(|pid| in_flight.remove(&pid)) {
                    tap.record(id);
                }
            }
            _ => {}
        }
    }
}
