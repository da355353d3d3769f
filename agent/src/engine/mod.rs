//! The engine task: owns every task's life cycle, from the MQTT message to
//! the final ack.
//!
//! Reads: `inbound_rx` (tasks and commands from the MQTT link),
//! `radio_rx` (check-ins and delivery outcomes from the radio task),
//! `query_rx` (snapshots for status reports).
//! Writes: the store (only writer of tasks, tags and new outbox entries),
//! `delivery_tx` (content for a tag that checked in), `puback_tx` (PUBACKs the
//! link may now send), `outbox_wake` (new acks to publish).
//!
//! Group commit: the engine takes every inbound message that is already
//! queued (up to `tasks.batch_max`), applies each one's changes to the store,
//! then flushes once and only then releases the PUBACKs of the whole batch.
//! If a write or the flush fails, the PUBACKs are held (the broker keeps the
//! messages), intake and radio events pause, and the status reports the
//! fault. The store refuses every operation after one failed write (SQLite
//! may have rolled the transaction back), so recovery reopens the store,
//! follows what is on disk and applies the held messages again; only then
//! are their PUBACKs released.
//!
//! The flush (SQLite's `COMMIT` and its fsync) runs on a blocking thread
//! while the engine waits without touching the store: every branch of its
//! loop that reads or writes the store is off until the flush has ended.
//! Messages queue in `inbound_rx` meanwhile and make the next group larger,
//! so a slower disk gives bigger groups rather than fewer tasks per second.
//! What a flush covered is released when it ends. These rules are the
//! commit [`Pipeline`] (`engine/pipeline.rs`), a type with no I/O that
//! [`Engine::run`] drives.
//! Pending tasks live only in the store (the engine reads a tag's record at
//! its check-in and the expiry index in the sweep), so memory does not grow
//! with the pending count.
//!
//! The decision logic lives in [`State`], which has no channels and takes the
//! time as an argument, so unit tests drive it directly.

mod acks;
pub(crate) mod commands;
mod delivery;
mod intake;
pub(crate) mod limiter;
mod pipeline;
mod state;
mod views;

pub(crate) use state::{EngineSettings, State};

use pipeline::{Pipeline, Replay};

use std::sync::Arc;
use std::time::Duration;

use esl_hal::{Delivery, RadioEvent};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::counters::Counters;
use crate::msg::{AckToken, Inbound, InboundKind, Query, Snapshot};
use crate::store::{Change, Store, StoreError};

/// Messages from the link that the engine has not taken yet. The broker
/// never has more than its in-flight window (Mosquitto: 20 by default; a
/// busy store's broker is often set to hundreds) of unacked QoS 1 messages
/// out; when it fills, the link waits. While a flush (an fsync) runs, the
/// messages that arrive wait here and form the next group commit, so this
/// bounds a group: 1 024 (with `tasks.batch_max`) lets a burst commit about
/// 1 000 tasks at once, which with random task ids wrote 1.6 KiB per task
/// against 2.9 KiB for 250-task groups (the store alone; docs/BENCHMARKS.md).
/// Memory: the broker's window bounds it first (20 × `limits.max_payload`
/// with Mosquitto's default); a typical 1 024 tasks are about 200 KiB.
pub(crate) const INBOUND_CAPACITY: usize = 1024;
/// Radio events not yet taken: a burst of check-ins from many tags.
pub(crate) const RADIO_EVENT_CAPACITY: usize = 1024;
/// Status snapshots asked for but not answered; the status task asks one at
/// a time.
pub(crate) const QUERY_CAPACITY: usize = 4;

/// How often expiry and delivery time-outs are looked at.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// How often finished tasks older than `tasks.keep_final_h` are pruned.
const PRUNE_INTERVAL_MS: u64 = 3600 * 1000;
/// Finished tasks removed per prune pass, so one pass never stalls intake.
const PRUNE_LIMIT: usize = 10_000;
/// How often the store is asked to give free pages back (a cheap check when
/// there are few): after a flood of commands or acks has been delivered, the
/// file shrinks within this long.
const RECLAIM_INTERVAL_MS: u64 = 10 * 1000;

/// The engine task: [`State`], the commit [`Pipeline`] and its channel ends.
pub(crate) struct Engine {
    state: State,
    store: Arc<Store>,
    counters: Arc<Counters>,
    channels: EngineChannels,
    shutdown: CancellationToken,
    /// When finished tasks were last pruned and free pages last given back
    /// (`now_ms`).
    last_prune: u64,
    last_reclaim: u64,
}

/// The engine's channel ends (see the map in ARCHITECTURE.md).
pub(crate) struct EngineChannels {
    pub inbound_rx: mpsc::Receiver<Inbound>,
    pub radio_rx: mpsc::Receiver<RadioEvent>,
    pub query_rx: mpsc::Receiver<Query>,
    pub delivery_tx: mpsc::Sender<Delivery>,
    pub puback_tx: mpsc::Sender<AckToken>,
    pub outbox_wake: Arc<Notify>,
}

/// The handle of a flush running in the background.
type FlushRun = tokio::task::JoinHandle<Result<(), StoreError>>;

impl Engine {
    pub(crate) fn new(
        state: State,
        store: Arc<Store>,
        counters: Arc<Counters>,
        channels: EngineChannels,
        shutdown: CancellationToken,
    ) -> Engine {
        Engine {
            state,
            store,
            counters,
            channels,
            shutdown,
            last_prune: now_ms(),
            last_reclaim: now_ms(),
        }
    }

    /// Drives the commit [`Pipeline`]: each branch does the I/O for one
    /// kind of event and tells the pipeline what happened; the pipeline's
    /// mode says which branches are on (see its module docs).
    pub(crate) async fn run(mut self) -> Result<(), StoreError> {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pipeline: Pipeline<FlushRun> = Pipeline::new();
        let batch_max = self.state.settings.batch_max;
        info!(
            pending = self.state.pending_len(),
            outbox = self.store.outbox_len(),
            "engine started"
        );
        // Acks restored from the store wait for the link's first CONNACK;
        // wake it in case the link is already connected.
        self.channels.outbox_wake.notify_one();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                result = async { pipeline.running_flush().expect("guarded").await }, if pipeline.flush_running() => {
                    match result.unwrap_or(Err(StoreError::Closed)) {
                        Ok(()) => self.flushed(&mut pipeline),
                        // Not on disk: its messages are applied again after
                        // the reopen, its outcomes recorded again, its local
                        // callers get no answer.
                        Err(e) => self.store_failed(&mut pipeline, e, "store flush failed"),
                    }
                }
                Some(first) = self.channels.inbound_rx.recv(), if pipeline.accepts_intake() => {
                    let mut batch = vec![first];
                    while batch.len() < batch_max {
                        match self.channels.inbound_rx.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    for m in batch {
                        if !pipeline.is_faulted() {
                            if let Err(e) = self.take(&m) {
                                // Not PUBACKed: it is applied again after the reopen.
                                self.store_failed(&mut pipeline, e, "store write failed");
                            }
                        }
                        pipeline.taken(m);
                    }
                }
                Some(first) = self.channels.radio_rx.recv(), if pipeline.accepts_intake() => {
                    let mut events = vec![first];
                    while events.len() < RADIO_EVENT_CAPACITY {
                        match self.channels.radio_rx.try_recv() {
                            Ok(e) => events.push(e),
                            Err(_) => break,
                        }
                    }
                    let mut deliveries = Vec::new();
                    for event in events {
                        let mut needs_flush = false;
                        if !pipeline.is_faulted() {
                            match self.record_radio(event.clone(), &mut deliveries) {
                                Ok(n) => needs_flush = n,
                                Err(e) => self.store_failed(&mut pipeline, e, "store write failed while handling a radio event"),
                            }
                        }
                        pipeline.radio_event(event, needs_flush);
                    }
                    for d in deliveries {
                        if let Err(e) = self.channels.delivery_tx.try_send(d) {
                            let d = match e {
                                mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
                            };
                            debug!(task_id = %d.task_id, "radio busy; delivery waits for the next check-in");
                            self.state.delivery_not_sent(&d.tag_id, &d.task_id);
                        }
                    }
                }
                Some(q) = self.channels.query_rx.recv(), if !pipeline.flush_running() => match q {
                    Query::Snapshot(reply) => self.snapshot(reply, pipeline.fault().map(str::to_owned)),
                    Query::Ping(reply) => {
                        // The asker may have given up; nothing to do then.
                        let _ = reply.send(());
                    }
                    Query::Command { payload, reply } => {
                        let mut change = Change::new();
                        let result = crate::engine::commands::handle_local(&mut self.state, &payload, now_ms(), &mut change);
                        let changed = !change.is_empty();
                        match result.and_then(|json| self.store.apply(change).map(|_| json)) {
                            // A read-only command (status, listings) needs no
                            // flush; the caller may have hung up.
                            Ok(json) if !changed => drop(reply.send(json)),
                            Ok(json) => pipeline.reply_after_flush((reply, json)),
                            Err(e) => self.store_failed(&mut pipeline, e, "store write failed while handling a local command"),
                        }
                    }
                },
                _ = sweep.tick(), if !pipeline.flush_running() => {
                    if pipeline.is_faulted() {
                        self.try_recovery(&mut pipeline).await;
                    } else {
                        self.sweep(&mut pipeline);
                    }
                }
            }
            if pipeline.flush_due() {
                match self.store.begin_flush() {
                    Ok(flush) => pipeline.flush_started(tokio::spawn(flush)),
                    Err(e) => self.store_failed(&mut pipeline, e, "store flush failed"),
                }
            }
        }
        // A flush in progress ends first; what it covered is released.
        if let Some(run) = pipeline.running_flush() {
            match run.await.unwrap_or(Err(StoreError::Closed)) {
                Ok(()) => self.flushed(&mut pipeline),
                Err(e) => {
                    warn!(error = %e, "store flush failed at shutdown");
                    Counters::bump(&self.counters.store_errors);
                    pipeline.failed(e.to_string(), Instant::now());
                }
            }
        }
        // Shutdown: make what was taken durable and release its PUBACKs, so
        // the broker does not send those messages again after the restart.
        // After a fault nothing is released: what was held is not on disk.
        if !pipeline.is_faulted() {
            let mut change = Change::new();
            self.state.save_tags(&mut change);
            if let Err(e) = self.store.apply(change) {
                warn!(error = %e, "saving the tags' last check-ins failed");
            }
            match self.store.flush().await {
                Ok(_) => {
                    pipeline.flushed_at_shutdown();
                    pipeline.release_pubacks(|t| self.channels.puback_tx.try_send(t));
                }
                Err(e) => warn!(error = %e, "final store flush failed"),
            }
        }
        info!(pending = self.state.pending_len(), "engine stopped");
        Ok(())
    }

    /// Decides one inbound message and applies its changes (not flushed).
    fn take(&mut self, m: &Inbound) -> Result<(), StoreError> {
        let mut change = Change::new();
        let now = now_ms();
        match (m.kind, m.oversized) {
            (kind, Some(size)) => self.state.on_oversized(kind, size, now, &mut change),
            (InboundKind::Task, None) => self.state.on_task(&m.payload, now, &mut change)?,
            (InboundKind::Command, None) => {
                crate::engine::commands::handle(&mut self.state, &m.payload, now, &mut change)?
            }
        }
        self.store.apply(change).map(drop)
    }

    /// Records one radio event (not flushed); deliveries it starts are added
    /// to `deliveries`. Returns whether a flush must follow (check-ins and
    /// radio state are best effort and need none of their own).
    fn record_radio(
        &mut self,
        event: RadioEvent,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<bool, StoreError> {
        let durable = !matches!(
            event,
            RadioEvent::CheckIn(_)
                | RadioEvent::State(_)
                | RadioEvent::Details(_)
                | RadioEvent::Tag(_)
        );
        let mut change = Change::new();
        let mut these = Vec::new();
        self.state
            .on_radio(event, now_ms(), &mut change, &mut these)?;
        // An ack it wrote (a check-in that finished a task) wants a flush
        // too; the outbox count cannot tell, as the link lowers it meanwhile.
        let acks = !self.store.apply(change)?.is_empty();
        deliveries.extend(these);
        Ok(durable || acks)
    }

    /// The sweep: expiry and delivery time-outs, and now and then pruning
    /// and giving free pages back; then PUBACKs the link had no room for.
    fn sweep(&mut self, pipeline: &mut Pipeline<FlushRun>) {
        let now = now_ms();
        let mut change = Change::new();
        let result = self.state.sweep(now, &mut change);
        let changed = !change.is_empty();
        match result.and_then(|()| self.store.apply(change).map(drop)) {
            Ok(()) if changed => pipeline.changed(),
            Ok(()) => {}
            Err(e) => self.store_failed(pipeline, e, "store write failed during the sweep"),
        }
        if !pipeline.is_faulted() && now.saturating_sub(self.last_prune) >= PRUNE_INTERVAL_MS {
            self.last_prune = now;
            let cutoff = now.saturating_sub(self.state.settings.keep_final_ms);
            match self.store.prune_final(cutoff, PRUNE_LIMIT) {
                Ok(0) => {}
                Ok(n) => {
                    info!(removed = n, "pruned finished tasks");
                    pipeline.changed();
                }
                Err(e) => self.store_failed(pipeline, e, "pruning finished tasks failed"),
            }
        }
        if !pipeline.is_faulted() && now.saturating_sub(self.last_reclaim) >= RECLAIM_INTERVAL_MS {
            self.last_reclaim = now;
            match self.store.reclaim() {
                Ok(0) => {}
                Ok(pages) => {
                    debug!(pages, "free store pages given back");
                    pipeline.changed();
                }
                Err(e) => self.store_failed(pipeline, e, "giving free store pages back failed"),
            }
        }
        // Check-in reports and outbox removals need no flush of their own,
        // but should not wait for the next task long.
        if !pipeline.is_faulted() && self.store.wants_commit() {
            pipeline.changed();
        }
        pipeline.release_pubacks(|t| self.channels.puback_tx.try_send(t));
    }

    /// A write or the flush failed: the pipeline enters (or stays in) the
    /// store fault, so intake and radio events pause, PUBACKs are held, and
    /// the sweep reopens the store.
    fn store_failed(&self, pipeline: &mut Pipeline<FlushRun>, e: StoreError, what: &str) {
        Counters::bump(&self.counters.store_errors);
        if pipeline.failed(e.to_string(), Instant::now()) {
            warn!(error = %e, "{what}; holding PUBACKs and pausing intake until the store can be reopened");
        }
    }

    /// During a store fault, at the sweep: reopens the store when that is
    /// due, and on success releases what was held.
    async fn try_recovery(&mut self, pipeline: &mut Pipeline<FlushRun>) {
        if !pipeline.reopen_due(Instant::now()) {
            return;
        }
        let replay = pipeline.replay();
        let (messages, outcomes) = (replay.messages.len(), replay.radio.len());
        match self.recover(replay).await {
            Ok(()) => {
                info!(
                    replayed = messages,
                    outcomes, "store reopened; intake resumes"
                );
                pipeline.recovered();
                self.release(pipeline);
            }
            Err(e) => {
                Counters::bump(&self.counters.store_errors);
                debug!(error = %e, "store still unusable; trying again");
                pipeline.recovery_failed(e.to_string(), Instant::now());
            }
        }
    }

    /// The way out of a store fault: reopen the store (it refuses every
    /// call after one failed write), rebuild the pending set from what is on
    /// disk, apply the held messages and radio outcomes again (duplicates of
    /// what survived are recognised as such), and flush.
    async fn recover(&mut self, replay: Replay<'_>) -> Result<(), StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.reopen())
            .await
            .map_err(|_| StoreError::Closed)??;
        self.state.reload()?;
        for m in replay.messages {
            self.take(m)?;
        }
        // Outcomes only finish tasks; they start no deliveries.
        let mut deliveries = Vec::new();
        for event in replay.radio {
            self.record_radio(event.clone(), &mut deliveries)?;
        }
        self.store.flush().await?;
        Counters::bump(&self.counters.store_flushes);
        Ok(())
    }

    /// The running flush ended well: what it covered is released.
    fn flushed(&mut self, pipeline: &mut Pipeline<FlushRun>) {
        Counters::bump(&self.counters.store_flushes);
        let replies = pipeline.flush_succeeded();
        self.release(pipeline);
        for (reply, json) in replies {
            // The caller may have hung up; nothing to do then.
            let _ = reply.send(json);
        }
    }

    /// Hands the PUBACKs the pipeline released to the link and wakes the
    /// link for the acks the flush made publishable.
    fn release(&mut self, pipeline: &mut Pipeline<FlushRun>) {
        pipeline.release_pubacks(|t| self.channels.puback_tx.try_send(t));
        self.channels.outbox_wake.notify_one();
    }

    fn snapshot(&self, reply: oneshot::Sender<Snapshot>, store_fault: Option<String>) {
        let snapshot = Snapshot {
            pending: self.state.pending_len(),
            outbox: self.store.outbox_len(),
            radio: self.state.radio.clone(),
            radio_details: self.state.radio_details.clone(),
            store_fault,
            tags: self.state.known_tag_views(now_ms()),
        };
        // The asker may have given up (shutdown); nothing to do then.
        let _ = reply.send(snapshot);
    }
}

#[cfg(test)]
mod tests;
