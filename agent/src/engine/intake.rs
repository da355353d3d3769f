//! Intake (PROTOCOL §4): one task message through rules 2–6, oversized
//! messages, and rejections.

use tracing::{debug, warn};

use super::State;
use crate::counters::Counters;
use crate::msg::InboundKind;
use crate::security::signing::{Purpose, SignatureError, Verdict};
use crate::store::{Change, StoreError, TaskRecord, TaskState};
use crate::wire::{self, AckStatus};

/// `detail` of the ack for a task whose signature failed. Deliberately the
/// same for every cause (missing, unknown key, mismatch): the log says which.
const BAD_SIGNATURE: &str = "bad signature";

impl State {
    /// PROTOCOL §4: one task message, rules 2–6.
    pub(super) fn on_task(
        &mut self,
        payload: &[u8],
        now: u64,
        change: &mut Change,
    ) -> Result<(), StoreError> {
        Counters::bump(&self.counters.tasks_received);
        let object = match wire::parse_object(payload, self.settings.max_payload) {
            Ok(o) => o,
            Err(mut rejection) => {
                // An oversized payload names its task (rule 2), but not
                // when signatures are required: it was never checked.
                if self.verifier.required(Purpose::Task) {
                    rejection.task_id = None;
                }
                self.reject(change, rejection, now);
                return Ok(());
            }
        };
        // Before any field is believed: an unauthenticated message must not
        // name a task, steer its ack (`reply_to`) or touch a record.
        let verdict = match self.verifier.check(Purpose::Task, &object) {
            Ok(v) => v,
            Err(e) => {
                self.reject_unverified(change, &object, &e, now);
                return Ok(());
            }
        };
        let task = match wire::task_from_object(&object) {
            Ok(t) => t,
            Err(rejection) => {
                self.reject(change, rejection, now);
                return Ok(());
            }
        };
        if let Some(r) = &task.reply_to {
            if !self.identity.reply_topic_fits(r) {
                let rejection = wire::Rejection {
                    task_id: Some(task.task_id),
                    tag_id: Some(task.tag_id),
                    reply_to: None,
                    detail: format!(
                        "reply_to: the ack topic {:?} would be longer than {} characters",
                        self.identity.reply_topic(r),
                        wire::MAX_TOPIC
                    ),
                };
                self.reject(change, rejection, now);
                return Ok(());
            }
        }

        // Rule 3: never applied twice.
        if let Some(existing) = self.store.task(&task.task_id)? {
            Counters::bump(&self.counters.tasks_duplicate);
            match &existing.state {
                TaskState::Final(f) => {
                    debug!(task_id = %task.task_id, status = ?f.status, "duplicate of a finished task: ack again");
                    let mut ack = self.ack_for(&existing, f.status, f.detail.clone(), f.at);
                    ack.duplicate = true;
                    self.push_ack(change, &ack);
                }
                TaskState::Pending => {
                    debug!(task_id = %task.task_id, "duplicate of a pending task: ignored");
                }
            }
            return Ok(());
        }

        // Content the tag can never show (the radio knows its display):
        // rejected now, naming what the tag expects, not failed at delivery.
        if let Some(check) = &self.content_check {
            if let Err(detail) = check.check(&task.tag_id, task.content.as_bytes()) {
                let rejection = wire::Rejection {
                    task_id: Some(task.task_id),
                    tag_id: Some(task.tag_id),
                    reply_to: task.reply_to,
                    detail,
                };
                self.reject(change, rejection, now);
                return Ok(());
            }
        }

        let ttl = task.ttl_ms.unwrap_or(self.settings.default_ttl_ms);
        // A verbatim replay of a signed task is a duplicate while the agent
        // remembers the task id (`tasks.keep_final_h` after its end). After
        // that it must already be expired, so a signed task may not live
        // longer than that memory.
        let expires_at = task.issued_at.saturating_add(ttl);
        if matches!(verdict, Verdict::Verified { .. })
            && expires_at > now.saturating_add(self.settings.keep_final_ms)
        {
            let rejection = wire::Rejection {
                detail: format!(
                    "ttl_ms: a signed task must expire within tasks.keep_final_h ({} ms) of its arrival, or a replay after the agent forgot it would apply again",
                    self.settings.keep_final_ms
                ),
                task_id: Some(task.task_id),
                tag_id: Some(task.tag_id),
                reply_to: task.reply_to,
            };
            self.reject(change, rejection, now);
            return Ok(());
        }
        let rec = TaskRecord {
            expires_at,
            ack_target: self.ack_target(task.reply_to.as_deref()),
            task_id: task.task_id,
            tag_id: task.tag_id,
            seq: task.seq,
            issued_at: task.issued_at,
            accepted_at: now,
            content: task.content,
            content_hash: task.content_hash,
            attempts: 0,
            state: TaskState::Pending,
        };

        // Rule 4: expired on arrival.
        if rec.expires_at < now {
            let detail = format!("expired {} ms before it arrived", now - rec.expires_at);
            self.finish(change, rec, AckStatus::Expired, Some(detail), now, false);
            return Ok(());
        }

        // Rule 5: per-tag order.
        let (max_seq, pending) = match self.store.tag_slot(&rec.tag_id)? {
            Some((seq, pending)) => (Some(seq), pending),
            None => (None, None),
        };
        if let Some(max) = max_seq {
            if rec.seq < max {
                let detail = format!(
                    "seq {} is older than seq {max} already accepted for this tag",
                    rec.seq
                );
                self.finish(change, rec, AckStatus::Superseded, Some(detail), now, false);
                return Ok(());
            }
        }
        // `put_task` below records `rec.seq` as the tag's highest seq.
        if let Some(old_id) = pending {
            if let Some(old_rec) = self.store.task(&old_id)? {
                let detail = format!("replaced by task {} (seq {})", rec.task_id, rec.seq);
                self.finish(
                    change,
                    old_rec,
                    AckStatus::Superseded,
                    Some(detail),
                    now,
                    true,
                );
            }
        }

        // Rule 6: pending until the tag confirms, the radio gives up, or it expires.
        Counters::bump(&self.counters.tasks_accepted);
        debug!(task_id = %rec.task_id, tag_id = %rec.tag_id, seq = rec.seq, "task pending");
        self.pending_count += 1;
        if self.settings.send_accepted {
            let ack = self.ack_for(&rec, AckStatus::Accepted, None, now);
            self.push_ack(change, &ack);
        }
        change.put_task(&rec);
        Ok(())
    }

    /// A message the link discarded unread for its size (PROTOCOL §4 rule
    /// 2): a task is acked `rejected` (`task_id` null, the detail names the
    /// size and the limit); a command cannot be answered (its `req_id` is
    /// unknown) and is counted as bad.
    pub(super) fn on_oversized(
        &mut self,
        kind: InboundKind,
        size: usize,
        now: u64,
        change: &mut Change,
    ) {
        match kind {
            InboundKind::Task => {
                Counters::bump(&self.counters.tasks_received);
                let rejection = wire::Rejection {
                    task_id: None,
                    tag_id: None,
                    reply_to: None,
                    detail: format!(
                        "payload: {size} bytes is over the limit of {} bytes (limits.max_payload); discarded unread",
                        self.settings.max_payload
                    ),
                };
                self.reject(change, rejection, now);
            }
            InboundKind::Command => {
                Counters::bump(&self.counters.commands_received);
                Counters::bump(&self.counters.commands_bad);
                debug!(size, "oversized command discarded");
            }
        }
    }

    /// A task whose signature failed: `rejected`, detail `bad signature`,
    /// to `ack_to` whatever its `reply_to` says, with `task_id` null (the
    /// claimed id goes in `unverified_task_id`).
    pub(super) fn reject_unverified(
        &mut self,
        change: &mut Change,
        object: &serde_json::Map<String, serde_json::Value>,
        error: &SignatureError,
        now: u64,
    ) {
        Counters::bump(&self.counters.tasks_bad_signature);
        let claimed = wire::readable_task_id(object);
        warn!(claimed_task_id = ?claimed, reason = %error, "task with a bad signature rejected");
        let rejection = wire::Rejection {
            task_id: None,
            tag_id: None,
            reply_to: None,
            detail: BAD_SIGNATURE.into(),
        };
        let mut ack = self.rejection_ack(rejection, now);
        ack.unverified_task_id = claimed;
        if self.admit_limited(now, "rejected ack") {
            self.push_ack(change, &ack);
        }
    }

    /// Bad input gets its `rejected` ack always, whatever the rate: PROTOCOL
    /// §5 gives every PUBACKed task exactly one final status, and the back
    /// end may be ours with a bug. (Forged tasks, whose ack names no task,
    /// and command replies are the ones limited.)
    pub(super) fn reject(&mut self, change: &mut Change, r: wire::Rejection, now: u64) {
        debug!(task_id = ?r.task_id, detail = %r.detail, "task rejected");
        let ack = self.rejection_ack(r, now);
        self.push_ack(change, &ack);
    }
}
