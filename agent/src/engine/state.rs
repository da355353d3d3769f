//! The engine's decision state: settings, the tag table, deliveries in
//! flight, and the handles decisions need (store, counters, signature
//! check, limiter, radio). Loading, reloading after a store fault, and the
//! getters the engine task and the commands use.

use std::collections::HashMap;
use std::sync::Arc;

use esl_hal::RadioState;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::counters::Counters;
use crate::engine::limiter::ReplyLimiter;
use crate::identity::Identity;
use crate::security::signing::Verifier;
use crate::store::{Change, Store, StoreError, TagRecord};
use crate::wire::Method;

/// Settings the engine needs, taken from the config once.
#[derive(Debug, Clone)]
pub(crate) struct EngineSettings {
    pub default_ttl_ms: u64,
    pub max_attempts: u32,
    pub delivery_timeout_ms: u64,
    pub keep_final_ms: u64,
    pub send_accepted: bool,
    pub batch_max: usize,
    pub max_payload: usize,
    pub offline_after_ms: u64,
    pub ack_to: String,
    /// Remote methods the agent answers (`security.allowed_methods`).
    pub allowed_methods: Vec<Method>,
    /// Patterns a command's `reply_to` must match
    /// (`Config::reply_to_patterns`).
    pub reply_to_allowed: Vec<String>,
    /// State-changing methods allowed from unsigned commands
    /// (`security.allow_unsigned_methods`).
    pub allow_unsigned_methods: Vec<Method>,
}

impl EngineSettings {
    pub(crate) fn from_config(c: &Config) -> Self {
        EngineSettings {
            default_ttl_ms: c.tasks.default_ttl_ms,
            max_attempts: c.tasks.max_attempts,
            delivery_timeout_ms: c.tasks.delivery_timeout_ms,
            keep_final_ms: c.tasks.keep_final_h.saturating_mul(3600 * 1000),
            send_accepted: c.tasks.send_accepted,
            batch_max: c.tasks.batch_max,
            max_payload: c.limits.max_payload,
            offline_after_ms: c.status.offline_after_s.saturating_mul(1000),
            ack_to: c.mqtt.ack_to.clone(),
            allowed_methods: methods(&c.security.allowed_methods),
            reply_to_allowed: c.reply_to_patterns(),
            allow_unsigned_methods: methods(&c.security.allow_unsigned_methods),
        }
    }
}

/// The methods a validated config list names (validation refused unknown
/// names, so none is dropped here).
fn methods(names: &[String]) -> Vec<Method> {
    names.iter().filter_map(|n| Method::from_name(n)).collect()
}

/// A delivery handed to the radio and not answered yet.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct InFlight {
    pub(super) task_id: String,
    /// Wall-clock deadline of the delivery.
    pub(super) until: u64,
}

/// What the engine remembers of a tag between check-ins.
#[derive(Debug, Clone, Default)]
pub(super) struct TagEntry {
    pub(super) rec: TagRecord,
    /// The radio's latest [`esl_hal::TagDetails`] for the tag (memory only:
    /// radios report them again after a restart). Boxed: most tags have
    /// none, and the table holds an entry for each of thousands of tags.
    pub(super) info: Option<Box<serde_json::Map<String, serde_json::Value>>>,
    /// When `rec` was last written to the store; 0 = never (or changed in a
    /// way that must be written at the next change).
    pub(super) saved_at: u64,
}

/// How often a tag's check-in report (battery, signal, last seen) is
/// written to the store when nothing else about it changed. The report is
/// best effort (status shows the live value from memory); writing it at
/// every check-in cost one store write per check-in.
pub(super) const TAG_SAVE_INTERVAL_MS: u64 = 60_000;
/// Pending tasks the sweep expires per pass (every `SWEEP_INTERVAL`), so a
/// mass expiry never makes one huge store batch.
pub(super) const EXPIRE_LIMIT: usize = 1_000;

/// The engine's decisions, without channels. Every method takes `now` (ms
/// since the Unix epoch) and records its store writes in the given
/// [`Change`]; deliveries to start are pushed to `deliveries`.
pub(crate) struct State {
    pub(super) settings: EngineSettings,
    pub(super) identity: Identity,
    pub(super) store: Arc<Store>,
    pub(super) counters: Arc<Counters>,
    /// Tags with a pending task. The tasks themselves are only in the
    /// store (`p`, `x`): memory does not grow with the pending count.
    pub(super) pending_count: usize,
    /// Deliveries in flight, by tag (at most one per tag).
    pub(super) in_flight: HashMap<String, InFlight>,
    pub(super) tags: HashMap<String, TagEntry>,
    /// Tags whose last content is sent again at their next check-in
    /// (`tag.refresh`). Not persisted: a refresh lost in a restart is
    /// harmless and can be asked for again.
    pub(super) refresh: std::collections::HashSet<String>,
    pub(super) radio: RadioState,
    /// The link's connection state, for `agent.status`.
    pub(super) link: Option<tokio::sync::watch::Receiver<crate::msg::LinkState>>,
    /// Signature check of tasks and commands; checks nothing until
    /// [`State::set_verifier`].
    pub(super) verifier: Verifier,
    /// Bounds command replies and rejection acks (issue 14).
    pub(super) limiter: ReplyLimiter,
    /// What the radio said about its hardware (firmware), for status.
    pub(super) radio_details: esl_hal::RadioDetails,
    /// Requests to the radio task (`network.permit_join`,
    /// `network.change_channel`); `None` until
    /// [`State::set_radio_control`] (tests without a radio).
    pub(super) radio_control: Option<mpsc::Sender<crate::msg::RadioControl>>,
    /// The radio's check of content against the tag's capabilities
    /// ([`esl_hal::Radio::content_check`]); `None` when its tags take any.
    pub(super) content_check: Option<Arc<dyn esl_hal::ContentCheck>>,
}

impl State {
    /// Loads pending tasks and known tags from the store.
    pub(crate) fn load(
        settings: EngineSettings,
        identity: Identity,
        store: Arc<Store>,
        counters: Arc<Counters>,
    ) -> Result<State, StoreError> {
        let pending_count = store.pending_count()?;
        let tags = store
            .tags()?
            .into_iter()
            .map(|(id, rec)| {
                let saved_at = rec.last_seen.unwrap_or_default();
                (
                    id,
                    TagEntry {
                        rec,
                        saved_at,
                        info: None,
                    },
                )
            })
            .collect();
        Ok(State {
            verifier: Verifier::disabled(&identity.client_id),
            limiter: ReplyLimiter::default(),
            settings,
            identity,
            store,
            counters,
            pending_count,
            in_flight: HashMap::new(),
            tags,
            refresh: Default::default(),
            link: None,
            radio_control: None,
            content_check: None,
            radio_details: Default::default(),
            radio: RadioState::Down {
                reason: "starting".into(),
            },
        })
    }

    /// Follows the store after [`Store::reopen`]: changes applied after the
    /// last good flush may be gone, so the in-memory view must follow the
    /// disk, not the other way round. A delivery in flight for a task that
    /// is still pending stays in flight, so its tag is not sent the same
    /// content again. (The tag table is best effort and at least as fresh in
    /// memory; it is kept, and written again at the next change.)
    pub(super) fn reload(&mut self) -> Result<(), StoreError> {
        self.pending_count = self.store.pending_count()?;
        let mut in_flight = std::mem::take(&mut self.in_flight);
        for (tag_id, f) in in_flight.drain() {
            if self.store.pending_of(&tag_id)?.as_deref() == Some(f.task_id.as_str()) {
                self.in_flight.insert(tag_id, f);
            }
        }
        for t in self.tags.values_mut() {
            t.saved_at = 0;
        }
        Ok(())
    }

    pub(super) fn pending_len(&self) -> usize {
        self.pending_count
    }

    /// Writes every tag report that changed since it was last written (at
    /// shutdown, so a restart shows the last check-ins).
    pub(super) fn save_tags(&mut self, change: &mut Change) {
        for (id, t) in &mut self.tags {
            if t.rec.last_seen.is_some_and(|seen| seen > t.saved_at) {
                change.put_tag(id, &t.rec);
                t.saved_at = t.rec.last_seen.unwrap_or_default();
            }
        }
    }

    /// Installs the signature policy of `[security]` (keys loaded at start).
    pub(crate) fn set_verifier(&mut self, verifier: Verifier) {
        self.verifier = verifier;
    }

    pub(super) fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Whether one more command reply or rejection ack may go into
    /// the outbox now ([`ReplyLimiter`]); a refusal is counted here.
    pub(super) fn admit_limited(&mut self, now: u64, what: &str) -> bool {
        let admitted = self.limiter.admit(now, self.store.outbox_len(), what);
        if !admitted {
            Counters::bump(&self.counters.replies_dropped);
        }
        admitted
    }

    pub(super) fn radio_details(&self) -> &esl_hal::RadioDetails {
        &self.radio_details
    }

    pub(super) fn radio_state(&self) -> &RadioState {
        &self.radio
    }

    /// The radio task's control channel, for `network.permit_join` and
    /// `network.change_channel`.
    pub(crate) fn set_radio_control(&mut self, tx: mpsc::Sender<crate::msg::RadioControl>) {
        self.radio_control = Some(tx);
    }

    /// The radio's content check, run on every new task.
    pub(crate) fn set_content_check(&mut self, check: Option<Arc<dyn esl_hal::ContentCheck>>) {
        self.content_check = check;
    }

    pub(super) fn radio_control(&self) -> Option<&mpsc::Sender<crate::msg::RadioControl>> {
        self.radio_control.as_ref()
    }

    pub(crate) fn set_link(&mut self, link: tokio::sync::watch::Receiver<crate::msg::LinkState>) {
        self.link = Some(link);
    }

    pub(super) fn link_state(&self) -> crate::msg::LinkState {
        self.link.as_ref().map(|l| *l.borrow()).unwrap_or_default()
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(super) fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    pub(super) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Adds tags the radio knows before their first check-in, so reports
    /// list them (as not yet seen).
    pub(crate) fn add_known_tags(&mut self, tag_ids: Vec<String>) {
        for id in tag_ids {
            self.tags.entry(id).or_default();
        }
    }

    /// Asks for the tag's last content to be sent again at its next check-in.
    pub(super) fn request_refresh(&mut self, tag_id: &str) {
        self.refresh.insert(tag_id.to_owned());
    }
}
