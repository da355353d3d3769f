//! The commit pipeline: what the engine holds back until the disk has it.
//!
//! Owns two of the agent's guarantees (ARCHITECTURE.md, "Guarantees"): a
//! message's PUBACK, and a local command's reply, leave only after a flush
//! that covers its changes has ended well; and after a failed write or
//! flush, what is not on disk waits for the store to be reopened, is applied
//! again oldest first, and is released only once that is durable.
//!
//! [`Pipeline`] does no I/O, like rumqttc's `MqttState` or quinn-proto's
//! `Connection`: it has no store, no channels and no clock (the time is an
//! argument, so tests drive it in paused time). The engine tells
//! it what happened (a message was taken, a write failed, a flush ended) and
//! asks it what may happen next (may the engine take messages? is a flush
//! due? is the reopen due? which PUBACKs may go?); [`super::Engine::run`]
//! does the store calls, channel sends and spawning. It is in one of three
//! modes:
//!
//! - **Idle**: the store is usable and free. The engine takes
//!   messages, radio events, commands and sweeps; whatever changes the store
//!   makes a flush due.
//! - **Flushing**: a flush (SQLite's `COMMIT` and its fsync, on a
//!   blocking thread) holds the store, so nothing may touch it. The flush
//!   covers exactly what was applied before it started; anything after it
//!   waits for the next one.
//! - **Faulted**: a write or a flush failed. SQLite may have rolled
//!   the open transaction back, so nothing since the last good flush counts
//!   as written: its messages and radio outcomes wait to be applied again,
//!   local callers get no answer (their change is lost; they may ask again),
//!   intake and radio events pause, and the store is reopened every
//!   [`REOPEN_INTERVAL`] until that works. Recovery applies the held
//!   messages and outcomes again and flushes; only then does the pipeline
//!   return to `Idle` and release their PUBACKs.
//!
//! PUBACKs of durable messages are handed to the link without waiting; what
//! does not fit its channel goes at the next chance, in the order received.

use std::collections::VecDeque;
use std::time::Duration;

use esl_hal::RadioEvent;
use tokio::sync::{mpsc::error::TrySendError, oneshot};
use tokio::time::Instant;

use crate::msg::{AckToken, Inbound};

/// After a store fault, how long between two attempts to reopen the store:
/// often enough to resume within a second or two of the disk recovering,
/// rarely enough that a disk that stays full costs little.
pub(crate) const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// A local command's reply, sent once the command's change is durable.
pub(crate) type Reply = (oneshot::Sender<Vec<u8>>, Vec<u8>);

/// The commit pipeline. `F` is the handle of a running flush (a
/// `JoinHandle` in the engine); the pipeline only keeps it, so that "a flush
/// runs" has one source of truth.
pub(crate) struct Pipeline<F> {
    mode: Mode<F>,
    /// Applied since the last flush started: the next flush covers it.
    /// Empty while faulted (it moved into the fault).
    next: Group,
    /// The store holds changes no flush covers yet (also changes that
    /// release nothing, such as the sweep's).
    unflushed: bool,
    /// PUBACKs of durable messages that the link had no room for yet,
    /// oldest first.
    releasable: VecDeque<AckToken>,
}

/// What waits for one flush.
#[derive(Default)]
struct Group {
    /// Messages whose PUBACKs wait for it.
    messages: Vec<Inbound>,
    /// Local command replies that wait for it.
    replies: Vec<Reply>,
    /// Radio outcomes it makes durable (recorded again if it fails).
    outcomes: Vec<RadioEvent>,
}

/// See the module docs.
enum Mode<F> {
    Idle,
    Flushing { flush: F, covers: Group },
    Faulted(Fault),
}

/// A store fault being waited out.
struct Fault {
    /// Reported in status (`store.fault`).
    error: String,
    next_reopen: Instant,
    /// Messages to apply again after the reopen, in the order they came.
    messages: Vec<Inbound>,
    /// Radio outcomes and state changes to record again, in the order they
    /// came. (Check-ins are not kept: the tag checks in again.)
    radio: Vec<RadioEvent>,
}

/// What a recovery applies again: everything not on disk, oldest first.
pub(crate) struct Replay<'a> {
    pub(crate) messages: &'a [Inbound],
    pub(crate) radio: &'a [RadioEvent],
}

impl<F> Pipeline<F> {
    pub(crate) fn new() -> Self {
        Pipeline {
            mode: Mode::Idle,
            next: Group::default(),
            unflushed: false,
            releasable: VecDeque::new(),
        }
    }

    /// Whether the engine may take messages and radio events: the store is
    /// usable and no flush holds it.
    pub(crate) fn accepts_intake(&self) -> bool {
        matches!(self.mode, Mode::Idle)
    }

    /// Whether a flush holds the store: then nothing may use it (queries
    /// and the sweep wait too).
    pub(crate) fn flush_running(&self) -> bool {
        matches!(self.mode, Mode::Flushing { .. })
    }

    pub(crate) fn is_faulted(&self) -> bool {
        matches!(self.mode, Mode::Faulted(_))
    }

    /// The store fault being waited out, for status reports.
    pub(crate) fn fault(&self) -> Option<&str> {
        match &self.mode {
            Mode::Faulted(f) => Some(&f.error),
            _ => None,
        }
    }

    /// A message was taken from the link. Unless the pipeline is faulted its
    /// changes must have been applied: the next flush covers it. While
    /// faulted it was not applied, and waits for the replay.
    pub(crate) fn taken(&mut self, m: Inbound) {
        match &mut self.mode {
            Mode::Faulted(f) => f.messages.push(m),
            Mode::Idle | Mode::Flushing { .. } => {
                self.next.messages.push(m);
                self.unflushed = true;
            }
        }
    }

    /// A radio event was handled. Unless the pipeline is faulted it was
    /// recorded, and `needs_flush` says whether its changes need a flush of
    /// their own (check-ins and radio state are best effort); an outcome is
    /// kept until a flush covers it, in case that flush fails. While
    /// faulted it was not recorded, and every event but a check-in waits
    /// for the replay.
    pub(crate) fn radio_event(&mut self, event: RadioEvent, needs_flush: bool) {
        match &mut self.mode {
            Mode::Faulted(f) => {
                if !matches!(event, RadioEvent::CheckIn(_)) {
                    f.radio.push(event);
                }
            }
            Mode::Idle | Mode::Flushing { .. } => {
                self.unflushed |= needs_flush;
                if matches!(event, RadioEvent::Outcome(_)) {
                    self.next.outcomes.push(event);
                }
            }
        }
    }

    /// A local command changed the store: its reply waits for the flush.
    /// While faulted the change is lost, and so is the reply.
    pub(crate) fn reply_after_flush(&mut self, reply: Reply) {
        if !self.is_faulted() {
            self.next.replies.push(reply);
            self.unflushed = true;
        }
    }

    /// The store was changed by something that waits for no flush (the
    /// sweep, pruning, an idle transaction), but should be flushed soon.
    pub(crate) fn changed(&mut self) {
        if !self.is_faulted() {
            self.unflushed = true;
        }
    }

    /// Whether the engine should start a flush now.
    pub(crate) fn flush_due(&self) -> bool {
        self.unflushed && matches!(self.mode, Mode::Idle)
    }

    /// A flush started: it covers everything applied until now. Only when
    /// [`Pipeline::flush_due`] said so (never during a fault: that would
    /// forget what the fault holds).
    pub(crate) fn flush_started(&mut self, flush: F) {
        if !matches!(self.mode, Mode::Idle) {
            debug_assert!(false, "a flush started while the store was not free");
            return;
        }
        self.unflushed = false;
        let covers = std::mem::take(&mut self.next);
        self.mode = Mode::Flushing { flush, covers };
    }

    /// The running flush, for the engine to wait on.
    pub(crate) fn running_flush(&mut self) -> Option<&mut F> {
        match &mut self.mode {
            Mode::Flushing { flush, .. } => Some(flush),
            _ => None,
        }
    }

    /// The running flush ended well: the PUBACKs of what it covered become
    /// releasable, and its local replies are returned to be sent.
    pub(crate) fn flush_succeeded(&mut self) -> Vec<Reply> {
        match std::mem::replace(&mut self.mode, Mode::Idle) {
            Mode::Flushing { covers, .. } => {
                self.releasable
                    .extend(covers.messages.into_iter().map(|m| m.token));
                covers.replies
            }
            other => {
                debug_assert!(false, "no flush was running");
                self.mode = other;
                Vec::new()
            }
        }
    }

    /// A write or the running flush failed. Enters the fault (or, if
    /// already in one, updates its error): everything applied since the
    /// last good flush (a failed flush's group first, then what came after
    /// it) waits for the replay, and local callers get no answer. Returns
    /// whether the fault is new.
    pub(crate) fn failed(&mut self, error: String, now: Instant) -> bool {
        let mut lost = match std::mem::replace(&mut self.mode, Mode::Idle) {
            Mode::Faulted(mut f) => {
                f.error = error;
                self.mode = Mode::Faulted(f);
                return false;
            }
            Mode::Flushing { covers, .. } => covers,
            Mode::Idle => Group::default(),
        };
        let newer = std::mem::take(&mut self.next);
        lost.messages.extend(newer.messages);
        lost.outcomes.extend(newer.outcomes);
        self.unflushed = false;
        self.mode = Mode::Faulted(Fault {
            error,
            next_reopen: now,
            messages: lost.messages,
            radio: lost.outcomes,
        });
        true
    }

    /// Whether the store should be reopened now.
    pub(crate) fn reopen_due(&self, now: Instant) -> bool {
        matches!(&self.mode, Mode::Faulted(f) if now >= f.next_reopen)
    }

    /// What a recovery must apply again (nothing unless faulted).
    pub(crate) fn replay(&self) -> Replay<'_> {
        match &self.mode {
            Mode::Faulted(f) => Replay {
                messages: &f.messages,
                radio: &f.radio,
            },
            _ => Replay {
                messages: &[],
                radio: &[],
            },
        }
    }

    /// The reopen failed: try again after [`REOPEN_INTERVAL`].
    pub(crate) fn recovery_failed(&mut self, error: String, now: Instant) {
        if let Mode::Faulted(f) = &mut self.mode {
            f.error = error;
            f.next_reopen = now + REOPEN_INTERVAL;
        }
    }

    /// The store was reopened, the replay applied and flushed: the fault is
    /// over and the held messages' PUBACKs become releasable.
    pub(crate) fn recovered(&mut self) {
        if let Mode::Faulted(f) = std::mem::replace(&mut self.mode, Mode::Idle) {
            self.releasable
                .extend(f.messages.into_iter().map(|m| m.token));
        }
    }

    /// Shutdown: the engine's last flush made everything applied durable,
    /// so its PUBACKs become releasable (the local callers have gone).
    /// Nothing after a fault: what was held is not on disk.
    pub(crate) fn flushed_at_shutdown(&mut self) {
        if matches!(self.mode, Mode::Idle) {
            self.releasable
                .extend(self.next.messages.drain(..).map(|m| m.token));
        }
    }

    /// Hands releasable PUBACKs to `try_send` (the link's channel) oldest
    /// first, without waiting: when the channel is full the rest stay and
    /// go at the next call, so the engine never blocks on the link while
    /// the link waits for the engine to take more messages. A closed
    /// channel (the link has ended) drops them.
    pub(crate) fn release_pubacks(
        &mut self,
        mut try_send: impl FnMut(AckToken) -> Result<(), TrySendError<AckToken>>,
    ) {
        while let Some(&token) = self.releasable.front() {
            match try_send(token) {
                Ok(()) => {
                    self.releasable.pop_front();
                }
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Closed(_)) => {
                    self.releasable.clear();
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::InboundKind;
    use esl_hal::{CheckIn, Outcome, RadioState};
    use tokio::sync::mpsc;

    /// The tests' flushes: the pipeline never looks at the handle.
    type TestPipeline = Pipeline<()>;

    fn msg(pkid: u16) -> Inbound {
        Inbound {
            kind: InboundKind::Task,
            payload: format!("task {pkid}").into_bytes().into(),
            token: AckToken { epoch: 1, pkid },
            oversized: None,
        }
    }

    fn outcome(task: &str) -> RadioEvent {
        RadioEvent::Outcome(Outcome {
            tag_id: "A".into(),
            task_id: task.into(),
            result: Ok(()),
        })
    }

    fn checkin() -> RadioEvent {
        RadioEvent::CheckIn(CheckIn {
            tag_id: "A".into(),
            battery_mv: None,
            rssi: None,
            content_hash: None,
        })
    }

    fn reply(json: &str) -> (Reply, oneshot::Receiver<Vec<u8>>) {
        let (tx, rx) = oneshot::channel();
        ((tx, json.as_bytes().to_vec()), rx)
    }

    /// Releases into a channel with room for everything and returns the
    /// packet ids released.
    fn released(p: &mut TestPipeline) -> Vec<u16> {
        let (tx, mut rx) = mpsc::channel(64);
        p.release_pubacks(|t| tx.try_send(t));
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|t| t.pkid)
            .collect()
    }

    fn pkids(ms: &[Inbound]) -> Vec<u16> {
        ms.iter().map(|m| m.token.pkid).collect()
    }

    fn task_ids(events: &[RadioEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                RadioEvent::Outcome(o) => o.task_id.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn no_puback_is_released_before_the_flush_that_covers_it() {
        let mut p = TestPipeline::new();
        assert!(!p.flush_due(), "nothing to flush yet");
        p.taken(msg(1));
        p.taken(msg(2));
        let (r, mut reply_rx) = reply("{}");
        p.reply_after_flush(r);
        assert!(released(&mut p).is_empty(), "applied is not durable");
        assert!(p.flush_due());

        p.flush_started(());
        assert!(p.flush_running() && !p.accepts_intake() && !p.flush_due());
        assert!(released(&mut p).is_empty(), "the flush has not ended");
        assert!(reply_rx.try_recv().is_err(), "nor the reply");

        let replies = p.flush_succeeded();
        assert_eq!(released(&mut p), [1, 2], "in the order taken");
        assert_eq!(replies.len(), 1, "the reply goes now");
        assert!(p.accepts_intake() && !p.flush_due());
    }

    #[test]
    fn a_flush_covers_only_what_was_applied_before_it_started() {
        let mut p = TestPipeline::new();
        p.taken(msg(1));
        p.flush_started(());
        // The engine takes nothing while the store is busy (the messages
        // queue in its channel), but should it, a flush still releases only
        // what it covers.
        p.taken(msg(2));
        let (r, _reply_rx) = reply("{}");
        p.reply_after_flush(r);
        assert!(p.flush_succeeded().is_empty(), "the reply came after");
        assert_eq!(released(&mut p), [1]);
        assert!(p.flush_due(), "the newer message needs a flush of its own");

        p.taken(msg(3));
        p.flush_started(());
        assert!(released(&mut p).is_empty());
        assert_eq!(p.flush_succeeded().len(), 1);
        assert_eq!(released(&mut p), [2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_flush_replays_its_group_before_newer_ones_and_releases_after_recovery() {
        let mut p = TestPipeline::new();
        p.taken(msg(1));
        p.radio_event(outcome("t1"), true);
        p.radio_event(checkin(), false);
        let (r, mut covered_reply) = reply("{}");
        p.reply_after_flush(r);
        p.flush_started(());
        p.taken(msg(2));
        p.radio_event(outcome("t2"), true);
        let (r, mut newer_reply) = reply("{}");
        p.reply_after_flush(r);

        assert!(
            p.failed("disk is full".into(), Instant::now()),
            "a new fault"
        );
        assert_eq!(p.fault(), Some("disk is full"));
        assert!(!p.flush_running() && !p.accepts_intake() && !p.flush_due());
        let replay = p.replay();
        assert_eq!(pkids(replay.messages), [1, 2], "the failed flush's first");
        assert_eq!(
            task_ids(replay.radio),
            ["t1", "t2"],
            "outcomes, no check-in"
        );
        assert!(
            matches!(
                covered_reply.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            ) && matches!(
                newer_reply.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            ),
            "local callers get no answer the disk does not back"
        );
        assert!(released(&mut p).is_empty());

        // Nothing of this changes while faulted, and nothing is released.
        p.changed();
        assert!(!p.flush_due());
        assert!(
            !p.failed("still full".into(), Instant::now()),
            "the same fault"
        );
        assert_eq!(p.fault(), Some("still full"));
        assert!(p.reopen_due(Instant::now()), "the first reopen is at once");
        p.recovery_failed("reopen failed".into(), Instant::now());
        assert!(released(&mut p).is_empty(), "not before recovery's flush");
        assert_eq!(pkids(p.replay().messages), [1, 2], "kept for the next try");

        p.recovered();
        assert_eq!(p.fault(), None);
        assert!(p.accepts_intake() && !p.flush_due(), "recovery flushed");
        assert_eq!(released(&mut p), [1, 2]);
        assert!(p.replay().messages.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_holds_what_came_before_and_after_it() {
        let mut p = TestPipeline::new();
        p.taken(msg(1));
        p.flush_started(());
        p.flush_succeeded();
        assert_eq!(released(&mut p), [1]);

        p.taken(msg(2));
        p.radio_event(outcome("t2"), true);
        let (r, mut lost_reply) = reply("{}");
        p.reply_after_flush(r);
        // Message 3's write fails; the rest of its batch is not applied.
        assert!(p.failed("disk is full".into(), Instant::now()));
        p.taken(msg(3));
        p.taken(msg(4));
        p.radio_event(outcome("t3"), false);
        p.radio_event(checkin(), false);
        p.radio_event(
            RadioEvent::State(RadioState::Down {
                reason: "unplugged".into(),
            }),
            false,
        );
        let (r, mut faulted_reply) = reply("{}");
        p.reply_after_flush(r);

        let replay = p.replay();
        assert_eq!(pkids(replay.messages), [2, 3, 4], "1 is on disk");
        assert_eq!(replay.radio.len(), 3, "{:?}", task_ids(replay.radio));
        assert_eq!(task_ids(&replay.radio[..2]), ["t2", "t3"]);
        assert!(matches!(replay.radio[2], RadioEvent::State(_)));
        assert!(lost_reply.try_recv().is_err() && faulted_reply.try_recv().is_err());
        p.flushed_at_shutdown();
        assert!(released(&mut p).is_empty(), "nothing after a fault");

        p.recovered();
        assert_eq!(released(&mut p), [2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_retries_at_the_reopen_interval() {
        let mut p = TestPipeline::new();
        p.taken(msg(1));
        assert!(!p.reopen_due(Instant::now()), "no fault, no reopen");
        p.failed("disk is full".into(), Instant::now());
        assert!(p.reopen_due(Instant::now()));

        p.recovery_failed("still full".into(), Instant::now());
        assert_eq!(p.fault(), Some("still full"));
        tokio::time::advance(REOPEN_INTERVAL - Duration::from_millis(1)).await;
        assert!(!p.reopen_due(Instant::now()), "too early");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(p.reopen_due(Instant::now()));
        p.recovery_failed("still full".into(), Instant::now());
        assert!(!p.reopen_due(Instant::now()), "the next try waits again");
        tokio::time::advance(REOPEN_INTERVAL).await;
        assert!(p.reopen_due(Instant::now()));
        assert_eq!(pkids(p.replay().messages), [1]);
    }

    #[test]
    fn pubacks_the_link_has_no_room_for_go_later_in_order() {
        let mut p = TestPipeline::new();
        for pkid in 1..=5 {
            p.taken(msg(pkid));
        }
        p.flush_started(());
        p.flush_succeeded();
        let (tx, mut rx) = mpsc::channel(2);
        p.release_pubacks(|t| tx.try_send(t));
        assert_eq!(rx.try_recv().unwrap().pkid, 1);
        // A newer flush's PUBACKs queue behind the older ones.
        p.taken(msg(6));
        p.flush_started(());
        p.flush_succeeded();
        p.release_pubacks(|t| tx.try_send(t));
        let mut got = Vec::new();
        while let Ok(t) = rx.try_recv() {
            got.push(t.pkid);
            p.release_pubacks(|t| tx.try_send(t));
        }
        assert_eq!(got, [2, 3, 4, 5, 6]);

        // The link has ended: nothing to keep.
        p.taken(msg(7));
        p.flush_started(());
        p.flush_succeeded();
        drop(rx);
        p.release_pubacks(|t| tx.try_send(t));
        assert!(released(&mut p).is_empty());
    }

    #[test]
    fn shutdown_releases_what_the_last_flush_made_durable() {
        let mut p = TestPipeline::new();
        p.taken(msg(1));
        p.taken(msg(2));
        assert!(released(&mut p).is_empty());
        p.flushed_at_shutdown();
        assert_eq!(released(&mut p), [1, 2]);
    }
}
