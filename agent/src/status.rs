//! The status task: publishes PROTOCOL §6 reports on
//! `{status_parent}/{client_id}` — `hello` after every CONNACK, `periodic`
//! every `status.interval_s`.
//!
//! Reads: `link_rx` (connection state from the link), asks the engine for a
//! [`Snapshot`] over `query_tx`. Writes: `report_tx` (ready-made payloads
//! the link publishes). Reports are not durable: a report lost with the link
//! is replaced by the next one.
//!
//! Report format (one JSON object per chunk, every chunk ≤ `max_payload`):
//!
//! ```json
//! {"v":1,"type":"status","kind":"hello","agent":"GID_esl@@@a4b1c2d3e4f5",
//!  "version":"0.1.0","at":1764230401234,"uptime_s":12,"report":3,
//!  "chunk":0,"chunks":1,"queues":{"pending":4,"outbox":0},
//!  "radio":{"state":"up"},"store":{"ok":true,"fault":null,"bytes":524288},
//!  "counters":{"tasks_received":10,…},
//!  "tags":[{"tag_id":"SIM000001","battery_mv":2990,"rssi":-61,
//!           "content_hash":"9f86d081884c7d65","last_seen":1764230400000,
//!           "online":true,"pending_task":null}]}
//! ```
//! `report` numbers the reports of one process; `chunk`/`chunks` say which
//! part of that report a message is. Everything but `tags` repeats in every
//! chunk so each chunk stands alone. `tags` lists the tags the agent has
//! heard of (the radio knows them, or they checked in); a tag named only by
//! a pending task has no readings and is counted in `queues.pending` (the
//! `tags.list` command shows it too). This keeps a report's size tied to the
//! store's real tags, not to how many tasks the back end queued.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::counters::Counters;
use crate::msg::{LinkState, Report};
use crate::msg::{Query, Snapshot};
use crate::store::Store;

/// Reports handed to the link but not yet published: one report's chunks.
pub(crate) const REPORT_CAPACITY: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReportKind {
    Hello,
    Periodic,
}

impl ReportKind {
    fn as_str(self) -> &'static str {
        match self {
            ReportKind::Hello => "hello",
            ReportKind::Periodic => "periodic",
        }
    }
}

/// Fixed facts about the agent that every report carries.
pub(crate) struct ReportHeader<'a> {
    pub agent: &'a str,
    pub kind: ReportKind,
    pub report: u64,
    pub at: u64,
    pub uptime_s: u64,
    pub store_bytes: u64,
    pub counters: &'a Counters,
}

/// Splits a snapshot into JSON payloads of at most `max_payload` bytes.
///
/// Each tag record is serialised straight to bytes, once, into one buffer,
/// and the chunks are spliced from it: with 10 000 tags a `serde_json::Value`
/// per tag (as this did before) held about 8 MiB at once, the largest part
/// of the agent's peak memory (docs/BENCHMARKS.md).
pub(crate) fn build_chunks(h: &ReportHeader<'_>, s: &Snapshot, max_payload: usize) -> Vec<Vec<u8>> {
    const EMPTY_TAGS: &str = "\"tags\":[]";
    let counters = h.counters.to_json();
    let envelope = |chunk: usize, chunks: usize| {
        json!({
            "v": 1, "type": "status", "kind": h.kind.as_str(), "agent": h.agent,
            "version": env!("CARGO_PKG_VERSION"), "at": h.at, "uptime_s": h.uptime_s,
            "report": h.report, "chunk": chunk, "chunks": chunks,
            "queues": {"pending": s.pending, "outbox": s.outbox},
            "radio": crate::wire::radio_json(&s.radio, &s.radio_details),
            "store": {"ok": s.store_fault.is_none(), "fault": s.store_fault, "bytes": h.store_bytes},
            "counters": counters,
            "tags": [],
        })
        .to_string()
    };
    // Room for the chunk numbers growing to their final width.
    let budget = max_payload.saturating_sub(envelope(999_999, 999_999).len());
    // Every tag's JSON, back to back; `groups` are the index ranges of the
    // tags each chunk carries.
    let mut all = Vec::new();
    let mut ends = Vec::with_capacity(s.tags.len());
    let mut groups: Vec<std::ops::Range<usize>> = Vec::with_capacity(1);
    groups.push(0..0);
    let mut used = 0;
    for (i, tag) in s.tags.iter().enumerate() {
        let start = all.len();
        if serde_json::to_writer(&mut all, tag).is_err() {
            // A TagView has only strings and numbers; keep the array valid.
            all.truncate(start);
            all.extend_from_slice(b"null");
        }
        ends.push(all.len());
        // +1 for the comma between array items.
        let len = all.len() - start + 1;
        let current = groups
            .last_mut()
            .expect("groups starts non-empty and only grows");
        if current.end > current.start && used + len > budget {
            groups.push(i..i + 1);
            used = len;
        } else {
            current.end = i + 1;
            used += len;
        }
    }
    let chunks = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(n, range)| {
            let head = envelope(n, chunks);
            // The envelope's only empty `tags` array: the records go inside.
            let at =
                head.find(EMPTY_TAGS).expect("the envelope has \"tags\":[]") + EMPTY_TAGS.len() - 1;
            let from = if range.start == 0 {
                0
            } else {
                ends[range.start - 1]
            };
            let to = if range.end == 0 {
                0
            } else {
                ends[range.end - 1]
            };
            let mut out = Vec::with_capacity(head.len() + (to - from) + range.len());
            out.extend_from_slice(&head.as_bytes()[..at]);
            let mut first = true;
            for i in range {
                let begin = if i == 0 { 0 } else { ends[i - 1] };
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(&all[begin..ends[i]]);
            }
            out.extend_from_slice(&head.as_bytes()[at..]);
            out
        })
        .collect()
}

pub(crate) struct StatusTask {
    pub agent: String,
    pub topic: String,
    pub interval: Duration,
    pub max_payload: usize,
    pub store: Arc<Store>,
    pub counters: Arc<Counters>,
    pub link_rx: watch::Receiver<LinkState>,
    pub query_tx: mpsc::Sender<Query>,
    pub report_tx: mpsc::Sender<Report>,
    pub shutdown: CancellationToken,
}

impl StatusTask {
    pub(crate) async fn run(mut self) {
        let started = Instant::now();
        let mut report_no = 0u64;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; hello covers it
        let mut seen_epoch = 0;
        loop {
            let kind = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = self.link_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = *self.link_rx.borrow_and_update();
                    if !state.connected || state.epoch == seen_epoch {
                        continue;
                    }
                    seen_epoch = state.epoch;
                    ReportKind::Hello
                }
                _ = tick.tick() => {
                    if !self.link_rx.borrow().connected {
                        continue;
                    }
                    ReportKind::Periodic
                }
            };
            let (tx, rx) = oneshot::channel();
            if self.query_tx.send(Query::Snapshot(tx)).await.is_err() {
                return;
            }
            let Ok(snapshot) = rx.await else { return };
            report_no += 1;
            let header = ReportHeader {
                agent: &self.agent,
                kind,
                report: report_no,
                at: now_ms(),
                uptime_s: started.elapsed().as_secs(),
                store_bytes: self.store.size_on_disk(),
                counters: &self.counters,
            };
            let chunks = build_chunks(&header, &snapshot, self.max_payload);
            debug!(
                kind = kind.as_str(),
                chunks = chunks.len(),
                tags = snapshot.tags.len(),
                "status report"
            );
            for payload in chunks {
                let report = Report {
                    topic: self.topic.clone(),
                    payload,
                };
                if self.report_tx.try_send(report).is_err() {
                    warn!("status report dropped: the link is not keeping up");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::TagView;
    use esl_hal::RadioState;
    use serde_json::Value;

    fn snapshot(tags: usize) -> Snapshot {
        Snapshot {
            pending: 1,
            outbox: 2,
            radio: RadioState::Up,
            radio_details: Default::default(),
            store_fault: None,
            tags: (0..tags)
                .map(|i| TagView {
                    tag_id: format!("SIM{i:06}"),
                    battery_mv: Some(3000),
                    rssi: Some(-60),
                    content_hash: Some("9f86d081884c7d65".into()),
                    last_seen: Some(1_764_230_400_000),
                    online: true,
                    pending_task: None,
                    radio: None,
                })
                .collect(),
        }
    }

    fn header(counters: &Counters) -> ReportHeader<'_> {
        ReportHeader {
            agent: "GID_test@@@dev1",
            kind: ReportKind::Hello,
            report: 1,
            at: 1,
            uptime_s: 0,
            store_bytes: 0,
            counters,
        }
    }

    #[test]
    fn chunks_fit_the_limit_and_carry_every_tag_once() {
        let counters = Counters::default();
        for limit in [2048, 4096, 65536] {
            let chunks = build_chunks(&header(&counters), &snapshot(500), limit);
            let mut seen = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                assert!(c.len() <= limit, "chunk {i} is {} bytes > {limit}", c.len());
                let v: Value = serde_json::from_slice(c).unwrap();
                assert_eq!(v["chunk"], i);
                assert_eq!(v["chunks"], chunks.len());
                assert_eq!(v["kind"], "hello");
                for t in v["tags"].as_array().unwrap() {
                    seen.push(t["tag_id"].as_str().unwrap().to_owned());
                }
            }
            assert_eq!(seen.len(), 500, "limit {limit}");
            seen.dedup();
            assert_eq!(seen.len(), 500);
            if limit == 2048 {
                assert!(chunks.len() > 10);
            }
        }
    }

    #[test]
    fn a_report_without_tags_is_one_chunk() {
        let counters = Counters::default();
        let chunks = build_chunks(&header(&counters), &snapshot(0), 4096);
        assert_eq!(chunks.len(), 1);
        let v: Value = serde_json::from_slice(&chunks[0]).unwrap();
        assert_eq!(v["queues"]["outbox"], 2);
        assert_eq!(v["radio"]["state"], "up");
    }
}
