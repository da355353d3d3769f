//! Acks (PROTOCOL §5): the one builder, where they go (`reply_to` or
//! `ack_to`), and finishing a task, which writes its final state and its
//! ack in the same change.

use tracing::debug;

use super::State;
use crate::counters::Counters;
use crate::store::{Change, FinalState, OutboxEntry, TaskRecord, TaskState};
use crate::wire::{self, Ack, AckStatus};

impl State {
    /// The client id acks go to for `reply_to`, if its topic fits.
    pub(super) fn ack_target(&self, reply_to: Option<&str>) -> String {
        match reply_to {
            Some(r) if self.identity.reply_topic_fits(r) => r.to_owned(),
            _ => self.settings.ack_to.clone(),
        }
    }

    pub(super) fn push_ack(&self, change: &mut Change, ack: &Ack) {
        change.push_outbox(OutboxEntry {
            topic: self.identity.reply_topic(&ack.target),
            payload: ack.to_json(),
        });
    }

    /// Every ack is made here: the fields all acks carry, for `status` at
    /// `at`, addressed to `target`; the caller names the task it is about.
    fn ack(&self, status: AckStatus, target: String, at: u64) -> Ack {
        Ack {
            v: 1,
            kind: "ack".into(),
            task_id: None,
            tag_id: None,
            status,
            agent: self.identity.client_id.clone(),
            at,
            attempts: 0,
            content_hash: None,
            detail: None,
            duplicate: false,
            unverified_task_id: None,
            target,
        }
    }

    /// The ack of a task the agent keeps a record of.
    pub(super) fn ack_for(
        &self,
        rec: &TaskRecord,
        status: AckStatus,
        detail: Option<String>,
        at: u64,
    ) -> Ack {
        Ack {
            task_id: Some(rec.task_id.clone()),
            tag_id: Some(rec.tag_id.clone()),
            attempts: rec.attempts,
            content_hash: Some(rec.content_hash.clone()),
            detail,
            ..self.ack(status, rec.ack_target.clone(), at)
        }
    }

    /// The `rejected` ack of a message that never became a task record.
    pub(super) fn rejection_ack(&self, r: wire::Rejection, now: u64) -> Ack {
        Counters::bump(&self.counters.tasks_rejected);
        Ack {
            task_id: r.task_id,
            tag_id: r.tag_id,
            detail: Some(r.detail),
            ..self.ack(
                AckStatus::Rejected,
                self.ack_target(r.reply_to.as_deref()),
                now,
            )
        }
    }

    /// Makes `rec` final with `status` and queues its ack. `rec` as read
    /// from the store in state `Pending` is its tag's pending task (the
    /// store keeps the two together) and leaves the pending set; a task
    /// finished on arrival never joined it and must not be read from the
    /// store in a way that claims it did, so it is passed with
    /// `stored = false`.
    pub(super) fn finish(
        &mut self,
        change: &mut Change,
        mut rec: TaskRecord,
        status: AckStatus,
        detail: Option<String>,
        now: u64,
        stored: bool,
    ) {
        let counter = match status {
            AckStatus::Applied => &self.counters.tasks_applied,
            AckStatus::Failed => &self.counters.tasks_failed,
            AckStatus::Expired => &self.counters.tasks_expired,
            AckStatus::Superseded => &self.counters.tasks_superseded,
            AckStatus::Rejected => &self.counters.tasks_rejected,
            AckStatus::Accepted => unreachable!("accepted is not a final status"),
        };
        Counters::bump(counter);
        debug!(task_id = %rec.task_id, tag_id = %rec.tag_id, status = ?status, detail = ?detail, "task final");
        let ack = self.ack_for(&rec, status, detail.clone(), now);
        self.push_ack(change, &ack);
        if stored && rec.state == TaskState::Pending {
            self.pending_count = self.pending_count.saturating_sub(1);
            change.clear_pending(&rec);
            self.delivery_not_sent(&rec.tag_id, &rec.task_id);
        }
        if status == AckStatus::Applied && !rec.content.is_empty() {
            change.put_last_content(&rec.tag_id, &rec.task_id, &rec.content);
        }
        rec.content.clear();
        rec.state = TaskState::Final(FinalState {
            status,
            at: now,
            detail,
        });
        change.put_task(&rec);
    }
}
