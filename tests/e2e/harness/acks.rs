//! Acks as the back end receives them (PROTOCOL §5): [`Ack`] checks the
//! normative fields when parsed; [`AckLog`] answers the scenarios' questions
//! (final status per task, consistency of repeated acks).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::AGENT_CLIENT_ID;

/// `status` of an ack (PROTOCOL §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AckStatus {
    Accepted,
    Applied,
    Failed,
    Expired,
    Superseded,
    Rejected,
}

impl AckStatus {
    fn parse(s: &str) -> Option<AckStatus> {
        Some(match s {
            "accepted" => AckStatus::Accepted,
            "applied" => AckStatus::Applied,
            "failed" => AckStatus::Failed,
            "expired" => AckStatus::Expired,
            "superseded" => AckStatus::Superseded,
            "rejected" => AckStatus::Rejected,
            _ => return None,
        })
    }

    /// Every status but the optional `accepted` progress report is final.
    pub fn is_final(self) -> bool {
        self != AckStatus::Accepted
    }
}

/// One ack as received, checked against PROTOCOL §5 when parsed.
#[derive(Debug, Clone)]
pub struct Ack {
    pub topic: String,
    pub json: Value,
}

fn protocol_violation(rule: &str, what: &impl std::fmt::Display) -> ! {
    panic!("PROTOCOL §5 violated ({rule}): {what}")
}

impl Ack {
    /// Parses and checks an ack received on `topic`; panics naming the
    /// violated rule.
    pub(super) fn parse(topic: String, payload: &[u8]) -> Ack {
        let json: Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
            protocol_violation(
                "an ack is JSON",
                &format!("{e} in {:?} on {topic}", String::from_utf8_lossy(payload)),
            )
        });
        if json["v"] != json!(1) {
            protocol_violation("\"v\":1", &json);
        }
        if json["type"] != "ack" {
            protocol_violation("\"type\":\"ack\"", &json);
        }
        if json["agent"] != AGENT_CLIENT_ID {
            protocol_violation("\"agent\" is the agent's client id", &json);
        }
        if json["status"].as_str().and_then(AckStatus::parse).is_none() {
            protocol_violation("status is one of the listed values", &json);
        }
        // Milliseconds, not seconds: anything before 2020 is a unit error.
        match json["at"].as_u64() {
            Some(at) if at > 1_577_836_800_000 => {}
            _ => protocol_violation("\"at\" is ms since the epoch", &json),
        }
        if json["attempts"].as_u64().is_none() {
            protocol_violation("\"attempts\" is a count", &json);
        }
        if !json["duplicate"].is_boolean() {
            protocol_violation("\"duplicate\" is a boolean", &json);
        }
        for key in ["task_id", "tag_id", "content_hash", "detail"] {
            match json.get(key) {
                Some(Value::Null) | Some(Value::String(_)) => {}
                _ => protocol_violation(&format!("\"{key}\" is present, a string or null"), &json),
            }
        }
        Ack { topic, json }
    }

    pub fn task_id(&self) -> Option<&str> {
        self.json["task_id"].as_str()
    }

    pub fn tag_id(&self) -> Option<&str> {
        self.json["tag_id"].as_str()
    }

    pub fn status(&self) -> AckStatus {
        // Checked in `parse`.
        AckStatus::parse(self.json["status"].as_str().unwrap_or_default())
            .expect("validated in parse")
    }

    pub fn attempts(&self) -> u64 {
        self.json["attempts"].as_u64().expect("validated in parse")
    }

    pub fn at(&self) -> u64 {
        self.json["at"].as_u64().expect("validated in parse")
    }

    pub fn content_hash(&self) -> Option<&str> {
        self.json["content_hash"].as_str()
    }

    pub fn detail(&self) -> Option<&str> {
        self.json["detail"].as_str()
    }

    pub fn duplicate(&self) -> bool {
        self.json["duplicate"]
            .as_bool()
            .expect("validated in parse")
    }
}

/// All acks a back end collected, with the questions the scenarios ask.
#[derive(Debug, Default, Clone)]
pub struct AckLog {
    acks: Vec<Ack>,
}

impl IntoIterator for AckLog {
    type Item = Ack;
    type IntoIter = std::vec::IntoIter<Ack>;

    fn into_iter(self) -> Self::IntoIter {
        self.acks.into_iter()
    }
}

impl AckLog {
    pub fn push(&mut self, ack: Ack) {
        self.acks.push(ack);
    }

    pub fn extend(&mut self, acks: impl IntoIterator<Item = Ack>) {
        self.acks.extend(acks);
    }

    /// Final acks for `task_id`, in arrival order.
    pub fn finals(&self, task_id: &str) -> Vec<&Ack> {
        self.acks
            .iter()
            .filter(|a| a.status().is_final() && a.task_id() == Some(task_id))
            .collect()
    }

    pub fn has_final(&self, task_id: &str) -> bool {
        !self.finals(task_id).is_empty()
    }

    /// The final ack of `task_id`. A task has exactly one final status; an
    /// ack may be published more than once (PROTOCOL §5), so every copy must
    /// say the same thing.
    pub fn final_ack(&self, task_id: &str) -> &Ack {
        let finals = self.finals(task_id);
        let first = *finals
            .first()
            .unwrap_or_else(|| panic!("no final ack for {task_id}; got: {}", self.summary()));
        for other in &finals[1..] {
            let same = other.status() == first.status()
                && other.tag_id() == first.tag_id()
                && other.content_hash() == first.content_hash()
                && other.attempts() == first.attempts();
            assert!(
                same,
                "task {task_id} got two different final acks:\n  {}\n  {}",
                first.json, other.json
            );
        }
        first
    }

    pub fn status(&self, task_id: &str) -> AckStatus {
        self.final_ack(task_id).status()
    }

    /// Task `task_id` ended with `status`.
    pub fn assert_status(&self, task_id: &str, status: AckStatus) {
        let ack = self.final_ack(task_id);
        assert_eq!(ack.status(), status, "task {task_id}: {}", ack.json);
    }

    /// Every task in `task_ids` ended with `status`.
    pub fn assert_all(&self, task_ids: &[String], status: AckStatus) {
        for id in task_ids {
            self.assert_status(id, status);
        }
    }

    /// The tasks of `task_ids` that have no final ack yet.
    pub fn without_final(&self, task_ids: &[String]) -> Vec<String> {
        task_ids
            .iter()
            .filter(|id| !self.has_final(id))
            .cloned()
            .collect()
    }

    /// Stricter than PROTOCOL §5 ("at least once"), for runs without
    /// reconnects or restarts: every task got exactly one final ack.
    pub fn assert_exactly_one_final_each(&self, task_ids: &[String]) {
        for id in task_ids {
            let finals = self.finals(id);
            assert_eq!(
                finals.len(),
                1,
                "task {id} should have exactly one final ack, got: {:#?}",
                finals.iter().map(|a| &a.json).collect::<Vec<_>>()
            );
            assert!(
                !finals[0].duplicate(),
                "first ack of {id} says duplicate: {}",
                finals[0].json
            );
        }
    }

    /// Count of final acks per status, for failure messages.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<AckStatus, usize> = BTreeMap::new();
        for ack in &self.acks {
            *counts.entry(ack.status()).or_default() += 1;
        }
        format!("{} acks, by status {counts:?}", self.acks.len())
    }
}
