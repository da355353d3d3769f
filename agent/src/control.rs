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
//! a stale one from a crashed agent is replaced at start, the file is removed
//! at shutdown. At most [`MAX_CLIENTS`] connections are served at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::Query;

/// Operators rarely run more than one CLI at a time; a few spare slots, and
/// a stuck client cannot exhaust the agent.
pub const MAX_CLIENTS: usize = 4;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: another agent is listening there")]
    InUse { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    max_line: usize,
    query_tx: mpsc::Sender<Query>,
    shutdown: CancellationToken,
}

impl ControlServer {
    /// Binds the socket, replacing a stale one left by a crashed agent.
    pub fn bind(
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
        })
    }

    pub async fn run(self) {
        info!(socket = %self.path.display(), "control socket ready");
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            debug!("control client refused: too many connections");
                            continue;
                        };
                        let query_tx = self.query_tx.clone();
                        let max_line = self.max_line;
                        let shutdown = self.shutdown.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                result = serve(stream, query_tx, max_line) => {
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

/// Serves one client: a reply line for every request line.
async fn serve(
    stream: UnixStream,
    query_tx: mpsc::Sender<Query>,
    max_line: usize,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = (max_line + 1) as u64;
        let n = match tokio::time::timeout(
            IDLE_TIMEOUT,
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
            write.write_all(msg.as_bytes()).await?;
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
        write.write_all(&reply).await?;
    }
}
