//! The back end's books: every message it sent, the final ack each one got,
//! and what the agent last reported about its tags.
//!
//! Fed by the demo's drive loop (one owner, no locks): `record_sent` when a
//! message goes out, `on_message` for whatever arrives on the back end's
//! subscriptions. It checks the promise of PROTOCOL §5 from the outside:
//! every sent task gets exactly one final status; the same ack arriving
//! again (at least once) is counted as a repeat, a *different* final status
//! for one task as a conflict.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, warn};

use super::plan::Planned;
use super::{DemoSummary, Latency, Outcomes, TagLine};
use crate::wire::{Ack, AckStatus};

/// A tag as the agent reports it, in status reports and `tags.list` replies
/// (PROTOCOL §6).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TagRecord {
    pub tag_id: String,
    pub battery_mv: Option<u16>,
    pub rssi: Option<i16>,
    pub content_hash: Option<String>,
    pub last_seen: Option<u64>,
    #[serde(default)]
    pub online: bool,
}

/// What a message from the agent was, as far as the drive loop cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Received {
    Hello,
    Reply { req_id: Option<String> },
    Other,
}

struct Sent {
    tag_id: Option<String>,
    seq: u64,
    /// `"Milk 1L" 9.90 CNY`, for the summary's tag lines.
    label: String,
    at: Instant,
    /// Kept until the final ack, so the first applied task can be resent.
    payload: Vec<u8>,
    outcome: Option<AckStatus>,
}

/// The one task resent with the same `task_id` to show duplicate handling.
enum Duplicate {
    /// No task applied yet.
    Waiting,
    /// The first applied task: resend this.
    Ready {
        task_id: String,
        payload: Vec<u8>,
    },
    Sent {
        task_id: String,
    },
    Answered,
}

pub(crate) struct Ledger {
    sent: HashMap<String, Sent>,
    /// Entries of `sent` without an outcome yet, kept as a count because
    /// the drive loop asks after every message.
    open: usize,
    /// Send times of malformed messages without a readable `task_id`; their
    /// `rejected` acks carry `"task_id": null` and are matched by count.
    anonymous: VecDeque<Instant>,
    messages: usize,
    malformed: usize,
    outcomes: Outcomes,
    applied_ms: Vec<u64>,
    duplicate: Duplicate,
    duplicates_seen: usize,
    repeated: usize,
    conflicting: usize,
    unexpected: usize,
    example_ack: Option<String>,
    example_rejection: Option<String>,
    /// Per tag: seq, content hash and label of the newest applied task.
    shown: HashMap<String, (u64, String, String)>,
    /// Latest record per tag from the agent.
    tags: BTreeMap<String, TagRecord>,
    /// Outbox depth from the latest status report.
    outbox: Option<u64>,
}

impl Ledger {
    pub(crate) fn new() -> Ledger {
        Ledger {
            sent: HashMap::new(),
            open: 0,
            anonymous: VecDeque::new(),
            messages: 0,
            malformed: 0,
            outcomes: Outcomes::default(),
            applied_ms: Vec::new(),
            duplicate: Duplicate::Waiting,
            duplicates_seen: 0,
            repeated: 0,
            conflicting: 0,
            unexpected: 0,
            example_ack: None,
            example_rejection: None,
            shown: HashMap::new(),
            tags: BTreeMap::new(),
            outbox: None,
        }
    }

    pub(crate) fn record_sent(&mut self, planned: &Planned, payload: Vec<u8>, at: Instant) {
        self.messages += 1;
        let (tag_id, seq, label) = match planned {
            Planned::Task(t) => (
                Some(t.tag_id.clone()),
                t.seq,
                format!("{:?} {} CNY", t.product, t.price),
            ),
            Planned::Malformed { .. } => {
                self.malformed += 1;
                (None, 0, String::new())
            }
        };
        let Some(task_id) = planned.task_id() else {
            self.anonymous.push_back(at);
            return;
        };
        let sent = Sent {
            tag_id,
            seq,
            label,
            at,
            payload,
            outcome: None,
        };
        self.open += 1;
        self.sent.insert(task_id.to_owned(), sent);
    }

    /// The first applied task's message, to resend once with its `task_id`.
    pub(crate) fn duplicate_to_send(&self) -> Option<Vec<u8>> {
        match &self.duplicate {
            Duplicate::Ready { payload, .. } => Some(payload.clone()),
            _ => None,
        }
    }

    pub(crate) fn duplicate_sent(&mut self) {
        if let Duplicate::Ready { task_id, .. } = &mut self.duplicate {
            let task_id = std::mem::take(task_id);
            self.duplicate = Duplicate::Sent { task_id };
        }
    }

    /// Sent messages still waiting for their final ack (or, for the
    /// duplicate resend, for its repeated ack).
    pub(crate) fn unresolved(&self) -> usize {
        let duplicate = matches!(self.duplicate, Duplicate::Sent { .. });
        self.open + self.anonymous.len() + usize::from(duplicate)
    }

    pub(crate) fn on_message(&mut self, payload: &[u8]) -> Received {
        let value: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "back end: a message from the agent is not JSON");
                self.unexpected += 1;
                return Received::Other;
            }
        };
        match value["type"].as_str() {
            Some("ack") => match serde_json::from_value::<Ack>(value) {
                Ok(ack) => self.on_ack(ack, payload),
                Err(e) => {
                    warn!(error = %e, "back end: an ack does not match PROTOCOL §5");
                    self.unexpected += 1;
                }
            },
            Some("reply") => {
                self.read_tags(&value["result"]["tags"]);
                return Received::Reply {
                    req_id: value["req_id"].as_str().map(str::to_owned),
                };
            }
            Some("status") => {
                self.read_tags(&value["tags"]);
                self.outbox = value["queues"]["outbox"].as_u64().or(self.outbox);
                if value["kind"] == "hello" {
                    return Received::Hello;
                }
            }
            other => debug!(kind = ?other, "back end: message ignored"),
        }
        Received::Other
    }

    fn read_tags(&mut self, tags: &Value) {
        let Value::Array(tags) = tags else { return };
        for tag in tags {
            match TagRecord::deserialize(tag) {
                Ok(t) => {
                    self.tags.insert(t.tag_id.clone(), t);
                }
                Err(e) => debug!(error = %e, "back end: unreadable tag record"),
            }
        }
    }

    fn on_ack(&mut self, ack: Ack, raw: &[u8]) {
        if ack.status == AckStatus::Accepted {
            return; // progress only; the agent's default is not to send it
        }
        if ack.duplicate {
            self.duplicates_seen += 1;
            if matches!(&self.duplicate, Duplicate::Sent { task_id } if ack.task_id.as_ref() == Some(task_id))
            {
                self.duplicate = Duplicate::Answered;
            }
            return;
        }
        let sent = match &ack.task_id {
            // The rejection of a message without a readable `task_id`.
            None if ack.status == AckStatus::Rejected && self.anonymous.pop_front().is_some() => {
                None
            }
            None => {
                self.unexpected += 1;
                return;
            }
            Some(task_id) => {
                let Some(sent) = self.sent.get_mut(task_id) else {
                    warn!(task_id, "back end: ack for a task it never sent");
                    self.unexpected += 1;
                    return;
                };
                match sent.outcome {
                    // At least once (PROTOCOL §5): e.g. resent after a lost PUBACK.
                    Some(first) if first == ack.status => {
                        self.repeated += 1;
                        return;
                    }
                    Some(first) => {
                        warn!(task_id, ?first, then = ?ack.status, "back end: two different final acks for one task");
                        self.conflicting += 1;
                        return;
                    }
                    None => {
                        sent.outcome = Some(ack.status);
                        self.open -= 1;
                        let payload = std::mem::take(&mut sent.payload);
                        Some((task_id, sent, payload))
                    }
                }
            }
        };
        self.outcomes.count(ack.status);
        if ack.status == AckStatus::Rejected {
            self.example_rejection
                .get_or_insert_with(|| ack.detail.clone().unwrap_or_default());
        }
        let (Some((task_id, sent, payload)), AckStatus::Applied) = (sent, ack.status) else {
            return;
        };
        self.applied_ms.push(sent.at.elapsed().as_millis() as u64);
        self.example_ack
            .get_or_insert_with(|| String::from_utf8_lossy(raw).into_owned());
        if let (Some(tag), Some(hash)) = (&sent.tag_id, &ack.content_hash) {
            let newest = self
                .shown
                .get(tag)
                .is_none_or(|(seq, _, _)| *seq < sent.seq);
            if newest {
                self.shown
                    .insert(tag.clone(), (sent.seq, hash.clone(), sent.label.clone()));
            }
        }
        if matches!(self.duplicate, Duplicate::Waiting) {
            self.duplicate = Duplicate::Ready {
                task_id: task_id.clone(),
                payload,
            };
        }
    }

    /// The one-line progress display.
    pub(crate) fn progress_line(&self, planned: usize) -> String {
        let o = &self.outcomes;
        let p50 = match Latency::of(&self.applied_ms) {
            Some(l) => format!("{} ms", l.p50.as_millis()),
            None => "-".to_owned(),
        };
        let outbox = self.outbox.map_or("-".to_owned(), |n| n.to_string());
        format!(
            "sent {}/{planned}  applied {}  failed {}  expired {}  superseded {}  rejected {}  pending {}  outbox {outbox}  p50 {p50}",
            self.messages,
            o.applied,
            o.failed,
            o.expired,
            o.superseded,
            o.rejected,
            self.unresolved(),
        )
    }

    /// The books closed. Unresolved messages are `lost`, unless the run was
    /// stopped early (then they are `unfinished`).
    pub(crate) fn summary(&self, elapsed: Duration, stopped_early: bool) -> DemoSummary {
        let unresolved = self.unresolved();
        DemoSummary {
            sent: self.messages,
            malformed: self.malformed,
            outcomes: self.outcomes,
            duplicate_resent: !matches!(
                self.duplicate,
                Duplicate::Waiting | Duplicate::Ready { .. }
            ),
            duplicates_seen: self.duplicates_seen,
            lost: if stopped_early { 0 } else { unresolved },
            unfinished: if stopped_early { unresolved } else { 0 },
            repeated_acks: self.repeated,
            conflicting_acks: self.conflicting,
            unexpected_messages: self.unexpected,
            latency: Latency::of(&self.applied_ms),
            elapsed,
            tags: self.tag_lines(),
            example_ack: self.example_ack.clone(),
            example_rejection: self.example_rejection.clone(),
        }
    }

    /// Two tags showing prices and one that never checked in, if there are.
    fn tag_lines(&self) -> Vec<TagLine> {
        let line = |t: &TagRecord| TagLine {
            tag: t.clone(),
            last_applied: self
                .shown
                .get(&t.tag_id)
                .map(|(_, hash, label)| (hash.clone(), label.clone())),
        };
        // A record older than the tag's first check-in (the hello report,
        // when the agent did not answer `tags.list`) is not shown as silent.
        let showing = self
            .tags
            .values()
            .filter(|t| t.last_seen.is_some() && self.shown.contains_key(&t.tag_id))
            .take(2);
        let silent = self
            .tags
            .values()
            .filter(|t| t.last_seen.is_none() && !self.shown.contains_key(&t.tag_id))
            .take(1);
        showing.chain(silent).map(line).collect()
    }
}

impl Latency {
    /// p50, p99 and max of millisecond samples (nearest rank).
    pub(crate) fn of(samples_ms: &[u64]) -> Option<Latency> {
        let mut sorted = samples_ms.to_vec();
        sorted.sort_unstable();
        let rank = |p: usize| {
            let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
            Duration::from_millis(sorted[i])
        };
        let max = *sorted.last()?;
        Some(Latency {
            p50: rank(50),
            p99: rank(99),
            max: Duration::from_millis(max),
        })
    }
}
