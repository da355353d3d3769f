//! Delivery: radio events (check-ins start deliveries, outcomes finish
//! tasks), retries, delivery time-outs, expiry, cancellation.

use esl_hal::{CheckIn, Delivery, Outcome, RadioEvent, RadioState};
use tracing::{debug, info, warn};

use super::state::{InFlight, EXPIRE_LIMIT, TAG_SAVE_INTERVAL_MS};
use super::State;
use crate::counters::Counters;
use crate::store::{Change, StoreError, TaskRecord, TaskState};
use crate::wire::{self, AckStatus};

/// Task id prefix of `tag.refresh` deliveries.
const REFRESH_PREFIX: &str = "refresh:";

impl State {
    /// A radio event: check-in (maybe start a delivery) or outcome.
    pub(super) fn on_radio(
        &mut self,
        event: RadioEvent,
        now: u64,
        change: &mut Change,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<(), StoreError> {
        match event {
            RadioEvent::CheckIn(c) => self.on_checkin(c, now, change, deliveries),
            RadioEvent::Outcome(o) => self.on_outcome(o, now, change),
            RadioEvent::State(s) => {
                match &s {
                    RadioState::Up => info!("radio up"),
                    RadioState::Down { reason } => warn!(%reason, "radio down"),
                }
                self.radio = s;
                Ok(())
            }
            RadioEvent::Details(d) => {
                info!(firmware = ?d.firmware, "radio details");
                self.radio_details = d;
                Ok(())
            }
            RadioEvent::Tag(d) => {
                debug!(tag_id = %d.tag_id, "tag details from the radio");
                // The id the radio listed the tag under before goes, unless
                // the tag checked in under it (its readings are its own).
                if let Some(old) = d.replaces.filter(|old| *old != d.tag_id) {
                    if self
                        .tags
                        .get(&old)
                        .is_some_and(|t| t.rec.last_seen.is_none())
                    {
                        debug!(tag_id = %d.tag_id, replaces = %old, "tag listed under its new id");
                        self.tags.remove(&old);
                    }
                }
                self.tags.entry(d.tag_id).or_default().info = Some(Box::new(d.info));
                Ok(())
            }
        }
    }

    pub(super) fn on_checkin(
        &mut self,
        c: CheckIn,
        now: u64,
        change: &mut Change,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<(), StoreError> {
        Counters::bump(&self.counters.checkins);
        let tag = self.tags.entry(c.tag_id.clone()).or_default();
        let t = &mut tag.rec;
        t.battery_mv = c.battery_mv.or(t.battery_mv);
        t.rssi = c.rssi.or(t.rssi);
        if c.content_hash.is_some() && c.content_hash != t.content_hash {
            t.content_hash = c.content_hash.clone();
            tag.saved_at = 0;
        }
        t.last_seen = Some(now);
        if now.saturating_sub(tag.saved_at) >= TAG_SAVE_INTERVAL_MS {
            change.put_tag(&c.tag_id, &tag.rec);
            tag.saved_at = now;
        }

        if self.in_flight.contains_key(&c.tag_id) {
            return Ok(());
        }
        let Some(task_id) = self.store.pending_of(&c.tag_id)? else {
            if self.refresh.remove(&c.tag_id) {
                if let Some((task_id, content)) = self.store.last_content(&c.tag_id)? {
                    debug!(tag_id = %c.tag_id, %task_id, "refreshing the tag's content");
                    // Its own task id, so the tag's journal and outcome
                    // never look like the original task applied twice.
                    deliveries.push(Delivery {
                        tag_id: c.tag_id.clone(),
                        content_hash: wire::content_hash(content.as_bytes()),
                        content: content.into_bytes(),
                        task_id: format!("{REFRESH_PREFIX}{task_id}"),
                    });
                }
            }
            return Ok(());
        };
        let Some(mut rec) = self.store.task(&task_id)? else {
            return Ok(());
        };
        if c.content_hash.as_deref() == Some(rec.content_hash.as_str()) {
            // The tag already shows this content (e.g. it confirmed just
            // before a crash): never apply it a second time.
            debug!(task_id = %rec.task_id, "tag already shows the content");
            self.finish(change, rec, AckStatus::Applied, None, now, true);
            return Ok(());
        }
        rec.attempts += 1;
        Counters::bump(&self.counters.deliveries);
        debug!(task_id = %rec.task_id, tag_id = %rec.tag_id, attempt = rec.attempts, "delivering");
        deliveries.push(Delivery {
            tag_id: rec.tag_id.clone(),
            task_id: rec.task_id.clone(),
            content: rec.content.clone().into_bytes(),
            content_hash: rec.content_hash.clone(),
        });
        self.in_flight.insert(
            c.tag_id.clone(),
            InFlight {
                task_id: rec.task_id.clone(),
                until: now + self.settings.delivery_timeout_ms,
            },
        );
        change.put_task(&rec);
        Ok(())
    }

    /// The tag has no delivery of `task_id` in flight any more: it could
    /// not even be handed to the radio (never attempted, so not counted
    /// against the task), its attempt failed, or the task ended.
    pub(super) fn delivery_not_sent(&mut self, tag_id: &str, task_id: &str) {
        if self
            .in_flight
            .get(tag_id)
            .is_some_and(|f| f.task_id == task_id)
        {
            self.in_flight.remove(tag_id);
        }
    }

    pub(super) fn on_outcome(
        &mut self,
        o: Outcome,
        now: u64,
        change: &mut Change,
    ) -> Result<(), StoreError> {
        let rec = self.store.task(&o.task_id)?;
        if o.result.is_ok() {
            if let Some(rec) = &rec {
                let tag = self.tags.entry(o.tag_id.clone()).or_default();
                tag.rec.content_hash = Some(rec.content_hash.clone());
                tag.rec.last_seen = Some(now);
                tag.saved_at = now;
                change.put_tag(&o.tag_id, &tag.rec);
            }
        }
        // A task record in state `Pending` is its tag's pending task.
        let Some(rec) = rec.filter(|r| r.state == TaskState::Pending && r.tag_id == o.tag_id)
        else {
            // Superseded, cancelled or expired while in flight.
            debug!(task_id = %o.task_id, ok = o.result.is_ok(), "outcome for a task that is no longer pending");
            return Ok(());
        };
        match o.result {
            Ok(()) => self.finish(change, rec, AckStatus::Applied, None, now, true),
            Err(failure) => {
                Counters::bump(&self.counters.delivery_failures);
                self.attempt_failed(change, rec, failure.retryable, failure.reason, now)
            }
        }
        Ok(())
    }

    pub(super) fn attempt_failed(
        &mut self,
        change: &mut Change,
        rec: TaskRecord,
        retryable: bool,
        reason: String,
        now: u64,
    ) {
        if !retryable || rec.attempts >= self.settings.max_attempts {
            let detail = format!("{reason} (after {} attempts)", rec.attempts);
            self.finish(change, rec, AckStatus::Failed, Some(detail), now, true);
        } else {
            debug!(task_id = %rec.task_id, attempt = rec.attempts, %reason, "attempt failed, retry at next check-in");
            self.delivery_not_sent(&rec.tag_id, &rec.task_id);
        }
    }

    /// Delivery time-outs, then expiry (up to `EXPIRE_LIMIT` per pass; the
    /// rest at the next pass).
    pub(super) fn sweep(&mut self, now: u64, change: &mut Change) -> Result<(), StoreError> {
        let timed_out: Vec<(String, String)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.until <= now)
            .map(|(tag, f)| (tag.clone(), f.task_id.clone()))
            .collect();
        for (tag_id, task_id) in timed_out {
            match self.store.task(&task_id)? {
                Some(rec) if rec.state == TaskState::Pending => {
                    Counters::bump(&self.counters.delivery_failures);
                    let reason = format!(
                        "no confirmation from the radio within {} ms",
                        self.settings.delivery_timeout_ms
                    );
                    self.attempt_failed(change, rec, true, reason, now);
                }
                _ => {
                    self.in_flight.remove(&tag_id);
                }
            }
        }
        for (_, task_id) in self.store.expiring_before(now, EXPIRE_LIMIT)? {
            // The expiry index holds pending tasks only (a partial index in
            // the store), so this is a pending task.
            let Some(rec) = self.store.task(&task_id)? else {
                continue;
            };
            if self.in_flight.contains_key(&rec.tag_id) {
                // Its delivery's outcome or time-out decides first.
                continue;
            }
            let seen = self
                .tags
                .get(&rec.tag_id)
                .and_then(|t| t.rec.last_seen)
                .is_some();
            let detail = if seen {
                format!("not confirmed by the tag after {} attempts", rec.attempts)
            } else {
                "the tag never checked in before the task expired".to_owned()
            };
            self.finish(change, rec, AckStatus::Expired, Some(detail), now, true);
        }
        Ok(())
    }

    /// Cancels a pending task: it is acked `failed` with detail `cancelled`.
    /// Returns `false` when the task is not pending.
    pub(super) fn cancel(
        &mut self,
        task_id: &str,
        now: u64,
        change: &mut Change,
    ) -> Result<bool, StoreError> {
        match self.store.task(task_id)? {
            Some(rec) if rec.state == TaskState::Pending => {
                self.finish(
                    change,
                    rec,
                    AckStatus::Failed,
                    Some("cancelled".into()),
                    now,
                    true,
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
