//! The systemd task: tells the service manager when the agent is ready, that
//! it is alive, and when it stops (the `sd_notify` protocol of a
//! `Type=notify` unit with `WatchdogSec=`).
//!
//! Reads: `link_rx` (connection state from the link), the engine's answers
//! to [`Query::Ping`] over `query_tx`. Writes: datagrams to the socket named
//! by `$NOTIFY_SOCKET`. It owns nothing else and never stops the agent: a
//! datagram that cannot be sent is logged and dropped.
//!
//! What it sends, and why then:
//! - `READY=1` once, after the first CONNACK. The store is open before this
//!   task is started ([`crate::start`] opens it first), so "ready" means:
//!   tasks can arrive and be stored.
//! - `WATCHDOG=1` every half of `$WATCHDOG_USEC`, but only if the engine
//!   answered a ping within that half: a wedged engine loop (the part that
//!   stores tasks and releases PUBACKs) stops the pings, and systemd
//!   restarts the agent. Pings start at once, before READY: systemd arms the
//!   watchdog on the first ping, so an agent that hangs while it waits for
//!   the broker is caught too.
//! - `STATUS=…` on every link change, for `systemctl status`.
//! - `STOPPING=1` when shutdown begins.
//!
//! Without `$NOTIFY_SOCKET` (OpenWrt's procd, a shell, the tests) the task is
//! not started at all: [`NotifySocket::from_env`] returns `None`.
//!
//! The protocol is a few lines over a Unix datagram socket, written here
//! rather than taken from the `sd-notify` crate so that the socket address
//! is a value the task owns: unit tests give each task its own socket
//! instead of sharing the process environment.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::msg::LinkState;
use crate::msg::Query;

/// A problem with the environment systemd hands us.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract socket (@name)")]
    Address(String),
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds")]
    WatchdogUsec(String),
    #[error("cannot create the notification socket: {0}")]
    Socket(io::Error),
}

/// Where systemd listens for our notifications.
#[derive(Debug)]
pub(crate) struct NotifySocket {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// For logs: the address as systemd gave it.
    name: String,
}

impl NotifySocket {
    /// The socket of `$NOTIFY_SOCKET`, or `None` when the agent does not run
    /// under systemd (or the variable is unusable: that is logged).
    pub(crate) fn from_env() -> Option<NotifySocket> {
        let name = std::env::var("NOTIFY_SOCKET").ok()?;
        match NotifySocket::new(&name) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "not sending readiness or watchdog notifications");
                None
            }
        }
    }

    /// A socket that sends to `name`: an absolute path, or `@name` for a
    /// socket in the abstract namespace (what systemd uses in containers).
    pub(crate) fn new(name: &str) -> Result<NotifySocket, NotifyError> {
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            abstract_addr(abstract_name.as_bytes())
                .map_err(|_| NotifyError::Address(name.to_owned()))?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name).map_err(|_| NotifyError::Address(name.to_owned()))?
        } else {
            return Err(NotifyError::Address(name.to_owned()));
        };
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        // systemd reads its socket promptly; if it ever does not, dropping a
        // notification beats blocking a runtime worker thread.
        socket.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(NotifySocket {
            socket,
            addr,
            name: name.to_owned(),
        })
    }

    /// Sends one notification (`KEY=VALUE` lines). Errors are logged, not
    /// returned: nothing the agent does depends on systemd hearing it.
    pub(crate) fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            warn!(error = %e, socket = %self.name, message, "systemd notification not sent");
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, as systemd
/// recommends, or `None` when the watchdog is off or meant for another
/// process (`$WATCHDOG_PID` names a different PID).
pub(crate) fn watchdog_interval_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    match watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id()) {
        Ok(interval) => interval,
        Err(e) => {
            warn!(error = %e, "watchdog off");
            None
        }
    }
}

/// [`watchdog_interval_from_env`] on given values.
pub(crate) fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else { return Ok(None) };
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(my_pid) {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(Duration::from_micros(n) / 2)),
        _ => Err(NotifyError::WatchdogUsec(usec.to_owned())),
    }
}

/// The `STATUS=` line for a link state.
fn status_line(link: LinkState) -> &'static str {
    match (link.connected, link.epoch) {
        (true, _) => "STATUS=Connected to the broker",
        (false, 0) => "STATUS=Store open; connecting to the broker",
        (false, _) => "STATUS=Broker link lost; reconnecting",
    }
}

/// The task: its socket, watchdog period and channel ends.
pub(crate) struct SystemdTask {
    pub socket: NotifySocket,
    /// Half of `WatchdogSec`; `None` without a watchdog.
    pub watchdog: Option<Duration>,
    pub link_rx: watch::Receiver<LinkState>,
    pub query_tx: mpsc::Sender<Query>,
    pub shutdown: CancellationToken,
}

impl SystemdTask {
    pub(crate) async fn run(mut self) {
        let mut ready = false;
        let mut link_open = true;
        // A disabled watchdog still needs a timer for `select!`; it never
        // fires in practice.
        let period = self.watchdog.unwrap_or(Duration::from_secs(86_400));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(socket = %self.socket.name, watchdog_ping_every = ?self.watchdog, "notifying systemd");
        let first = *self.link_rx.borrow_and_update();
        self.on_link(first, &mut ready);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                changed = self.link_rx.changed(), if link_open => match changed {
                    Ok(()) => {
                        let link = *self.link_rx.borrow_and_update();
                        self.on_link(link, &mut ready);
                    }
                    // The link has ended; the agent is stopping.
                    Err(_) => link_open = false,
                },
                _ = tick.tick(), if self.watchdog.is_some() => {
                    if self.engine_answers(period).await {
                        self.socket.send("WATCHDOG=1");
                    } else if !self.shutdown.is_cancelled() {
                        warn!(waited = ?period, "the engine did not answer; withholding the watchdog ping");
                    }
                }
            }
        }
        self.socket.send("STOPPING=1\nSTATUS=Shutting down");
        debug!("systemd notifications stopped");
    }

    fn on_link(&self, link: LinkState, ready: &mut bool) {
        if link.connected && !*ready {
            *ready = true;
            self.socket.send(&format!("READY=1\n{}", status_line(link)));
        } else {
            self.socket.send(status_line(link));
        }
    }

    /// Whether the engine loop answered a ping within `limit`.
    async fn engine_answers(&self, limit: Duration) -> bool {
        let ping = async {
            let (tx, rx) = oneshot::channel();
            self.query_tx.send(Query::Ping(tx)).await.is_ok() && rx.await.is_ok()
        };
        tokio::select! {
            answered = tokio::time::timeout(limit, ping) => answered.unwrap_or(false),
            _ = self.shutdown.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixDatagram as AsyncDatagram;

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_this_process() {
        let half = Duration::from_secs(15);
        assert_eq!(watchdog_interval(None, None, 7).unwrap(), None);
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7).unwrap(),
            Some(half)
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7).unwrap(),
            Some(half)
        );
        // Meant for another process (inherited from a parent).
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("8"), 7).unwrap(),
            None
        );
        for bad in ["0", "-1", "30s", ""] {
            let err = watchdog_interval(Some(bad), None, 7).unwrap_err();
            assert!(err.to_string().contains("WATCHDOG_USEC"), "{err}");
        }
    }

    #[test]
    fn notify_socket_must_be_absolute_or_abstract() {
        for bad in ["", "relative/notify", "notify"] {
            let err = NotifySocket::new(bad).unwrap_err();
            assert!(matches!(err, NotifyError::Address(_)), "{bad:?}: {err}");
        }
        NotifySocket::new("/run/systemd/notify").unwrap();
        NotifySocket::new("@/org/freedesktop/systemd1/notify/1").unwrap();
    }

    #[tokio::test]
    async fn sends_to_an_abstract_socket() {
        let name = format!("esl-agent-test-{}", std::process::id());
        let std_rx = UnixDatagram::bind_addr(&abstract_addr(name.as_bytes()).unwrap()).unwrap();
        std_rx.set_nonblocking(true).unwrap();
        let receiver = AsyncDatagram::from_std(std_rx).unwrap();
        NotifySocket::new(&format!("@{name}"))
            .unwrap()
            .send("READY=1");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), receiver.recv(&mut buf))
            .await
            .expect("datagram within 5 s")
            .unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    /// A task under test with its own socket, link and fake engine.
    struct Fixture {
        _dir: tempfile::TempDir,
        /// Datagrams as "systemd" received them. A collector reads the
        /// socket at once, as systemd does: a Unix datagram queue holds only
        /// `net.unix.max_dgram_qlen` (10) messages.
        systemd: mpsc::UnboundedReceiver<String>,
        link_tx: watch::Sender<LinkState>,
        /// While true, the fake engine answers pings.
        engine_alive: watch::Sender<bool>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    const HALF: Duration = Duration::from_secs(5);

    impl Fixture {
        fn start(watchdog: Option<Duration>) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = AsyncDatagram::bind(&path).unwrap();
            let (received_tx, systemd) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok(n) = socket.recv(&mut buf).await {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if received_tx.send(message).is_err() {
                        break;
                    }
                }
            });
            let (link_tx, link_rx) = watch::channel(LinkState::default());
            let (query_tx, mut query_rx) = mpsc::channel(crate::engine::QUERY_CAPACITY);
            let (engine_alive, alive_rx) = watch::channel(true);
            // The fake engine: answers pings while alive; while "stalled" it
            // leaves them unanswered, like a loop stuck in a slow flush.
            tokio::spawn(async move {
                let mut parked = Vec::new();
                while let Some(q) = query_rx.recv().await {
                    match q {
                        Query::Ping(reply) if *alive_rx.borrow() => {
                            let _ = reply.send(());
                        }
                        other => parked.push(other),
                    }
                }
            });
            let shutdown = CancellationToken::new();
            let task = SystemdTask {
                socket: NotifySocket::new(path.to_str().unwrap()).unwrap(),
                watchdog,
                link_rx,
                query_tx,
                shutdown: shutdown.clone(),
            };
            let task = tokio::spawn(task.run());
            Fixture {
                _dir: dir,
                systemd,
                link_tx,
                engine_alive,
                shutdown,
                task,
            }
        }

        /// Every notification received so far.
        fn drain(&mut self) -> Vec<String> {
            let mut out = Vec::new();
            while let Ok(message) = self.systemd.try_recv() {
                out.push(message);
            }
            out
        }

        /// Waits (paused time) for a notification containing `line`.
        async fn expect(&mut self, line: &str) -> Vec<String> {
            let mut seen = Vec::new();
            loop {
                let message = tokio::time::timeout(Duration::from_secs(60), self.systemd.recv())
                    .await
                    .unwrap_or_else(|_| panic!("no {line:?} within 60 s; got {seen:?}"))
                    .expect("the collector runs as long as the fixture");
                let found = message.lines().any(|l| l == line);
                seen.push(message);
                if found {
                    return seen;
                }
            }
        }
    }

    fn count(messages: &[String], line: &str) -> usize {
        messages
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waits_for_the_first_connack() {
        let mut f = Fixture::start(None);
        tokio::time::sleep(Duration::from_secs(120)).await;
        let before = f.drain();
        assert_eq!(count(&before, "READY=1"), 0, "{before:?}");
        assert!(
            before
                .iter()
                .any(|m| m.contains("STATUS=Store open; connecting")),
            "{before:?}"
        );

        f.link_tx.send_replace(LinkState {
            connected: true,
            epoch: 1,
        });
        f.expect("READY=1").await;
        // A reconnect is not a second READY.
        f.link_tx.send_replace(LinkState {
            connected: false,
            epoch: 1,
        });
        f.expect("STATUS=Broker link lost; reconnecting").await;
        f.link_tx.send_replace(LinkState {
            connected: true,
            epoch: 2,
        });
        let after = f.expect("STATUS=Connected to the broker").await;
        assert_eq!(count(&after, "READY=1"), 0, "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_every_half_period_while_the_engine_answers() {
        let mut f = Fixture::start(Some(HALF));
        // Before READY too: systemd arms the watchdog on the first ping.
        tokio::time::sleep(HALF * 12).await;
        let pings = count(&f.drain(), "WATCHDOG=1");
        // Ticks at 0, 5, …, 60 s; the last one may fall either side.
        assert!((12..=13).contains(&pings), "{pings} pings in 60 s");
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_engine_gets_no_watchdog_ping() {
        let mut f = Fixture::start(Some(HALF));
        f.expect("WATCHDOG=1").await;
        f.engine_alive.send_replace(false);
        tokio::time::sleep(HALF).await;
        f.drain();
        tokio::time::sleep(HALF * 6).await;
        let stalled = f.drain();
        assert_eq!(count(&stalled, "WATCHDOG=1"), 0, "{stalled:?}");

        f.engine_alive.send_replace(true);
        f.expect("WATCHDOG=1").await;
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_is_sent_when_shutdown_begins() {
        let mut f = Fixture::start(Some(HALF));
        f.expect("STATUS=Store open; connecting to the broker")
            .await;
        f.shutdown.cancel();
        f.expect("STOPPING=1").await;
        tokio::time::timeout(Duration::from_secs(5), f.task)
            .await
            .expect("the task ends at shutdown")
            .unwrap();
    }
}
