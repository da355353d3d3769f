//! The control socket task: lets `esl-agent status|tags|tasks` talk to the
//! running daemon (the store is locked by the daemon, so the CLI cannot read
//! it directly).
//!
//! Protocol: a Unix stream socket (mode 0600, so only the agent's user and
//! root can use it); the client writes one JSON request per line — the same
//! object as an MQTT command (PROTOCOL §7, `reply_to`/`reply` ignored) — and
//! reads one JSON reply per line.
//!
//! Reads: client connections. Writes: `query_tx` (`Query::Command` to the
//! engine, which executes it like an MQTT command). Owns the socket file:
//! a stale *socket* from a crashed agent is replaced at start; anything else
//! at that path is a config error (`control.socket`), never deleted. The
//! file is removed at shutdown.
//!
//! At most [`MAX_CLIENTS`] connections are served at once; one more is told
//! that the agent is busy (a `busy` error line) and closed. A client that
//! sends no request for [`READ_TIMEOUT`], or does not take a reply within
//! [`WRITE_TIMEOUT`], is dropped, so silent or stuck clients cannot hold the
//! slots. Local callers are trusted by the socket's file mode (0600): they
//! may call every method, whatever `security.allowed_methods` says.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::msg::Query;

/// Operators rarely run more than one CLI at a time; a few spare slots, and
/// a stuck client cannot exhaust the agent.
pub(crate) const MAX_CLIENTS: usize = 4;
/// A connection that sends no (complete) request for this long is closed.
/// The CLI sends its next request at once; a person typing into `socat`
/// has this long per line.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply the client does not take within this long closes the
/// connection (the CLI reads at once).
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// What a client beyond [`MAX_CLIENTS`] reads before the socket closes.
pub(crate) const BUSY_REPLY: &str = "{\"v\":1,\"type\":\"reply\",\"req_id\":null,\"ok\":false,\"error\":{\"code\":\"busy\",\"message\":\"the agent is busy: every control connection is in use; try again\"}}\n";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("control socket {path}: another agent is listening there")]
    InUse { path: PathBuf },
    #[error("config key `control.socket`: {path} exists and is not a socket; the agent does not replace it (choose another path or remove it)")]
    NotASocket { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    max_line: usize,
    query_tx: mpsc::Sender<Query>,
    shutdown: CancellationToken,
    timeouts: Timeouts,
}

/// Per-connection time-outs ([`READ_TIMEOUT`], [`WRITE_TIMEOUT`]; shorter
/// in tests).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    read: Duration,
    write: Duration,
}

/// Whether the agent may bind `path`: nothing there, or a socket (a stale
/// one is replaced by [`ControlServer::bind`]). Anything else — a regular
/// file, a directory, a symbolic link — is a config error: the agent
/// deletes only what it made.
pub(crate) fn check_path(path: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(ControlError::NotASocket {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ControlError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

impl ControlServer {
    /// Binds the socket, replacing a stale socket left by a crashed agent
    /// (and nothing else, see [`check_path`]).
    pub(crate) fn bind(
        path: &Path,
        max_line: usize,
        query_tx: mpsc::Sender<Query>,
        shutdown: CancellationToken,
    ) -> Result<ControlServer, ControlError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        check_path(path)?;
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            max_line,
            query_tx,
            shutdown,
            timeouts: Timeouts {
                read: READ_TIMEOUT,
                write: WRITE_TIMEOUT,
            },
        })
    }

    #[cfg(test)]
    fn with_timeouts(mut self, read: Duration, write: Duration) -> Self {
        self.timeouts = Timeouts { read, write };
        self
    }

    pub(crate) async fn run(self) {
        info!(socket = %self.path.display(), "control socket ready");
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            debug!("control client refused: too many connections");
                            // Best effort and never blocking: a fresh
                            // socket's buffer takes one short line. The CLI
                            // reads it even after its own write failed.
                            // Written by the plain syscall: tokio's
                            // `try_write` refuses until the reactor has
                            // seen the new socket writable.
                            if let Ok(mut refused) = stream.into_std() {
                                let _ = std::io::Write::write(&mut refused, BUSY_REPLY.as_bytes());
                            }
                            continue;
                        };
                        let query_tx = self.query_tx.clone();
                        let max_line = self.max_line;
                        let shutdown = self.shutdown.clone();
                        let timeouts = self.timeouts;
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                result = serve(stream, query_tx, max_line, timeouts) => {
                                    if let Err(e) = result {
                                        debug!(error = %e, "control client ended");
                                    }
                                }
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            debug!(error = %e, "control socket not removed");
        }
    }
}

/// Writes `bytes` unless the client has not taken them within `timeout`.
async fn write_timed(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(timeout, write.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client does not read its replies",
        )),
    }
}

/// Serves one client: a reply line for every request line.
async fn serve(
    stream: UnixStream,
    query_tx: mpsc::Sender<Query>,
    max_line: usize,
    timeouts: Timeouts,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = (max_line + 1) as u64;
        let n = match tokio::time::timeout(
            timeouts.read,
            (&mut reader).take(limit).read_until(b'\n', &mut line),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Ok(()), // idle
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 >= limit {
            let msg = format!(
                "{{\"v\":1,\"type\":\"reply\",\"req_id\":null,\"ok\":false,\"error\":{{\"code\":\"bad_request\",\"message\":\"request longer than {max_line} bytes\"}}}}\n"
            );
            write_timed(&mut write, msg.as_bytes(), timeouts.write).await?;
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let payload = Bytes::copy_from_slice(line.trim_ascii());
        if query_tx
            .send(Query::Command { payload, reply: tx })
            .await
            .is_err()
        {
            return Ok(()); // engine stopped
        }
        let Ok(mut reply) = rx.await else {
            return Ok(());
        };
        reply.push(b'\n');
        write_timed(&mut write, &reply, timeouts.write).await?;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::cli::{CliError, Client};

    /// A fake engine: answers every command with a reply of about `size`
    /// bytes.
    fn fake_engine(size: usize) -> mpsc::Sender<Query> {
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(q) = rx.recv().await {
                if let Query::Command { reply, .. } = q {
                    let body = format!(
                        "{{\"v\":1,\"type\":\"reply\",\"req_id\":null,\"ok\":true,\"result\":\"{}\"}}",
                        "x".repeat(size)
                    );
                    let _ = reply.send(body.into_bytes());
                }
            }
        });
        tx
    }

    fn serve_at(path: &Path, reply_size: usize, read: Duration, write: Duration) {
        let server = ControlServer::bind(
            path,
            65536,
            fake_engine(reply_size),
            CancellationToken::new(),
        )
        .unwrap()
        .with_timeouts(read, write);
        tokio::spawn(server.run());
    }

    async fn cli_call(path: &Path) -> Result<serde_json::Value, CliError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Client::connect(&path)?.call("agent.status", json!({})))
            .await
            .unwrap()
    }

    /// Calls until the agent answers (a busy refusal is retried) or the
    /// deadline passes.
    async fn served_within(path: &Path, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            match cli_call(path).await {
                Ok(_) => return true,
                Err(CliError::Busy { .. }) => {}
                Err(e) => panic!("not a busy refusal: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Issue 14 item 6: four silent clients locked the CLI out for 60 s,
    /// and the refused CLI said "Broken pipe". Now the fifth is told the
    /// agent is busy, and the silent ones are dropped after the read
    /// time-out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_clients_are_dropped_and_a_refused_cli_hears_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        // The read time-out leaves the busy check below ample time.
        serve_at(&path, 10, Duration::from_secs(5), Duration::from_secs(5));
        let mut silent = Vec::new();
        for _ in 0..MAX_CLIENTS {
            silent.push(UnixStream::connect(&path).await.unwrap());
        }
        match cli_call(&path).await {
            Err(e @ CliError::Busy { .. }) => assert!(e.to_string().contains("busy"), "{e}"),
            other => panic!("wanted a busy refusal, got {other:?}"),
        }
        assert!(served_within(&path, Duration::from_secs(15)).await);
        for mut s in silent {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("a silent client is closed")
                .unwrap_or(0);
            assert_eq!(n, 0, "closed without a reply");
        }
    }

    /// Issue 14 item 6: clients that send requests and never read held
    /// every slot for ever (writes had no time-out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_that_never_read_are_dropped_after_the_write_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        serve_at(
            &path,
            60_000,
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let mut stuck = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let mut s = UnixStream::connect(&path).await.unwrap();
            let requests = "{\"v\":1,\"method\":\"agent.status\"}\n".repeat(64);
            s.write_all(requests.as_bytes()).await.unwrap();
            stuck.push(s);
        }
        assert!(
            served_within(&path, Duration::from_secs(15)).await,
            "the stuck clients still hold every slot"
        );
        drop(stuck);
    }

    /// Issue 14 item 7: a regular file at `control.socket` was deleted and
    /// replaced; only a stale socket may be.
    #[tokio::test]
    async fn only_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, "keep me").unwrap();
        let shutdown = CancellationToken::new();
        let (tx, _rx) = mpsc::channel(1);
        let err = ControlServer::bind(&file, 1024, tx.clone(), shutdown.clone())
            .err()
            .expect("a regular file is refused");
        assert!(matches!(err, ControlError::NotASocket { .. }), "{err}");
        assert!(err.to_string().contains("control.socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        assert!(check_path(dir.path()).is_err(), "a directory is refused");

        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        ControlServer::bind(&stale, 1024, tx, shutdown).expect("a stale socket is replaced");
    }
}
