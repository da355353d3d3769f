//! Radio hardware abstraction for the ESL agent.
//!
//! The agent's scheduler talks to every radio (simulated tags, ZigBee
//! coordinator, BLE) through one small async trait, [`Radio`]. A backend owns
//! its hardware (or simulation) completely; the agent only ever sees
//! [`RadioEvent`]s coming up and [`Delivery`] requests going down.
//!
//! The contract in one paragraph: tags wake up on their own schedule and
//! *check in* ([`RadioEvent::CheckIn`]). While a tag is awake the agent may
//! offer it new content with [`Radio::deliver`]; that call only queues the
//! offer. The outcome arrives later, asynchronously, as exactly one
//! [`RadioEvent::Outcome`] carrying the same `task_id` (confirmed, or failed
//! with a flag saying whether another attempt makes sense). A backend that
//! loses its hardware reports [`RadioEvent::State`] and keeps going; it never
//! ends the agent.
//!
//! Backends: [`sim`] (simulated tags, PROTOCOL §8), [`zigbee`] (Z-Stack
//! ZNP coordinator on a serial port), [`ble`] (ESL Service over Bluetooth LE;
//! the btleplug glue needs the cargo feature `ble`).

use std::future::Future;

use std::sync::Arc;
use tokio::sync::mpsc;

pub mod ble;
mod outgoing;
pub mod sim;
#[cfg(test)]
mod test_util;
pub mod zigbee;

/// Identifier of a tag as the back end knows it (`SIM000042`, a MAC, …).
pub type TagId = String;

/// Something the radio reports to the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum RadioEvent {
    /// A tag woke up and is listening for content now.
    CheckIn(CheckIn),
    /// The result of one earlier [`Radio::deliver`] call.
    Outcome(Outcome),
    /// The radio itself went up or down (adapter unplugged, controller reset…).
    State(RadioState),
    /// Facts about the radio for status reports (its firmware…), sent when
    /// they become known; radios that have none never send it.
    Details(RadioDetails),
    /// Facts about one tag learnt outside a check-in: it joined the network
    /// (a ZigBee device announce) or the radio read what it can show (BLE
    /// ESL Information). The agent lists the tag from then on, before its
    /// first check-in, and shows `info` in `tag.get` and `tags.list`.
    Tag(TagDetails),
}

/// What a backend knows about one tag besides its check-in readings.
#[derive(Debug, Clone, PartialEq)]
pub struct TagDetails {
    pub tag_id: TagId,
    /// Backend-specific facts as one JSON object (`{"ieee": "…", "nwk": …}`,
    /// `{"displays": […]}`); the next report for the same tag replaces it
    /// whole. Keep it small: `tags.list` pages carry it for every tag.
    pub info: serde_json::Map<String, serde_json::Value>,
    /// The id this radio listed the same tag under until now (a ZigBee tag
    /// is listed by its IEEE address from its join until its first
    /// check-in names its own id): the agent forgets that entry unless the
    /// tag checked in under it.
    pub replaces: Option<TagId>,
}

/// What a backend knows about its own hardware, for `agent.status` and the
/// status reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RadioDetails {
    /// The adapter's firmware as the backend names it
    /// (`Z-Stack 3.x.0 (release 2.7.1, revision 20230507)`).
    pub firmware: Option<String>,
}

/// A tag's periodic wake-up report.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckIn {
    pub tag_id: TagId,
    /// Battery voltage in millivolts, when the tag reports it.
    pub battery_mv: Option<u16>,
    /// Received signal strength in dBm, when the radio measures it.
    pub rssi: Option<i16>,
    /// Hash of the content the tag displays now (same scheme as the agent's
    /// `content_hash`), when the tag reports it.
    pub content_hash: Option<String>,
}

/// Content to put on one tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub tag_id: TagId,
    /// The task this content belongs to; echoed in the [`Outcome`].
    pub task_id: String,
    /// Canonical JSON of the content (what the tag renders).
    pub content: Vec<u8>,
    /// Hash of `content`, as in the ack's `content_hash`.
    pub content_hash: String,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub tag_id: TagId,
    pub task_id: String,
    pub result: Result<(), DeliveryFailure>,
}

/// Why one delivery attempt did not end with the tag showing the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailure {
    /// `true` when a later attempt may succeed (tag asleep, radio busy,
    /// no acknowledgement); `false` when retrying is pointless (tag rejected
    /// the content).
    pub retryable: bool,
    /// Short human-readable reason, passed on in the ack's `detail`.
    pub reason: String,
}

/// Whether the radio can currently reach tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RadioState {
    Up,
    Down { reason: String },
}

/// What kind of failure a [`RadioError`] is, for callers that branch on it
/// (like embedded-hal's `ErrorKind`: the backend's own error stays
/// available as the [`std::error::Error::source`]). New kinds may be added;
/// match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RadioErrorKind {
    /// The radio stopped for good (its task ended); no more events will come.
    Closed,
    /// The hardware is temporarily unreachable; try again later.
    Unavailable,
    /// The request was malformed (e.g. content too large for this radio);
    /// sending it again cannot succeed.
    InvalidRequest,
}

impl RadioErrorKind {
    /// Whether the same request may succeed later.
    pub fn is_retryable(self) -> bool {
        !matches!(self, RadioErrorKind::InvalidRequest)
    }
}

/// Error returned by [`Radio`] methods: a kind to branch on, a message for
/// people, and the backend's typed error (a ZNP status, a BlueZ error…)
/// as its source, so nothing the backend knew is lost.
#[derive(Debug, thiserror::Error)]
#[error("radio error ({kind:?}): {message}")]
pub struct RadioError {
    kind: RadioErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl RadioError {
    pub fn new(kind: RadioErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Keeps the backend's own error as the source of this one.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn kind(&self) -> RadioErrorKind {
        self.kind
    }
}

/// One radio backend. Implementations own their hardware and run any
/// background work in tasks of their own.
pub trait Radio: Send + 'static {
    /// Waits for the next event. Must be cancel-safe: the agent calls it
    /// inside `select!`, and dropping the future must not lose an event.
    fn next_event(&mut self) -> impl Future<Output = Result<RadioEvent, RadioError>> + Send;

    /// What the backend tells the agent once, when the agent takes it
    /// over: tags it knows before they check in, its counters, its content
    /// check. Apart from the events and requests below, which are the
    /// radio's work; radios with nothing to tell keep the default.
    fn inventory(&self) -> RadioInventory {
        RadioInventory::default()
    }

    /// Opens the network for new tags to join for `seconds` (0 closes it).
    /// Radios without a joining procedure answer `InvalidRequest`.
    fn permit_join(&mut self, seconds: u8) -> impl Future<Output = Result<(), RadioError>> + Send {
        let _ = seconds;
        std::future::ready(Err(RadioError::new(
            RadioErrorKind::InvalidRequest,
            "this radio has no network to open for joining (only ZigBee has)",
        )))
    }

    /// Moves the radio's network to `channel` (ZigBee: 11..=26). Radios
    /// without a network of their own answer `InvalidRequest`.
    fn change_channel(
        &mut self,
        channel: u8,
    ) -> impl Future<Output = Result<(), RadioError>> + Send {
        let _ = channel;
        std::future::ready(Err(RadioError::new(
            RadioErrorKind::InvalidRequest,
            "this radio has no network channel to change (only ZigBee has)",
        )))
    }

    /// Queues content for a tag that has just checked in. Returns once the
    /// request is accepted; the result comes later as one
    /// [`RadioEvent::Outcome`] with the same `task_id`.
    fn deliver(
        &mut self,
        delivery: Delivery,
    ) -> impl Future<Output = Result<(), RadioError>> + Send;
}

/// What a backend tells the agent besides its events ([`Radio::inventory`]).
#[derive(Default)]
pub struct RadioInventory {
    /// Tags the radio knows before they check in (configured or paired
    /// tags), so status reports list them from the start. Radios that
    /// learn tags only from check-ins leave it empty.
    pub known_tags: Vec<TagId>,
    /// Counters the backend keeps about its own link (bad frames,
    /// timeouts), which the agent shows next to its own.
    pub counters: Option<Arc<dyn RadioCounters>>,
    /// The radio's check of a task's content against what the tag can
    /// show, which the agent runs when the task arrives (so a misfit is
    /// `rejected` at once rather than `failed` at delivery). `None` when the
    /// radio's tags take any content.
    pub content_check: Option<Arc<dyn ContentCheck>>,
}

impl std::fmt::Debug for RadioInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadioInventory")
            .field("known_tags", &self.known_tags.len())
            .field("counters", &self.counters.is_some())
            .field("content_check", &self.content_check.is_some())
            .finish()
    }
}

/// A backend's intake check of content, readable from any thread at any
/// time (it reads what the backend learnt about its tags).
pub trait ContentCheck: Send + Sync + std::fmt::Debug {
    /// `Err(detail)` when `tag_id` can never show `content` (the canonical
    /// JSON of the task's `content`); the detail names the field and what
    /// the tag expects (`content.ble_image.bitmap: 4 736 bytes, display 0
    /// needs 5 000`). `Ok` when it fits, or when the backend does not know
    /// the tag's capabilities yet (the delivery decides then).
    fn check(&self, tag_id: &str, content: &[u8]) -> Result<(), String>;
}

/// Named counters of one backend, readable from any thread at any time.
/// Names carry the backend's prefix (`zigbee_bad_fcs_frames`) so they never
/// clash with the agent's own.
pub trait RadioCounters: Send + Sync + std::fmt::Debug {
    fn snapshot(&self) -> Vec<(&'static str, u64)>;
}

/// The agent's ends of a backend's driver task: events come up one channel,
/// deliveries go down the other. The backends whose driver runs in a task
/// of its own (all of them so far) implement [`Radio`] by forwarding here.
#[derive(Debug)]
pub(crate) struct DriverChannels {
    /// Names the driver in the "stopped" error.
    driver: &'static str,
    delivery_tx: mpsc::Sender<Delivery>,
    event_rx: mpsc::Receiver<RadioEvent>,
}

impl DriverChannels {
    pub(crate) fn new(
        driver: &'static str,
        delivery_tx: mpsc::Sender<Delivery>,
        event_rx: mpsc::Receiver<RadioEvent>,
    ) -> Self {
        DriverChannels {
            driver,
            delivery_tx,
            event_rx,
        }
    }

    /// Cancel-safe: a dropped `recv` future never takes a message.
    pub(crate) async fn next_event(&mut self) -> Result<RadioEvent, RadioError> {
        let driver = self.driver;
        self.event_rx.recv().await.ok_or_else(|| stopped(driver))
    }

    pub(crate) async fn deliver(&mut self, delivery: Delivery) -> Result<(), RadioError> {
        let driver = self.driver;
        self.delivery_tx
            .send(delivery)
            .await
            .map_err(|_| stopped(driver))
    }
}

fn stopped(driver: &str) -> RadioError {
    RadioError::new(RadioErrorKind::Closed, format!("{driver} stopped"))
}
