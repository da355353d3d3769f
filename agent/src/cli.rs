//! The operator's side of the control socket: `esl-agent status`, `tags`
//! and `tasks` for someone logged into the AP.
//!
//! Blocking std I/O on purpose: one request at a time, no runtime needed.
//! Talks to the control server (`control.rs`) with the PROTOCOL §7 command JSON, fetches
//! every page of a listing, and renders readable tables (or the raw JSON
//! with `--json`). Rendering is pure (JSON in, text out) so it is unit
//! tested without a daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// How long the CLI waits for one reply before giving up on the daemon.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("esl-agent is not running (nothing listens on {path}: {reason})")]
    NotRunning { path: PathBuf, reason: String },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent is busy: all {max} control connections are in use (control socket {path}); try again in a moment", max = crate::control::MAX_CLIENTS)]
    Busy { path: PathBuf },
    #[error("the agent answered with something that is not a reply: {0}")]
    BadReply(String),
    #[error("{code}: {message}")]
    Remote { code: String, message: String },
}

pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, CliError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                CliError::NotRunning {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }
            }
            _ => CliError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
        let io = |source| CliError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        Ok(Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            next_id: 1,
        })
    }

    /// Calls one method; an error reply becomes [`CliError::Remote`].
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CliError> {
        let io = |source| CliError::Io {
            path: self.path.clone(),
            source,
        };
        let req_id = format!("cli-{}", self.next_id);
        self.next_id += 1;
        let mut line =
            json!({"v": 1, "req_id": req_id, "method": method, "params": params}).to_string();
        line.push('\n');
        let written = self.reader.get_mut().write_all(line.as_bytes());
        // A refused connection holds one `busy` line and is closed, so the
        // write may fail (broken pipe) while that line is still there.
        let mut reply = String::new();
        let read = self.reader.read_line(&mut reply);
        if is_busy(&reply) {
            return Err(CliError::Busy {
                path: self.path.clone(),
            });
        }
        written.map_err(io)?;
        let n = read.map_err(io)?;
        if n == 0 {
            return Err(CliError::BadReply("the agent closed the connection".into()));
        }
        let v: Value =
            serde_json::from_str(&reply).map_err(|e| CliError::BadReply(e.to_string()))?;
        if v["ok"] == true {
            Ok(v["result"].clone())
        } else {
            Err(CliError::Remote {
                code: v["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                message: v["error"]["message"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    /// Fetches every page of a listing (`tags.list`, `tasks.list`), up to
    /// `max` items.
    pub fn list_all(
        &mut self,
        method: &str,
        key: &str,
        mut params: Value,
        max: usize,
    ) -> Result<Vec<Value>, CliError> {
        let mut items = Vec::new();
        loop {
            let page = self.call(method, params.clone())?;
            if let Some(a) = page[key].as_array() {
                items.extend(a.iter().cloned());
            }
            match page["next"].as_str() {
                Some(next) if items.len() < max => params["after"] = next.into(),
                _ => break,
            }
        }
        items.truncate(max);
        Ok(items)
    }
}

/// Whether `line` is the control socket's answer to a connection beyond
/// its limit (`control::BUSY_REPLY`).
fn is_busy(line: &str) -> bool {
    serde_json::from_str::<Value>(line).is_ok_and(|v| v["error"]["code"] == "busy")
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`, or `never`.
pub fn ago(then_ms: Option<u64>, now_ms: u64) -> String {
    let Some(then) = then_ms else {
        return "never".into();
    };
    let s = now_ms.saturating_sub(then) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn render_status(s: &Value) -> String {
    let mut out = String::new();
    let radio = match s["radio"]["state"].as_str() {
        Some("down") => format!("down ({})", text(&s["radio"]["reason"])),
        Some(state) => state.to_owned(),
        None => "-".into(),
    };
    let mqtt = if s["mqtt"]["connected"] == true {
        "connected"
    } else {
        "disconnected"
    };
    out.push_str(&format!(
        "agent    {} (version {})\n",
        text(&s["agent"]),
        text(&s["version"])
    ));
    out.push_str(&format!("mqtt     {mqtt}\n"));
    out.push_str(&format!("radio    {radio}\n"));
    out.push_str(&format!("pending  {} tasks\n", text(&s["pending"])));
    out.push_str(&format!(
        "outbox   {} acks waiting for the broker\n",
        text(&s["outbox"])
    ));
    if let Some(c) = s["counters"].as_object() {
        out.push_str("counters\n");
        for (k, v) in c {
            out.push_str(&format!("  {k:<20} {v}\n"));
        }
    }
    out
}

pub fn render_tags(tags: &[Value], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = tags
        .iter()
        .map(|t| {
            vec![
                text(&t["tag_id"]),
                t["battery_mv"]
                    .as_u64()
                    .map_or("-".into(), |b| format!("{b} mV")),
                t["rssi"]
                    .as_i64()
                    .map_or("-".into(), |r| format!("{r} dBm")),
                ago(t["last_seen"].as_u64(), now_ms),
                if t["online"] == true { "yes" } else { "no" }.into(),
                text(&t["content_hash"]),
                text(&t["pending_task"]),
            ]
        })
        .collect();
    table(
        &[
            "TAG",
            "BATTERY",
            "SIGNAL",
            "LAST SEEN",
            "ONLINE",
            "CONTENT",
            "PENDING TASK",
        ],
        &rows,
    )
}

pub fn render_tasks(tasks: &[Value], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let state = match t["status"].as_str() {
                Some(status) => status.to_owned(),
                None => text(&t["state"]),
            };
            vec![
                text(&t["task_id"]),
                text(&t["tag_id"]),
                state,
                text(&t["attempts"]),
                ago(t["accepted_at"].as_u64(), now_ms),
                text(&t["detail"]),
            ]
        })
        .collect();
    table(
        &["TASK", "TAG", "STATE", "ATTEMPTS", "RECEIVED", "DETAIL"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ago_is_readable() {
        assert_eq!(ago(None, 5), "never");
        assert_eq!(ago(Some(1_000), 13_000), "12s ago");
        assert_eq!(ago(Some(0), 300_000), "5m ago");
        assert_eq!(ago(Some(0), 3 * 3_600_000), "3h ago");
        assert_eq!(ago(Some(0), 3 * 86_400_000), "3d ago");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONG"],
            &[
                vec!["xxxx".into(), "y".into()],
                vec!["z".into(), "w".into()],
            ],
        );
        assert_eq!(t, "A     LONG\nxxxx  y\nz     w\n");
    }

    #[test]
    fn tags_table_shows_every_tag_with_units() {
        let tags = vec![
            json!({"tag_id":"SIM000001","battery_mv":2990,"rssi":-61,"last_seen":1_000,"online":true,
                   "content_hash":"9f86d081884c7d65","pending_task":null}),
            json!({"tag_id":"SIM000002","battery_mv":null,"rssi":null,"last_seen":null,"online":false,
                   "content_hash":null,"pending_task":"t-9"}),
        ];
        let out = render_tags(&tags, 11_000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TAG"));
        assert!(
            lines[1].contains("2990 mV")
                && lines[1].contains("-61 dBm")
                && lines[1].contains("10s ago")
        );
        assert!(lines[2].contains("never") && lines[2].contains("t-9"));
    }

    #[test]
    fn tasks_table_prefers_the_final_status() {
        let tasks = vec![
            json!({"task_id":"t-1","tag_id":"A","state":"final","status":"applied","attempts":1,"accepted_at":0,"detail":null}),
            json!({"task_id":"t-2","tag_id":"B","state":"pending","status":null,"attempts":0,"accepted_at":0,"detail":null}),
        ];
        let out = render_tasks(&tasks, 1_000);
        assert!(out.lines().nth(1).unwrap().contains("applied"));
        assert!(out.lines().nth(2).unwrap().contains("pending"));
    }

    #[test]
    fn a_missing_socket_means_not_running() {
        let err = Client::connect(Path::new("/nonexistent/esl-agent.sock"))
            .err()
            .unwrap();
        assert!(matches!(err, CliError::NotRunning { .. }), "{err}");
        assert!(err.to_string().contains("not running"));
    }
}
