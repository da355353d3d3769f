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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
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
        tokio::spawn(pump(
            agent_rx,
            broker_tx,
            Direction::Upstream,
            control.clone(),
            conn.clone(),
        ));
        tokio::spawn(pump(
            broker_rx,
            agent_tx,
            Direction::Downstream,
            control.clone(),
            conn,
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
