//! Simulated tags (PROTOCOL §8): the backend that `esl-agent demo` and every
//! end-to-end test drive through the same [`Radio`] trait as real hardware.
//!
//! Owns: the simulated tags' state (what each one displays, its battery and
//! signal), their wake-up schedule, and the optional display journal (only
//! this module opens that file). Must not: know about MQTT, tasks or the
//! store, or ever make the agent wait on it.
//!
//! Channels: [`SimRadio::deliver`] writes `delivery_tx` (bounded,
//! [`DELIVERY_CAPACITY`]); the driver task reads `delivery_rx` and writes
//! `event_tx` (bounded, [`EVENT_CAPACITY`]); [`SimRadio::next_event`] reads
//! `event_rx`.
//!
//! One driver task serves every tag, so 10 000 tags cost 10 000 heap entries,
//! not 10 000 tasks: a timer heap holds each online tag's next check-in, a
//! FIFO holds the deliveries being rendered, and a local outgoing queue holds
//! events not yet handed to the agent.
//!
//! The outgoing queue is every driver's (`outgoing.rs`): the driver
//! never waits on one thing; it `select!`s over accepting a delivery, the
//! next timer, and reserving channel space for the front of its queue.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::distributions::Bernoulli;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::outgoing::{Outgoing, Pending};
use crate::{
    CheckIn, Delivery, DeliveryFailure, DriverChannels, Outcome, Radio, RadioError, RadioEvent,
    RadioInventory, TagId,
};

/// Capacity of the delivery channel. The driver takes from it on every turn
/// of its loop and never waits on anything else first, so it only has to
/// absorb what the agent hands over between two turns; 64 lets the agent
/// serve a burst of woken tags without a task switch per delivery.
pub const DELIVERY_CAPACITY: usize = 64;

/// Capacity of the event channel. Events that do not fit wait in the
/// driver's own queue, where check-ins are coalesced and built fresh when
/// sent; a check-in already in the channel is frozen and may go stale. So
/// this is small on purpose: enough to smooth a burst of wake-ups on the same
/// millisecond, not a backlog.
pub const EVENT_CAPACITY: usize = 256;

/// Tag ids end in a 6-digit index (PROTOCOL §8), so no more tags than this.
const MAX_TAGS: u32 = 1_000_000;

/// Check-in jitter is ±interval/5, i.e. ±20 %.
const JITTER_DIVISOR: u64 = 5;

/// A fresh coin cell, per tag (so tags are told apart in the status reports).
const FRESH_BATTERY_MV: RangeInclusive<u16> = 2950..=3050;
/// Radio and e-paper refresh cost per displayed update.
const BATTERY_MV_PER_UPDATE: u16 = 2;
/// Below this a real tag browns out; the simulated battery stops draining.
const EMPTY_BATTERY_MV: u16 = 2000;

/// Per-tag signal strength: from the far end of the store to next to the AP.
const BASE_RSSI_DBM: RangeInclusive<i16> = -90..=-40;
/// Fading between two check-ins of the same tag.
const RSSI_NOISE_DB: i16 = 3;

/// Malformed journal lines warned about one by one; beyond that, one summary
/// (a corrupt journal must not flood the log).
const MALFORMED_WARNINGS: usize = 5;

/// Mixed into the seed of the event RNG. The schedule and the events draw
/// from separate streams so that deliveries (which draw failures) do not
/// shift the check-in schedule: same seed, same check-ins, whatever the agent
/// delivers.
const EVENT_STREAM: u64 = 0x9E37_79B9_7F4A_7C15;

/// Simulated radio settings (`[radio.sim]`, PROTOCOL §8): the agent's
/// config file deserialises straight into this, like every radio's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Number of simulated tags.
    pub tags: u32,
    /// Tag ids are this prefix plus a 6-digit zero-padded index.
    pub id_prefix: String,
    /// Mean time between two check-ins of one tag (jitter ±20 %).
    pub checkin_interval_ms: u64,
    /// Probability that one delivery attempt fails (retryably).
    pub fail_rate: f64,
    /// Tag ids that never check in and never answer.
    pub offline: Vec<String>,
    /// RNG seed, so runs repeat.
    pub seed: u64,
    /// One JSON line per content a tag actually displays; read back at start.
    pub journal: Option<PathBuf>,
    /// Time a tag takes to render content and confirm it.
    pub apply_ms: u64,
}

impl SimConfig {
    /// Checks every setting; the error names the key
    /// (`radio.sim.fail_rate`).
    pub fn validate(&self) -> Result<(), SimError> {
        let invalid = |key, reason: &str| {
            Err(SimError::InvalidConfig {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.tags > MAX_TAGS {
            return invalid(
                "radio.sim.tags",
                "must be at most 1000000 (ids have 6 digits)",
            );
        }
        // Tag ids are at most 32 characters: prefix plus 6 digits.
        if self.id_prefix.len() > 26
            || !self
                .id_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
        {
            return invalid(
                "radio.sim.id_prefix",
                "must be at most 26 characters of letters, digits, '_', '.', ':' and '-'",
            );
        }
        if self.checkin_interval_ms == 0 {
            return invalid("radio.sim.checkin_interval_ms", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return invalid("radio.sim.fail_rate", "must be between 0.0 and 1.0");
        }
        Ok(())
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            tags: 16,
            id_prefix: "SIM".to_owned(),
            checkin_interval_ms: 1000,
            fail_rate: 0.0,
            offline: Vec::new(),
            seed: 1,
            journal: None,
            apply_ms: 20,
        }
    }
}

/// Why the simulated radio could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A setting is out of range; `key` is its full name
    /// (`radio.sim.fail_rate`).
    #[error("invalid {key}: {reason}")]
    InvalidConfig { key: &'static str, reason: String },
    /// The journal could not be opened, read or repaired. The I/O error is
    /// part of the message (not only the source) so that it shows however
    /// the caller prints it.
    #[error("sim journal {}: cannot {action}: {error}", path.display())]
    Journal {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    /// [`SimRadio::start`] spawns its driver on the current tokio runtime.
    #[error("the simulated radio must be started inside a tokio runtime")]
    NoRuntime,
}

/// The simulated radio: the agent's handle on the driver task.
///
/// Dropping it closes both channels, which ends the driver.
#[derive(Debug)]
pub struct SimRadio {
    names: TagNames,
    channels: DriverChannels,
    malformed_journal_lines: usize,
}

impl SimRadio {
    /// Validates `cfg`, reads the journal (if any) and spawns the driver task
    /// on the current tokio runtime.
    pub fn start(cfg: SimConfig) -> Result<SimRadio, SimError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SimError::NoRuntime)?;
        let (radio, driver) = build(cfg)?;
        runtime.spawn(driver.run());
        Ok(radio)
    }

    /// Every simulated tag's id, offline ones included, in index order.
    pub fn tag_ids(&self) -> Vec<TagId> {
        (0..self.names.len()).map(|i| self.names.id(i)).collect()
    }

    /// How many journal lines were skipped at start because they could not be
    /// parsed (a torn last line after a crash, hand edits…).
    pub fn malformed_journal_lines(&self) -> usize {
        self.malformed_journal_lines
    }
}

impl Radio for SimRadio {
    fn inventory(&self) -> RadioInventory {
        RadioInventory {
            known_tags: self.tag_ids(),
            ..RadioInventory::default()
        }
    }

    async fn next_event(&mut self) -> Result<RadioEvent, RadioError> {
        self.channels.next_event().await
    }

    async fn deliver(&mut self, delivery: Delivery) -> Result<(), RadioError> {
        self.channels.deliver(delivery).await
    }
}

/// Validates the config, reads the journal and sets up both ends. Split from
/// [`SimRadio::start`] so tests can hold a driver without running it.
fn build(cfg: SimConfig) -> Result<(SimRadio, Driver), SimError> {
    cfg.validate()?;
    let failure = Bernoulli::new(cfg.fail_rate).expect("validate checked the probability");

    let names = TagNames {
        prefix: cfg.id_prefix,
        count: cfg.tags,
    };
    let offline: HashSet<&str> = cfg.offline.iter().map(String::as_str).collect();
    for id in &offline {
        if names.index(id).is_none() {
            tracing::warn!(tag_id = %id, "radio.sim.offline names a tag that is not simulated");
        }
    }

    let (journal, restored) = match &cfg.journal {
        Some(path) => {
            let (journal, restored) = Journal::open(path, &names)?;
            (Some(journal), restored)
        }
        None => (None, Restored::empty(&names)),
    };
    let malformed_journal_lines = restored.malformed;

    let mut schedule_rng = SmallRng::seed_from_u64(cfg.seed);
    let now = Instant::now();
    let mut wakeups = BinaryHeap::with_capacity(names.len());
    let tags = restored
        .tags
        .into_iter()
        .enumerate()
        .map(|(index, (displayed, updates))| {
            // Every tag draws the same values whether or not it is offline,
            // so taking one tag offline does not reshuffle the others.
            let base_rssi = schedule_rng.gen_range(BASE_RSSI_DBM);
            let fresh_battery_mv = schedule_rng.gen_range(FRESH_BATTERY_MV);
            let first = Duration::from_millis(schedule_rng.gen_range(0..cfg.checkin_interval_ms));
            let offline = offline.contains(names.id(index).as_str());
            if !offline {
                wakeups.push(Reverse((now + first, index)));
            }
            SimTag {
                offline,
                base_rssi,
                fresh_battery_mv,
                updates,
                displayed,
            }
        })
        .collect();

    let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_CAPACITY);
    let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
    let radio = SimRadio {
        names: names.clone(),
        channels: DriverChannels::new("simulated radio driver", delivery_tx, event_rx),
        malformed_journal_lines,
    };
    let driver = Driver {
        state: SimState {
            names,
            tags,
            interval_ms: cfg.checkin_interval_ms,
            apply_delay: Duration::from_millis(cfg.apply_ms),
            failure,
            schedule_rng,
            event_rng: SmallRng::seed_from_u64(cfg.seed ^ EVENT_STREAM),
            wakeups,
            rendering: VecDeque::new(),
            outgoing: Outgoing::default(),
            journal,
        },
        delivery_rx,
        event_tx,
    };
    Ok((radio, driver))
}

/// Maps tag indexes to ids and back (`SIM000042` ↔ 42).
#[derive(Debug, Clone)]
struct TagNames {
    prefix: String,
    count: u32,
}

impl TagNames {
    fn len(&self) -> usize {
        // u32 → usize cannot lose anything on the 32- and 64-bit targets we build.
        self.count as usize
    }

    fn id(&self, index: usize) -> TagId {
        format!("{}{index:06}", self.prefix)
    }

    /// The index of `id`, if it names a simulated tag. Only the exact form
    /// [`TagNames::id`] produces is accepted (`SIM00042` and `SIM+00042` are
    /// not tags).
    fn index(&self, id: &str) -> Option<usize> {
        let digits = id.strip_prefix(self.prefix.as_str())?;
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let index: usize = digits.parse().ok()?;
        (index < self.len()).then_some(index)
    }
}

/// One line of the display journal (PROTOCOL §8). Borrowing lets the driver
/// write a line without cloning the delivery, and parse one without copying
/// unescaped strings.
#[derive(Debug, Serialize, Deserialize)]
struct JournalLine<'a> {
    #[serde(borrow)]
    tag_id: Cow<'a, str>,
    #[serde(borrow)]
    task_id: Cow<'a, str>,
    #[serde(borrow)]
    content_hash: Cow<'a, str>,
    /// Milliseconds since the Unix epoch.
    at: u64,
}

/// The open journal: append-only, one `write` per line so a line is never
/// interleaved with or split by another writer's.
#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: File,
}

/// What the journal says about each tag, by index: the hash it displays and
/// how many updates it has displayed (which drained its battery).
struct Restored {
    tags: Vec<(Option<String>, u32)>,
    malformed: usize,
}

impl Restored {
    fn empty(names: &TagNames) -> Self {
        Self {
            tags: vec![(None, 0); names.len()],
            malformed: 0,
        }
    }
}

impl Journal {
    /// Opens (creating if missing) and replays the journal. A malformed line
    /// is warned about, counted and skipped; only I/O errors fail, naming the
    /// path.
    fn open(path: &Path, names: &TagNames) -> Result<(Journal, Restored), SimError> {
        let fail = |action, error| SimError::Journal {
            path: path.to_owned(),
            action,
            error,
        };
        // Append mode writes always land at the end; reads start at 0.
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| fail("open", e))?;

        let mut restored = Restored::empty(names);
        let mut reader = BufReader::new(&file);
        let mut buf = Vec::new();
        let mut line_no = 0usize;
        let mut ends_with_newline = true;
        loop {
            buf.clear();
            if reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| fail("read", e))?
                == 0
            {
                break;
            }
            line_no += 1;
            ends_with_newline = buf.last() == Some(&b'\n');
            let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line: JournalLine = match serde_json::from_slice(text) {
                Ok(line) => line,
                Err(error) => {
                    restored.malformed += 1;
                    if restored.malformed <= MALFORMED_WARNINGS {
                        tracing::warn!(path = %path.display(), line = line_no, %error,
                            "skipping malformed sim journal line");
                    }
                    continue;
                }
            };
            // Lines for tags no longer simulated (fewer tags, other prefix)
            // are history, not errors.
            if let Some((displayed, updates)) = names
                .index(&line.tag_id)
                .and_then(|index| restored.tags.get_mut(index))
            {
                *displayed = Some(line.content_hash.into_owned());
                *updates = updates.saturating_add(1);
            }
        }
        if restored.malformed > MALFORMED_WARNINGS {
            tracing::warn!(path = %path.display(), skipped = restored.malformed,
                "skipped malformed sim journal lines");
        }
        // A torn last line (crash mid-write) must not swallow our first new
        // line: end it, so it stays one malformed line on its own.
        if !ends_with_newline {
            (&file).write_all(b"\n").map_err(|e| fail("repair", e))?;
        }

        let journal = Journal {
            path: path.to_owned(),
            file,
        };
        Ok((journal, restored))
    }

    /// Appends the line for a displayed delivery. A plain blocking write on
    /// purpose: the line is a couple of hundred bytes into the page cache, and
    /// doing it inline is what guarantees the line is in the file before the
    /// outcome leaves the driver.
    fn record(&mut self, delivery: &Delivery) -> io::Result<()> {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            // A clock before 1970 is broken; 0 still parses and sorts first.
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let line = JournalLine {
            tag_id: Cow::Borrowed(&delivery.tag_id),
            task_id: Cow::Borrowed(&delivery.task_id),
            content_hash: Cow::Borrowed(&delivery.content_hash),
            at,
        };
        // Serializing strings and an integer cannot fail; mapped, not unwrapped.
        let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        self.file.write_all(&bytes)
    }
}

/// One simulated tag.
#[derive(Debug)]
struct SimTag {
    offline: bool,
    base_rssi: i16,
    fresh_battery_mv: u16,
    /// Updates displayed so far, journal included; drains the battery.
    updates: u32,
    /// Hash of what the e-paper shows now.
    displayed: Option<String>,
}

impl SimTag {
    fn battery_mv(&self) -> u16 {
        let drain = u16::try_from(self.updates)
            .unwrap_or(u16::MAX)
            .saturating_mul(BATTERY_MV_PER_UPDATE);
        self.fresh_battery_mv
            .saturating_sub(drain)
            .max(EMPTY_BATTERY_MV)
    }
}

/// The driver task: the simulation state plus the driver's channel ends.
/// Kept apart so the loop can hold a send permit (borrowing `event_tx`) while
/// it updates the state.
struct Driver {
    state: SimState,
    delivery_rx: mpsc::Receiver<Delivery>,
    event_tx: mpsc::Sender<RadioEvent>,
}

/// Everything the driver simulates. Tag indexes held here (heap, queue) all
/// come from [`TagNames::index`] or from enumerating `tags`, so they are
/// always in bounds for `tags`.
struct SimState {
    names: TagNames,
    tags: Vec<SimTag>,
    interval_ms: u64,
    apply_delay: Duration,
    failure: Bernoulli,
    /// First check-ins, jitter and per-tag constants.
    schedule_rng: SmallRng,
    /// RSSI noise and delivery failures.
    event_rng: SmallRng,
    /// Next check-in of every online tag, earliest first; ties go to the
    /// lower index, so runs repeat.
    wakeups: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Deliveries being rendered, with when they finish. `apply_delay` is
    /// constant and deliveries arrive in order, so this is sorted as built.
    rendering: VecDeque<(Instant, Delivery)>,
    /// Events waiting for room in the event channel, oldest first.
    /// Events not yet taken by the agent; check-ins by tag index.
    outgoing: Outgoing<usize>,
    journal: Option<Journal>,
}

impl Driver {
    /// Runs until the [`SimRadio`] is dropped (either channel closes).
    async fn run(self) {
        let Driver {
            mut state,
            mut delivery_rx,
            event_tx,
        } = self;
        loop {
            let wake = state.next_wake();
            tokio::select! {
                // Fixed order so runs repeat. Deliveries first: the agent may
                // be waiting in `deliver()` and is not reading events then.
                biased;
                received = delivery_rx.recv() => match received {
                    Some(delivery) => {
                        let done = Instant::now() + state.apply_delay;
                        state.rendering.push_back((done, delivery));
                    }
                    None => break,
                },
                // The placeholder instant is never awaited: the branch is off
                // when nothing is scheduled.
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    state.fire_due(Instant::now());
                }
                permit = event_tx.reserve(), if !state.outgoing.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(pending) = state.outgoing.pop() {
                            permit.send(state.event(pending));
                        }
                    }
                    Err(_) => break,
                },
            }
        }
        tracing::debug!("simulated radio driver stopped");
    }
}

impl SimState {
    /// The earliest instant something is due: a render finishing or a check-in.
    fn next_wake(&self) -> Option<Instant> {
        let render = self.rendering.front().map(|(done, _)| *done);
        let checkin = self.wakeups.peek().map(|Reverse((due, _))| *due);
        match (render, checkin) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Finishes every render and fires every check-in due by `now`.
    fn fire_due(&mut self, now: Instant) {
        while let Some((done, delivery)) = self.rendering.pop_front() {
            if done > now {
                self.rendering.push_front((done, delivery));
                break;
            }
            let outcome = self.render(delivery);
            self.outgoing.event(RadioEvent::Outcome(outcome));
        }
        while let Some(&Reverse((due, index))) = self.wakeups.peek() {
            if due > now {
                break;
            }
            self.wakeups.pop();
            self.outgoing.checkin(index);
            // From `now`, not `due`: a driver that fell behind resumes the
            // cadence instead of firing a catch-up burst.
            let next = now + self.next_gap();
            self.wakeups.push(Reverse((next, index)));
        }
    }

    /// Time to a tag's next check-in: the interval ±20 %, uniform. Never 0
    /// (interval ≥ 1 and jitter < interval), so `fire_due` always ends.
    fn next_gap(&mut self) -> Duration {
        let jitter = self.interval_ms / JITTER_DIVISOR;
        let gap = self.interval_ms - jitter + self.schedule_rng.gen_range(0..=2 * jitter);
        Duration::from_millis(gap)
    }

    /// The tag renders a delivery (or does not); the result is its outcome.
    fn render(&mut self, delivery: Delivery) -> Outcome {
        let result = self.try_render(&delivery);
        Outcome {
            tag_id: delivery.tag_id,
            task_id: delivery.task_id,
            result,
        }
    }

    fn try_render(&mut self, delivery: &Delivery) -> Result<(), DeliveryFailure> {
        let failure = |retryable, reason: &str| DeliveryFailure {
            retryable,
            reason: reason.to_owned(),
        };
        let Some(index) = self.names.index(&delivery.tag_id) else {
            return Err(failure(false, "no such tag"));
        };
        if self.tags[index].offline {
            return Err(failure(true, "tag did not answer"));
        }
        if self.event_rng.sample(self.failure) {
            return Err(failure(true, "simulated radio failure"));
        }
        // The tag displays the content before it confirms: journal first.
        if let Some(journal) = &mut self.journal {
            if let Err(error) = journal.record(delivery) {
                // The journal is the tests' record of what tags show; an
                // unrecorded success would break "one line per success".
                tracing::warn!(path = %journal.path.display(), tag_id = %delivery.tag_id,
                    %error, "cannot append to the sim journal; failing the delivery");
                return Err(failure(true, "simulated tag could not journal the display"));
            }
        }
        let tag = &mut self.tags[index];
        tag.displayed = Some(delivery.content_hash.clone());
        tag.updates = tag.updates.saturating_add(1);
        Ok(())
    }

    /// Turns a queued entry into the event to send now.
    fn event(&mut self, pending: Pending<usize>) -> RadioEvent {
        match pending {
            Pending::Event(event) => event,
            Pending::Details(_) => unreachable!("the simulator queues no details"),
            Pending::CheckIn(index) => {
                let tag = &self.tags[index];
                let noise = self.event_rng.gen_range(-RSSI_NOISE_DB..=RSSI_NOISE_DB);
                RadioEvent::CheckIn(CheckIn {
                    tag_id: self.names.id(index),
                    battery_mv: Some(tag.battery_mv()),
                    rssi: Some(tag.base_rssi + noise),
                    content_hash: tag.displayed.clone(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::time::{sleep, timeout};

    use super::*;
    use crate::test_util::{checkins, events_for};

    fn config(tags: u32) -> SimConfig {
        SimConfig {
            tags,
            ..SimConfig::default()
        }
    }

    fn delivery(tag_id: &str, task_id: &str, content_hash: &str) -> Delivery {
        Delivery {
            tag_id: tag_id.to_owned(),
            task_id: task_id.to_owned(),
            content: br#"{"price":"1.99"}"#.to_vec(),
            content_hash: content_hash.to_owned(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The next outcome, skipping check-ins, with when it arrived.
    async fn next_outcome(radio: &mut SimRadio) -> (Instant, Outcome) {
        loop {
            let event = timeout(Duration::from_secs(60), radio.next_event())
                .await
                .expect("an outcome within a minute")
                .expect("radio open");
            if let RadioEvent::Outcome(outcome) = event {
                return (Instant::now(), outcome);
            }
        }
    }

    /// What each tag that checked in last reported displaying.
    fn displayed(events: &[(u64, RadioEvent)]) -> HashMap<&str, Option<&str>> {
        checkins(events)
            .into_iter()
            .map(|(_, c)| (c.tag_id.as_str(), c.content_hash.as_deref()))
            .collect()
    }

    fn journal_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("journal readable")
            .lines()
            .map(|line| serde_json::from_str(line).expect("journal line is JSON"))
            .collect()
    }

    #[test]
    fn defaults_match_protocol() {
        let cfg = SimConfig::default();
        assert_eq!(cfg.tags, 16);
        assert_eq!(cfg.id_prefix, "SIM");
        assert_eq!(cfg.checkin_interval_ms, 1000);
        assert_eq!(cfg.fail_rate, 0.0);
        assert!(cfg.offline.is_empty());
        assert_eq!(cfg.seed, 1);
        assert_eq!(cfg.journal, None);
        assert_eq!(cfg.apply_ms, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn tag_ids_are_prefix_and_six_digits() {
        let radio = SimRadio::start(SimConfig {
            tags: 3,
            id_prefix: "AB".to_owned(),
            ..SimConfig::default()
        })
        .expect("start");
        assert_eq!(radio.tag_ids(), ["AB000000", "AB000001", "AB000002"]);
        let names = &radio.names;
        assert_eq!(names.index("AB000002"), Some(2));
        for not_a_tag in ["AB000003", "AB00002", "AB+00002", "XX000001", "AB0000001"] {
            assert_eq!(names.index(not_a_tag), None, "{not_a_tag}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checkins_follow_the_interval_with_jitter() {
        let mut radio = SimRadio::start(config(8)).expect("start");
        let events = events_for(&mut radio, 30_000).await;

        let mut by_tag: HashMap<&str, Vec<u64>> = HashMap::new();
        for (at, checkin) in checkins(&events) {
            by_tag.entry(&checkin.tag_id).or_default().push(at);
            assert!(checkin
                .battery_mv
                .is_some_and(|mv| FRESH_BATTERY_MV.contains(&mv)));
            assert!(checkin.rssi.is_some_and(|dbm| (-93..=-37).contains(&dbm)));
            assert_eq!(checkin.content_hash, None, "nothing displayed yet");
        }
        assert_eq!(by_tag.len(), 8, "every tag checks in");
        for (tag, times) in by_tag {
            assert!(times[0] < 1000, "{tag}: first check-in within one interval");
            for gap in times.windows(2).map(|w| w[1] - w[0]) {
                assert!((800..=1200).contains(&gap), "{tag}: gap {gap} ms");
            }
            // 30 s at 800..1200 ms per check-in.
            assert!(
                (25..=38).contains(&times.len()),
                "{tag}: {} check-ins",
                times.len()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn offline_tags_never_check_in_and_do_not_answer() {
        let mut radio = SimRadio::start(SimConfig {
            tags: 3,
            offline: vec!["SIM000001".to_owned()],
            ..SimConfig::default()
        })
        .expect("start");
        let events = events_for(&mut radio, 10_000).await;
        let mut seen: Vec<&str> = displayed(&events).into_keys().collect();
        seen.sort_unstable();
        assert_eq!(seen, ["SIM000000", "SIM000002"]);

        radio
            .deliver(delivery("SIM000001", "t1", "h1"))
            .await
            .expect("deliver");
        let (_, outcome) = next_outcome(&mut radio).await;
        let failure = outcome.result.expect_err("offline tag fails");
        assert!(failure.retryable);
        assert_eq!(failure.reason, "tag did not answer");
    }

    #[tokio::test(start_paused = true)]
    async fn fail_rate_one_always_fails_retryably() {
        let mut radio = SimRadio::start(SimConfig {
            fail_rate: 1.0,
            ..config(4)
        })
        .expect("start");
        for n in 0..20 {
            let task = format!("t{n}");
            radio
                .deliver(delivery("SIM000002", &task, "h"))
                .await
                .expect("deliver");
            let (_, outcome) = next_outcome(&mut radio).await;
            assert_eq!(outcome.task_id, task);
            let failure = outcome.result.expect_err("fail_rate 1.0");
            assert!(failure.retryable);
            assert_eq!(failure.reason, "simulated radio failure");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fail_rate_zero_always_succeeds_after_apply_ms() {
        let mut radio = SimRadio::start(config(4)).expect("start");
        for n in 0..20 {
            let task = format!("t{n}");
            let sent = Instant::now();
            radio
                .deliver(delivery("SIM000003", &task, &format!("h{n}")))
                .await
                .expect("deliver");
            let (arrived, outcome) = next_outcome(&mut radio).await;
            assert!(arrived - sent >= ms(20), "tag takes apply_ms to confirm");
            assert_eq!(outcome.tag_id, "SIM000003");
            assert_eq!(outcome.task_id, task);
            assert_eq!(outcome.result, Ok(()));
        }
        // The next check-in shows the last content and a slightly drained battery.
        let events = events_for(&mut radio, 1300).await;
        let checkin = checkins(&events)
            .into_iter()
            .map(|(_, c)| c)
            .find(|c| c.tag_id == "SIM000003")
            .expect("tag checks in");
        assert_eq!(checkin.content_hash.as_deref(), Some("h19"));
        let fresh = radio_fresh_battery(3);
        assert_eq!(checkin.battery_mv, Some(fresh - 20 * BATTERY_MV_PER_UPDATE));
    }

    /// The fresh battery the default seed gives tag `index`.
    fn radio_fresh_battery(index: usize) -> u16 {
        let (_radio, driver) = build(config(4)).expect("build");
        driver.state.tags[index].fresh_battery_mv
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_tag_fails_without_retry() {
        let mut radio = SimRadio::start(config(16)).expect("start");
        for tag in ["NOPE", "SIM000016", "SIM00001"] {
            radio
                .deliver(delivery(tag, "t", "h"))
                .await
                .expect("deliver");
            let (_, outcome) = next_outcome(&mut radio).await;
            assert_eq!(outcome.tag_id, tag);
            let failure = outcome.result.expect_err("unknown tag");
            assert!(!failure.retryable, "{tag}");
            assert_eq!(failure.reason, "no such tag");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn journal_has_one_line_per_success_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let cfg = SimConfig {
            offline: vec!["SIM000003".to_owned()],
            journal: Some(path.clone()),
            ..config(4)
        };
        let mut radio = SimRadio::start(cfg.clone()).expect("start");
        let attempts = [
            ("SIM000000", "t1", "hash-a", true),
            ("SIM000001", "t2", "hash-b", true),
            ("SIM000003", "t3", "hash-c", false), // offline
            ("NOPE", "t4", "hash-d", false),      // unknown
            ("SIM000000", "t5", "hash-e", true),  // replaces hash-a
        ];
        let mut successes = 0;
        for (tag, task, hash, succeeds) in attempts {
            radio
                .deliver(delivery(tag, task, hash))
                .await
                .expect("deliver");
            let (_, outcome) = next_outcome(&mut radio).await;
            assert_eq!(outcome.result.is_ok(), succeeds, "{task}");
            if succeeds {
                successes += 1;
            }
            // The tag displays (journals) before it confirms.
            let lines = journal_lines(&path);
            assert_eq!(lines.len(), successes, "after {task}");
            if succeeds {
                let last = lines.last().expect("a line per success");
                assert_eq!(last["tag_id"], tag);
                assert_eq!(last["task_id"], task);
                assert_eq!(last["content_hash"], hash);
                assert!(last["at"].as_u64().is_some_and(|at| at > 1_600_000_000_000));
            }
        }
        drop(radio);

        let mut restarted = SimRadio::start(cfg).expect("restart");
        assert_eq!(restarted.malformed_journal_lines(), 0);
        let events = events_for(&mut restarted, 1000).await;
        let shown = displayed(&events);
        assert_eq!(shown["SIM000000"], Some("hash-e"));
        assert_eq!(shown["SIM000001"], Some("hash-b"));
        assert_eq!(shown["SIM000002"], None);
        assert_eq!(journal_lines(&path).len(), 3, "restart writes nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_journal_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let good = |tag: &str, hash: &str| {
            format!(r#"{{"tag_id":"{tag}","task_id":"t","content_hash":"{hash}","at":1}}"#)
        };
        let contents = [
            good("SIM000000", "first"),
            "not json at all".to_owned(),
            r#"{"tag_id":"SIM000001","content_hash":"no-task-or-at"}"#.to_owned(),
            String::new(),
            good("SIM000000", "second"),
            good("OTHER000001", "not-simulated"),
            // Torn last line: the agent crashed mid-write, no newline.
            r#"{"tag_id":"SIM000001","task_id":"t","cont"#.to_owned(),
        ]
        .join("\n");
        std::fs::write(&path, contents).expect("write journal");

        let mut radio = SimRadio::start(SimConfig {
            journal: Some(path.clone()),
            ..config(2)
        })
        .expect("a bad line never stops the start");
        assert_eq!(radio.malformed_journal_lines(), 3);

        let events = events_for(&mut radio, 1000).await;
        let shown = displayed(&events);
        assert_eq!(shown["SIM000000"], Some("second"));
        assert_eq!(shown["SIM000001"], None);

        // The torn line was ended, so the new line stands on its own.
        radio
            .deliver(delivery("SIM000001", "t9", "third"))
            .await
            .expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        let text = std::fs::read_to_string(&path).expect("journal readable");
        let last: serde_json::Value =
            serde_json::from_str(text.lines().last().expect("a last line")).expect("JSON");
        assert_eq!(last["content_hash"], "third");
    }

    #[tokio::test(start_paused = true)]
    async fn same_seed_repeats_the_checkins() {
        async fn run(seed: u64) -> Vec<(u64, CheckIn)> {
            let mut radio = SimRadio::start(SimConfig { seed, ..config(10) }).expect("start");
            let events = events_for(&mut radio, 5000).await;
            checkins(&events)
                .into_iter()
                .map(|(at, c)| (at, c.clone()))
                .collect()
        }
        let first = run(7).await;
        assert!(first.len() > 40);
        assert_eq!(first, run(7).await);
        assert_ne!(first, run(8).await);
    }

    #[tokio::test(start_paused = true)]
    async fn flood_of_deliveries_without_reading_events_does_not_deadlock() {
        const TAGS: u32 = 100;
        const DELIVERIES: usize = 5000;
        let mut radio = SimRadio::start(SimConfig {
            checkin_interval_ms: 10,
            fail_rate: 0.5,
            ..config(TAGS)
        })
        .expect("start");

        // Nobody reads events: the channel fills with check-ins and outcomes
        // pile up in the driver. Paused time jumps to the timeout if the
        // driver ever stops taking deliveries.
        timeout(Duration::from_secs(3600), async {
            for n in 0..DELIVERIES {
                let tag = format!("SIM{:06}", n % TAGS as usize);
                radio
                    .deliver(delivery(&tag, &format!("t{n}"), "h"))
                    .await
                    .expect("deliver");
                sleep(ms(1)).await;
            }
        })
        .await
        .expect("deliveries are accepted while events are not read");
        // Let the last renders finish, still not reading, so that draining
        // below needs no time to pass (and no new check-ins fire).
        sleep(ms(50)).await;

        let mut outcomes = HashSet::new();
        let mut checkins = 0usize;
        timeout(Duration::from_secs(3600), async {
            while outcomes.len() < DELIVERIES {
                match radio.next_event().await.expect("radio open") {
                    RadioEvent::Outcome(outcome) => {
                        assert!(outcomes.insert(outcome.task_id), "one outcome per delivery");
                    }
                    RadioEvent::CheckIn(_) => checkins += 1,
                    RadioEvent::State(_) | RadioEvent::Details(_) | RadioEvent::Tag(_) => {}
                }
            }
        })
        .await
        .expect("every outcome arrives");
        // Coalescing: what waited is at most the channel plus one per tag,
        // not the 50 000 check-ins of 5 s × 100 tags / 10 ms.
        assert!(
            checkins <= EVENT_CAPACITY + TAGS as usize,
            "{checkins} check-ins queued"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_tags_share_one_driver() {
        let mut radio = SimRadio::start(config(10_000)).expect("start");
        let events = events_for(&mut radio, 1000).await;
        assert_eq!(
            displayed(&events).len(),
            10_000,
            "every tag checks in within one interval"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stopped_driver_reports_closed() {
        let (mut radio, driver) = build(config(2)).expect("build");
        drop(driver);
        let error = radio.next_event().await.expect_err("no driver");
        assert_eq!(error.kind(), crate::RadioErrorKind::Closed);
        let error = radio
            .deliver(delivery("SIM000000", "t", "h"))
            .await
            .expect_err("no driver");
        assert_eq!(error.kind(), crate::RadioErrorKind::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_config_names_the_key() {
        let cases = [
            (
                SimConfig {
                    fail_rate: 1.5,
                    ..config(1)
                },
                "radio.sim.fail_rate",
            ),
            (
                SimConfig {
                    fail_rate: f64::NAN,
                    ..config(1)
                },
                "radio.sim.fail_rate",
            ),
            (
                SimConfig {
                    checkin_interval_ms: 0,
                    ..config(1)
                },
                "radio.sim.checkin_interval_ms",
            ),
            (config(MAX_TAGS + 1), "radio.sim.tags"),
        ];
        for (cfg, key) in cases {
            let error = SimRadio::start(cfg).expect_err("invalid");
            assert!(error.to_string().contains(key), "{error}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn journal_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory cannot be opened for appending.
        let error = SimRadio::start(SimConfig {
            journal: Some(dir.path().to_owned()),
            ..config(1)
        })
        .expect_err("a directory is no journal");
        assert!(matches!(error, SimError::Journal { .. }));
        assert!(
            error.to_string().contains(&*dir.path().to_string_lossy()),
            "{error}"
        );
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let error = SimRadio::start(config(1)).expect_err("no runtime");
        assert!(matches!(error, SimError::NoRuntime));
    }
}
