//! The link's byte path to the broker, with the poison-message filter in
//! it (`oversize`).
//!
//! rumqttc frames bytes from a socket it opens itself, and nothing in its
//! public API lets a caller hand it a stream or wrap the one it opens (its
//! `Network` type is not exported). It does connect to a Unix socket path
//! (`Transport::Unix`). So the link points rumqttc at a private abstract
//! Unix socket ([`BrokerSocket::rumqttc_addr`]) and this module, for every
//! connection rumqttc makes there, opens the real one (TCP, TLS or wss, with
//! the rustls config of `tls.rs`) and pumps bytes both ways: broker → agent
//! through [`OversizeFilter`], agent → broker unchanged. MQTT itself
//! (CONNECT, keepalive, PUBACKs) stays rumqttc's.
//!
//! - Only this process may use the socket: a connection from any other
//!   process id (`SO_PEERCRED`) is closed at once, so no local user can
//!   borrow the agent's TLS session or client certificate. An abstract
//!   socket has no file to clean up or to protect (abstract sockets are
//!   Linux's; the agent runs on Linux only).
//! - One broker connection at a time: a new connection from rumqttc ends the
//!   previous pump. When either side closes, both do.
//! - Why a connection failed (TLS, DNS, WebSocket) is kept for the link
//!   ([`BrokerSocket::take_error`]), which explains it in the log as before;
//!   rumqttc itself only sees its socket close.
//!
//! Owns: the listener and the pump task (spawned by [`BrokerSocket::spawn`],
//! ended when the link drops the returned [`AbortOnDrop`]).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::tungstenite;
use rumqttc::{ConnectionError, TlsConfiguration, Transport};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::MqttConfig;
use crate::link::oversize::{Marker, OversizeFilter};
use crate::security::tls::LinkTransport;

/// Room in a PUBLISH for the fixed header's rest, the topic and the packet
/// id beyond `limits.max_payload`: a packet up to the payload limit plus
/// this passes the filter whole (and is then rejected by size if its
/// payload is over), a larger one becomes a stand-in.
const HEADER_ROOM: usize = crate::wire::OVER_LIMIT_READ;

/// A byte stream to the broker.
trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// See the module docs.
pub(crate) struct BrokerSocket {
    transport: LinkTransport,
    host: String,
    port: u16,
    connect_timeout: Duration,
    /// A PUBLISH whose remaining length is above this becomes a stand-in.
    limit: usize,
    marker: Marker,
    /// The abstract socket's name, with the leading NUL.
    name: String,
    /// Why the last broker connection could not be opened.
    error: Arc<Mutex<Option<ConnectionError>>>,
    /// Pumps running (an aborted one may end after its successor started),
    /// for a clean end: [`BrokerSocket::wait_idle`].
    pumping: Arc<watch::Sender<usize>>,
}

impl BrokerSocket {
    pub(crate) fn new(
        transport: LinkTransport,
        m: &MqttConfig,
        max_payload: usize,
    ) -> BrokerSocket {
        let marker = Marker::random();
        let name = format!(
            "\0esl-agent-link-{}-{}",
            std::process::id(),
            &hex::encode(rand::random::<[u8; 8]>())
        );
        BrokerSocket {
            transport,
            host: m.host.clone(),
            port: m.port,
            connect_timeout: Duration::from_secs(m.connect_timeout_s),
            limit: max_payload.saturating_add(HEADER_ROOM),
            marker,
            name,
            error: Arc::default(),
            pumping: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Waits until no pump runs (rumqttc closed its side and what it wrote
    /// went to the broker), at most `within`.
    pub(crate) async fn wait_idle(&self, within: Duration) {
        let mut idle = self.pumping.subscribe();
        let _ = tokio::time::timeout(within, idle.wait_for(|running| *running == 0)).await;
    }

    /// The "host" rumqttc connects to with `Transport::Unix`.
    pub(crate) fn rumqttc_addr(&self) -> &str {
        &self.name
    }

    /// What rumqttc's incoming packet limit must allow: a whole packet the
    /// filter passes, or a stand-in (topic of up to 64 KiB).
    pub(crate) fn rumqttc_incoming_limit(&self) -> usize {
        self.limit + 64 * 1024 + 1024
    }

    /// The stand-in payload the link recognises.
    pub(crate) fn marker(&self) -> &Marker {
        &self.marker
    }

    /// Why the last broker connection failed, if it did (taken once).
    pub(crate) fn take_error(&self) -> Option<ConnectionError> {
        self.error.lock().map_or(None, |mut e| e.take())
    }

    /// Binds the socket and serves rumqttc's connections until the
    /// returned guard is dropped.
    pub(crate) fn spawn(&self) -> io::Result<AbortOnDrop> {
        let route = Route::of(&self.transport.transport)?;
        let listener = UnixListener::bind(&self.name)?;
        let opener = Opener {
            route,
            broker_addr: self.transport.broker_addr.clone(),
            host: self.host.clone(),
            port: self.port,
            // Shorter than rumqttc's own connect time-out, so the reason
            // is known when rumqttc gives up.
            timeout: self
                .connect_timeout
                .saturating_sub(Duration::from_millis(500))
                .max(Duration::from_millis(500)),
        };
        let limit = self.limit;
        let marker = self.marker.clone();
        let error = self.error.clone();
        let pumping = self.pumping.clone();
        Ok(AbortOnDrop(tokio::spawn(async move {
            let mut pump: Option<AbortOnDrop> = None;
            loop {
                let unix = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "link socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let ours = unix
                    .peer_cred()
                    .ok()
                    .and_then(|c| c.pid())
                    .is_some_and(|pid| pid == std::process::id() as i32);
                if !ours {
                    warn!("connection to the link socket from another process refused");
                    continue;
                }
                // Ends the previous pump, if any.
                drop(pump.take());
                if let Ok(mut e) = error.lock() {
                    *e = None;
                }
                let opener = opener.clone();
                let (marker, error) = (marker.clone(), error.clone());
                let running = Running::start(pumping.clone());
                pump = Some(AbortOnDrop(tokio::spawn(async move {
                    let _running = running;
                    match opener.open().await {
                        Ok(broker) => run_pump(unix, broker, limit, marker, &error).await,
                        Err(e) => {
                            // Not logged here: the link logs it, explained
                            // (tls::explain), when rumqttc's connect fails.
                            debug!("cannot open the broker connection");
                            if let Ok(mut slot) = error.lock() {
                                *slot = Some(e);
                            }
                            // Dropping `unix` tells rumqttc.
                        }
                    }
                })));
            }
        })))
    }
}

/// Counts a pump as running until dropped (also when it is aborted).
struct Running(Arc<watch::Sender<usize>>);

impl Running {
    fn start(count: Arc<watch::Sender<usize>>) -> Running {
        count.send_modify(|n| *n += 1);
        Running(count)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A spawned task that ends when this is dropped.
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pumps bytes until either side closes. A failure reading from the broker
/// (a TLS alert after the handshake: "certificate required" under TLS 1.3)
/// is kept in `error` for the link.
async fn run_pump(
    unix: UnixStream,
    broker: Box<dyn Duplex>,
    limit: usize,
    marker: Marker,
    error: &Mutex<Option<ConnectionError>>,
) {
    let (mut from_agent, mut to_agent) = unix.into_split();
    let (from_broker, mut to_broker) = tokio::io::split(broker);
    let mut from_broker = OversizeFilter::new(from_broker, limit, marker);
    tokio::select! {
        r = tokio::io::copy(&mut from_agent, &mut to_broker) => {
            if let Err(e) = r {
                debug!(error = %e, "agent → broker ended");
            }
            // rumqttc closed its side (after a DISCONNECT, or an error):
            // close the broker's too (TLS close_notify, FIN).
            let _ = tokio::time::timeout(Duration::from_secs(1), to_broker.shutdown()).await;
        }
        r = tokio::io::copy(&mut from_broker, &mut to_agent) => {
            if let Err(e) = r {
                debug!(error = %e, "broker → agent ended");
                if let Ok(mut slot) = error.lock() {
                    *slot = Some(ConnectionError::Io(e));
                }
            }
        }
    }
}

/// How the broker is reached: the transports `tls.rs` makes, without the
/// rumqttc variants the link never uses (`Transport::Unix` is rumqttc's way
/// to this module; TLS configs other than a finished rustls one).
#[derive(Clone)]
enum Route {
    Tcp,
    Tls(Arc<ClientConfig>),
    Ws,
    Wss(Arc<ClientConfig>),
}

impl Route {
    /// Checked once, when the link starts, not at every connection.
    fn of(transport: &Transport) -> io::Result<Route> {
        Ok(match transport {
            Transport::Tcp => Route::Tcp,
            Transport::Tls(TlsConfiguration::Rustls(c)) => Route::Tls(c.clone()),
            Transport::Ws => Route::Ws,
            Transport::Wss(TlsConfiguration::Rustls(c)) => Route::Wss(c.clone()),
            _ => {
                return Err(io::Error::other(
                    "tls.rs made a transport the link does not support (it takes TCP, WebSocket, and a finished rustls config)",
                ))
            }
        })
    }
}

/// Opens the broker connection for one rumqttc connection.
#[derive(Clone)]
struct Opener {
    route: Route,
    /// Host name for TCP/TLS, the full URL for WebSocket (`tls.rs`).
    broker_addr: String,
    host: String,
    port: u16,
    timeout: Duration,
}

impl Opener {
    async fn open(&self) -> Result<Box<dyn Duplex>, ConnectionError> {
        match tokio::time::timeout(self.timeout, self.open_now()).await {
            Ok(r) => r,
            Err(_) => Err(ConnectionError::NetworkTimeout),
        }
    }

    async fn open_now(&self) -> Result<Box<dyn Duplex>, ConnectionError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        Ok(match &self.route {
            Route::Tcp => Box::new(tcp),
            Route::Tls(config) => Box::new(self.tls(config, tcp).await?),
            Route::Ws => Box::new(self.websocket(tcp).await?),
            Route::Wss(config) => {
                let tls = self.tls(config, tcp).await?;
                Box::new(self.websocket(tls).await?)
            }
        })
    }

    async fn tls(
        &self,
        config: &Arc<ClientConfig>,
        tcp: TcpStream,
    ) -> Result<impl Duplex, ConnectionError> {
        let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
            ConnectionError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mqtt.host {:?} is no valid TLS server name: {e}", self.host),
            ))
        })?;
        let connector = rumqttc::tokio_rustls::TlsConnector::from(config.clone());
        Ok(connector.connect(name, tcp).await?)
    }

    /// MQTT over WebSocket (subprotocol `mqtt`) on `stream`, at the URL of
    /// `tls.rs` (`ws://` or `wss://host:port/path`).
    async fn websocket<S>(&self, stream: S) -> Result<impl Duplex, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        use tungstenite::client::IntoClientRequest;
        let mut request = self.broker_addr.as_str().into_client_request()?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tungstenite::http::HeaderValue::from_static("mqtt"),
        );
        let (socket, response) = async_tungstenite::tokio::client_async(request, stream).await?;
        let subprotocol = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        if subprotocol != Some("mqtt") {
            return Err(ConnectionError::Io(io::Error::other(format!(
                "the WebSocket server did not accept the subprotocol \"mqtt\" (answered {subprotocol:?})"
            ))));
        }
        Ok(ws_stream_tungstenite::WsStream::new(socket))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// The rumqttc transports the link never uses are refused once, when it
    /// starts, rather than at every connection attempt.
    #[tokio::test]
    async fn a_transport_the_link_does_not_take_is_refused_at_start() {
        let m = MqttConfig::default();
        let transport = |transport| LinkTransport {
            transport,
            broker_addr: m.host.clone(),
            url: String::new(),
            trust: None,
        };
        let unix = BrokerSocket::new(transport(Transport::Unix), &m, 65536);
        let err = unix.spawn().err().expect("refused");
        assert!(err.to_string().contains("does not support"), "{err}");
        assert!(
            UnixStream::connect(unix.rumqttc_addr()).await.is_err(),
            "no socket bound"
        );
        let tcp = BrokerSocket::new(transport(Transport::Tcp), &m, 65536);
        assert!(tcp.spawn().is_ok());
    }

    /// The link socket bridges this process to the broker, and nobody else:
    /// another local process gets its connection closed at once and no
    /// broker connection (it could borrow a client certificate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_this_process_may_use_the_link_socket() {
        let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut m = MqttConfig {
            host: "127.0.0.1".into(),
            ..MqttConfig::default()
        };
        m.port = broker.local_addr().unwrap().port();
        let transport = LinkTransport {
            transport: Transport::Tcp,
            broker_addr: m.host.clone(),
            url: String::new(),
            trust: None,
        };
        let socket = BrokerSocket::new(transport, &m, 65536);
        let _running = socket.spawn().unwrap();

        let name = &socket.rumqttc_addr()[1..];
        // Closed at once: EOF, a reset or a broken pipe; bridged: the
        // broker never answers and the read times out.
        let script = format!(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(5)\n\
             s.connect(b'\\0{name}')\n\
             try:\n    s.sendall(b'x')\n    print(len(s.recv(16)))\n\
             except (ConnectionResetError, BrokenPipeError):\n    print(0)\n\
             except socket.timeout:\n    print('bridged')\n"
        );
        let out = tokio::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .await
            .expect("python3 runs");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "0\n",
            "closed at once: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // This process: bridged; the broker's first connection is ours.
        let mut ours = UnixStream::connect(socket.rumqttc_addr()).await.unwrap();
        ours.write_all(b"hello").await.unwrap();
        let (mut conn, _) = broker.accept().await.unwrap();
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
