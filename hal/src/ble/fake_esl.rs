//! Fake ESL tags on a fake adapter: a [`Central`] whose tags behave like ESL
//! Service peripherals with the vendor content characteristic, so the whole
//! BLE radio (driver, sessions, codec) runs without a Bluetooth controller.
//!
//! Owns: the fake tags' state (address, stored images, what they display,
//! battery, signal), their advertising schedule, the fake adapter's power,
//! and the optional display journal (only this module opens that file).
//! Must not: be used for anything but tests and demos (`[radio.ble.fake]`);
//! it checks the AP's side of the protocol, it is not a reference tag.
//!
//! What a fake tag does: advertises the ESL Service (0x1857) every
//! `adv_interval_ms` (±20 %); accepts one link at a time; starts
//! Unassociated (no ESL address, no keys). It becomes configured only when
//! an AP wrote ESL Address, AP Sync Key Material (24 bytes), ESL Response
//! Key Material (24 bytes) and Current Absolute Time (4 bytes) and then sent
//! Update Complete; a link that ends before that sends it back to
//! Unassociated, which forgets its address and keys, deletes its images and
//! blanks the display (Nordic's `esl.c`: link loss while configuring, and
//! `bt_esl_unassociate`). A configured tag that gets no session for 60
//! minutes falls back to Unassociated too (ESL Service Unsynchronized state;
//! the fake never synchronises, as this radio cannot send PAwR). It answers
//! a command for another ESL ID, or any command while it has no address,
//! with Invalid Parameter(s) (both public tags do: Nordic `esl.c`, Silicon
//! Labs `esl_tag_opcodes.c`); stores content sent over the vendor
//! characteristic only when length and CRC-32 match; answers Display Image
//! with Display State when it holds the image, Read Sensor Data 0 with its
//! Present Input Voltage (1/64 V, as its Sensor Information says), Ping and
//! Update Complete with its Basic State, and everything it does not know
//! with an Error response. One more device advertises a non-ESL service, so
//! the radio's own filtering is exercised.
//!
//! Knobs for failure tests: `offline` tags neither advertise nor connect,
//! `corrupt` tags flip a bit of every transfer (the integrity check fails),
//! `connect_fail_rate` refuses that share of connections, and
//! [`FakeAir::set_powered`] takes the adapter away.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::distributions::Bernoulli;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::{sleep, sleep_until, Instant};
use uuid::Uuid;

use super::codec::{
    uuid16, BasicState, Command, ErrorCode, EslAddress, Response, BATTERY_LEVEL_CHARACTERISTIC,
    CONTROL_POINT_CHARACTERISTIC, ESL_ADDRESS_CHARACTERISTIC, ESL_SERVICE,
};
use super::content::{decode_frame, ContentStatus, Frame, TransferState};
use super::ots::{
    self, OacpRequest, OacpResponse, OacpResult, OlcpResult, OACP_CHARACTERISTIC,
    OBJECT_ID_CHARACTERISTIC, OBJECT_SIZE_CHARACTERISTIC, OLCP_CHARACTERISTIC, OTS_PSM,
};
use super::provision::{
    encode_displays, encode_leds, encode_sensors, DisplayInfo, DisplayType, LedType, SensorType,
    TagInfo, ABSOLUTE_TIME_CHARACTERISTIC, AP_SYNC_KEY_CHARACTERISTIC, DISPLAY_INFO_CHARACTERISTIC,
    IMAGE_INFO_CHARACTERISTIC, KEY_MATERIAL_LEN, LED_INFO_CHARACTERISTIC, PRESENT_INPUT_VOLTAGE,
    RESPONSE_KEY_CHARACTERISTIC, SENSOR_INFO_CHARACTERISTIC,
};
use super::transport::{
    Advertisement, Central, GattError, Link, Notification, ObjectChannel, Pairing, Scan,
};
use super::UNASSOCIATED_FALLBACK_S;

/// Address of the one non-ESL device on the fake air.
pub const STRANGER_ADDRESS: &str = "F0:FF:FF:FF:FF:FF";
/// Heart Rate service: what the stranger advertises.
const STRANGER_SERVICE: u16 = 0x180D;
/// Heart Rate Measurement: the stranger's only characteristic.
const STRANGER_CHARACTERISTIC: u16 = 0x2A37;
/// Most fake tags: addresses have three bytes for the index.
pub const MAX_FAKE_TAGS: u32 = 1 << 24;
/// The sensor index that reports the battery (Present Input Voltage).
pub const BATTERY_SENSOR: u8 = 0;
/// Largest image index of a fake tag: two image slots.
pub const MAX_IMAGE_INDEX: u8 = 1;

/// What every fake tag says about itself in its Information
/// characteristics: one 2.9" black/white display, two image slots, a
/// voltage sensor, one RGB LED.
pub fn fake_tag_info() -> TagInfo {
    TagInfo {
        displays: vec![DisplayInfo {
            width: 296,
            height: 128,
            display_type: DisplayType::BlackWhite,
        }],
        max_image_index: Some(MAX_IMAGE_INDEX),
        sensors: vec![SensorType::MeshProperty(PRESENT_INPUT_VOLTAGE)],
        leds: vec![LedType::Srgb { color: 0x3F }],
    }
}
/// Battery drain per displayed image.
const MV_PER_UPDATE: u16 = 2;
/// Battery Level 0 % and 100 % of the fake coin cell.
const EMPTY_MV: u16 = 2000;
const FULL_MV: u16 = 3000;

/// `[radio.ble.fake]`: fake tags instead of a Bluetooth controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeConfig {
    /// Number of fake tags; addresses `F0:00:00:00:00:00`, `…:01`, …
    pub tags: u32,
    /// Mean time between two advertisements of one tag (±20 %).
    pub adv_interval_ms: u64,
    /// Time each GATT operation takes.
    pub latency_ms: u64,
    /// Share of connection attempts refused.
    pub connect_fail_rate: f64,
    /// Tags that never advertise and cannot be reached.
    pub offline: Vec<String>,
    /// Tags that flip a bit of every content transfer.
    pub corrupt: Vec<String>,
    /// Stock tags: Object Transfer Service only, no vendor content
    /// characteristic (the others have both).
    pub ots_only: Vec<String>,
    /// Tags that behave like Silicon Labs' ESL tag where it differs from
    /// Nordic's (the others): no response to a successful Update Complete,
    /// Invalid State to an Update Complete before configuration.
    pub silabs: Vec<String>,
    /// RNG seed, so runs repeat.
    pub seed: u64,
    /// One JSON line per image a tag displays: `{"tag_id","content_hash","at"}`.
    pub journal: Option<PathBuf>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            tags: 4,
            adv_interval_ms: 1000,
            latency_ms: 2,
            connect_fail_rate: 0.0,
            offline: Vec::new(),
            corrupt: Vec::new(),
            silabs: Vec::new(),
            ots_only: Vec::new(),
            seed: 1,
            journal: None,
        }
    }
}

/// Bytes an image object of a fake tag can hold: one full-screen image.
fn object_capacity() -> usize {
    fake_tag_info().displays[0].image_bytes().unwrap_or(0)
}

/// What [`FakeAir::displayed`] reports for an image written through OTS.
pub fn ots_hash(bitmap: &[u8]) -> String {
    format!("ots-crc32-{:08X}", crc32fast::hash(bitmap))
}

/// Address of fake tag `index`.
pub fn fake_address(index: u32) -> String {
    let [_, a, b, c] = index.to_be_bytes();
    format!("F0:00:00:{a:02X}:{b:02X}:{c:02X}")
}

/// Why the fake air could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("invalid radio.ble.fake.{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("fake BLE journal {}: {error}", path.display())]
    Journal {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Whose public tag implementation a fake tag follows where the two differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// nRF Connect SDK `subsys/bluetooth/services/esl/esl.c`: Update
    /// Complete is always answered with the Basic State.
    Nordic,
    /// Gecko SDK `app/bluetooth/common/esl_tag_core/src/esl_tag_opcodes.c`:
    /// a successful Update Complete builds no response; before the tag is
    /// configured it is answered with Invalid State.
    SiliconLabs,
}

/// An accepted OACP Write waiting for its bytes on the channel.
#[derive(Debug)]
struct WriteOp {
    image_index: u8,
    offset: usize,
    length: usize,
    received: Vec<u8>,
}

/// What an AP has written while configuring the tag.
#[derive(Debug, Default, Clone)]
struct Provisioned {
    ap_sync_key: Option<Vec<u8>>,
    response_key: Option<Vec<u8>>,
    absolute_time: Option<Vec<u8>>,
}

/// One fake peripheral.
#[derive(Debug)]
struct FakeTag {
    address: String,
    /// False for the stranger.
    esl: bool,
    /// None while Unassociated.
    esl_address: Option<EslAddress>,
    provisioned: Provisioned,
    /// Configured: all four writes and Update Complete happened.
    configured: bool,
    /// When the last link to a configured tag ended: its fall-back timer.
    idle_since: Option<Instant>,
    /// The tag side's bond (one AP at a time).
    bond: Option<u64>,
    offline: bool,
    corrupt: bool,
    vendor: Vendor,
    base_rssi: i16,
    battery_mv: u16,
    /// The transfer in progress: its header and the bytes so far.
    receiving: Option<(super::content::Begin, Vec<u8>)>,
    status: ContentStatus,
    /// Stored images: index → (hash, bytes). An image written through OTS
    /// is object 0x100 + index; its "hash" is `ots-crc32-XXXXXXXX`.
    images: HashMap<u8, (String, Vec<u8>)>,
    /// Has the vendor content characteristic (besides OTS).
    vendor_content: bool,
    /// OTS state of the current link: the selected image object, whether
    /// the object channel is open, the OACP Write in progress.
    ots_selected: Option<u8>,
    channel_open: bool,
    write_op: Option<WriteOp>,
    /// (image index, hash) on the e-paper.
    displayed: Option<(u8, String)>,
    linked: bool,
}

struct World {
    tags: Vec<FakeTag>,
    index: HashMap<String, usize>,
    powered: bool,
    rng: SmallRng,
    connect_fail: Bernoulli,
    active_links: usize,
    max_active_links: usize,
    connects: u64,
    journal: Option<(PathBuf, File)>,
    /// The AP side's bonds: tag address → bond id.
    ap_bonds: HashMap<String, u64>,
    next_bond: u64,
}

/// The fake adapter and the tags around it. Clones share everything.
#[derive(Clone)]
pub struct FakeAir {
    world: Arc<Mutex<World>>,
    content_characteristic: Uuid,
    latency: Duration,
    adv_interval_ms: u64,
    seed: u64,
}

impl FakeAir {
    /// Builds `cfg.tags` tags that store content on `content_characteristic`
    /// and start out with the ESL address `address_of` gives them.
    pub fn new(cfg: &FakeConfig, content_characteristic: Uuid) -> Result<FakeAir, FakeError> {
        let invalid = |key, reason: String| FakeError::Invalid { key, reason };
        if cfg.tags > MAX_FAKE_TAGS {
            return Err(invalid("tags", format!("at most {MAX_FAKE_TAGS}")));
        }
        if cfg.adv_interval_ms == 0 {
            return Err(invalid("adv_interval_ms", "must be at least 1".to_owned()));
        }
        let connect_fail = Bernoulli::new(cfg.connect_fail_rate).map_err(|_| {
            invalid(
                "connect_fail_rate",
                format!("{} is not a probability in [0, 1]", cfg.connect_fail_rate),
            )
        })?;
        let journal = match &cfg.journal {
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|error| FakeError::Journal {
                        path: path.clone(),
                        error,
                    })?;
                Some((path.clone(), file))
            }
            None => None,
        };
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let mut tags: Vec<FakeTag> = (0..cfg.tags)
            .map(|i| {
                let address = fake_address(i);
                let mut tag = FakeTag::new(rng.gen_range(-90..=-40), rng.gen_range(2950..=3050));
                tag.offline = cfg.offline.contains(&address);
                tag.corrupt = cfg.corrupt.contains(&address);
                tag.vendor_content = !cfg.ots_only.contains(&address);
                if cfg.silabs.contains(&address) {
                    tag.vendor = Vendor::SiliconLabs;
                }
                tag.address = address;
                tag
            })
            .collect();
        // The stranger: its ESL address is never used.
        let mut stranger = FakeTag::new(-60, FULL_MV);
        stranger.esl = false;
        stranger.address = STRANGER_ADDRESS.to_owned();
        tags.push(stranger);
        let index = tags
            .iter()
            .enumerate()
            .map(|(i, t)| (t.address.clone(), i))
            .collect();
        Ok(FakeAir {
            world: Arc::new(Mutex::new(World {
                tags,
                index,
                powered: true,
                rng,
                connect_fail,
                active_links: 0,
                max_active_links: 0,
                connects: 0,
                journal,
                ap_bonds: HashMap::new(),
                next_bond: 1,
            })),
            content_characteristic,
            latency: Duration::from_millis(cfg.latency_ms),
            adv_interval_ms: cfg.adv_interval_ms,
            seed: cfg.seed,
        })
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        // Nothing panics while holding the lock; if it did, the state is
        // still the best there is.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fake tags' addresses (the stranger is not a tag).
    pub fn tag_ids(&self) -> Vec<String> {
        let world = self.lock();
        world
            .tags
            .iter()
            .filter(|t| t.esl)
            .map(|t| t.address.clone())
            .collect()
    }

    /// Hash of what `tag` displays.
    pub fn displayed(&self, tag: &str) -> Option<String> {
        let mut world = self.lock();
        let i = *world.index.get(tag)?;
        let tag = &mut world.tags[i];
        tag.settle(Instant::now());
        tag.displayed.as_ref().map(|(_, h)| h.clone())
    }

    /// The ESL address `tag` has now (none while Unassociated).
    pub fn esl_address(&self, tag: &str) -> Option<EslAddress> {
        let mut world = self.lock();
        let i = *world.index.get(tag)?;
        let tag = &mut world.tags[i];
        tag.settle(Instant::now());
        tag.esl_address
    }

    /// Whether `tag` is configured now (not Unassociated).
    pub fn configured(&self, tag: &str) -> bool {
        let mut world = self.lock();
        let Some(&i) = world.index.get(tag) else {
            return false;
        };
        let tag = &mut world.tags[i];
        tag.settle(Instant::now());
        tag.configured
    }

    /// The AP Sync and Response Key material `tag` was given (test
    /// support: a real tag never reveals it).
    pub fn keys(&self, tag: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let world = self.lock();
        let p = &world.tags[*world.index.get(tag)?].provisioned;
        Some((p.ap_sync_key.clone()?, p.response_key.clone()?))
    }

    /// Sends `tag` back to Unassociated, as its own 60-minute fall-back or
    /// an Unassociate command from another AP would.
    pub fn unassociate(&self, tag: &str) {
        let mut world = self.lock();
        if let Some(&i) = world.index.get(tag) {
            world.tags[i].unassociate();
        }
    }

    pub fn battery_mv(&self, tag: &str) -> Option<u16> {
        let world = self.lock();
        world.index.get(tag).map(|&i| world.tags[i].battery_mv)
    }

    /// Most links open at the same time so far.
    pub fn max_concurrent_links(&self) -> usize {
        self.lock().max_active_links
    }

    /// Links open now.
    pub fn open_links(&self) -> usize {
        self.lock().active_links
    }

    /// Connection attempts so far (refused ones included).
    pub fn connects(&self) -> u64 {
        self.lock().connects
    }

    /// Switches the adapter on or off (off: scans end, links drop).
    pub fn set_powered(&self, on: bool) {
        self.lock().powered = on;
    }

    pub fn set_offline(&self, tag: &str, offline: bool) {
        let mut world = self.lock();
        if let Some(&i) = world.index.get(tag) {
            world.tags[i].offline = offline;
        }
    }

    pub fn set_corrupt(&self, tag: &str, corrupt: bool) {
        let mut world = self.lock();
        if let Some(&i) = world.index.get(tag) {
            world.tags[i].corrupt = corrupt;
        }
    }
}

impl Central for FakeAir {
    type Scan = FakeScan;
    type Link = FakeLink;

    async fn remove_bond(&self, address: &str) -> Result<(), GattError> {
        self.lock().ap_bonds.remove(address);
        Ok(())
    }

    async fn scan(&self) -> Result<FakeScan, GattError> {
        let world = self.lock();
        if !world.powered {
            return Err(GattError::Adapter("fake adapter powered off".to_owned()));
        }
        let mut rng = SmallRng::seed_from_u64(self.seed ^ 0x5CA7);
        let now = Instant::now();
        let adverts = (0..world.tags.len())
            .map(|i| {
                let first = Duration::from_millis(rng.gen_range(0..self.adv_interval_ms));
                Reverse((now + first, i))
            })
            .collect();
        Ok(FakeScan {
            air: self.clone(),
            adverts,
            rng,
        })
    }

    async fn connect(&self, address: &str) -> Result<FakeLink, GattError> {
        sleep(self.latency).await;
        let mut world = self.lock();
        let world = &mut *world;
        world.connects += 1;
        if !world.powered {
            return Err(GattError::Adapter("fake adapter powered off".to_owned()));
        }
        let Some(&i) = world.index.get(address) else {
            return Err(GattError::UnknownPeer(address.to_owned()));
        };
        if world.tags[i].offline {
            return Err(GattError::Failed(
                "le-connection-abort-by-local (tag out of range)".to_owned(),
            ));
        }
        if world.rng.sample(world.connect_fail) {
            return Err(GattError::Failed(
                "le-connection-abort-by-local (fake refusal)".to_owned(),
            ));
        }
        let tag = &mut world.tags[i];
        if tag.linked {
            return Err(GattError::Failed("tag already connected".to_owned()));
        }
        tag.linked = true;
        world.active_links += 1;
        world.max_active_links = world.max_active_links.max(world.active_links);
        Ok(FakeLink {
            air: self.clone(),
            index: i,
            open: true,
            encrypted: false,
            subscribed: Vec::new(),
            notifications: VecDeque::new(),
        })
    }
}

/// Advertisements of every fake device, in time order.
pub struct FakeScan {
    air: FakeAir,
    adverts: BinaryHeap<Reverse<(Instant, usize)>>,
    rng: SmallRng,
}

impl Scan for FakeScan {
    async fn next(&mut self) -> Result<Advertisement, GattError> {
        loop {
            // There is always the stranger, so the heap is never empty.
            let Some(&Reverse((due, i))) = self.adverts.peek() else {
                return std::future::pending().await;
            };
            // Cancel-safe: nothing changes before the sleep ends.
            sleep_until(due).await;
            self.adverts.pop();
            let jitter = self.air.adv_interval_ms / 5;
            let gap = self.air.adv_interval_ms - jitter + self.rng.gen_range(0..=2 * jitter);
            self.adverts
                .push(Reverse((due + Duration::from_millis(gap), i)));
            let noise = self.rng.gen_range(-3..=3);
            let world = self.air.lock();
            if !world.powered {
                return Err(GattError::Adapter("fake adapter powered off".to_owned()));
            }
            let tag = &world.tags[i];
            if tag.offline {
                continue;
            }
            let service = if tag.esl {
                ESL_SERVICE
            } else {
                STRANGER_SERVICE
            };
            return Ok(Advertisement {
                address: tag.address.clone(),
                rssi: Some(tag.base_rssi + noise),
                services: vec![uuid16(service)],
            });
        }
    }
}

/// A link to one fake tag.
pub struct FakeLink {
    air: FakeAir,
    index: usize,
    open: bool,
    /// Characteristics whose notifications / indications are on.
    subscribed: Vec<Uuid>,
    /// [`Link::pair`] succeeded on this link.
    encrypted: bool,
    notifications: VecDeque<Notification>,
}

impl FakeLink {
    /// Waits the operation's latency, then runs `op` on the tag unless the
    /// link or the adapter is gone.
    async fn with_tag<T>(
        &mut self,
        op: impl FnOnce(&mut FakeTag, &mut Option<(PathBuf, File)>) -> Result<T, GattError>,
    ) -> Result<T, GattError> {
        sleep(self.air.latency).await;
        if !self.open {
            return Err(GattError::Disconnected);
        }
        let air = self.air.clone();
        let mut world = air.lock();
        if !world.powered {
            drop(world);
            self.close();
            return Err(GattError::Disconnected);
        }
        let world = &mut *world;
        let tag = &mut world.tags[self.index];
        tag.settle(Instant::now());
        op(tag, &mut world.journal)
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            let mut world = self.air.lock();
            let tag = &mut world.tags[self.index];
            tag.linked = false;
            tag.link_ended(Instant::now());
            world.active_links -= 1;
        }
    }
}

impl Drop for FakeLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// The OTS object channel of one fake link.
pub struct FakeChannel {
    air: FakeAir,
    index: usize,
    open: bool,
}

impl ObjectChannel for FakeChannel {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), GattError> {
        sleep(self.air.latency).await;
        let mut world = self.air.lock();
        let tag = &mut world.tags[self.index];
        if !self.open || !tag.channel_open {
            return Err(GattError::Disconnected);
        }
        tag.receive_object(bytes)
    }

    async fn close(&mut self) -> Result<(), GattError> {
        if std::mem::take(&mut self.open) {
            let mut world = self.air.lock();
            let tag = &mut world.tags[self.index];
            tag.channel_open = false;
            // The OTS server aborts a write whose channel closed.
            tag.write_op = None;
        }
        Ok(())
    }
}

/// Whether a characteristic needs an encrypted link: every ESL and OTS
/// characteristic (Nordic's ESL service requires encryption by default,
/// `BT_ESL_DEFAULT_PERM_RW_ENCRYPT`).
fn protected(characteristic: Uuid) -> bool {
    let esl = (ESL_ADDRESS_CHARACTERISTIC..=CONTROL_POINT_CHARACTERISTIC).map(uuid16);
    let ots = [
        OACP_CHARACTERISTIC,
        OLCP_CHARACTERISTIC,
        OBJECT_ID_CHARACTERISTIC,
        OBJECT_SIZE_CHARACTERISTIC,
    ]
    .map(uuid16);
    esl.chain(ots).any(|c| c == characteristic)
}

impl FakeLink {
    /// Insufficient Encryption for a protected characteristic on a plain
    /// link.
    fn require_encryption(&self, characteristic: Uuid) -> Result<(), GattError> {
        if protected(characteristic) && !self.encrypted {
            return Err(GattError::NotEncrypted);
        }
        Ok(())
    }
}

impl Link for FakeLink {
    type Channel = FakeChannel;

    async fn pair(&mut self) -> Result<Pairing, GattError> {
        sleep(self.air.latency).await;
        let mut world = self.air.lock();
        let world = &mut *world;
        let tag = &mut world.tags[self.index];
        let address = tag.address.clone();
        let pairing = match world.ap_bonds.get(&address) {
            Some(&bond) if tag.bond == Some(bond) => Pairing::Existing,
            // We have a bond, the tag has not: encryption fails.
            Some(_) => return Err(GattError::BondLost),
            None => {
                let bond = world.next_bond;
                world.next_bond += 1;
                world.ap_bonds.insert(address, bond);
                tag.bond = Some(bond);
                Pairing::New
            }
        };
        self.encrypted = true;
        Ok(pairing)
    }

    async fn open_channel(&mut self, psm: u16) -> Result<FakeChannel, GattError> {
        self.with_tag(|tag, _| {
            if !tag.esl || psm != OTS_PSM {
                return Err(GattError::Failed(format!(
                    "L2CAP connection refused: PSM 0x{psm:04X} not supported"
                )));
            }
            tag.channel_open = true;
            Ok(())
        })
        .await?;
        Ok(FakeChannel {
            air: self.air.clone(),
            index: self.index,
            open: true,
        })
    }

    async fn discover(&mut self) -> Result<Vec<Uuid>, GattError> {
        let content = self.air.content_characteristic;
        self.with_tag(|tag, _| {
            Ok(if tag.esl {
                vec![
                    uuid16(ESL_ADDRESS_CHARACTERISTIC),
                    uuid16(AP_SYNC_KEY_CHARACTERISTIC),
                    uuid16(RESPONSE_KEY_CHARACTERISTIC),
                    uuid16(ABSOLUTE_TIME_CHARACTERISTIC),
                    uuid16(DISPLAY_INFO_CHARACTERISTIC),
                    uuid16(IMAGE_INFO_CHARACTERISTIC),
                    uuid16(SENSOR_INFO_CHARACTERISTIC),
                    uuid16(LED_INFO_CHARACTERISTIC),
                    uuid16(CONTROL_POINT_CHARACTERISTIC),
                    uuid16(OACP_CHARACTERISTIC),
                    uuid16(OLCP_CHARACTERISTIC),
                    uuid16(OBJECT_ID_CHARACTERISTIC),
                    uuid16(OBJECT_SIZE_CHARACTERISTIC),
                    uuid16(BATTERY_LEVEL_CHARACTERISTIC),
                ]
                .into_iter()
                .chain(tag.vendor_content.then_some(content))
                .collect()
            } else {
                vec![uuid16(STRANGER_CHARACTERISTIC)]
            })
        })
        .await
    }

    async fn subscribe(&mut self, characteristic: Uuid) -> Result<(), GattError> {
        self.require_encryption(characteristic)?;
        self.with_tag(|tag, _| {
            let indicating = [
                CONTROL_POINT_CHARACTERISTIC,
                OACP_CHARACTERISTIC,
                OLCP_CHARACTERISTIC,
            ];
            if tag.esl && indicating.map(uuid16).contains(&characteristic) {
                Ok(())
            } else {
                Err(GattError::Failed(
                    "characteristic does not notify".to_owned(),
                ))
            }
        })
        .await?;
        self.subscribed.push(characteristic);
        Ok(())
    }

    async fn write(&mut self, characteristic: Uuid, value: &[u8]) -> Result<(), GattError> {
        self.require_encryption(characteristic)?;
        let content = self.air.content_characteristic;
        let indications_on = self.subscribed.contains(&characteristic);
        let response = self
            .with_tag(|tag, journal| {
                if !tag.esl {
                    Err(att_error("no such characteristic"))
                } else if characteristic == uuid16(CONTROL_POINT_CHARACTERISTIC) {
                    // Responses the fake builds are valid by construction.
                    tag.command(value, journal)
                        .map(|r| r.encode().map_err(|e| GattError::Failed(e.to_string())))
                        .transpose()
                } else if characteristic == uuid16(OACP_CHARACTERISTIC)
                    || characteristic == uuid16(OLCP_CHARACTERISTIC)
                {
                    if !indications_on {
                        // An OTS server refuses control point writes whose
                        // indications are off.
                        return Err(att_error(
                            "Client Characteristic Configuration improperly configured",
                        ));
                    }
                    if characteristic == uuid16(OACP_CHARACTERISTIC) {
                        Ok(Some(tag.oacp(value)))
                    } else {
                        tag.olcp(value).map(Some)
                    }
                } else if tag.vendor_content && characteristic == content {
                    tag.receive(value).map(|()| None)
                } else if characteristic == uuid16(ESL_ADDRESS_CHARACTERISTIC) {
                    tag.esl_address = Some(
                        EslAddress::decode(value)
                            .map_err(|e| att_error(&format!("bad ESL Address: {e}")))?,
                    );
                    Ok(None)
                } else if let Some(slot) = tag.provisioning_slot(characteristic) {
                    let len = if characteristic == uuid16(ABSOLUTE_TIME_CHARACTERISTIC) {
                        4
                    } else {
                        KEY_MATERIAL_LEN
                    };
                    if value.len() != len {
                        return Err(att_error("invalid attribute value length"));
                    }
                    *slot = Some(value.to_vec());
                    Ok(None)
                } else {
                    Err(att_error("characteristic not writable"))
                }
            })
            .await?;
        if let (Some(value), true) = (response, indications_on) {
            self.notifications.push_back(Notification {
                characteristic,
                value,
            });
        }
        Ok(())
    }

    async fn read(&mut self, characteristic: Uuid) -> Result<Vec<u8>, GattError> {
        self.require_encryption(characteristic)?;
        let content = self.air.content_characteristic;
        self.with_tag(|tag, _| {
            if tag.esl && tag.vendor_content && characteristic == content {
                tag.status
                    .encode()
                    .map_err(|e| GattError::Failed(e.to_string()))
            } else if let Some(value) = tag.info_value(characteristic) {
                Ok(value)
            } else if tag.esl && characteristic == uuid16(OBJECT_SIZE_CHARACTERISTIC) {
                let index = tag
                    .ots_selected
                    .ok_or_else(|| att_error("no object selected"))?;
                let current = tag.images.get(&index).map_or(0, |(_, b)| b.len());
                Ok(ots::encode_object_size(
                    current as u32,
                    object_capacity() as u32,
                ))
            } else if tag.esl && characteristic == uuid16(OBJECT_ID_CHARACTERISTIC) {
                let index = tag
                    .ots_selected
                    .ok_or_else(|| att_error("no object selected"))?;
                Ok(ots::image_object_id(index).to_le_bytes()[..6].to_vec())
            } else if tag.esl && characteristic == uuid16(BATTERY_LEVEL_CHARACTERISTIC) {
                let above = tag.battery_mv.saturating_sub(EMPTY_MV);
                let percent = (u32::from(above) * 100 / u32::from(FULL_MV - EMPTY_MV)).min(100);
                Ok(vec![percent as u8])
            } else {
                Err(att_error("characteristic not readable"))
            }
        })
        .await
    }

    async fn notification(&mut self) -> Result<Notification, GattError> {
        match self.notifications.pop_front() {
            Some(n) => Ok(n),
            // Nothing to say: a real tag stays silent too.
            None => std::future::pending().await,
        }
    }

    async fn disconnect(&mut self) -> Result<(), GattError> {
        sleep(self.air.latency).await;
        self.close();
        Ok(())
    }
}

fn att_error(what: &str) -> GattError {
    GattError::Failed(format!("ATT error: {what}"))
}

impl FakeTag {
    /// An unassociated ESL tag showing nothing yet, not linked.
    fn new(base_rssi: i16, battery_mv: u16) -> FakeTag {
        FakeTag {
            address: String::new(),
            esl: true,
            esl_address: None,
            provisioned: Provisioned::default(),
            configured: false,
            idle_since: None,
            bond: None,
            offline: false,
            corrupt: false,
            vendor: Vendor::Nordic,
            base_rssi,
            battery_mv,
            receiving: None,
            status: ContentStatus {
                state: TransferState::Idle,
                image_index: 0,
                received: 0,
                crc32: 0,
                content_hash: String::new(),
            },
            images: HashMap::new(),
            vendor_content: true,
            ots_selected: None,
            channel_open: false,
            write_op: None,
            displayed: None,
            linked: false,
        }
    }

    fn basic_state(&self) -> BasicState {
        // Never synchronised: this radio sends no PAwR.
        BasicState(0)
    }

    /// The configuring write this characteristic records, if it is one.
    fn provisioning_slot(&mut self, characteristic: Uuid) -> Option<&mut Option<Vec<u8>>> {
        if !self.esl {
            return None;
        }
        let p = &mut self.provisioned;
        [
            (AP_SYNC_KEY_CHARACTERISTIC, &mut p.ap_sync_key),
            (RESPONSE_KEY_CHARACTERISTIC, &mut p.response_key),
            (ABSOLUTE_TIME_CHARACTERISTIC, &mut p.absolute_time),
        ]
        .into_iter()
        .find(|(short, _)| uuid16(*short) == characteristic)
        .map(|(_, slot)| slot)
    }

    /// The value of an Information characteristic.
    fn info_value(&self, characteristic: Uuid) -> Option<Vec<u8>> {
        if !self.esl {
            return None;
        }
        let info = fake_tag_info();
        let short = [
            DISPLAY_INFO_CHARACTERISTIC,
            IMAGE_INFO_CHARACTERISTIC,
            SENSOR_INFO_CHARACTERISTIC,
            LED_INFO_CHARACTERISTIC,
        ]
        .into_iter()
        .find(|s| uuid16(*s) == characteristic)?;
        Some(match short {
            DISPLAY_INFO_CHARACTERISTIC => encode_displays(&info.displays),
            IMAGE_INFO_CHARACTERISTIC => vec![MAX_IMAGE_INDEX],
            SENSOR_INFO_CHARACTERISTIC => encode_sensors(&info.sensors),
            _ => encode_leds(&info.leds),
        })
    }

    /// Whether the ESL Address and all three configuring writes are there.
    fn fully_provisioned(&self) -> bool {
        let p = &self.provisioned;
        self.esl_address.is_some()
            && p.ap_sync_key.is_some()
            && p.response_key.is_some()
            && p.absolute_time.is_some()
    }

    /// Applies the 60-minute fall-back of a configured tag nobody updated.
    fn settle(&mut self, now: Instant) {
        let fallback = Duration::from_secs(UNASSOCIATED_FALLBACK_S);
        if self
            .idle_since
            .is_some_and(|since| now.duration_since(since) >= fallback)
        {
            self.unassociate();
        }
    }

    /// A link ended: an unfinished configuration is lost, a configured tag
    /// starts its fall-back timer.
    fn link_ended(&mut self, now: Instant) {
        self.ots_selected = None;
        self.channel_open = false;
        self.write_op = None;
        if self.configured {
            self.idle_since = Some(now);
        } else if self.esl {
            self.forget_configuration();
        }
    }

    /// Back to the Unassociated state by the 60-minute fall-back or an
    /// Unassociate command: the configuration is gone, and a Nordic tag
    /// deletes its bonds too.
    fn unassociate(&mut self) {
        if self.vendor == Vendor::Nordic {
            // `bt_esl_unassociate` unpairs every peer.
            self.bond = None;
        }
        self.forget_configuration();
    }

    /// Address, keys, images and what is shown are gone; the bond stays
    /// (a link lost while configuring, Nordic's `disconnected()`).
    fn forget_configuration(&mut self) {
        self.esl_address = None;
        self.provisioned = Provisioned::default();
        self.configured = false;
        self.idle_since = None;
        self.images.clear();
        self.displayed = None;
        self.receiving = None;
        self.status = ContentStatus {
            state: TransferState::Idle,
            image_index: 0,
            received: 0,
            crc32: 0,
            content_hash: String::new(),
        };
    }

    /// Handles a Control Point write; `None` when the ESL stays silent.
    fn command(&mut self, bytes: &[u8], journal: &mut Option<(PathBuf, File)>) -> Option<Response> {
        let command = match Command::decode(bytes) {
            Ok(command) => command,
            Err(super::codec::CodecError::UnknownOpcode { .. }) => {
                return Some(Response::Error(ErrorCode::InvalidOpcode))
            }
            Err(_) => return Some(Response::Error(ErrorCode::InvalidParameters)),
        };
        if self.esl_address.map(EslAddress::esl_id) != Some(command.esl_id()) {
            // Another ESL's ID over the Control Point (or no address yet).
            return Some(Response::Error(ErrorCode::InvalidParameters));
        }
        Some(match command {
            Command::Ping { .. } => Response::BasicState(self.basic_state()),
            Command::UpdateComplete { .. } => {
                let complete = self.fully_provisioned();
                if complete {
                    self.configured = true;
                }
                match (self.vendor, complete) {
                    (Vendor::Nordic, _) => Response::BasicState(self.basic_state()),
                    (Vendor::SiliconLabs, true) => return None,
                    (Vendor::SiliconLabs, false) => Response::Error(ErrorCode::InvalidState),
                }
            }
            Command::ReadSensorData { sensor_index, .. } if sensor_index == BATTERY_SENSOR => {
                // GATT Voltage: 1/64 V.
                let raw = (u32::from(self.battery_mv) * 64 / 1000) as u16;
                Response::SensorValue {
                    sensor_index,
                    data: raw.to_le_bytes().to_vec(),
                }
            }
            Command::DisplayImage {
                display_index: 0,
                image_index,
                ..
            } => match self.images.get(&image_index) {
                Some((hash, _)) => {
                    let hash = hash.clone();
                    self.display(image_index, hash, journal);
                    Response::DisplayState {
                        display_index: 0,
                        image_index,
                    }
                }
                None => Response::Error(ErrorCode::ImageNotAvailable),
            },
            Command::RefreshDisplay {
                display_index: 0, ..
            } => match &self.displayed {
                Some((image_index, _)) => Response::DisplayState {
                    display_index: 0,
                    image_index: *image_index,
                },
                None => Response::Error(ErrorCode::ImageNotAvailable),
            },
            Command::LedControl { led_index: 0, .. } => Response::LedState { led_index: 0 },
            Command::ReadSensorData { .. }
            | Command::DisplayImage { .. }
            | Command::RefreshDisplay { .. }
            | Command::LedControl { .. } => Response::Error(ErrorCode::InvalidParameters),
            _ => Response::Error(ErrorCode::InvalidOpcode),
        })
    }

    fn display(&mut self, image_index: u8, hash: String, journal: &mut Option<(PathBuf, File)>) {
        if let Some((path, file)) = journal {
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let line = serde_json::json!({
                "tag_id": self.address,
                "content_hash": hash,
                "at": at,
            });
            if let Err(error) = writeln!(file, "{line}") {
                tracing::warn!(path = %path.display(), %error, "cannot append to the fake BLE journal");
            }
        }
        self.battery_mv = self.battery_mv.saturating_sub(MV_PER_UPDATE).max(EMPTY_MV);
        self.displayed = Some((image_index, hash));
    }

    /// Handles an OACP write; returns the indication.
    fn oacp(&mut self, value: &[u8]) -> Vec<u8> {
        let respond = |request: u8, result: OacpResult, checksum: Option<u32>| {
            OacpResponse {
                request,
                result,
                checksum,
            }
            .encode()
        };
        let request = match OacpRequest::decode(value) {
            Ok(request) => request,
            Err(_) => {
                return respond(
                    value.first().copied().unwrap_or(0),
                    OacpResult::OpcodeNotSupported,
                    None,
                )
            }
        };
        let op = request.opcode();
        let Some(index) = self.ots_selected else {
            return respond(op, OacpResult::InvalidObject, None);
        };
        let current = self.images.get(&index).map_or(0, |(_, b)| b.len());
        match request {
            OacpRequest::Write {
                offset,
                length,
                truncate,
            } => {
                let (offset, length) = (offset as usize, length as usize);
                let result = if !self.channel_open {
                    OacpResult::ChannelUnavailable
                } else if truncate {
                    OacpResult::ProcedureNotPermitted
                } else if offset > current || offset + length > object_capacity() {
                    OacpResult::InvalidParameter
                } else if self.write_op.is_some() {
                    OacpResult::ObjectLocked
                } else {
                    self.write_op = Some(WriteOp {
                        image_index: index,
                        offset,
                        length,
                        received: Vec::new(),
                    });
                    OacpResult::Success
                };
                respond(op, result, None)
            }
            OacpRequest::CalculateChecksum { offset, length } => {
                let (offset, length) = (offset as usize, length as usize);
                match self.images.get(&index) {
                    Some((_, bytes)) if offset + length <= bytes.len() => respond(
                        op,
                        OacpResult::Success,
                        Some(crc32fast::hash(&bytes[offset..offset + length])),
                    ),
                    _ => respond(op, OacpResult::InvalidParameter, None),
                }
            }
        }
    }

    /// Handles an OLCP write (Go To only); returns the indication.
    fn olcp(&mut self, value: &[u8]) -> Result<Vec<u8>, GattError> {
        let id = ots::decode_go_to(value).map_err(|e| att_error(&e.to_string()))?;
        let first = ots::image_object_id(0);
        let result = match id.checked_sub(first).and_then(|i| u8::try_from(i).ok()) {
            Some(index) if index <= MAX_IMAGE_INDEX => {
                self.ots_selected = Some(index);
                OlcpResult::Success
            }
            _ => OlcpResult::ObjectIdNotFound,
        };
        Ok(ots::encode_go_to_response(result))
    }

    /// Object bytes from the channel for the accepted OACP Write.
    fn receive_object(&mut self, bytes: &[u8]) -> Result<(), GattError> {
        let Some(op) = &mut self.write_op else {
            return Err(GattError::Failed(
                "object channel data without an OACP Write".to_owned(),
            ));
        };
        let start = op.received.len();
        if start + bytes.len() > op.length {
            return Err(GattError::Failed(format!(
                "{} object bytes, the OACP Write announced {}",
                start + bytes.len(),
                op.length
            )));
        }
        op.received.extend_from_slice(bytes);
        if self.corrupt && start == 0 && !op.received.is_empty() {
            op.received[0] ^= 0x01;
        }
        if op.received.len() == op.length {
            let Some(op) = self.write_op.take() else {
                return Ok(());
            };
            let mut object = self
                .images
                .remove(&op.image_index)
                .map(|(_, b)| b)
                .unwrap_or_default();
            let end = op.offset + op.length;
            if object.len() < end {
                object.resize(end, 0);
            }
            object[op.offset..end].copy_from_slice(&op.received);
            let hash = ots_hash(&object);
            self.images.insert(op.image_index, (hash, object));
        }
        Ok(())
    }

    /// Handles a write to the content characteristic.
    fn receive(&mut self, bytes: &[u8]) -> Result<(), GattError> {
        match decode_frame(bytes).map_err(|e| att_error(&e.to_string()))? {
            Frame::Begin(begin) => {
                self.status = ContentStatus {
                    state: TransferState::Receiving,
                    image_index: begin.image_index,
                    received: 0,
                    crc32: 0,
                    content_hash: begin.content_hash.clone(),
                };
                self.receiving = Some((begin, Vec::new()));
            }
            Frame::Data { offset, bytes } => {
                let Some((_, received)) = &mut self.receiving else {
                    return Err(att_error("DATA without BEGIN"));
                };
                if offset as usize != received.len() {
                    return Err(att_error(&format!(
                        "DATA at {offset}, expected {}",
                        received.len()
                    )));
                }
                let start = received.len();
                received.extend_from_slice(bytes);
                if self.corrupt && start == 0 {
                    received[0] ^= 0x01;
                }
                self.status.received = received.len() as u32;
                self.status.crc32 = crc32fast::hash(received);
            }
            Frame::Commit => {
                let Some((begin, received)) = self.receiving.take() else {
                    return Err(att_error("COMMIT without BEGIN"));
                };
                let intact = received.len() == begin.total_len as usize
                    && crc32fast::hash(&received) == begin.crc32;
                self.status.received = received.len() as u32;
                self.status.crc32 = crc32fast::hash(&received);
                if intact {
                    self.status.state = TransferState::Committed;
                    self.images
                        .insert(begin.image_index, (begin.content_hash, received));
                } else {
                    self.status.state = TransferState::Failed;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn linked() -> (FakeAir, FakeLink) {
        let cfg = FakeConfig {
            tags: 1,
            ..FakeConfig::default()
        };
        let air = FakeAir::new(&cfg, Uuid::nil()).expect("air");
        let mut link = air.connect(&fake_address(0)).await.expect("link");
        assert_eq!(link.pair().await, Ok(Pairing::New));
        (air, link)
    }

    async fn oacp_write(link: &mut FakeLink, length: u32) -> OacpResponse {
        let request = OacpRequest::Write {
            offset: 0,
            length,
            truncate: false,
        };
        let oacp = uuid16(OACP_CHARACTERISTIC);
        link.write(oacp, &request.encode()).await.expect("written");
        let answer = link.notification().await.expect("indication");
        assert_eq!(answer.characteristic, oacp);
        OacpResponse::decode(&answer.value).expect("response")
    }

    #[tokio::test(start_paused = true)]
    async fn ots_control_points_need_their_indications_on() {
        let (_air, mut link) = linked().await;
        let error = link
            .write(uuid16(OLCP_CHARACTERISTIC), &ots::encode_go_to(0x100))
            .await
            .expect_err("indications off");
        assert!(
            error.to_string().contains("improperly configured"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn esl_characteristics_need_an_encrypted_link() {
        let cfg = FakeConfig {
            tags: 1,
            ..FakeConfig::default()
        };
        let air = FakeAir::new(&cfg, Uuid::nil()).expect("air");
        let mut link = air.connect(&fake_address(0)).await.expect("link");
        let address = uuid16(ESL_ADDRESS_CHARACTERISTIC);
        assert_eq!(
            link.write(address, &[1, 0]).await,
            Err(GattError::NotEncrypted)
        );
        assert_eq!(
            link.subscribe(uuid16(CONTROL_POINT_CHARACTERISTIC)).await,
            Err(GattError::NotEncrypted)
        );
        assert_eq!(
            link.read(uuid16(DISPLAY_INFO_CHARACTERISTIC)).await,
            Err(GattError::NotEncrypted)
        );
        assert_eq!(link.pair().await, Ok(Pairing::New));
        link.write(address, &[1, 0]).await.expect("encrypted");
        link.disconnect().await.expect("closed");

        // Bonded: the next link encrypts with the bond. A Nordic tag that
        // falls back to Unassociated deletes it: encryption then fails.
        let mut link = air.connect(&fake_address(0)).await.expect("link");
        assert_eq!(link.pair().await, Ok(Pairing::Existing));
        link.disconnect().await.expect("closed");
        air.unassociate(&fake_address(0));
        let mut link = air.connect(&fake_address(0)).await.expect("link");
        assert_eq!(link.pair().await, Err(GattError::BondLost));
        air.remove_bond(&fake_address(0)).await.expect("removed");
        assert_eq!(link.pair().await, Ok(Pairing::New));
    }

    #[tokio::test(start_paused = true)]
    async fn an_oacp_write_needs_the_object_channel_open_first() {
        let (_air, mut link) = linked().await;
        for short in [OACP_CHARACTERISTIC, OLCP_CHARACTERISTIC] {
            link.subscribe(uuid16(short)).await.expect("subscribed");
        }
        link.write(uuid16(OLCP_CHARACTERISTIC), &ots::encode_go_to(0x101))
            .await
            .expect("go to");
        let selected = link.notification().await.expect("indication");
        assert_eq!(
            ots::decode_go_to_response(&selected.value),
            Ok(OlcpResult::Success)
        );
        assert_eq!(
            oacp_write(&mut link, 16).await.result,
            OacpResult::ChannelUnavailable
        );
        let mut channel = link.open_channel(OTS_PSM).await.expect("channel");
        assert_eq!(oacp_write(&mut link, 16).await.result, OacpResult::Success);
        channel.send(&[7; 16]).await.expect("sent");
        // More than the Write announced is refused.
        assert!(channel.send(&[7]).await.is_err());
    }
}
