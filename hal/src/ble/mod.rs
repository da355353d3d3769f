//! BLE radio: ESL tags over the Bluetooth SIG Electronic Shelf Label Service
//! (0x1857), reached through a GATT stack behind a small trait.
//!
//! Files:
//! - `codec.rs`: Control Point commands and responses, ESL Address.
//! - `provision.rs`: key material, absolute time, the Information
//!   characteristics, [`provision::TagInfo`] and the
//!   [`provision::ProvisionStore`] interface.
//! - `ots.rs`: the Object Transfer Service codec (images).
//! - `content.rs`: framing of the vendor content characteristic, and the
//!   `ble_image` a task's content carries for OTS.
//! - `transport.rs`: the GATT trait ([`transport::Central`], with pairing
//!   and the L2CAP object channel) and one session's sequencing (connect,
//!   encrypt, configure, OTS or vendor transfer, Display Image, Update
//!   Complete, disconnect).
//! - `btleplug.rs` (cargo feature `ble`): the trait on btleplug / BlueZ
//!   (no L2CAP channels, no pairing).
//! - `bluez.rs` (cargo feature `ble-bluez`, preferred when built): the
//!   trait on BlueZ through `bluer`, with L2CAP and a pairing agent;
//!   check-compiled only.
//! - `fake_esl.rs`: fake tags on a fake adapter (`[radio.ble.fake]`).
//! - `fake.rs`: a scripted fake peer for the transport's tests.
//! - this file: [`BleConfig`], [`BleRadio`] (the [`Radio`]) and its driver.
//!
//! The driver task owns the scan, the per-tag bookkeeping and the session
//! tasks. Channels: [`BleRadio::deliver`] writes `delivery_tx` (bounded,
//! [`DELIVERY_CAPACITY`]); the driver writes `event_tx` (bounded,
//! [`EVENT_CAPACITY`]); sessions run in a `JoinSet` of at most
//! `max_connections` and hand their result back by ending. Like the
//! simulator, the driver never waits on one thing: it `select!`s over taking
//! a delivery, a session ending, the next advertisement, its timers and
//! room in the event channel, with events waiting in its own queue (a tag's
//! check-in is queued at most once and built when sent). So `deliver` and
//! `next_event` cannot deadlock each other.
//!
//! A check-in is an advertisement of the ESL service from a tag (at most one
//! per tag per `checkin_interval_ms`). Deliveries queue per tag, at most one
//! session per tag and `max_connections` in all; a session that fails with a
//! retryable error is tried again after `retry_backoff_ms` (doubling) up to
//! `retries` times before the outcome is a failure. Battery comes from the
//! sessions (and from a poll session every `battery_poll_interval_s`), and
//! rides on the tag's next check-in.
//!
//! The driver decides per session whether to configure the tag (first
//! session, a tag that showed it lost its configuration or bond, or one
//! whose last session is older than `reconfigure_after_s`), keeps each
//! tag's Response Key material and Information, and exposes the latter
//! through [`BleRadio::tag_info`]. It describes each tag to the agent
//! ([`RadioEvent::Tag`]: ESL address, bond, configured, Information,
//! content paths; docs/BLE.md "Tag details") at start for the tags the
//! store kept, and whenever a session changes one of those. What the
//! sessions learnt also backs [`BleContentCheck`], the agent's intake
//! check of a task's content (run on the engine's thread).

pub mod codec;
pub mod content;
pub mod fake;
pub mod fake_esl;
pub mod ots;
pub mod provision;
pub mod transport;

#[cfg(feature = "ble")]
pub mod btleplug;

#[cfg(feature = "ble-bluez")]
pub mod bluez;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};
use uuid::Uuid;

use crate::outgoing::{Outgoing, Pending};
use crate::{
    CheckIn, ContentCheck, Delivery, DeliveryFailure, DriverChannels, Outcome, Radio, RadioError,
    RadioErrorKind, RadioEvent, RadioInventory, RadioState, TagDetails, TagId,
};
use codec::{uuid16, EslAddress, ESL_SERVICE};
use fake_esl::{FakeAir, FakeConfig, FakeError};
use provision::{ContentPaths, KeyMaterial, MemoryStore, ProvisionStore, TagInfo, TagRecord};
use transport::{
    Advertisement, BatterySource, Central, GattError, Provisioning, Scan, SessionPlan,
    SessionReport, SessionSettings, Step, TransportError,
};

/// Capacity of the delivery channel. The driver takes from it on every turn
/// and never waits on anything else first; the engine hands over at most one
/// delivery per tag that just checked in, so a burst of woken tags fits.
pub const DELIVERY_CAPACITY: usize = 64;

/// Capacity of the event channel: small on purpose, as in the simulator;
/// events that do not fit wait in the driver's queue where check-ins are
/// coalesced and stay fresh.
pub const EVENT_CAPACITY: usize = 128;

/// Most simultaneous links `max_connections` may ask for. Controllers and
/// BlueZ handle a handful; more only makes connection attempts collide.
pub const MAX_CONNECTIONS: usize = 8;

/// Most tags tracked. Only devices advertising the ESL service are tracked;
/// this bounds memory if a crowd of them passes by.
const MAX_TRACKED_TAGS: usize = 100_000;

/// Largest content bytes in one DATA write: ATT values are at most 512
/// bytes, the frame header takes 5.
pub const MAX_CHUNK: usize = 512 - content::DATA_HEADER_LEN;

/// Largest delay between two retries of one delivery.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// First and largest delay before scanning again after the adapter failed.
const SCAN_RETRY_MIN: Duration = Duration::from_secs(1);
const SCAN_RETRY_MAX: Duration = Duration::from_secs(30);
/// Bound on starting a scan (D-Bus round trips to bluetoothd).
const SCAN_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Seconds an unsynchronised ESL waits before it drops back to Unassociated
/// (ESL Service, Unsynchronized state: 60 minutes).
pub const UNASSOCIATED_FALLBACK_S: u64 = 3600;

/// Vendor content characteristic used when none is configured. It must
/// match the tag firmware; this one is the fake tags' and the docs' example.
pub const DEFAULT_CONTENT_CHARACTERISTIC: &str = "a0e4f2b0-5d3c-4e4b-9a51-7c1e0e5e5101";

/// `[radio.ble]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BleConfig {
    /// Adapter name (`hci0`); none: the first one BlueZ lists.
    pub adapter: Option<String>,
    /// Tag addresses to serve (`C0:11:22:33:44:55`); empty: every device
    /// that advertises the ESL service. Listed tags appear in status reports
    /// before they are seen.
    pub tags: Vec<String>,
    /// Explicit ESL addresses by tag; other tags get one derived from their
    /// Bluetooth address.
    pub addresses: BTreeMap<String, AddressConfig>,
    /// Write the ESL Address characteristic in every session.
    pub write_address: bool,
    /// UUID of the vendor characteristic that takes content.
    pub content_characteristic: String,
    pub display_index: u8,
    /// Image slot the content is stored in and shown from.
    pub image_index: u8,
    /// Content bytes per write (1..=507).
    pub chunk_size: usize,
    /// Larger content is refused (not retried).
    pub max_content_bytes: usize,
    /// Links open at once, 1..=8.
    pub max_connections: usize,
    /// Further sessions after a retryable failure, before the outcome.
    pub retries: u32,
    /// Delay before the first retry; doubles per retry (at most 30 s).
    pub retry_backoff_ms: u64,
    pub connect_timeout_ms: u64,
    /// Each GATT discover, subscribe, read or write.
    pub gatt_timeout_ms: u64,
    /// From a Control Point write to its response.
    pub response_timeout_ms: u64,
    /// How long Update Complete waits for an answer. Some tags (Silicon
    /// Labs' ESL tag) send none on success, so silence after this is
    /// success; an Error response comes at once.
    pub update_complete_timeout_ms: u64,
    /// A whole session, connect to disconnect.
    pub session_timeout_ms: u64,
    /// At most one check-in per tag this often.
    pub checkin_interval_ms: u64,
    /// Read the battery with Read Sensor Data at this index (millivolts,
    /// little-endian); none: Battery Service Battery Level when present.
    pub battery_sensor_index: Option<u8>,
    /// Battery Level 0 % and 100 % in millivolts.
    pub battery_empty_mv: u16,
    pub battery_full_mv: u16,
    /// Connect to a tag without deliveries to read its battery this often;
    /// 0: only during deliveries.
    pub battery_poll_interval_s: u64,
    /// Configure a tag again (address, keys, time, Information) when its
    /// last session is this old. An ESL that is not synchronised falls back
    /// to Unassociated after 60 minutes without an update (ESL Service
    /// Unsynchronized state; Nordic's `BT_ESL_UNASSOCIATED_TIMEOUT`, 3600 s),
    /// and this radio cannot keep tags synchronised (no PAwR on BlueZ), so
    /// this must stay below 3600 s.
    pub reconfigure_after_s: u64,
    /// Fake tags instead of a Bluetooth controller (tests, demos).
    pub fake: Option<FakeConfig>,
}

/// One tag's ESL address in `[radio.ble.addresses]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressConfig {
    pub group_id: u8,
    pub esl_id: u8,
}

impl Default for BleConfig {
    fn default() -> Self {
        BleConfig {
            adapter: None,
            tags: Vec::new(),
            addresses: BTreeMap::new(),
            write_address: true,
            content_characteristic: DEFAULT_CONTENT_CHARACTERISTIC.to_owned(),
            display_index: 0,
            image_index: 0,
            chunk_size: 180,
            max_content_bytes: 64 * 1024,
            max_connections: 2,
            retries: 1,
            retry_backoff_ms: 500,
            connect_timeout_ms: 5_000,
            gatt_timeout_ms: 3_000,
            response_timeout_ms: 3_000,
            update_complete_timeout_ms: 300,
            session_timeout_ms: 10_000,
            checkin_interval_ms: 1_000,
            battery_sensor_index: None,
            battery_empty_mv: 2_000,
            battery_full_mv: 3_000,
            battery_poll_interval_s: 6 * 3600,
            reconfigure_after_s: 50 * 60,
            fake: None,
        }
    }
}

/// A `[radio.ble]` value that breaks a rule; `key` is its full name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {rule}")]
pub struct BleConfigError {
    pub key: &'static str,
    pub rule: String,
}

fn rule(key: &'static str, rule: impl Into<String>) -> BleConfigError {
    BleConfigError {
        key,
        rule: rule.into(),
    }
}

/// `C0:11:22:33:44:55`: six upper-case hex pairs, as BlueZ prints them.
pub fn is_bluetooth_address(text: &str) -> bool {
    text.len() == 17
        && text.split(':').count() == 6
        && text.split(':').all(|pair| {
            pair.len() == 2
                && pair
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
        })
}

impl BleConfig {
    /// Checks every `[radio.ble]` rule.
    pub fn validate(&self) -> Result<(), BleConfigError> {
        self.content_uuid()?;
        for tag in &self.tags {
            if !is_bluetooth_address(tag) {
                return Err(rule(
                    "radio.ble.tags",
                    format!("{tag:?} is not a Bluetooth address like \"C0:11:22:33:44:55\" (upper case)"),
                ));
            }
        }
        let mut taken: HashMap<EslAddress, &str> = HashMap::new();
        for (tag, a) in &self.addresses {
            if !is_bluetooth_address(tag) {
                return Err(rule(
                    "radio.ble.addresses",
                    format!("key {tag:?} is not a Bluetooth address like \"C0:11:22:33:44:55\" (upper case)"),
                ));
            }
            let address = EslAddress::new(a.group_id, a.esl_id)
                .map_err(|e| rule("radio.ble.addresses", format!("{tag}: {e}")))?;
            if let Some(other) = taken.insert(address, tag) {
                return Err(rule(
                    "radio.ble.addresses",
                    format!("{other} and {tag} both have {address}"),
                ));
            }
        }
        if !(1..=MAX_CHUNK).contains(&self.chunk_size) {
            return Err(rule(
                "radio.ble.chunk_size",
                format!("must be between 1 and {MAX_CHUNK}"),
            ));
        }
        if !(1..=16 * 1024 * 1024).contains(&self.max_content_bytes) {
            return Err(rule(
                "radio.ble.max_content_bytes",
                "must be between 1 and 16777216",
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(rule(
                "radio.ble.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        if self.retries > 10 {
            return Err(rule("radio.ble.retries", "must be at most 10"));
        }
        let at_least_1 = [
            ("radio.ble.connect_timeout_ms", self.connect_timeout_ms),
            ("radio.ble.gatt_timeout_ms", self.gatt_timeout_ms),
            ("radio.ble.response_timeout_ms", self.response_timeout_ms),
            (
                "radio.ble.update_complete_timeout_ms",
                self.update_complete_timeout_ms,
            ),
            ("radio.ble.session_timeout_ms", self.session_timeout_ms),
            ("radio.ble.checkin_interval_ms", self.checkin_interval_ms),
        ];
        for (key, value) in at_least_1 {
            if value == 0 {
                return Err(rule(key, "must be at least 1"));
            }
        }
        if !(1..UNASSOCIATED_FALLBACK_S).contains(&self.reconfigure_after_s) {
            return Err(rule(
                "radio.ble.reconfigure_after_s",
                format!(
                    "must be between 1 and {} (tags fall back to Unassociated after {UNASSOCIATED_FALLBACK_S} s)",
                    UNASSOCIATED_FALLBACK_S - 1
                ),
            ));
        }
        if self.battery_empty_mv >= self.battery_full_mv {
            return Err(rule(
                "radio.ble.battery_full_mv",
                "must be more than radio.ble.battery_empty_mv",
            ));
        }
        if let Some(fake) = &self.fake {
            if fake.tags > fake_esl::MAX_FAKE_TAGS {
                return Err(rule(
                    "radio.ble.fake.tags",
                    format!("must be at most {}", fake_esl::MAX_FAKE_TAGS),
                ));
            }
            if fake.adv_interval_ms == 0 {
                return Err(rule("radio.ble.fake.adv_interval_ms", "must be at least 1"));
            }
            if !(0.0..=1.0).contains(&fake.connect_fail_rate) {
                return Err(rule(
                    "radio.ble.fake.connect_fail_rate",
                    "must be between 0.0 and 1.0",
                ));
            }
        }
        Ok(())
    }

    fn content_uuid(&self) -> Result<Uuid, BleConfigError> {
        Uuid::parse_str(&self.content_characteristic).map_err(|e| {
            rule(
                "radio.ble.content_characteristic",
                format!("{:?} is not a UUID: {e}", self.content_characteristic),
            )
        })
    }

    /// The longest one delivery attempt can take in the driver: every
    /// session timing out, with the backoffs between them. The engine's
    /// `tasks.delivery_timeout_ms` must be longer, or it gives up on an
    /// attempt the radio is still making.
    pub fn worst_case_attempt(&self) -> Duration {
        let sessions = Duration::from_millis(self.session_timeout_ms) * (self.retries + 1);
        let backoffs: Duration = (0..self.retries).map(|n| self.backoff(n)).sum();
        sessions + backoffs
    }

    fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u64 << retry.min(16);
        Duration::from_millis(self.retry_backoff_ms.saturating_mul(factor)).min(MAX_RETRY_BACKOFF)
    }

    /// The tag's configured ESL address, or the one derived from its
    /// Bluetooth address.
    pub fn address_for(&self, tag: &str) -> EslAddress {
        self.addresses
            .get(tag)
            .and_then(|a| EslAddress::new(a.group_id, a.esl_id).ok())
            .unwrap_or_else(|| derived_address(tag))
    }

    fn session_settings(&self) -> Result<SessionSettings, BleConfigError> {
        Ok(SessionSettings {
            write_address: self.write_address,
            content_characteristic: self.content_uuid()?,
            display_index: self.display_index,
            image_index: self.image_index,
            chunk_size: self.chunk_size,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            gatt_timeout: Duration::from_millis(self.gatt_timeout_ms),
            response_timeout: Duration::from_millis(self.response_timeout_ms),
            update_complete_timeout: Duration::from_millis(self.update_complete_timeout_ms),
            battery: match self.battery_sensor_index {
                Some(index) => BatterySource::Sensor(index),
                None => BatterySource::BatteryLevel {
                    empty_mv: self.battery_empty_mv,
                    full_mv: self.battery_full_mv,
                },
            },
        })
    }
}

/// Milliseconds since `epoch` on the AP's ESL clock (wraps after 49 days,
/// as the 32-bit ESL absolute time does).
fn absolute_time(epoch: Instant, now: Instant) -> u32 {
    now.duration_since(epoch).as_millis() as u32
}

/// An ESL address from a Bluetooth address (FNV-1a): stable across runs and
/// APs without storing anything. Two tags may share one; that only matters
/// for broadcast (PAwR) commands, which this radio does not send: every
/// command goes over the one tag's own link.
pub fn derived_address(tag: &str) -> EslAddress {
    let mut hash: u32 = 0x811C_9DC5;
    for byte in tag.bytes() {
        hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    // esl_id in 0..=254 and group_id in 0..=127 are always valid.
    EslAddress::new(((hash >> 8) % 128) as u8, (hash % 255) as u8)
        .expect("derived ESL address is in range")
}

/// Why the BLE radio could not start.
#[derive(Debug, thiserror::Error)]
pub enum BleError {
    #[error(transparent)]
    Config(#[from] BleConfigError),
    #[error(transparent)]
    Fake(#[from] FakeError),
    #[error(
        "this build has no Bluetooth support (cargo feature `ble`); \
         rebuild with `--features ble`, or set [radio.ble.fake] for fake tags"
    )]
    NotBuilt,
    #[error("the BLE radio must be started inside a tokio runtime")]
    NoRuntime,
}

/// The BLE radio: the agent's handle on the driver task. Dropping it ends
/// the driver, which aborts its sessions.
pub struct BleRadio {
    channels: DriverChannels,
    /// The intake check, over what the driver learnt about each tag.
    check: Arc<BleContentCheck>,
    known: Vec<TagId>,
    fake: Option<FakeAir>,
}

/// What the driver learnt about one tag that others read: the intake
/// check ([`BleContentCheck`], on the engine's thread) and
/// [`BleRadio::tag_info`]. The driver writes.
#[derive(Debug, Clone, Default)]
struct TagProfile {
    /// From the last configuring session, or from the store.
    info: Option<TagInfo>,
    /// From the last session that found them (`TagRecord::content_paths`),
    /// of this run or, through the store, an earlier one.
    paths: Option<ContentPaths>,
}

/// The profiles by tag, behind a lock held only for a lookup or an insert.
type Profiles = Arc<Mutex<HashMap<TagId, TagProfile>>>;

/// The profile map's lock; nothing panics while holding it.
fn lock(
    profiles: &Mutex<HashMap<TagId, TagProfile>>,
) -> MutexGuard<'_, HashMap<TagId, TagProfile>> {
    profiles.lock().unwrap_or_else(|e| e.into_inner())
}

/// The BLE radio's [`ContentCheck`]: content a tag can never show, judged
/// from what its sessions learnt (docs/BLE.md, "Content for BLE tags").
/// Cheap enough for the engine's thread: it parses the content (bounded by
/// `radio.ble.max_content_bytes`) and looks the tag up under a lock; no
/// I/O. A tag it knows nothing about passes (the delivery decides then).
#[derive(Debug)]
pub struct BleContentCheck {
    profiles: Profiles,
    max_content_bytes: usize,
}

impl ContentCheck for BleContentCheck {
    fn check(&self, tag_id: &str, content: &[u8]) -> Result<(), String> {
        // The size first: it is cheap, and an oversized content is not parsed.
        if content.len() > self.max_content_bytes {
            return Err(format!(
                "content is {} bytes, radio.ble.max_content_bytes is {}",
                content.len(),
                self.max_content_bytes
            ));
        }
        let image = content::ImageContent::from_content(content).map_err(|e| e.to_string())?;
        let profiles = lock(&self.profiles);
        let Some(profile) = profiles.get(tag_id) else {
            return Ok(());
        };
        match (&image, profile.paths) {
            (Some(_), Some(paths)) if !paths.ots => Err(format!(
                "{}: the tag has no Object Transfer Service (0x1825); it takes only \
                 content without it, over the vendor characteristic",
                content::IMAGE_FIELD
            )),
            (None, Some(paths)) if !paths.vendor => Err(format!(
                "content: the tag shows only images ({}) as it has no vendor content \
                 characteristic (radio.ble.content_characteristic)",
                content::IMAGE_FIELD
            )),
            (Some(image), _) => match &profile.info {
                Some(info) => transport::image_fits(info, image),
                None => Ok(()),
            },
            (None, _) => Ok(()),
        }
    }
}

impl BleRadio {
    /// Starts on fake tags when `[radio.ble.fake]` is set, else on the
    /// Bluetooth adapter (needs the `ble` feature).
    pub fn start(cfg: BleConfig) -> Result<BleRadio, BleError> {
        BleRadio::start_persisted(cfg, MemoryStore::default())
    }

    /// [`BleRadio::start`], keeping key material, Information, bond state
    /// and content paths in `store` (the agent's store, across restarts).
    pub fn start_persisted(
        cfg: BleConfig,
        store: impl ProvisionStore,
    ) -> Result<BleRadio, BleError> {
        cfg.validate()?;
        if let Some(fake) = &cfg.fake {
            let air = FakeAir::new(fake, cfg.content_uuid()?)?;
            let mut radio = BleRadio::start_with_store(cfg, air.clone(), store)?;
            radio.fake = Some(air);
            return Ok(radio);
        }
        #[cfg(feature = "ble-bluez")]
        {
            let central = bluez::BluezCentral::new(cfg.adapter.clone());
            BleRadio::start_with_store(cfg, central, store)
        }
        #[cfg(all(feature = "ble", not(feature = "ble-bluez")))]
        {
            let central = btleplug::BtleplugCentral::new(cfg.adapter.clone());
            BleRadio::start_with_store(cfg, central, store)
        }
        #[cfg(not(any(feature = "ble", feature = "ble-bluez")))]
        {
            drop(store);
            Err(BleError::NotBuilt)
        }
    }

    /// Starts the driver on any [`Central`].
    pub fn start_with<C: Central>(cfg: BleConfig, central: C) -> Result<BleRadio, BleError> {
        BleRadio::start_with_store(cfg, central, MemoryStore::default())
    }

    /// [`BleRadio::start_with`] and a [`ProvisionStore`].
    pub fn start_with_store<C: Central>(
        cfg: BleConfig,
        central: C,
        mut store: impl ProvisionStore,
    ) -> Result<BleRadio, BleError> {
        cfg.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BleError::NoRuntime)?;
        let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
        let profiles: Profiles = Arc::default();
        let ap_sync_key = store.ap_sync_key().unwrap_or_else(|| {
            let key = KeyMaterial::generate();
            store.set_ap_sync_key(&key);
            key
        });
        let mut driver = Driver {
            delivery_rx,
            event_tx,
            state: DriverState {
                settings: Arc::new(cfg.session_settings()?),
                central,
                tags: HashMap::new(),
                ready: VecDeque::new(),
                delayed: BinaryHeap::new(),
                delayed_seq: 0,
                polls: VecDeque::new(),
                outgoing: Outgoing::default(),
                radio_up: true,
                scan_retry: None,
                scan_backoff: SCAN_RETRY_MIN,
                ap_sync_key,
                store: Box::new(store),
                epoch: Instant::now(),
                profiles: profiles.clone(),
                cfg: cfg.clone(),
            },
        };
        // Before the first delivery can arrive: the intake check and
        // `tag_info` know the stored tags from the start.
        driver.state.load_stored();
        runtime.spawn(driver.run());
        Ok(BleRadio {
            channels: DriverChannels::new("BLE radio driver", delivery_tx, event_rx),
            check: Arc::new(BleContentCheck {
                profiles,
                max_content_bytes: cfg.max_content_bytes,
            }),
            known: cfg.tags.clone(),
            fake: None,
        })
    }

    /// The fake tags, when the radio runs on them.
    pub fn fake_air(&self) -> Option<&FakeAir> {
        self.fake.as_ref()
    }

    /// What `tag` reported about itself (displays, image slots, sensors,
    /// LEDs) when it was last configured, by this run or (through the
    /// store) an earlier one; `None` before that. (The agent learns it from
    /// `RadioEvent::Tag`; tests look here.)
    #[cfg(test)]
    fn tag_info(&self, tag: &str) -> Option<TagInfo> {
        lock(&self.check.profiles)
            .get(tag)
            .and_then(|p| p.info.clone())
    }

    /// [`BleRadio::tag_info`] of every configured tag.
    #[cfg(test)]
    fn tag_infos(&self) -> HashMap<TagId, TagInfo> {
        lock(&self.check.profiles)
            .iter()
            .filter_map(|(tag, p)| Some((tag.clone(), p.info.clone()?)))
            .collect()
    }
}

impl Radio for BleRadio {
    fn inventory(&self) -> RadioInventory {
        let known_tags = match &self.fake {
            Some(air) if self.known.is_empty() => air.tag_ids(),
            _ => self.known.clone(),
        };
        RadioInventory {
            known_tags,
            counters: None,
            content_check: Some(self.check.clone()),
        }
    }

    async fn next_event(&mut self) -> Result<RadioEvent, RadioError> {
        self.channels.next_event().await
    }

    async fn deliver(&mut self, delivery: Delivery) -> Result<(), RadioError> {
        // The agent ran the same check at intake; the driver may have
        // learnt more about the tag since (the session checks an image
        // again after configuring).
        self.check
            .check(&delivery.tag_id, &delivery.content)
            .map_err(|reason| RadioError::new(RadioErrorKind::InvalidRequest, reason))?;
        self.channels.deliver(delivery).await
    }
}

/// Work for one session.
#[derive(Debug)]
enum Job {
    Deliver { delivery: Delivery, retries: u32 },
    Poll { tag: TagId },
}

impl Job {
    fn tag(&self) -> &str {
        match self {
            Job::Deliver { delivery, .. } => &delivery.tag_id,
            Job::Poll { tag } => tag,
        }
    }
}

/// A job waiting for its retry; ordered by due time, then arrival.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// What the driver knows about one tag.
#[derive(Debug, Default)]
struct TagState {
    rssi: Option<i16>,
    battery_mv: Option<u16>,
    /// End of the last session (any result): a battery poll is due
    /// `battery_poll_interval_s` after it, so a tag that fails its polls
    /// is not polled again at every advertisement.
    battery_tried_at: Option<Instant>,
    last_checkin_sent: Option<Instant>,
    /// A session with this tag is open.
    in_session: bool,
    /// A delivery for this tag waits for its retry.
    retrying: bool,
    poll_queued: bool,
    /// The store's record for the tag was looked up (once per run).
    loaded: bool,
    /// This tag's ESL Response Key material (a secret; never logged).
    response_key: Option<KeyMaterial>,
    /// Whether this AP holds a bond with the tag (`TagRecord::bonded`);
    /// `None` before any session or record says.
    bonded: Option<bool>,
    /// This run configured the tag and no session since showed it lost
    /// that (the tag's own 60-minute fall-back is not guessed at).
    configured: bool,
    /// End of the last successful session (with its Update Complete):
    /// the tag's fall-back timer started then.
    updated_at: Option<Instant>,
    /// The tag showed it lost its configuration: configure next time.
    reconfigure: bool,
}

/// A session's end.
struct Done {
    job: Job,
    result: Result<SessionReport, TransportError>,
}

/// The driver task: its state plus its channel ends, kept apart so the loop
/// can hold a send permit (borrowing `event_tx`) while it updates the state.
struct Driver<C: Central> {
    state: DriverState<C>,
    delivery_rx: mpsc::Receiver<Delivery>,
    event_tx: mpsc::Sender<RadioEvent>,
}

/// Everything the driver keeps between turns of its loop.
struct DriverState<C: Central> {
    cfg: BleConfig,
    settings: Arc<SessionSettings>,
    central: C,
    tags: HashMap<TagId, TagState>,
    /// Deliveries waiting for a free link, oldest first.
    ready: VecDeque<Job>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    delayed_seq: u64,
    /// Battery polls, served only when no delivery waits.
    polls: VecDeque<TagId>,
    /// Events not yet taken by the agent; check-ins and details by tag.
    outgoing: Outgoing<TagId>,
    /// What the agent was last told.
    radio_up: bool,
    /// When to try scanning again after the adapter failed.
    scan_retry: Option<Instant>,
    scan_backoff: Duration,
    /// This AP's sync key material, written to every tag it configures.
    ap_sync_key: KeyMaterial,
    /// Zero of the AP's ESL absolute time.
    epoch: Instant,
    /// Key material, Information, bond state and content paths across
    /// restarts.
    store: Box<dyn ProvisionStore>,
    profiles: Profiles,
}

/// The next advertisement, or never while there is no scan.
async fn next_advertisement<S: Scan>(scan: &mut Option<S>) -> Result<Advertisement, GattError> {
    match scan {
        Some(scan) => scan.next().await,
        None => std::future::pending().await,
    }
}

impl<C: Central> Driver<C> {
    /// Runs until the [`BleRadio`] is dropped.
    async fn run(self) {
        let Driver {
            mut state,
            mut delivery_rx,
            event_tx,
        } = self;
        let mut sessions: JoinSet<Done> = JoinSet::new();
        let mut scan = state.start_scan().await;
        loop {
            state.start_sessions(&mut sessions);
            let wake = state.next_wake();
            tokio::select! {
                // Deliveries first: the agent may be waiting in `deliver()`.
                biased;
                received = delivery_rx.recv() => match received {
                    Some(delivery) => state.ready.push_back(Job::Deliver { delivery, retries: 0 }),
                    None => break,
                },
                Some(joined) = sessions.join_next(), if !sessions.is_empty() => match joined {
                    Ok(done) => state.finish(done),
                    // Sessions do not panic; if one did, its outcome is lost
                    // and the engine's delivery timeout covers it.
                    Err(error) => tracing::error!(%error, "BLE session task failed"),
                },
                advertised = next_advertisement(&mut scan) => match advertised {
                    Ok(advertisement) => state.on_advertisement(advertisement),
                    Err(error) => {
                        scan = None;
                        state.adapter_failed(error);
                    }
                },
                // The placeholder instant is never awaited: the branch is off
                // when nothing is scheduled.
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    let now = Instant::now();
                    state.release_retries(now);
                    if scan.is_none() && state.scan_retry.is_some_and(|at| at <= now) {
                        // Awaited in the loop (at most SCAN_START_TIMEOUT):
                        // the radio is down meanwhile anyway, and deliveries
                        // wait in their channel, not lost.
                        state.scan_retry = None;
                        scan = state.start_scan().await;
                    }
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
        sessions.abort_all();
        tracing::debug!("BLE radio driver stopped");
    }
}

impl<C: Central> DriverState<C> {
    async fn start_scan(&mut self) -> Option<C::Scan> {
        let result = match timeout(SCAN_START_TIMEOUT, self.central.scan()).await {
            Ok(result) => result,
            Err(_) => Err(GattError::Adapter(format!(
                "starting the scan took more than {SCAN_START_TIMEOUT:?}"
            ))),
        };
        match result {
            Ok(scan) => {
                self.scan_backoff = SCAN_RETRY_MIN;
                if !self.radio_up {
                    tracing::info!("Bluetooth adapter back; scanning");
                    self.radio_up = true;
                    self.outgoing.event(RadioEvent::State(RadioState::Up));
                }
                Some(scan)
            }
            Err(error) => {
                self.adapter_failed(error);
                None
            }
        }
    }

    /// Reports the radio down (once) and schedules the next scan attempt.
    fn adapter_failed(&mut self, error: GattError) {
        tracing::warn!(%error, retry_in = ?self.scan_backoff, "BLE scan stopped");
        if self.radio_up {
            self.radio_up = false;
            self.outgoing.event(RadioEvent::State(RadioState::Down {
                reason: error.to_string(),
            }));
        }
        self.scan_retry = Some(Instant::now() + self.scan_backoff);
        self.scan_backoff = (self.scan_backoff * 2).min(SCAN_RETRY_MAX);
    }

    fn next_wake(&self) -> Option<Instant> {
        let retry = self.delayed.peek().map(|Reverse(d)| d.due);
        match (retry, self.scan_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn release_retries(&mut self, now: Instant) {
        while self.delayed.peek().is_some_and(|Reverse(d)| d.due <= now) {
            if let Some(Reverse(delayed)) = self.delayed.pop() {
                if let Some(tag) = self.tags.get_mut(delayed.job.tag()) {
                    tag.retrying = false;
                }
                // A retry goes before newer deliveries: it is older.
                self.ready.push_front(delayed.job);
            }
        }
    }

    /// Starts queued jobs while links are free: deliveries first, in order,
    /// skipping tags that are in a session; then battery polls.
    fn start_sessions(&mut self, sessions: &mut JoinSet<Done>) {
        while sessions.len() < self.cfg.max_connections {
            let free = |tags: &HashMap<TagId, TagState>, tag: &str| {
                !tags.get(tag).is_some_and(|t| t.in_session)
            };
            let job = if let Some(at) = self.ready.iter().position(|j| free(&self.tags, j.tag())) {
                self.ready.remove(at)
            } else if self.ready.is_empty() {
                self.next_poll()
            } else {
                None
            };
            let Some(job) = job else { break };
            self.tags
                .entry(job.tag().to_owned())
                .or_default()
                .in_session = true;
            let central = self.central.clone();
            let settings = self.settings.clone();
            let address = self.cfg.address_for(job.tag());
            let limit = Duration::from_millis(self.cfg.session_timeout_ms);
            let plan = self.plan(job.tag());
            sessions.spawn(async move {
                let session = async {
                    match &job {
                        Job::Deliver { delivery, .. } => {
                            transport::deliver(
                                &central,
                                &delivery.tag_id,
                                address,
                                &settings,
                                &plan,
                                &delivery.content,
                                &delivery.content_hash,
                            )
                            .await
                        }
                        Job::Poll { tag } => {
                            transport::poll(&central, tag, address, &settings, &plan).await
                        }
                    }
                };
                let result = match timeout(limit, session).await {
                    Ok(result) => result,
                    Err(_) => Err(TransportError::Timeout {
                        step: Step::Session,
                        after: limit,
                    }),
                };
                Done { job, result }
            });
        }
    }

    /// Whether the next session with `tag` configures it, and with what.
    fn plan(&mut self, tag: &str) -> SessionPlan {
        let now = Instant::now();
        let stale = Duration::from_secs(self.cfg.reconfigure_after_s);
        self.load(tag);
        let info = lock(&self.profiles).get(tag).and_then(|p| p.info.clone());
        let state = self.tags.entry(tag.to_owned()).or_default();
        let due = state.reconfigure
            || state
                .updated_at
                .is_none_or(|at| now.duration_since(at) >= stale);
        let configure = due.then(|| Provisioning {
            ap_sync_key: self.ap_sync_key.clone(),
            response_key: state
                .response_key
                .get_or_insert_with(KeyMaterial::generate)
                .clone(),
            absolute_time: absolute_time(self.epoch, now),
        });
        SessionPlan { configure, info }
    }

    /// Takes what an earlier run kept about `tag` (its Response Key,
    /// Information, bond state and content paths), once per run; whether
    /// there was a record.
    fn load(&mut self, tag: &str) -> bool {
        let state = self.tags.entry(tag.to_owned()).or_default();
        if std::mem::replace(&mut state.loaded, true) {
            return false;
        }
        let Some(record) = self.store.tag(tag) else {
            return false;
        };
        state.response_key = Some(record.response_key);
        state.bonded = Some(record.bonded);
        let mut profiles = lock(&self.profiles);
        let profile = profiles.entry(tag.to_owned()).or_default();
        profile.info = record.info;
        profile.paths = record.content_paths;
        true
    }

    /// Writes what the store keeps of `tag` after a session changed it.
    /// Nothing before the tag has a Response Key (its first session's plan
    /// makes one).
    fn save(&mut self, tag: &str) {
        let Some(state) = self.tags.get(tag) else {
            return;
        };
        let Some(response_key) = state.response_key.clone() else {
            return;
        };
        // Copied out: the lock is not held across the store's write (a disk
        // sync), as the engine's intake check takes it.
        let profile = lock(&self.profiles).get(tag).cloned().unwrap_or_default();
        let record = TagRecord {
            response_key,
            info: profile.info,
            bonded: state.bonded.unwrap_or(false),
            content_paths: profile.paths,
        };
        self.store.set_tag(tag, &record);
    }

    /// At start: loads the tags the store kept (those it lists, and those
    /// in `radio.ble.tags`) and describes each to the agent.
    fn load_stored(&mut self) {
        let mut stored = self.store.tag_ids();
        stored.extend(self.cfg.tags.iter().cloned());
        for tag in stored {
            let served = self.cfg.tags.is_empty() || self.cfg.tags.contains(&tag);
            if served && self.load(&tag) {
                self.queue_details(&tag);
            }
        }
    }

    /// Queues the tag's details for the agent (at most once at a time).
    fn queue_details(&mut self, tag: &str) {
        self.outgoing.details(tag.to_owned());
    }

    /// What the agent shows for the tag in `tag.get` and `tags.list`
    /// (docs/BLE.md, "Tag details").
    fn details(&self, tag: &str) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let address = self.cfg.address_for(tag);
        let profile = lock(&self.profiles).get(tag).cloned().unwrap_or_default();
        let state = self.tags.get(tag);
        let mut details = profile.info.map(|i| i.summary()).unwrap_or_default();
        details.insert(
            "esl_address".into(),
            json!({"group_id": address.group_id(), "esl_id": address.esl_id()}),
        );
        if let Some(bonded) = state.and_then(|s| s.bonded) {
            details.insert("bonded".into(), bonded.into());
        }
        details.insert(
            "configured".into(),
            state.is_some_and(|s| s.configured).into(),
        );
        if let Some(paths) = profile.paths {
            details.insert("content_paths".into(), json!(paths.names()));
        }
        details
    }

    fn next_poll(&mut self) -> Option<Job> {
        while let Some(tag) = self.polls.pop_front() {
            let Some(state) = self.tags.get_mut(&tag) else {
                continue;
            };
            state.poll_queued = false;
            if !state.in_session && !state.retrying {
                return Some(Job::Poll { tag });
            }
        }
        None
    }

    fn finish(&mut self, done: Done) {
        let tag_id = done.job.tag().to_owned();
        let tag = self.tags.entry(tag_id.clone()).or_default();
        tag.in_session = false;
        tag.battery_tried_at = Some(Instant::now());
        let before = (tag.bonded, tag.configured);
        // Changed what the store keeps (the bond is compared below).
        let mut changed = false;
        let (paths, info) = match &done.result {
            Ok(report) => (report.paths, report.info.clone()),
            Err(error) => (error.paths_found(), None),
        };
        match &done.result {
            Ok(report) => {
                if let Some(mv) = report.battery_mv {
                    tag.battery_mv = Some(mv);
                }
                tag.updated_at = Some(Instant::now());
                // The session secured the link with our bond first.
                tag.bonded = Some(true);
                if report.info.is_some() {
                    tag.reconfigure = false;
                    tag.configured = true;
                }
            }
            Err(TransportError::NoContentPath { .. }) => {
                // Discovery comes after the link was secured with our bond.
                tag.bonded = Some(true);
            }
            Err(TransportError::BondLost) => {
                tracing::info!(tag = %tag_id, "BLE tag lost its bond; pairing and configuring it again");
                tag.reconfigure = true;
                tag.configured = false;
                tag.bonded = Some(false);
            }
            Err(error) if error.needs_configuring() => {
                tracing::info!(tag = %tag_id, %error, "BLE tag lost its configuration; configuring it again");
                tag.reconfigure = true;
                tag.configured = false;
            }
            Err(_) => {}
        }
        let bond_changed = before.0 != tag.bonded;
        let state_changed = before != (tag.bonded, tag.configured);
        {
            let mut profiles = lock(&self.profiles);
            let profile = profiles.entry(tag_id.clone()).or_default();
            if paths.is_some() && paths != profile.paths {
                profile.paths = paths;
                changed = true;
            }
            // A configuring session read the Information: saved (with the
            // Response Key it wrote) and reported only when it is new.
            if info.is_some() && info != profile.info {
                profile.info = info;
                changed = true;
            }
        }
        if changed || bond_changed {
            self.save(&tag_id);
        }
        if changed || state_changed {
            self.queue_details(&tag_id);
        }
        let tag = self.tags.entry(tag_id.clone()).or_default();
        match (done.job, done.result) {
            (Job::Deliver { delivery, .. }, Ok(report)) => {
                tracing::debug!(tag = %tag_id, task = %delivery.task_id, sent = report.transferred,
                    "BLE delivery confirmed by the tag");
                self.outgoing.event(RadioEvent::Outcome(Outcome {
                    tag_id,
                    task_id: delivery.task_id,
                    result: Ok(()),
                }));
            }
            (Job::Deliver { delivery, retries }, Err(error)) => {
                if error.retryable() && retries < self.cfg.retries {
                    let wait = self.cfg.backoff(retries);
                    tracing::debug!(tag = %tag_id, task = %delivery.task_id, %error, ?wait,
                        "BLE session failed; retrying");
                    tag.retrying = true;
                    self.delayed_seq += 1;
                    self.delayed.push(Reverse(Delayed {
                        due: Instant::now() + wait,
                        seq: self.delayed_seq,
                        job: Job::Deliver {
                            delivery,
                            retries: retries + 1,
                        },
                    }));
                } else {
                    tracing::warn!(tag = %tag_id, task = %delivery.task_id, %error,
                        sessions = retries + 1, "BLE delivery failed");
                    self.outgoing.event(RadioEvent::Outcome(Outcome {
                        tag_id,
                        task_id: delivery.task_id,
                        result: Err(DeliveryFailure {
                            retryable: error.retryable(),
                            reason: format!("BLE {error}"),
                        }),
                    }));
                }
            }
            (Job::Poll { .. }, Ok(_)) => {}
            (Job::Poll { .. }, Err(error)) => {
                tracing::debug!(tag = %tag_id, %error, "BLE battery poll failed");
            }
        }
    }

    fn on_advertisement(&mut self, advertisement: Advertisement) {
        // Scan filters are advisory on some stacks (and BlueZ replays cached
        // devices): keep only ESL tags, allowed ones, with a fresh signal.
        if !advertisement.services.contains(&uuid16(ESL_SERVICE)) {
            return;
        }
        if !self.cfg.tags.is_empty() && !self.cfg.tags.contains(&advertisement.address) {
            return;
        }
        let Some(rssi) = advertisement.rssi else {
            return;
        };
        if !self.tags.contains_key(&advertisement.address) && self.tags.len() >= MAX_TRACKED_TAGS {
            tracing::warn!(tag = %advertisement.address, "too many BLE tags; ignoring a new one");
            return;
        }
        let now = Instant::now();
        let checkin_interval = Duration::from_millis(self.cfg.checkin_interval_ms);
        let poll_interval = Duration::from_secs(self.cfg.battery_poll_interval_s);
        let tag = self.tags.entry(advertisement.address.clone()).or_default();
        tag.rssi = Some(rssi);
        let due = tag
            .last_checkin_sent
            .is_none_or(|sent| now.duration_since(sent) >= checkin_interval);
        if due {
            self.outgoing.checkin(advertisement.address.clone());
        }
        let battery_stale = tag
            .battery_tried_at
            .is_none_or(|at| now.duration_since(at) >= poll_interval);
        if self.cfg.battery_poll_interval_s > 0
            && battery_stale
            && !tag.poll_queued
            && !tag.in_session
            && !tag.retrying
        {
            tag.poll_queued = true;
            self.polls.push_back(advertisement.address);
        }
    }

    fn event(&mut self, pending: Pending<TagId>) -> RadioEvent {
        match pending {
            Pending::Event(event) => event,
            Pending::Details(tag_id) => {
                let info = self.details(&tag_id);
                RadioEvent::Tag(TagDetails {
                    tag_id,
                    info,
                    replaces: None,
                })
            }
            Pending::CheckIn(tag_id) => {
                let tag = self.tags.entry(tag_id.clone()).or_default();
                tag.last_checkin_sent = Some(Instant::now());
                RadioEvent::CheckIn(CheckIn {
                    tag_id,
                    battery_mv: tag.battery_mv,
                    rssi: tag.rssi,
                    // ESL tags do not advertise what they show; the session
                    // reads it from the tag before sending anything.
                    content_hash: None,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tokio::time::timeout_at;

    use super::fake_esl::{fake_address, STRANGER_ADDRESS};
    use super::*;
    use crate::test_util::{checkins, events_for};

    const CONTENT: &[u8] = br#"{"name":"Milk 1L","price":"9.90"}"#;

    fn fake_config(tags: u32) -> BleConfig {
        BleConfig {
            checkin_interval_ms: 500,
            battery_poll_interval_s: 0,
            fake: Some(FakeConfig {
                tags,
                adv_interval_ms: 200,
                ..FakeConfig::default()
            }),
            ..BleConfig::default()
        }
    }

    /// The fake tags `cfg` asks for.
    fn fake_air(cfg: &BleConfig) -> FakeAir {
        FakeAir::new(cfg.fake.as_ref().unwrap(), cfg.content_uuid().unwrap()).expect("air")
    }

    /// The radio on `cfg`'s fake tags, with `store`; the tags too.
    fn start_stored(cfg: BleConfig, store: &MemoryStore) -> (BleRadio, FakeAir) {
        let air = fake_air(&cfg);
        let radio = BleRadio::start_with_store(cfg, air.clone(), store.clone()).expect("start");
        (radio, air)
    }

    /// A record of a fake tag configured by an earlier run that did not
    /// keep content paths.
    fn stored_record(bonded: bool) -> TagRecord {
        TagRecord {
            response_key: KeyMaterial::generate(),
            info: Some(fake_esl::fake_tag_info()),
            bonded,
            content_paths: None,
        }
    }

    fn delivery(tag: &str, task: &str) -> Delivery {
        Delivery {
            tag_id: tag.to_owned(),
            task_id: task.to_owned(),
            content: CONTENT.to_vec(),
            content_hash: format!("hash-{task}"),
        }
    }

    /// The next outcome, skipping other events; panics after an hour of
    /// (paused) time.
    async fn next_outcome(radio: &mut BleRadio) -> (Duration, Outcome) {
        let start = Instant::now();
        let (_, outcome) = until_outcome(radio).await;
        (start.elapsed(), outcome)
    }

    /// The events before the next outcome, and the outcome; panics after
    /// an hour of (paused) time.
    async fn until_outcome(radio: &mut BleRadio) -> (Vec<RadioEvent>, Outcome) {
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut before = Vec::new();
        loop {
            match timeout_at(deadline, radio.next_event()).await {
                Ok(Ok(RadioEvent::Outcome(outcome))) => return (before, outcome),
                Ok(Ok(event)) => before.push(event),
                Ok(Err(error)) => panic!("radio error: {error}"),
                Err(_) => panic!("no outcome within an hour"),
            }
        }
    }

    /// The tag details among `events`, in order.
    fn details_in(events: &[RadioEvent]) -> Vec<&TagDetails> {
        events
            .iter()
            .filter_map(|event| match event {
                RadioEvent::Tag(details) => Some(details),
                _ => None,
            })
            .collect()
    }

    /// What `fake_esl::fake_tag_info()` shows, for `tag` in `state`.
    fn fake_tag_details(tag: &str, bonded: bool, configured: bool) -> serde_json::Value {
        let address = derived_address(tag);
        serde_json::json!({
            "displays": [{"index": 0, "width": 296, "height": 128,
                          "type": "black_white", "image_bytes": 4736}],
            "image_slots": 2,
            "sensors": [{"index": 0, "mesh_property": 0x0059}],
            "leds": [{"index": 0, "type": "srgb", "color": 0x3F}],
            "esl_address": {"group_id": address.group_id(), "esl_id": address.esl_id()},
            "bonded": bonded,
            "configured": configured,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_tag_is_described_and_again_when_its_bond_or_configuration_changes() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(fake_config(1)).expect("start");
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        let (events, outcome) = until_outcome(&mut radio).await;
        assert_eq!(outcome.result, Ok(()));
        let described = details_in(&events);
        assert_eq!(described.len(), 1, "{described:?}");
        assert_eq!(described[0].tag_id, tag);
        let mut expected = fake_tag_details(&tag, true, true);
        expected["content_paths"] = serde_json::json!(["ots", "vendor"]);
        assert_eq!(
            serde_json::Value::Object(described[0].info.clone()),
            expected
        );

        // Nothing changed: no new details.
        radio.deliver(delivery(&tag, "t2")).await.expect("deliver");
        let (events, outcome) = until_outcome(&mut radio).await;
        assert_eq!(outcome.result, Ok(()));
        assert!(details_in(&events).is_empty(), "{events:?}");

        // The tag falls back and deletes its bond (Nordic): the failed
        // session says so, the retry bonds and configures it again.
        radio.fake_air().expect("fake").unassociate(&tag);
        radio.deliver(delivery(&tag, "t3")).await.expect("deliver");
        let (events, outcome) = until_outcome(&mut radio).await;
        assert_eq!(outcome.result, Ok(()));
        let states: Vec<(bool, bool)> = details_in(&events)
            .iter()
            .map(|d| (d.info["bonded"] == true, d.info["configured"] == true))
            .collect();
        assert_eq!(states, [(false, false), (true, true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn stored_tags_are_described_and_their_content_checked_from_the_start() {
        let tag = fake_address(0);
        let mut store = MemoryStore::default();
        store.set_tag(&tag, &stored_record(false));
        let (mut radio, air) = start_stored(fake_config(1), &store);
        // Before any session: the intake check knows the display...
        let check = radio.inventory().content_check.expect("a content check");
        let error = check
            .check(
                &tag,
                image_delivery(&tag, "t1", &[0; 10]).content.as_slice(),
            )
            .expect_err("misfit");
        assert!(error.contains("takes 4736 bytes"), "{error}");
        // ... and the agent hears of the tag first.
        let first = radio.next_event().await.expect("open");
        let RadioEvent::Tag(described) = first else {
            panic!("expected the tag's details first, got {first:?}");
        };
        assert_eq!(described.tag_id, tag);
        assert_eq!(
            serde_json::Value::Object(described.info),
            fake_tag_details(&tag, false, false),
            "as stored: no content paths before a session"
        );
        assert_eq!(air.connects(), 0);
    }

    /// A store that cannot list its tags (as the agent's may not).
    struct Unlisted(MemoryStore);

    impl ProvisionStore for Unlisted {
        fn ap_sync_key(&mut self) -> Option<KeyMaterial> {
            self.0.ap_sync_key()
        }
        fn set_ap_sync_key(&mut self, key: &KeyMaterial) {
            self.0.set_ap_sync_key(key);
        }
        fn tag(&mut self, tag: &str) -> Option<TagRecord> {
            self.0.tag(tag)
        }
        fn set_tag(&mut self, tag: &str, record: &TagRecord) {
            self.0.set_tag(tag, record);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_lists_nothing_still_describes_the_tags_served_by_name() {
        let (named, other) = (fake_address(0), fake_address(1));
        let mut store = MemoryStore::default();
        for tag in [&named, &other] {
            store.set_tag(tag, &stored_record(true));
        }
        let cfg = BleConfig {
            tags: vec![named.clone()],
            battery_poll_interval_s: 0,
            ..fake_config(2)
        };
        let mut radio = BleRadio::start_with_store(cfg.clone(), fake_air(&cfg), Unlisted(store))
            .expect("start");
        let events: Vec<RadioEvent> = events_for(&mut radio, 100)
            .await
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        let described: Vec<&str> = details_in(&events)
            .iter()
            .map(|d| d.tag_id.as_str())
            .collect();
        assert_eq!(described, [named.as_str()]);
    }

    #[test]
    fn the_content_check_rejects_only_what_a_known_tag_can_never_show() {
        use base64::Engine as _;
        let image = |display: u8, image: u8, len: usize| {
            serde_json::json!({"ble_image": {"display": display, "image": image,
                "bitmap": base64::engine::general_purpose::STANDARD.encode(vec![0u8; len])}})
            .to_string()
        };
        let profile = |ots: bool, vendor: bool| TagProfile {
            info: Some(fake_esl::fake_tag_info()),
            paths: Some(ContentPaths { ots, vendor }),
        };
        let check = BleContentCheck {
            profiles: Arc::new(Mutex::new(HashMap::from([
                ("stock".to_owned(), profile(true, false)),
                ("vendor-only".to_owned(), profile(false, true)),
                (
                    "unprobed".to_owned(),
                    TagProfile {
                        info: Some(fake_esl::fake_tag_info()),
                        paths: None,
                    },
                ),
            ]))),
            max_content_bytes: 8 * 1024,
        };
        let text = br#"{"name":"Milk 1L"}"#;
        let cases: Vec<(&str, Vec<u8>, Result<(), &str>)> = vec![
            ("stock", image(0, 1, 4736).into_bytes(), Ok(())),
            ("unknown", image(0, 1, 10).into_bytes(), Ok(())),
            ("unprobed", text.to_vec(), Ok(())),
            ("vendor-only", text.to_vec(), Ok(())),
            (
                "stock",
                image(0, 1, 10).into_bytes(),
                Err(
                    "content.ble_image.bitmap is 10 bytes; display 0 (296x128, BlackWhite) \
                     takes 4736 bytes",
                ),
            ),
            (
                "unprobed",
                image(1, 0, 4736).into_bytes(),
                Err("content.ble_image.display is 1; the tag has displays 0..=0"),
            ),
            (
                "stock",
                image(0, 2, 4736).into_bytes(),
                Err("content.ble_image.image is 2; the tag has image slots 0..=1"),
            ),
            (
                "stock",
                text.to_vec(),
                Err(
                    "content: the tag shows only images (content.ble_image) as it has no \
                     vendor content characteristic (radio.ble.content_characteristic)",
                ),
            ),
            (
                "vendor-only",
                image(0, 1, 4736).into_bytes(),
                Err(
                    "content.ble_image: the tag has no Object Transfer Service (0x1825); it \
                     takes only content without it, over the vendor characteristic",
                ),
            ),
            (
                "unknown",
                br#"{"ble_image":{"display":0,"image":0}}"#.to_vec(),
                Err("content.ble_image: missing field `bitmap`"),
            ),
            (
                "unknown",
                image(0, 1, 8 * 1024).into_bytes(),
                Err("content is 10973 bytes, radio.ble.max_content_bytes is 8192"),
            ),
        ];
        for (tag, content, expected) in cases {
            assert_eq!(
                check.check(tag, &content),
                expected.map_err(str::to_owned),
                "{tag}: {}",
                String::from_utf8_lossy(&content[..content.len().min(60)])
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_that_fails_its_battery_poll_is_not_polled_at_every_advertisement() {
        let mut radio = BleRadio::start(BleConfig {
            battery_poll_interval_s: 3600,
            fake: Some(FakeConfig {
                connect_fail_rate: 1.0,
                ..fake_config(1).fake.unwrap()
            }),
            ..fake_config(1)
        })
        .expect("start");
        // Advertising every ~200 ms for 10 s.
        let events = events_for(&mut radio, 10_000).await;
        assert!(checkins(&events).len() > 10);
        assert_eq!(
            radio.fake_air().expect("fake").connects(),
            1,
            "one poll, failed; the next is due in an hour"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn esl_tags_check_in_with_rssi_and_other_devices_are_filtered() {
        let mut radio = BleRadio::start(fake_config(3)).expect("start");
        let events = events_for(&mut radio, 5000).await;
        let mut by_tag: HashMap<&str, Vec<u64>> = HashMap::new();
        for (at, checkin) in checkins(&events) {
            assert!(
                checkin.rssi.is_some_and(|r| (-93..=-37).contains(&r)),
                "{checkin:?}"
            );
            assert_eq!(checkin.content_hash, None);
            by_tag.entry(&checkin.tag_id).or_default().push(at);
        }
        let mut seen: Vec<&str> = by_tag.keys().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, [fake_address(0), fake_address(1), fake_address(2)]);
        assert!(!by_tag.contains_key(STRANGER_ADDRESS));
        for (tag, times) in by_tag {
            // Advertising every ~200 ms, checking in at most every 500 ms.
            for gap in times.windows(2).map(|w| w[1] - w[0]) {
                assert!((500..=800).contains(&gap), "{tag}: gap {gap} ms");
            }
            assert!((6..=10).contains(&times.len()), "{tag}: {}", times.len());
        }
        assert_eq!(radio.inventory().known_tags.len(), 3, "fake tags are known");
    }

    #[tokio::test(start_paused = true)]
    async fn an_allow_list_limits_the_tags_served() {
        let only = fake_address(1);
        let mut radio = BleRadio::start(BleConfig {
            tags: vec![only.clone()],
            ..fake_config(3)
        })
        .expect("start");
        assert_eq!(radio.inventory().known_tags, std::slice::from_ref(&only));
        let events = events_for(&mut radio, 3000).await;
        let tags: HashSet<&str> = checkins(&events)
            .iter()
            .map(|(_, c)| c.tag_id.as_str())
            .collect();
        assert_eq!(tags, HashSet::from([only.as_str()]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_is_displayed_and_the_battery_rides_on_the_next_checkin() {
        let mut radio = BleRadio::start(fake_config(2)).expect("start");
        let tag = fake_address(1);
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        let (_, outcome) = next_outcome(&mut radio).await;
        assert_eq!(outcome.task_id, "t1");
        assert_eq!(outcome.result, Ok(()));
        let air = radio.fake_air().expect("fake").clone();
        assert_eq!(air.displayed(&tag).as_deref(), Some("hash-t1"));
        assert_eq!(air.open_links(), 0, "the session disconnected");
        // The driver wrote the derived ESL address; the fake tag answered
        // the commands sent to it.
        assert_eq!(air.esl_address(&tag), Some(derived_address(&tag)));

        let events = events_for(&mut radio, 1500).await;
        let battery = checkins(&events)
            .into_iter()
            .find(|(_, c)| c.tag_id == tag)
            .and_then(|(_, c)| c.battery_mv)
            .expect("a check-in with the battery");
        // The voltage sensor, in 1/64 V steps (see the test below).
        assert!(air.battery_mv(&tag).unwrap() - battery < 16, "{battery}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_session_configures_the_tag_and_keeps_its_information() {
        let mut radio = BleRadio::start(fake_config(1)).expect("start");
        let tag = fake_address(0);
        let air = radio.fake_air().expect("fake").clone();
        assert!(!air.configured(&tag), "fake tags start Unassociated");
        assert_eq!(radio.tag_info(&tag), None);
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        // Configured: the link has ended and the tag still shows the image
        // (an unconfigured tag falls back to Unassociated and blanks).
        assert_eq!(air.open_links(), 0);
        assert!(air.configured(&tag));
        assert_eq!(air.displayed(&tag).as_deref(), Some("hash-t1"));
        assert_eq!(radio.tag_info(&tag), Some(fake_esl::fake_tag_info()));
        assert_eq!(radio.tag_infos().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silabs_tag_is_done_without_waiting_for_an_update_complete_answer() {
        let tag = fake_address(0);
        let mut cfg = fake_config(1);
        if let Some(fake) = &mut cfg.fake {
            fake.silabs = vec![tag.clone()];
        }
        let mut radio = BleRadio::start(cfg).expect("start");
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        let (took, outcome) = next_outcome(&mut radio).await;
        assert_eq!(outcome.result, Ok(()));
        // The tag answers nothing to a successful Update Complete; the
        // session does not wait the 3 s response time-out for it.
        assert!(took < Duration::from_secs(3), "{took:?}");
        let air = radio.fake_air().expect("fake");
        assert!(air.configured(&tag));
        assert_eq!(air.displayed(&tag).as_deref(), Some("hash-t1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_that_lost_its_address_is_configured_again_and_retried() {
        let tag = fake_address(0);
        let mut cfg = BleConfig {
            write_address: false,
            retries: 1,
            ..fake_config(1)
        };
        if let Some(fake) = &mut cfg.fake {
            // Keeps its bond when unassociated: the stale ID shows first.
            fake.silabs = vec![tag.clone()];
        }
        let mut radio = BleRadio::start(cfg).expect("start");
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        let air = radio.fake_air().expect("fake").clone();
        // Unassociated by another AP (or its own fall-back): no ESL ID.
        air.unassociate(&tag);
        radio.deliver(delivery(&tag, "t2")).await.expect("deliver");
        // Invalid Parameter(s) to Display Image: stale ID, configure, retry.
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        assert!(air.configured(&tag));
        assert_eq!(air.displayed(&tag).as_deref(), Some("hash-t2"));
        assert_eq!(air.esl_address(&tag), Some(derived_address(&tag)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_that_deleted_its_bond_is_bonded_and_configured_again() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(BleConfig {
            retries: 1,
            ..fake_config(1)
        })
        .expect("start");
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        let air = radio.fake_air().expect("fake").clone();
        // A Nordic tag deletes its bonds when it falls back to Unassociated.
        air.unassociate(&tag);
        radio.deliver(delivery(&tag, "t2")).await.expect("deliver");
        // Encryption fails (key missing): our bond is removed, the retry
        // pairs anew and configures the tag.
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        assert!(air.configured(&tag));
        assert_eq!(air.displayed(&tag).as_deref(), Some("hash-t2"));
    }

    #[tokio::test(start_paused = true)]
    async fn key_material_and_information_are_kept_in_the_store_across_restarts() {
        let tag = fake_address(0);
        let cfg = fake_config(1);
        let mut store = MemoryStore::default();
        let (mut radio, air) = start_stored(cfg.clone(), &store);
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        drop(radio);
        let ap_key = store.ap_sync_key().expect("AP key saved");
        let record = store.tag(&tag).expect("tag record saved");
        assert!(record.bonded);
        assert_eq!(record.info, Some(fake_esl::fake_tag_info()));
        let given = air.keys(&tag).expect("configured");
        assert_eq!(given.0, ap_key.expose().to_vec());
        assert_eq!(given.1, record.response_key.expose().to_vec());

        // A restart configures the tag again (its fall-back timer is
        // unknown), with the same key material.
        let mut radio = BleRadio::start_with_store(cfg, air.clone(), store.clone()).expect("start");
        radio.deliver(delivery(&tag, "t2")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        assert_eq!(air.keys(&tag), Some(given));
        assert_eq!(store.ap_sync_key(), Some(ap_key));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_idle_for_an_hour_is_configured_again() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(fake_config(1)).expect("start");
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        let air = radio.fake_air().expect("fake").clone();
        // Never synchronised, the tag falls back to Unassociated after 60
        // minutes without a session.
        events_for(&mut radio, 61 * 60 * 1000).await;
        assert!(!air.configured(&tag));
        assert_eq!(air.displayed(&tag), None);
        radio.deliver(delivery(&tag, "t2")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        // Configured again, so the image outlives the link.
        assert!(air.configured(&tag));
        assert_eq!(air.displayed(&tag).as_deref(), Some("hash-t2"));
    }

    fn image_delivery(tag: &str, task: &str, bitmap: &[u8]) -> Delivery {
        use base64::Engine as _;
        let content = serde_json::json!({"ble_image": {
            "display": 0,
            "image": 1,
            "bitmap": base64::engine::general_purpose::STANDARD.encode(bitmap),
        }});
        Delivery {
            tag_id: tag.to_owned(),
            task_id: task.to_owned(),
            content: content.to_string().into_bytes(),
            content_hash: format!("hash-{task}"),
        }
    }

    fn stock_tags(tags: u32, cfg: impl FnOnce(&mut FakeConfig)) -> BleConfig {
        let mut ble = fake_config(tags);
        if let Some(fake) = &mut ble.fake {
            fake.ots_only = (0..tags).map(fake_address).collect();
            cfg(fake);
        }
        ble
    }

    #[tokio::test(start_paused = true)]
    async fn a_stock_tag_gets_its_image_over_ots() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(stock_tags(1, |_| {})).expect("start");
        let bitmap: Vec<u8> = (0..4736).map(|i| (i * 7 % 256) as u8).collect();
        radio
            .deliver(image_delivery(&tag, "t1", &bitmap))
            .await
            .expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        let air = radio.fake_air().expect("fake");
        assert_eq!(
            air.displayed(&tag),
            Some(fake_esl::ots_hash(&bitmap)),
            "the tag shows exactly the bytes sent"
        );
        assert!(air.configured(&tag));
    }

    const STOCK_PATHS: ContentPaths = ContentPaths {
        ots: true,
        vendor: false,
    };

    #[tokio::test(start_paused = true)]
    async fn content_without_an_image_fails_a_stock_tag_for_good_and_is_refused_after() {
        // The tag's paths are unknown: its record comes from an agent that
        // did not keep them, and there are no battery polls. The session
        // finds no vendor content characteristic.
        let tag = fake_address(0);
        let mut store = MemoryStore::default();
        store.set_tag(&tag, &stored_record(true));
        let (mut radio, air) = start_stored(stock_tags(1, |_| {}), &store);
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        let (events, outcome) = until_outcome(&mut radio).await;
        let failure = outcome.result.expect_err("no vendor path");
        assert!(!failure.retryable);
        assert!(
            failure.reason.contains("vendor content"),
            "{}",
            failure.reason
        );
        // That failure is certain: the tag's paths are learnt from it,
        // shown, kept, and the next such content is refused at once.
        let paths: Vec<Option<&serde_json::Value>> = details_in(&events)
            .iter()
            .map(|d| d.info.get("content_paths"))
            .collect();
        assert_eq!(
            paths,
            [None, Some(&serde_json::json!(["ots"]))],
            "as stored at start, then as learnt"
        );
        let record = store.tag(&tag).expect("tag record");
        assert_eq!(record.content_paths, Some(STOCK_PATHS));
        assert!(record.bonded, "the link was secured before the discovery");
        let connects = air.connects();
        let error = radio
            .deliver(delivery(&tag, "t2"))
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), RadioErrorKind::InvalidRequest);
        assert!(
            error
                .to_string()
                .contains("no vendor content characteristic"),
            "{error}"
        );
        assert_eq!(air.connects(), connects);
    }

    #[tokio::test(start_paused = true)]
    async fn content_paths_survive_a_restart_and_refuse_content_at_once() {
        let tag = fake_address(0);
        let mut store = MemoryStore::default();
        let (mut radio, _) = start_stored(stock_tags(1, |_| {}), &store);
        radio
            .deliver(image_delivery(&tag, "t1", &[0; 4736]))
            .await
            .expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        drop(radio);
        let record = store.tag(&tag).expect("tag record saved");
        assert_eq!(record.content_paths, Some(STOCK_PATHS));

        // A restart with no battery polls: no session before the task.
        let (mut radio, air) = start_stored(stock_tags(1, |_| {}), &store);
        let check = radio.inventory().content_check.expect("a content check");
        let error = check.check(&tag, CONTENT).expect_err("no vendor path");
        assert!(
            error.starts_with("content: the tag shows only images"),
            "{error}"
        );
        assert_eq!(
            check.check(&tag, &image_delivery(&tag, "t2", &[0; 4736]).content),
            Ok(()),
            "an image still fits"
        );
        let error = radio
            .deliver(delivery(&tag, "t3"))
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), RadioErrorKind::InvalidRequest);
        let first = radio.next_event().await.expect("open");
        let RadioEvent::Tag(described) = first else {
            panic!("expected the tag's details first, got {first:?}");
        };
        assert_eq!(described.info["content_paths"], serde_json::json!(["ots"]));
        assert_eq!(air.connects(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stock_tag_that_garbles_the_object_fails_its_checksum() {
        let tag = fake_address(0);
        let corrupt = tag.clone();
        let mut radio = BleRadio::start(BleConfig {
            retries: 0,
            ..stock_tags(1, |f| f.corrupt = vec![corrupt])
        })
        .expect("start");
        radio
            .deliver(image_delivery(&tag, "t1", &vec![0x55; 4736]))
            .await
            .expect("deliver");
        let failure = next_outcome(&mut radio)
            .await
            .1
            .result
            .expect_err("garbled");
        assert!(failure.retryable);
        assert!(
            failure.reason.contains("tag computes CRC-32"),
            "{}",
            failure.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_of_the_wrong_size_fails_for_good_naming_the_expected_size() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(stock_tags(1, |_| {})).expect("start");
        radio
            .deliver(image_delivery(&tag, "t1", &[0; 10]))
            .await
            .expect("deliver");
        let failure = next_outcome(&mut radio).await.1.result.expect_err("misfit");
        assert!(!failure.retryable);
        assert_eq!(
            failure.reason,
            "BLE image does not fit the tag: content.ble_image.bitmap is 10 bytes; display 0 \
             (296x128, BlackWhite) takes 4736 bytes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_that_cannot_fit_a_known_tag_is_refused_at_once() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(stock_tags(1, |_| {})).expect("start");
        radio
            .deliver(image_delivery(&tag, "t1", &[0; 4736]))
            .await
            .expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        // The tag's Information is known now: no session for a misfit.
        let connects = radio.fake_air().expect("fake").connects();
        let error = radio
            .deliver(image_delivery(&tag, "t2", &[0; 100]))
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), RadioErrorKind::InvalidRequest);
        assert!(error.to_string().contains("takes 4736 bytes"), "{error}");
        let error = radio
            .deliver(Delivery {
                content: br#"{"ble_image":{"display":0,"image":0,"bitmap":"!"}}"#.to_vec(),
                ..delivery(&tag, "t3")
            })
            .await
            .expect_err("not base64");
        assert_eq!(error.kind(), RadioErrorKind::InvalidRequest);
        assert_eq!(radio.fake_air().expect("fake").connects(), connects);
    }

    #[tokio::test(start_paused = true)]
    async fn the_battery_comes_from_the_voltage_sensor_the_tag_lists() {
        // No battery_sensor_index: the Sensor Information names sensor 0 as
        // Present Input Voltage (1/64 V), preferred to Battery Level.
        let mut radio = BleRadio::start(fake_config(1)).expect("start");
        let tag = fake_address(0);
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        let air = radio.fake_air().expect("fake").clone();
        let events = events_for(&mut radio, 1500).await;
        let checkin = checkins(&events)
            .into_iter()
            .next()
            .expect("check-in")
            .1
            .clone();
        let mv = u32::from(air.battery_mv(&tag).unwrap());
        let quantised = (mv * 64 / 1000 * 1000 / 64) as u16;
        assert_eq!(checkin.battery_mv, Some(quantised));
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_are_bounded_by_max_connections() {
        let mut radio = BleRadio::start(BleConfig {
            max_connections: 2,
            ..fake_config(8)
        })
        .expect("start");
        for i in 0..8 {
            radio
                .deliver(delivery(&fake_address(i), &format!("t{i}")))
                .await
                .expect("deliver");
        }
        let mut done = HashSet::new();
        while done.len() < 8 {
            let (_, outcome) = next_outcome(&mut radio).await;
            assert_eq!(outcome.result, Ok(()), "{}", outcome.task_id);
            assert!(done.insert(outcome.task_id));
        }
        let air = radio.fake_air().expect("fake");
        assert_eq!(air.max_concurrent_links(), 2);
        for i in 0..8 {
            assert_eq!(
                air.displayed(&fake_address(i)).as_deref(),
                Some(format!("hash-t{i}").as_str())
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_session_per_tag_at_a_time() {
        let mut radio = BleRadio::start(fake_config(1)).expect("start");
        let tag = fake_address(0);
        for task in ["a", "b", "c"] {
            radio.deliver(delivery(&tag, task)).await.expect("deliver");
        }
        let mut order = Vec::new();
        for _ in 0..3 {
            let (_, outcome) = next_outcome(&mut radio).await;
            // A second link to a linked fake tag is refused; none was tried.
            assert_eq!(outcome.result, Ok(()), "{}", outcome.task_id);
            order.push(outcome.task_id);
        }
        assert_eq!(order, ["a", "b", "c"]);
        let air = radio.fake_air().expect("fake");
        assert_eq!(air.max_concurrent_links(), 1);
        assert_eq!(air.displayed(&tag).as_deref(), Some("hash-c"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_tag_is_retried_with_backoff_then_fails_retryably() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(BleConfig {
            retries: 3,
            retry_backoff_ms: 100,
            fake: Some(FakeConfig {
                offline: vec![tag.clone()],
                ..fake_config(1).fake.unwrap()
            }),
            ..fake_config(1)
        })
        .expect("start");
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        let (took, outcome) = next_outcome(&mut radio).await;
        let failure = outcome.result.expect_err("offline");
        assert!(failure.retryable);
        assert!(
            failure
                .reason
                .starts_with("BLE connect: le-connection-abort"),
            "{}",
            failure.reason
        );
        let air = radio.fake_air().expect("fake");
        assert_eq!(air.connects(), 4, "one session and three retries");
        // Backoffs 100 + 200 + 400 ms, plus 4 × 2 ms connect latency.
        assert!(took >= Duration::from_millis(708), "{took:?}");
        assert!(took < Duration::from_millis(800), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_is_retried_and_then_succeeds() {
        // Seeded: with half the connections refused, some deliveries need
        // a retry; with 10 retries every one gets through.
        let mut radio = BleRadio::start(BleConfig {
            retries: 10,
            retry_backoff_ms: 10,
            fake: Some(FakeConfig {
                connect_fail_rate: 0.5,
                ..fake_config(4).fake.unwrap()
            }),
            ..fake_config(4)
        })
        .expect("start");
        for i in 0..4 {
            radio
                .deliver(delivery(&fake_address(i), &format!("t{i}")))
                .await
                .expect("deliver");
        }
        for _ in 0..4 {
            assert_eq!(next_outcome(&mut radio).await.1.result, Ok(()));
        }
        let connects = radio.fake_air().expect("fake").connects();
        assert!(
            connects > 4,
            "{connects} connects: some were refused and retried"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_corrupting_tag_fails_the_integrity_check() {
        let tag = fake_address(0);
        let mut radio = BleRadio::start(BleConfig {
            fake: Some(FakeConfig {
                corrupt: vec![tag.clone()],
                ..fake_config(1).fake.unwrap()
            }),
            ..fake_config(1)
        })
        .expect("start");
        radio.deliver(delivery(&tag, "t1")).await.expect("deliver");
        let failure = next_outcome(&mut radio)
            .await
            .1
            .result
            .expect_err("corrupt");
        assert!(failure.retryable);
        assert!(
            failure
                .reason
                .starts_with("BLE content check failed: sent 33 bytes"),
            "{}",
            failure.reason
        );
        let air = radio.fake_air().expect("fake");
        assert_eq!(air.displayed(&tag), None, "nothing shown");
        assert_eq!(air.connects(), 2, "default: one retry");
    }

    #[tokio::test(start_paused = true)]
    async fn content_over_the_limit_is_an_invalid_request() {
        let mut radio = BleRadio::start(BleConfig {
            max_content_bytes: 10,
            ..fake_config(1)
        })
        .expect("start");
        let error = radio
            .deliver(delivery(&fake_address(0), "t1"))
            .await
            .expect_err("too large");
        assert_eq!(error.kind(), RadioErrorKind::InvalidRequest);
        assert!(
            error.to_string().contains("radio.ble.max_content_bytes"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_adapter_is_reported_down_and_up_again() {
        let mut radio = BleRadio::start(fake_config(1)).expect("start");
        let air = radio.fake_air().expect("fake").clone();
        events_for(&mut radio, 1000).await;
        air.set_powered(false);
        let events = events_for(&mut radio, 10_000).await;
        let states: Vec<&RadioState> = events
            .iter()
            .filter_map(|(_, e)| match e {
                RadioEvent::State(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(states.len(), 1, "down once, not once per retry: {states:?}");
        assert!(
            matches!(states[0], RadioState::Down { reason } if reason.contains("powered off")),
            "{states:?}"
        );
        assert!(checkins(&events).len() <= 2, "no check-ins while down");

        air.set_powered(true);
        let events = events_for(&mut radio, 40_000).await;
        assert!(matches!(
            events.first(),
            Some((_, RadioEvent::State(RadioState::Up)))
        ));
        assert!(!checkins(&events).is_empty(), "check-ins resume");
    }

    #[tokio::test(start_paused = true)]
    async fn tags_without_deliveries_are_polled_for_their_battery() {
        let mut radio = BleRadio::start(BleConfig {
            battery_poll_interval_s: 3600,
            ..fake_config(2)
        })
        .expect("start");
        let events = events_for(&mut radio, 3000).await;
        let batteries: HashMap<&str, Option<u16>> = checkins(&events)
            .into_iter()
            .map(|(_, c)| (c.tag_id.as_str(), c.battery_mv))
            .collect();
        assert_eq!(batteries.len(), 2);
        assert!(batteries.values().all(Option::is_some), "{batteries:?}");
        let air = radio.fake_air().expect("fake");
        assert_eq!(air.connects(), 2, "one poll per tag per hour");
        assert_eq!(
            air.displayed(&fake_address(0)),
            None,
            "a poll shows nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_radio_stops_its_driver_and_sessions() {
        let mut radio = BleRadio::start(BleConfig {
            retries: 0,
            ..fake_config(1)
        })
        .expect("start");
        let air = radio.fake_air().expect("fake").clone();
        radio
            .deliver(delivery(&fake_address(0), "t1"))
            .await
            .expect("deliver");
        // Let the session open its link, then drop the radio mid-session.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(air.open_links(), 1);
        drop(radio);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(air.open_links(), 0, "the aborted session closed its link");
    }

    #[test]
    fn config_rules_name_their_keys() {
        let cases: Vec<(BleConfig, &str)> = vec![
            (
                BleConfig {
                    reconfigure_after_s: UNASSOCIATED_FALLBACK_S,
                    ..BleConfig::default()
                },
                "radio.ble.reconfigure_after_s",
            ),
            (
                BleConfig {
                    update_complete_timeout_ms: 0,
                    ..BleConfig::default()
                },
                "radio.ble.update_complete_timeout_ms",
            ),
            (
                BleConfig {
                    chunk_size: 508,
                    ..BleConfig::default()
                },
                "radio.ble.chunk_size",
            ),
            (
                BleConfig {
                    max_connections: 0,
                    ..BleConfig::default()
                },
                "radio.ble.max_connections",
            ),
            (
                BleConfig {
                    tags: vec!["C0:11:22:33:44".to_owned()],
                    ..BleConfig::default()
                },
                "radio.ble.tags",
            ),
            (
                BleConfig {
                    addresses: BTreeMap::from([(
                        "C0:11:22:33:44:55".to_owned(),
                        AddressConfig {
                            group_id: 128,
                            esl_id: 1,
                        },
                    )]),
                    ..BleConfig::default()
                },
                "radio.ble.addresses",
            ),
            (
                BleConfig {
                    addresses: BTreeMap::from([
                        (
                            "C0:11:22:33:44:55".to_owned(),
                            AddressConfig {
                                group_id: 1,
                                esl_id: 1,
                            },
                        ),
                        (
                            "C0:11:22:33:44:56".to_owned(),
                            AddressConfig {
                                group_id: 1,
                                esl_id: 1,
                            },
                        ),
                    ]),
                    ..BleConfig::default()
                },
                "radio.ble.addresses",
            ),
            (
                BleConfig {
                    battery_empty_mv: 3000,
                    ..BleConfig::default()
                },
                "radio.ble.battery_full_mv",
            ),
            (
                BleConfig {
                    response_timeout_ms: 0,
                    ..BleConfig::default()
                },
                "radio.ble.response_timeout_ms",
            ),
            (
                BleConfig {
                    retries: 11,
                    ..BleConfig::default()
                },
                "radio.ble.retries",
            ),
        ];
        for (cfg, key) in cases {
            let error = cfg.validate().expect_err(key);
            assert_eq!(error.key, key, "{error}");
        }
        BleConfig::default().validate().expect("defaults are valid");
    }

    #[test]
    fn worst_case_attempt_adds_sessions_and_backoffs() {
        let cfg = BleConfig {
            session_timeout_ms: 10_000,
            retries: 2,
            retry_backoff_ms: 500,
            ..BleConfig::default()
        };
        assert_eq!(cfg.worst_case_attempt(), Duration::from_millis(31_500));
        // Defaults fit the engine's default 30 s delivery timeout.
        assert!(BleConfig::default().worst_case_attempt() < Duration::from_secs(30));
    }

    #[test]
    fn addresses_are_configured_or_derived_stably() {
        let cfg = BleConfig {
            addresses: BTreeMap::from([(
                "C0:11:22:33:44:55".to_owned(),
                AddressConfig {
                    group_id: 3,
                    esl_id: 9,
                },
            )]),
            ..BleConfig::default()
        };
        assert_eq!(
            cfg.address_for("C0:11:22:33:44:55"),
            EslAddress::new(3, 9).unwrap()
        );
        let derived = cfg.address_for("C0:11:22:33:44:66");
        assert_eq!(derived, derived_address("C0:11:22:33:44:66"));
        assert_ne!(derived.esl_id(), codec::BROADCAST_ESL_ID);
        // Different tags mostly get different addresses.
        let distinct: HashSet<EslAddress> = (0..200)
            .map(|i| derived_address(&fake_address(i)))
            .collect();
        assert!(distinct.len() > 190, "{}", distinct.len());
    }

    #[test]
    fn bluetooth_addresses() {
        assert!(is_bluetooth_address("C0:11:22:33:44:55"));
        for bad in [
            "c0:11:22:33:44:55",
            "C0:11:22:33:44",
            "C0-11-22-33-44-55",
            "C0:11:22:33:44:5G",
            "",
        ] {
            assert!(!is_bluetooth_address(bad), "{bad}");
        }
    }

    #[cfg(not(any(feature = "ble", feature = "ble-bluez")))]
    #[tokio::test]
    async fn without_the_feature_a_real_adapter_is_a_clear_error() {
        let error = BleRadio::start(BleConfig::default())
            .err()
            .expect("no btleplug in this build");
        assert!(matches!(error, BleError::NotBuilt));
        assert!(error.to_string().contains("--features ble"), "{error}");
    }

    /// The btleplug glue's one path testable without a controller: no
    /// system D-Bus, no bluetoothd or no adapter makes the radio report
    /// itself down, and deliveries fail retryably instead of hanging.
    #[cfg(any(feature = "ble", feature = "ble-bluez"))]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_controller_the_radio_is_down_and_deliveries_fail_retryably() {
        let controllers = std::fs::read_dir("/sys/class/bluetooth").map_or(0, |d| d.count());
        if controllers > 0 {
            eprintln!("this machine has a Bluetooth controller: nothing to check here");
            return;
        }
        let mut radio = BleRadio::start(BleConfig::default()).expect("start");
        let event = tokio::time::timeout(Duration::from_secs(20), radio.next_event())
            .await
            .expect("an event within 20 s")
            .expect("radio open");
        let RadioEvent::State(RadioState::Down { reason }) = event else {
            panic!("expected the radio down, got {event:?}");
        };
        eprintln!("radio down: {reason}");
        assert!(
            reason.starts_with("Bluetooth adapter unavailable"),
            "{reason}"
        );
        radio
            .deliver(delivery("C0:11:22:33:44:55", "t1"))
            .await
            .expect("deliver");
        let (_, outcome) = next_outcome(&mut radio).await;
        let failure = outcome.result.expect_err("no adapter");
        assert!(failure.retryable, "{failure:?}");
        // btleplug: "… not scanning"; bluer opens the adapter and says why
        // it cannot.
        assert!(
            failure
                .reason
                .starts_with("BLE connect: Bluetooth adapter unavailable: "),
            "{}",
            failure.reason
        );
    }
}
