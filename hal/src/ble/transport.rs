//! GATT transport: the small trait a Bluetooth stack must offer
//! ([`Central`], [`Scan`], [`Link`]) and the sequencing of one session with a
//! tag on top of it ([`deliver`], [`poll`]).
//!
//! Owns: the order of GATT operations, their timeouts, matching each Control
//! Point command with its response, and the content transfer with its
//! integrity check. Must not: hold state between sessions, retry (the driver
//! in `mod.rs` decides that), or know about btleplug (`btleplug.rs`) or the
//! fakes (`fake.rs`, `fake_esl.rs`) that implement the trait.
//!
//! A delivery session:
//!
//! ```text
//! connect → discover → subscribe Control Point → [write ESL Address]
//! → [configure: AP Sync Key, Response Key, Absolute Time; read Display,
//!    Image, Sensor and LED Information]
//! → image (content has `ble_image`), through OTS:
//!      check it against Display/Image Information → OLCP Go To object
//!      0x100 + image → [Object Size and OACP Calculate Checksum say the
//!      tag holds it already? ──▶ skip] → open L2CAP channel (PSM 0x0025)
//!      → OACP Write → object bytes on the channel → OACP Calculate
//!      Checksum must equal the CRC-32 sent
//!   or content for the vendor characteristic (tags that have it):
//!      read content status ── tag already holds it? ──▶ skip transfer
//!      → BEGIN, DATA…, COMMIT → read status: length, CRC-32, hash must match
//! → Display Image ⇒ Display State (same display and image)   ← confirmed here
//! → [battery: Read Sensor Data ⇒ Sensor Value, or Battery Level read]
//! → Update Complete ⇒ Basic State → disconnect
//! ```
//!
//! One command is outstanding at a time, so the first Control Point
//! notification after a write is its response; a response of the wrong kind
//! is an error, never skipped. Everything after the Display State confirmed
//! the image is best effort: the content is on the tag, so a battery read or
//! Update Complete that fails is logged, not turned into a failed delivery.
//! Every operation has a timeout, and the link is disconnected on every path.

use std::future::Future;
use std::time::Duration;

use tokio::time::timeout;
use uuid::Uuid;

use super::codec::{
    uuid16, BasicState, CodecError, Command, ErrorCode, EslAddress, Response,
    BATTERY_LEVEL_CHARACTERISTIC, CONTROL_POINT_CHARACTERISTIC, ESL_ADDRESS_CHARACTERISTIC,
};
use super::content::{self, ContentError, ContentStatus, ImageContent};
use super::ots::{
    self, OacpRequest, OacpResponse, OacpResult, OlcpResult, OACP_CHARACTERISTIC,
    OBJECT_SIZE_CHARACTERISTIC, OLCP_CHARACTERISTIC, OTS_PSM,
};
use super::provision::{
    self, ContentPaths, InfoError, KeyMaterial, TagInfo, ABSOLUTE_TIME_CHARACTERISTIC,
    AP_SYNC_KEY_CHARACTERISTIC, DISPLAY_INFO_CHARACTERISTIC, IMAGE_INFO_CHARACTERISTIC,
    LED_INFO_CHARACTERISTIC, RESPONSE_KEY_CHARACTERISTIC, SENSOR_INFO_CHARACTERISTIC,
};

/// [`Command::name`] of Update Complete.
const UPDATE_COMPLETE: &str = "Update Complete";

/// A tag seen advertising.
#[derive(Debug, Clone, PartialEq)]
pub struct Advertisement {
    /// Bluetooth device address, `C0:11:22:33:44:55`; the tag id.
    pub address: String,
    pub rssi: Option<i16>,
    /// Service UUIDs in the advertisement.
    pub services: Vec<Uuid>,
}

/// A value notified by the tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub characteristic: Uuid,
    pub value: Vec<u8>,
}

/// A failed GATT operation, as the stack reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GattError {
    /// No usable adapter (none present, powered off, bluetoothd gone). The
    /// radio is down until a new [`Central::scan`] succeeds.
    #[error("Bluetooth adapter unavailable: {0}")]
    Adapter(String),
    /// The stack has never seen this address advertise.
    #[error("tag {0} is unknown to the adapter (not seen advertising)")]
    UnknownPeer(String),
    /// The link dropped.
    #[error("link lost")]
    Disconnected,
    /// The tag refused an operation on a link that is not encrypted (ATT
    /// Insufficient Encryption / Authentication).
    #[error("the tag requires an encrypted link")]
    NotEncrypted,
    /// Encrypting with the stored bond failed because the tag no longer
    /// has it (HCI PIN or Key Missing): the tag dropped its bond.
    #[error("the tag no longer has our bond (key missing)")]
    BondLost,
    /// Anything else the stack reports (ATT error, connection refused…).
    #[error("{0}")]
    Failed(String),
}

/// How [`Link::pair`] secured the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    /// Encrypted with the bond both sides already had.
    Existing,
    /// Paired and bonded now (LE Secure Connections where the tag can).
    New,
}

/// The Bluetooth stack's central role: scanning and connecting. Cloned into
/// every session task, so it must be a cheap handle.
pub trait Central: Clone + Send + Sync + 'static {
    type Scan: Scan;
    type Link: Link;

    /// Starts scanning for tags. Called again after the scan failed.
    fn scan(&self) -> impl Future<Output = Result<Self::Scan, GattError>> + Send;

    /// Connects to the tag with this address.
    fn connect(&self, address: &str) -> impl Future<Output = Result<Self::Link, GattError>> + Send;

    /// Deletes this side's bond with the tag, so the next
    /// [`Link::pair`] pairs afresh (the re-bond path).
    fn remove_bond(&self, address: &str) -> impl Future<Output = Result<(), GattError>> + Send;
}

/// A running scan.
pub trait Scan: Send + 'static {
    /// The next advertisement. Must be cancel-safe: the driver calls it in
    /// `select!`. An error ends this scan.
    fn next(&mut self) -> impl Future<Output = Result<Advertisement, GattError>> + Send;
}

/// An L2CAP LE credit-based channel to a tag (OTS object data).
pub trait ObjectChannel: Send + 'static {
    /// Sends `bytes` in order; the stack cuts them into SDUs within the
    /// peer's MTU and waits for credits.
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = Result<(), GattError>> + Send;
    fn close(&mut self) -> impl Future<Output = Result<(), GattError>> + Send;
}

/// A connection to one tag. Characteristics are named by UUID alone; a tag
/// carries each of the few this module uses once.
pub trait Link: Send + 'static {
    type Channel: ObjectChannel;

    /// Encrypts the link: with the existing bond, or by pairing and
    /// bonding first. ESL tags refuse their characteristics on a plain link.
    fn pair(&mut self) -> impl Future<Output = Result<Pairing, GattError>> + Send;

    /// Opens an L2CAP LE credit-based channel on `psm` (OTS: 0x0025).
    fn open_channel(
        &mut self,
        psm: u16,
    ) -> impl Future<Output = Result<Self::Channel, GattError>> + Send;
    /// Discovers services; returns the UUIDs of every characteristic.
    fn discover(&mut self) -> impl Future<Output = Result<Vec<Uuid>, GattError>> + Send;
    /// Enables notifications of a characteristic.
    fn subscribe(
        &mut self,
        characteristic: Uuid,
    ) -> impl Future<Output = Result<(), GattError>> + Send;
    /// Writes with response (the tag acknowledges at ATT level).
    fn write(
        &mut self,
        characteristic: Uuid,
        value: &[u8],
    ) -> impl Future<Output = Result<(), GattError>> + Send;
    fn read(
        &mut self,
        characteristic: Uuid,
    ) -> impl Future<Output = Result<Vec<u8>, GattError>> + Send;
    /// Waits for the next notification of any subscribed characteristic.
    fn notification(&mut self) -> impl Future<Output = Result<Notification, GattError>> + Send;
    fn disconnect(&mut self) -> impl Future<Output = Result<(), GattError>> + Send;
}

/// Where a session was when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    /// Encrypting the link (pairing and bonding when needed).
    Pair,
    Discover,
    Subscribe,
    WriteAddress,
    /// Writing key material or the absolute time.
    Configure(&'static str),
    /// Reading an Information characteristic.
    ReadInfo(&'static str),
    /// An Object Transfer Service procedure.
    Ots(&'static str),
    ReadStatus,
    Transfer,
    Command(&'static str),
    ReadBattery,
    /// The whole session (`radio.ble.session_timeout_ms`).
    Session,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Connect => f.write_str("connect"),
            Step::Pair => f.write_str("pair/encrypt"),
            Step::Discover => f.write_str("service discovery"),
            Step::Subscribe => f.write_str("subscribe to the Control Point"),
            Step::WriteAddress => f.write_str("write ESL Address"),
            Step::Configure(what) => write!(f, "write {what}"),
            Step::ReadInfo(what) => write!(f, "read {what}"),
            Step::Ots(what) => f.write_str(what),
            Step::ReadStatus => f.write_str("read content status"),
            Step::Transfer => f.write_str("content transfer"),
            Step::Command(name) => f.write_str(name),
            Step::ReadBattery => f.write_str("read battery"),
            Step::Session => f.write_str("session"),
        }
    }
}

/// Why a session did not confirm the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("{step}: {error}")]
    Gatt { step: Step, error: GattError },
    #[error("{step}: no answer within {after:?}")]
    Timeout { step: Step, after: Duration },
    #[error("tag has no {0} characteristic")]
    Missing(&'static str),
    /// The tag has no way to store this content. The discovery that showed
    /// it completed, so `paths` is what the tag offers (the driver keeps it
    /// as a successful session's).
    #[error("tag has no {missing} characteristic")]
    NoContentPath {
        missing: &'static str,
        paths: ContentPaths,
    },
    #[error("{step}: malformed response: {error}")]
    Malformed { step: Step, error: CodecError },
    #[error("{step}: tag answered {code}")]
    Esl { step: Step, code: ErrorCode },
    #[error("{step}: unexpected response {response}")]
    Unexpected { step: Step, response: String },
    #[error("malformed content status: {0}")]
    Status(ContentError),
    #[error("content check failed: {0}")]
    Integrity(String),
    #[error("content cannot be sent: {0}")]
    Content(ContentError),
    #[error("malformed {0}")]
    Info(InfoError),
    /// Invalid Parameter(s) to the first command of a session that did not
    /// write the address: the tag no longer has the ESL ID this AP gave it.
    #[error("{step}: tag answered {code}: it no longer has its ESL address (configuring it again)", code = ErrorCode::InvalidParameters)]
    StaleAddress { step: Step },
    /// The tag lost its bond (it fell back to Unassociated, which deletes
    /// it on some tags); this side's bond is removed, the next session
    /// pairs and configures afresh.
    #[error("pair/encrypt: the tag lost its bond; bond removed, pairing and configuring again")]
    BondLost,
    #[error("{step}: tag answered {result}")]
    Oacp { step: Step, result: OacpResult },
    #[error("OLCP Go To image object: tag answered {0}")]
    Olcp(OlcpResult),
    #[error("{step}: malformed answer: {error}")]
    OtsMalformed { step: Step, error: ots::OtsError },
    /// The image does not fit the tag's Display / Image Information.
    #[error("image does not fit the tag: {0}")]
    Image(String),
}

impl TransportError {
    /// Whether another attempt may succeed: radio trouble and garbled
    /// answers may pass; a tag without the needed characteristics, an ESL
    /// error that says "never" or content that cannot be framed will not.
    pub fn retryable(&self) -> bool {
        match self {
            TransportError::Esl { code, .. } => code.retryable(),
            TransportError::Oacp { result, .. } => result.retryable(),
            TransportError::Olcp(result) => *result == OlcpResult::OperationFailed,
            TransportError::Missing(_)
            | TransportError::NoContentPath { .. }
            | TransportError::Content(_)
            | TransportError::Info(_)
            | TransportError::Image(_) => false,
            TransportError::Gatt { .. }
            | TransportError::Timeout { .. }
            | TransportError::Malformed { .. }
            | TransportError::Unexpected { .. }
            | TransportError::Status(_)
            | TransportError::Integrity(_)
            | TransportError::StaleAddress { .. }
            | TransportError::BondLost
            | TransportError::OtsMalformed { .. } => true,
        }
    }

    /// Whether the tag showed it lost its configuration (its ESL address
    /// and keys): the next session must configure it again.
    pub fn needs_configuring(&self) -> bool {
        match self {
            TransportError::StaleAddress { .. } | TransportError::BondLost => true,
            TransportError::Esl { step, code } => {
                *step == Step::Command(UPDATE_COMPLETE) && *code == ErrorCode::InvalidState
            }
            _ => false,
        }
    }

    /// The content paths a failed session found for certain: only when it
    /// failed for want of one, after a complete discovery.
    pub fn paths_found(&self) -> Option<ContentPaths> {
        match self {
            TransportError::NoContentPath { paths, .. } => Some(*paths),
            _ => None,
        }
    }

    /// Whether the adapter itself failed (the radio is down, not the tag).
    pub fn adapter_down(&self) -> bool {
        matches!(
            self,
            TransportError::Gatt {
                error: GattError::Adapter(_),
                ..
            }
        )
    }
}

/// Where the battery level comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatterySource {
    /// Read Sensor Data with this sensor index; the Sensor Value's first two
    /// bytes are millivolts, little-endian (a vendor sensor, configured).
    Sensor(u8),
    /// The sensor the tag's Sensor Information lists as Present Input
    /// Voltage (1/64 V); without one, the Battery Service's Battery Level
    /// (percent), when the tag has it, mapped linearly onto
    /// `empty_mv..=full_mv`.
    BatteryLevel { empty_mv: u16, full_mv: u16 },
}

/// How sessions talk to tags; fixed for the radio's life.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSettings {
    /// Write the tag's ESL Address after connecting.
    pub write_address: bool,
    /// The vendor characteristic that carries content (`content.rs`).
    pub content_characteristic: Uuid,
    pub display_index: u8,
    pub image_index: u8,
    /// Content bytes per DATA write.
    pub chunk_size: usize,
    pub connect_timeout: Duration,
    /// Each discover, subscribe, read and write.
    pub gatt_timeout: Duration,
    /// From a command's write to its response.
    pub response_timeout: Duration,
    /// Update Complete's wait: silence after it is success.
    pub update_complete_timeout: Duration,
    pub battery: BatterySource,
}

/// What the AP gives a tag when it configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioning {
    /// The AP's own key for its periodic advertising (same for every tag).
    pub ap_sync_key: KeyMaterial,
    /// This tag's key for its responses.
    pub response_key: KeyMaterial,
    /// Milliseconds on the AP's ESL clock.
    pub absolute_time: u32,
}

/// What the driver decided for one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionPlan {
    /// Configure the tag (write address, keys and time, read the
    /// Information characteristics) before anything else.
    pub configure: Option<Provisioning>,
    /// What the tag told an earlier configuring session.
    pub info: Option<TagInfo>,
}

impl ContentPaths {
    /// The paths the tag offers, judged from everything a session discovered.
    fn of(characteristics: &[Uuid], settings: &SessionSettings) -> ContentPaths {
        let has = |short: u16| characteristics.contains(&uuid16(short));
        ContentPaths {
            ots: has(OACP_CHARACTERISTIC) && has(OLCP_CHARACTERISTIC),
            vendor: characteristics.contains(&settings.content_characteristic),
        }
    }
}

/// What a session learned besides success.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionReport {
    /// The Information read while configuring (only then).
    pub info: Option<TagInfo>,
    /// What the session discovered (`None` only in tests' scripted reports).
    pub paths: Option<ContentPaths>,
    pub battery_mv: Option<u16>,
    /// The Basic State from Update Complete (or Ping), when it came.
    pub basic_state: Option<BasicState>,
    /// False when the tag already held the content and nothing was sent.
    pub transferred: bool,
}

/// Puts `content` on the tag and has it displayed (see the module docs).
pub async fn deliver<C: Central>(
    central: &C,
    tag: &str,
    address: EslAddress,
    settings: &SessionSettings,
    plan: &SessionPlan,
    content: &[u8],
    content_hash: &str,
) -> Result<SessionReport, TransportError> {
    // Content errors are the request's fault: found before the radio is used.
    let image = ImageContent::from_content(content).map_err(TransportError::Content)?;
    let frames = match &image {
        Some(_) => Vec::new(),
        None => content::frames(
            settings.image_index,
            content,
            content_hash,
            settings.chunk_size,
        )
        .map_err(TransportError::Content)?,
    };
    let path = if image.is_some() {
        Path::Ots
    } else {
        Path::Vendor
    };
    let mut session = Session::open(central, tag, address, settings, plan, Some(path)).await?;
    let result = match &image {
        Some(image) => session.deliver_image(image).await,
        None => session.deliver(frames, content, content_hash).await,
    };
    session.close().await;
    result
}

/// How content reaches the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The standard Object Transfer Service.
    Ots,
    /// The vendor content characteristic (`content.rs`).
    Vendor,
}

/// Reads the tag's state and battery without changing what it shows.
pub async fn poll<C: Central>(
    central: &C,
    tag: &str,
    address: EslAddress,
    settings: &SessionSettings,
    plan: &SessionPlan,
) -> Result<SessionReport, TransportError> {
    let mut session = Session::open(central, tag, address, settings, plan, None).await?;
    let result = session.poll().await;
    session.close().await;
    result
}

/// Whether `image` fits a tag with this Information: the display and the
/// image slot exist and the bitmap has exactly the display's size. The
/// error names the content field at fault and what the tag expects
/// (`content.ble_image.bitmap is 10 bytes; display 0 (296x128, BlackWhite)
/// takes 4736 bytes`).
pub fn image_fits(info: &TagInfo, image: &ImageContent) -> Result<(), String> {
    const FIELD: &str = content::IMAGE_FIELD;
    let index = image.display_index;
    let Some(display) = info.displays.get(usize::from(index)) else {
        return Err(match info.displays.len() {
            0 => format!("{FIELD}.display is {index}; the tag has no display"),
            n => format!(
                "{FIELD}.display is {index}; the tag has displays 0..={}",
                n - 1
            ),
        });
    };
    match info.max_image_index {
        Some(max) if image.image_index <= max => {}
        Some(max) => {
            return Err(format!(
                "{FIELD}.image is {}; the tag has image slots 0..={max}",
                image.image_index
            ))
        }
        None => return Err(format!("{FIELD}.image: the tag has no image slots")),
    }
    let Some(expected) = display.image_bytes() else {
        return Err(format!(
            "{FIELD}.display is {index}, of display type 0x{:02X}, whose bitmap format is unknown",
            display.display_type.to_byte()
        ));
    };
    if image.bitmap.len() != expected {
        return Err(format!(
            "{FIELD}.bitmap is {} bytes; display {index} ({}x{}, {:?}) takes {expected} bytes",
            image.bitmap.len(),
            display.width,
            display.height,
            display.display_type
        ));
    }
    Ok(())
}

/// Runs `op` under `limit`, naming `step` in both failures.
async fn within<T>(
    step: Step,
    limit: Duration,
    op: impl Future<Output = Result<T, GattError>>,
) -> Result<T, TransportError> {
    match timeout(limit, op).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(TransportError::Gatt { step, error }),
        Err(_) => Err(TransportError::Timeout { step, after: limit }),
    }
}

/// One connected tag.
struct Session<'a, L: Link> {
    link: L,
    tag: &'a str,
    address: EslAddress,
    settings: &'a SessionSettings,
    plan: &'a SessionPlan,
    has_battery_level: bool,
    /// Read in this session, or known from an earlier one.
    info: Option<TagInfo>,
    /// Read in this session.
    fresh_info: Option<TagInfo>,
    /// The tag answered a command of this session (so it knows its ID).
    answered: bool,
    /// How content goes to the tag; `None` for a poll.
    path: Option<Path>,
    characteristics: Vec<Uuid>,
}

impl<'a, L: Link> Session<'a, L> {
    /// Connects, discovers, checks the characteristics and subscribes.
    async fn open<C: Central<Link = L>>(
        central: &C,
        tag: &'a str,
        address: EslAddress,
        settings: &'a SessionSettings,
        plan: &'a SessionPlan,
        path: Option<Path>,
    ) -> Result<Session<'a, L>, TransportError> {
        let link = within(
            Step::Connect,
            settings.connect_timeout,
            central.connect(tag),
        )
        .await?;
        let mut session = Session {
            link,
            tag,
            address,
            settings,
            plan,
            has_battery_level: false,
            info: plan.info.clone(),
            fresh_info: None,
            answered: false,
            path,
            characteristics: Vec::new(),
        };
        match session.secure(central).await {
            Ok(()) => {}
            Err(error) => {
                session.close().await;
                return Err(error);
            }
        }
        match session.prepare().await {
            Ok(()) => Ok(session),
            Err(error) => {
                session.close().await;
                Err(error)
            }
        }
    }

    /// Encrypts the link before any ESL characteristic is touched. A tag
    /// that lost its bond: remove ours, so the next session pairs anew.
    async fn secure<C: Central<Link = L>>(&mut self, central: &C) -> Result<(), TransportError> {
        let t = self.settings.connect_timeout;
        match within(Step::Pair, t, self.link.pair()).await {
            Ok(Pairing::Existing) => Ok(()),
            Ok(Pairing::New) => {
                tracing::info!(tag = self.tag, "bonded with the tag");
                Ok(())
            }
            Err(TransportError::Gatt {
                error: GattError::BondLost,
                ..
            }) => {
                tracing::warn!(tag = self.tag, "the tag lost its bond; removing ours");
                within(Step::Pair, t, central.remove_bond(self.tag)).await?;
                Err(TransportError::BondLost)
            }
            Err(error) => Err(error),
        }
    }

    async fn prepare(&mut self) -> Result<(), TransportError> {
        let t = self.settings.gatt_timeout;
        let characteristics = within(Step::Discover, t, self.link.discover()).await?;
        let has = |short: u16| characteristics.contains(&uuid16(short));
        if !has(CONTROL_POINT_CHARACTERISTIC) {
            return Err(TransportError::Missing("ESL Control Point (0x2BFE)"));
        }
        let paths = ContentPaths::of(&characteristics, self.settings);
        let missing = match self.path {
            Some(Path::Ots) if !paths.ots => {
                Some("Object Transfer Service (0x1825: OACP 0x2AC5, OLCP 0x2AC6)")
            }
            Some(Path::Vendor) if !paths.vendor => {
                Some("vendor content (radio.ble.content_characteristic)")
            }
            _ => None,
        };
        if let Some(missing) = missing {
            return Err(TransportError::NoContentPath { missing, paths });
        }
        self.has_battery_level = has(BATTERY_LEVEL_CHARACTERISTIC);
        within(
            Step::Subscribe,
            t,
            self.link.subscribe(uuid16(CONTROL_POINT_CHARACTERISTIC)),
        )
        .await?;
        if self.path == Some(Path::Ots) {
            for short in [OACP_CHARACTERISTIC, OLCP_CHARACTERISTIC] {
                within(Step::Subscribe, t, self.link.subscribe(uuid16(short))).await?;
            }
        }
        if self.settings.write_address || self.plan.configure.is_some() {
            if !has(ESL_ADDRESS_CHARACTERISTIC) {
                return Err(TransportError::Missing("ESL Address (0x2BF6)"));
            }
            let value = self.address.encode();
            within(
                Step::WriteAddress,
                t,
                self.link.write(uuid16(ESL_ADDRESS_CHARACTERISTIC), &value),
            )
            .await?;
        }
        if let Some(provisioning) = &self.plan.configure {
            self.configure(&characteristics, provisioning).await?;
        }
        self.characteristics = characteristics;
        Ok(())
    }

    /// The configuring procedure after the ESL Address: key material and
    /// time (all three mandatory), then every Information characteristic
    /// the tag has. Values are secrets: never logged.
    async fn configure(
        &mut self,
        characteristics: &[Uuid],
        provisioning: &Provisioning,
    ) -> Result<(), TransportError> {
        let t = self.settings.gatt_timeout;
        let time = provisioning.absolute_time.to_le_bytes();
        let writes: [(u16, &'static str, &'static str, &[u8]); 3] = [
            (
                AP_SYNC_KEY_CHARACTERISTIC,
                "AP Sync Key Material",
                "AP Sync Key Material (0x2BF7)",
                provisioning.ap_sync_key.expose(),
            ),
            (
                RESPONSE_KEY_CHARACTERISTIC,
                "ESL Response Key Material",
                "ESL Response Key Material (0x2BF8)",
                provisioning.response_key.expose(),
            ),
            (
                ABSOLUTE_TIME_CHARACTERISTIC,
                "Current Absolute Time",
                "ESL Current Absolute Time (0x2BF9)",
                &time,
            ),
        ];
        for (short, name, missing, value) in writes {
            if !characteristics.contains(&uuid16(short)) {
                return Err(TransportError::Missing(missing));
            }
            within(
                Step::Configure(name),
                t,
                self.link.write(uuid16(short), value),
            )
            .await?;
        }
        let mut info = TagInfo::default();
        if let Some(bytes) = self
            .read_info(
                characteristics,
                DISPLAY_INFO_CHARACTERISTIC,
                "Display Information",
            )
            .await?
        {
            info.displays = provision::decode_displays(&bytes).map_err(TransportError::Info)?;
        }
        if let Some(bytes) = self
            .read_info(
                characteristics,
                IMAGE_INFO_CHARACTERISTIC,
                "Image Information",
            )
            .await?
        {
            info.max_image_index =
                Some(provision::decode_max_image_index(&bytes).map_err(TransportError::Info)?);
        }
        if let Some(bytes) = self
            .read_info(
                characteristics,
                SENSOR_INFO_CHARACTERISTIC,
                "Sensor Information",
            )
            .await?
        {
            info.sensors = provision::decode_sensors(&bytes).map_err(TransportError::Info)?;
        }
        if let Some(bytes) = self
            .read_info(characteristics, LED_INFO_CHARACTERISTIC, "LED Information")
            .await?
        {
            info.leds = provision::decode_leds(&bytes);
        }
        self.info = Some(info.clone());
        self.fresh_info = Some(info);
        Ok(())
    }

    /// Reads an Information characteristic; `None` when the tag has none
    /// (a tag without sensors or LEDs leaves those out).
    async fn read_info(
        &mut self,
        characteristics: &[Uuid],
        short: u16,
        name: &'static str,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        if !characteristics.contains(&uuid16(short)) {
            return Ok(None);
        }
        within(
            Step::ReadInfo(name),
            self.settings.gatt_timeout,
            self.link.read(uuid16(short)),
        )
        .await
        .map(Some)
    }

    async fn deliver(
        &mut self,
        frames: Vec<Vec<u8>>,
        content: &[u8],
        content_hash: &str,
    ) -> Result<SessionReport, TransportError> {
        let s = self.settings;
        let mut report = self.report();
        let before = self.read_status().await?;
        if before.holds(s.image_index, content, content_hash) {
            tracing::debug!(
                tag = self.tag,
                "tag already holds the content; not sent again"
            );
        } else {
            for frame in &frames {
                within(
                    Step::Transfer,
                    s.gatt_timeout,
                    self.link.write(s.content_characteristic, frame),
                )
                .await?;
            }
            let after = self.read_status().await?;
            if !after.holds(s.image_index, content, content_hash) {
                return Err(TransportError::Integrity(format!(
                    "sent {} bytes (CRC-32 0x{:08X}, hash {content_hash}) to image {}; tag reports \
                     {:?} with {} bytes (CRC-32 0x{:08X}, hash {}) in image {}",
                    content.len(),
                    crc32fast::hash(content),
                    s.image_index,
                    after.state,
                    after.received,
                    after.crc32,
                    after.content_hash,
                    after.image_index
                )));
            }
            report.transferred = true;
        }
        self.show(s.display_index, s.image_index, report).await
    }

    /// Puts an image into its OTS object (see the module docs) and shows it.
    async fn deliver_image(
        &mut self,
        image: &ImageContent,
    ) -> Result<SessionReport, TransportError> {
        self.check_fits(image)?;
        let report = SessionReport {
            transferred: self.store_object(image).await?,
            ..self.report()
        };
        self.show(image.display_index, image.image_index, report)
            .await
    }

    /// What every report carries: the Information read now, and the
    /// content paths found at discovery.
    fn report(&self) -> SessionReport {
        SessionReport {
            info: self.fresh_info.clone(),
            paths: Some(ContentPaths::of(&self.characteristics, self.settings)),
            ..SessionReport::default()
        }
    }

    /// The image against the tag's Display and Image Information.
    fn check_fits(&self, image: &ImageContent) -> Result<(), TransportError> {
        let Some(info) = &self.info else {
            return Err(TransportError::Image(
                "the tag's Display Information is unknown (not configured yet)".to_owned(),
            ));
        };
        image_fits(info, image).map_err(TransportError::Image)
    }

    /// Writes the image into object 0x100 + image index unless the object
    /// already holds exactly these bytes; returns whether it sent them.
    async fn store_object(&mut self, image: &ImageContent) -> Result<bool, TransportError> {
        let t = self.settings.gatt_timeout;
        let object_id = ots::image_object_id(image.image_index);
        let go_to = ots::encode_go_to(object_id);
        let step = Step::Ots("OLCP Go To");
        let answer = self.request(OLCP_CHARACTERISTIC, &go_to, step).await?;
        match ots::decode_go_to_response(&answer) {
            Ok(OlcpResult::Success) => {}
            Ok(result) => return Err(TransportError::Olcp(result)),
            Err(error) => return Err(TransportError::OtsMalformed { step, error }),
        }
        // Checked by check_fits: an image is at most 65535² × 24 bits.
        let length = u32::try_from(image.bitmap.len()).map_err(|_| {
            TransportError::Image(format!("{} bytes is too large", image.bitmap.len()))
        })?;
        let crc = crc32fast::hash(&image.bitmap);
        // A retry after a lost confirmation, or the same image again: the
        // tag's own checksum says whether it is already there.
        if self
            .characteristics
            .contains(&uuid16(OBJECT_SIZE_CHARACTERISTIC))
        {
            let step = Step::Ots("read Object Size");
            let size = within(step, t, self.link.read(uuid16(OBJECT_SIZE_CHARACTERISTIC))).await?;
            let (current, _) = ots::decode_object_size(&size)
                .map_err(|error| TransportError::OtsMalformed { step, error })?;
            if current == length && self.checksum(length).await? == crc {
                tracing::debug!(tag = self.tag, object_id, "tag already holds the image");
                return Ok(false);
            }
        }
        let step = Step::Ots("open the OTS object channel");
        let mut channel = within(
            step,
            self.settings.connect_timeout,
            self.link.open_channel(OTS_PSM),
        )
        .await?;
        let sent = self.write_object(&mut channel, &image.bitmap, length).await;
        if let Err(error) = within(step, t, channel.close()).await {
            tracing::debug!(tag = self.tag, %error, "closing the object channel");
        }
        sent?;
        let computed = self.checksum(length).await?;
        if computed != crc {
            return Err(TransportError::Integrity(format!(
                "sent {length} bytes (CRC-32 0x{crc:08X}) to image object 0x{object_id:X}; tag \
                 computes CRC-32 0x{computed:08X}"
            )));
        }
        Ok(true)
    }

    /// OACP Write, then the bytes on the channel (open before the Write,
    /// as the OTS server requires).
    async fn write_object(
        &mut self,
        channel: &mut L::Channel,
        bytes: &[u8],
        length: u32,
    ) -> Result<(), TransportError> {
        self.oacp(OacpRequest::Write {
            offset: 0,
            length,
            truncate: false,
        })
        .await?;
        // Each 4 KiB gets one GATT time-out: L2CAP moves a few KiB/s at worst.
        let blocks = u32::try_from(bytes.len() / 4096 + 1).unwrap_or(u32::MAX);
        within(
            Step::Ots("object transfer"),
            self.settings.gatt_timeout.saturating_mul(blocks),
            channel.send(bytes),
        )
        .await
    }

    /// OACP Calculate Checksum over the first `length` bytes.
    async fn checksum(&mut self, length: u32) -> Result<u32, TransportError> {
        let request = OacpRequest::CalculateChecksum { offset: 0, length };
        let response = self.oacp(request).await?;
        response.checksum.ok_or(TransportError::OtsMalformed {
            step: Step::Ots(request.name()),
            error: ots::OtsError::Malformed {
                what: "OACP response",
                reason: "Calculate Checksum succeeded without a checksum".to_owned(),
            },
        })
    }

    /// One OACP procedure; anything but Success is an error.
    async fn oacp(&mut self, request: OacpRequest) -> Result<OacpResponse, TransportError> {
        let step = Step::Ots(request.name());
        let answer = self
            .request(OACP_CHARACTERISTIC, &request.encode(), step)
            .await?;
        let response = OacpResponse::decode(&answer)
            .map_err(|error| TransportError::OtsMalformed { step, error })?;
        if response.request != request.opcode() {
            return Err(TransportError::Unexpected {
                step,
                response: format!("OACP response to opcode 0x{:02X}", response.request),
            });
        }
        match response.result {
            OacpResult::Success => Ok(response),
            result => Err(TransportError::Oacp { step, result }),
        }
    }

    /// Writes `value` to a control point and waits for its indication.
    async fn request(
        &mut self,
        short: u16,
        value: &[u8],
        step: Step,
    ) -> Result<Vec<u8>, TransportError> {
        let limit = self.settings.response_timeout;
        self.request_within(short, value, step, limit).await
    }

    /// [`Session::request`] with its own wait for the answer.
    async fn request_within(
        &mut self,
        short: u16,
        value: &[u8],
        step: Step,
        limit: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let characteristic = uuid16(short);
        within(
            step,
            self.settings.gatt_timeout,
            self.link.write(characteristic, value),
        )
        .await?;
        self.answer(characteristic, step, limit).await
    }

    /// The next value the tag notifies or indicates on `characteristic`;
    /// others are skipped (not answers).
    async fn answer(
        &mut self,
        characteristic: Uuid,
        step: Step,
        limit: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.link.notification()).await {
                Ok(Ok(n)) if n.characteristic == characteristic => return Ok(n.value),
                Ok(Ok(_)) => continue,
                Ok(Err(error)) => return Err(TransportError::Gatt { step, error }),
                Err(_) => return Err(TransportError::Timeout { step, after: limit }),
            }
        }
    }

    /// Display Image, confirmed by its Display State; then the battery and
    /// Update Complete.
    async fn show(
        &mut self,
        display: u8,
        image: u8,
        mut report: SessionReport,
    ) -> Result<SessionReport, TransportError> {
        let show = Command::DisplayImage {
            esl_id: self.address.esl_id(),
            display_index: display,
            image_index: image,
        };
        match self.command(&show).await? {
            Response::DisplayState {
                display_index,
                image_index,
            } if display_index == display && image_index == image => {}
            other => return Err(unexpected(&show, &other)),
        }

        // Confirmed: from here on a failure only costs information, except
        // a tag that says it is not configured: it drops the image when
        // the link ends.
        report.battery_mv = self.battery().await;
        report.basic_state = self.update_complete().await?;
        Ok(report)
    }

    async fn poll(&mut self) -> Result<SessionReport, TransportError> {
        let ping = Command::Ping {
            esl_id: self.address.esl_id(),
        };
        let state = match self.command(&ping).await? {
            Response::BasicState(state) => state,
            other => return Err(unexpected(&ping, &other)),
        };
        let battery_mv = self.battery().await;
        let basic_state = self.update_complete().await?.or(Some(state));
        Ok(SessionReport {
            battery_mv,
            basic_state,
            ..self.report()
        })
    }

    async fn read_status(&mut self) -> Result<ContentStatus, TransportError> {
        let value = within(
            Step::ReadStatus,
            self.settings.gatt_timeout,
            self.link.read(self.settings.content_characteristic),
        )
        .await?;
        ContentStatus::decode(&value).map_err(TransportError::Status)
    }

    /// Writes one command and waits for its response. An Error response is
    /// returned as [`TransportError::Esl`].
    async fn command(&mut self, command: &Command) -> Result<Response, TransportError> {
        let limit = self.settings.response_timeout;
        self.command_within(command, limit).await
    }

    /// [`Session::command`] with its own response time-out. Invalid
    /// Parameter(s) to the first command of a session that did not
    /// configure the tag is [`TransportError::StaleAddress`].
    async fn command_within(
        &mut self,
        command: &Command,
        limit: Duration,
    ) -> Result<Response, TransportError> {
        let result = self.exchange(command, limit).await;
        match result {
            Err(TransportError::Esl {
                step,
                code: ErrorCode::InvalidParameters,
            }) if !self.answered && self.plan.configure.is_none() => {
                Err(TransportError::StaleAddress { step })
            }
            Ok(response) => {
                self.answered = true;
                Ok(response)
            }
            Err(error) => {
                if matches!(error, TransportError::Esl { .. }) {
                    self.answered = true;
                }
                Err(error)
            }
        }
    }

    async fn exchange(
        &mut self,
        command: &Command,
        limit: Duration,
    ) -> Result<Response, TransportError> {
        let step = Step::Command(command.name());
        // Commands are built here from valid fields; an encoding error
        // would be a bug, reported like a malformed message.
        let bytes = command
            .encode()
            .map_err(|error| TransportError::Malformed { step, error })?;
        let value = self
            .request_within(CONTROL_POINT_CHARACTERISTIC, &bytes, step, limit)
            .await?;
        match Response::decode(&value) {
            Ok(Response::Error(code)) => Err(TransportError::Esl { step, code }),
            Ok(response) => Ok(response),
            Err(error) => Err(TransportError::Malformed { step, error }),
        }
    }

    /// Best effort: `None` (and a log line) when the tag cannot tell.
    async fn battery(&mut self) -> Option<u16> {
        let voltage_sensor = self.info.as_ref().and_then(TagInfo::voltage_sensor);
        let result = match (self.settings.battery, voltage_sensor) {
            (BatterySource::Sensor(sensor_index), _) => {
                self.battery_sensor(sensor_index, |data| {
                    (data.len() >= 2).then(|| u16::from_le_bytes([data[0], data[1]]))
                })
                .await
            }
            (BatterySource::BatteryLevel { .. }, Some(sensor_index)) => {
                self.battery_sensor(sensor_index, provision::voltage_mv)
                    .await
            }
            (BatterySource::BatteryLevel { empty_mv, full_mv }, None) if self.has_battery_level => {
                self.battery_level(empty_mv, full_mv).await
            }
            (BatterySource::BatteryLevel { .. }, None) => return None,
        };
        match result {
            Ok(mv) => Some(mv),
            Err(error) => {
                tracing::warn!(tag = self.tag, %error, "cannot read the battery");
                None
            }
        }
    }

    /// Read Sensor Data, the value turned into millivolts by `mv`.
    async fn battery_sensor(
        &mut self,
        sensor_index: u8,
        mv: impl FnOnce(&[u8]) -> Option<u16>,
    ) -> Result<u16, TransportError> {
        let read = Command::ReadSensorData {
            esl_id: self.address.esl_id(),
            sensor_index,
        };
        let response = self.command(&read).await?;
        match &response {
            Response::SensorValue {
                sensor_index: index,
                data,
            } if *index == sensor_index => mv(data).ok_or_else(|| unexpected(&read, &response)),
            other => Err(unexpected(&read, other)),
        }
    }

    async fn battery_level(&mut self, empty_mv: u16, full_mv: u16) -> Result<u16, TransportError> {
        let value = within(
            Step::ReadBattery,
            self.settings.gatt_timeout,
            self.link.read(uuid16(BATTERY_LEVEL_CHARACTERISTIC)),
        )
        .await?;
        match value.as_slice() {
            [percent] if *percent <= 100 => Ok(percent_to_mv(*percent, empty_mv, full_mv)),
            other => Err(TransportError::Unexpected {
                step: Step::ReadBattery,
                response: format!("Battery Level {other:02X?} (one byte 0..=100 expected)"),
            }),
        }
    }

    /// Tells the tag the AP is done; returns its Basic State when it sends
    /// one. Some tags answer a successful Update Complete with nothing
    /// (Silicon Labs' `esl_tag_opcodes.c`), so silence for
    /// `update_complete_timeout` is success, not a wait of the full
    /// response time-out. Best effort, except Invalid State: the tag is not
    /// configured and forgets everything when the link ends.
    async fn update_complete(&mut self) -> Result<Option<BasicState>, TransportError> {
        let done = Command::UpdateComplete {
            esl_id: self.address.esl_id(),
        };
        let limit = self.settings.update_complete_timeout;
        match self.command_within(&done, limit).await {
            Ok(Response::BasicState(state)) => {
                if state.service_needed() {
                    tracing::warn!(tag = self.tag, "tag reports Service Needed");
                }
                Ok(Some(state))
            }
            Ok(other) => {
                tracing::warn!(tag = self.tag, error = %unexpected(&done, &other), "after the update");
                Ok(None)
            }
            Err(TransportError::Timeout { .. }) => Ok(None),
            Err(error) if error.needs_configuring() => Err(error),
            Err(error) => {
                tracing::warn!(tag = self.tag, %error, "after the update");
                Ok(None)
            }
        }
    }

    /// Disconnects, best effort and bounded: the tag drops the link on its
    /// own when it goes back to sleep.
    async fn close(mut self) {
        if let Err(error) = within(
            Step::Connect,
            self.settings.gatt_timeout,
            self.link.disconnect(),
        )
        .await
        {
            tracing::debug!(tag = self.tag, %error, "disconnect");
        }
    }
}

fn unexpected(command: &Command, response: &Response) -> TransportError {
    TransportError::Unexpected {
        step: Step::Command(command.name()),
        response: response.to_string(),
    }
}

/// Battery Level percent onto a voltage range, rounded down.
pub fn percent_to_mv(percent: u8, empty_mv: u16, full_mv: u16) -> u16 {
    let span = u32::from(full_mv.saturating_sub(empty_mv));
    let above = span * u32::from(percent.min(100)) / 100;
    // above ≤ span ≤ u16::MAX - empty_mv, so the sum fits.
    empty_mv.saturating_add(above as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ble::codec::ESL_SERVICE;
    use crate::ble::content::TransferState;
    use crate::ble::fake::{Expect, ScriptedCentral};
    use crate::ble::ots::OBJECT_SIZE_CHARACTERISTIC;
    use crate::ble::provision::{
        ABSOLUTE_TIME_CHARACTERISTIC, AP_SYNC_KEY_CHARACTERISTIC, DISPLAY_INFO_CHARACTERISTIC,
        IMAGE_INFO_CHARACTERISTIC, LED_INFO_CHARACTERISTIC, RESPONSE_KEY_CHARACTERISTIC,
        SENSOR_INFO_CHARACTERISTIC,
    };

    const TAG: &str = "C0:11:22:33:44:55";
    const CONTENT: &[u8] = br#"{"name":"Milk 1L","price":"9.90"}"#;
    const HASH: &str = "9f86d081884c7d65";
    const BATTERY_MV: u16 = 2950;

    fn content_char() -> Uuid {
        Uuid::from_u128(0xA0E4_F2B0_5D3C_4E4B_9A51_7C1E_0E5E_5101)
    }

    fn address() -> EslAddress {
        EslAddress::new(1, 7).expect("valid")
    }

    fn settings() -> SessionSettings {
        SessionSettings {
            write_address: true,
            content_characteristic: content_char(),
            display_index: 0,
            image_index: 1,
            chunk_size: 12,
            connect_timeout: Duration::from_secs(10),
            gatt_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(3),
            update_complete_timeout: Duration::from_millis(300),
            battery: BatterySource::Sensor(0),
        }
    }

    fn characteristics() -> Vec<Uuid> {
        vec![
            uuid16(ESL_ADDRESS_CHARACTERISTIC),
            uuid16(CONTROL_POINT_CHARACTERISTIC),
            content_char(),
        ]
    }

    /// connect, discover, subscribe, write address.
    fn opening(discovered: Vec<Uuid>) -> Vec<Expect> {
        vec![
            Expect::Connect(Ok(())),
            Expect::Pair(Ok(Pairing::Existing)),
            Expect::Discover(Ok(discovered)),
            Expect::Subscribe(uuid16(CONTROL_POINT_CHARACTERISTIC), Ok(())),
            Expect::write(uuid16(ESL_ADDRESS_CHARACTERISTIC), vec![7, 1]),
        ]
    }

    fn status(state: TransferState, content: &[u8], hash: &str) -> Vec<u8> {
        ContentStatus {
            state,
            image_index: 1,
            received: content.len() as u32,
            crc32: crc32fast::hash(content),
            content_hash: hash.to_owned(),
        }
        .encode()
        .expect("status encodes")
    }

    fn idle() -> Vec<u8> {
        status(TransferState::Idle, b"", "-")
    }

    /// The status read, the frame writes and the status read after them.
    fn transfer(after: Vec<u8>) -> Vec<Expect> {
        let mut steps = vec![Expect::read(content_char(), idle())];
        for frame in content::frames(1, CONTENT, HASH, 12).expect("frames") {
            steps.push(Expect::write(content_char(), frame));
        }
        steps.push(Expect::read(content_char(), after));
        steps
    }

    fn show() -> Command {
        Command::DisplayImage {
            esl_id: 7,
            display_index: 0,
            image_index: 1,
        }
    }

    fn shown() -> Response {
        Response::DisplayState {
            display_index: 0,
            image_index: 1,
        }
    }

    /// Battery sensor, Update Complete, disconnect.
    fn closing() -> Vec<Expect> {
        vec![
            Expect::command(
                &Command::ReadSensorData {
                    esl_id: 7,
                    sensor_index: 0,
                },
                &Response::SensorValue {
                    sensor_index: 0,
                    data: BATTERY_MV.to_le_bytes().to_vec(),
                },
            ),
            Expect::command(
                &Command::UpdateComplete { esl_id: 7 },
                &Response::BasicState(BasicState(BasicState::SYNCHRONIZED)),
            ),
            Expect::Disconnect,
        ]
    }

    async fn run(central: &ScriptedCentral) -> Result<SessionReport, TransportError> {
        deliver(
            central,
            TAG,
            address(),
            &settings(),
            &SessionPlan::default(),
            CONTENT,
            HASH,
        )
        .await
    }

    fn script(parts: Vec<Vec<Expect>>) -> ScriptedCentral {
        ScriptedCentral::new(parts.into_iter().flatten())
    }

    #[tokio::test(start_paused = true)]
    async fn delivery_follows_the_whole_sequence() {
        let central = script(vec![
            opening(characteristics()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![Expect::command(&show(), &shown())],
            closing(),
        ]);
        let report = run(&central).await.expect("delivered");
        central.assert_done();
        assert_eq!(
            report,
            SessionReport {
                info: None,
                // The vendor characteristic, no OTS.
                paths: Some(ContentPaths {
                    ots: false,
                    vendor: true
                }),
                battery_mv: Some(BATTERY_MV),
                basic_state: Some(BasicState(BasicState::SYNCHRONIZED)),
                transferred: true,
            }
        );
        // 33 bytes in chunks of 12: BEGIN, 3 DATA, COMMIT.
        assert_eq!(content::frames(1, CONTENT, HASH, 12).unwrap().len(), 5);
    }

    fn provisioning() -> Provisioning {
        Provisioning {
            ap_sync_key: KeyMaterial::from_bytes([0xA5; 24]),
            response_key: KeyMaterial::from_bytes([0x5A; 24]),
            absolute_time: 0x0102_0304,
        }
    }

    /// What a configuring session writes and reads after the ESL Address,
    /// for a tag with every Information characteristic.
    fn configuring(info: &TagInfo) -> Vec<Expect> {
        vec![
            Expect::write(uuid16(AP_SYNC_KEY_CHARACTERISTIC), vec![0xA5; 24]),
            Expect::write(uuid16(RESPONSE_KEY_CHARACTERISTIC), vec![0x5A; 24]),
            Expect::write(uuid16(ABSOLUTE_TIME_CHARACTERISTIC), vec![4, 3, 2, 1]),
            Expect::read(
                uuid16(DISPLAY_INFO_CHARACTERISTIC),
                provision::encode_displays(&info.displays),
            ),
            Expect::read(uuid16(IMAGE_INFO_CHARACTERISTIC), vec![1]),
            Expect::read(
                uuid16(SENSOR_INFO_CHARACTERISTIC),
                provision::encode_sensors(&info.sensors),
            ),
            Expect::read(
                uuid16(LED_INFO_CHARACTERISTIC),
                provision::encode_leds(&info.leds),
            ),
        ]
    }

    fn all_characteristics() -> Vec<Uuid> {
        let mut all = characteristics();
        all.extend(
            [
                AP_SYNC_KEY_CHARACTERISTIC,
                RESPONSE_KEY_CHARACTERISTIC,
                ABSOLUTE_TIME_CHARACTERISTIC,
                DISPLAY_INFO_CHARACTERISTIC,
                IMAGE_INFO_CHARACTERISTIC,
                SENSOR_INFO_CHARACTERISTIC,
                LED_INFO_CHARACTERISTIC,
            ]
            .map(uuid16),
        );
        all
    }

    #[tokio::test(start_paused = true)]
    async fn configuring_writes_keys_and_time_then_reads_the_information() {
        let info = crate::ble::fake_esl::fake_tag_info();
        let central = script(vec![
            opening(all_characteristics()),
            configuring(&info),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![Expect::command(&show(), &shown())],
            // The Sensor Information lists Present Input Voltage at index
            // 0: read in 1/64 V even though battery is BatteryLevel.
            vec![
                Expect::command(
                    &Command::ReadSensorData {
                        esl_id: 7,
                        sensor_index: 0,
                    },
                    &Response::SensorValue {
                        sensor_index: 0,
                        data: 192u16.to_le_bytes().to_vec(),
                    },
                ),
                Expect::command(
                    &Command::UpdateComplete { esl_id: 7 },
                    &Response::BasicState(BasicState(0)),
                ),
                Expect::Disconnect,
            ],
        ]);
        let plan = SessionPlan {
            configure: Some(provisioning()),
            info: None,
        };
        let s = SessionSettings {
            write_address: false,
            battery: BatterySource::BatteryLevel {
                empty_mv: 2000,
                full_mv: 3000,
            },
            ..settings()
        };
        let report = deliver(&central, TAG, address(), &s, &plan, CONTENT, HASH)
            .await
            .expect("delivered");
        central.assert_done();
        assert_eq!(report.info, Some(info));
        assert_eq!(report.battery_mv, Some(3000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_without_key_material_characteristics_cannot_be_configured() {
        let central = script(vec![vec![
            Expect::Connect(Ok(())),
            Expect::Pair(Ok(Pairing::Existing)),
            Expect::Discover(Ok(characteristics())),
            Expect::Subscribe(uuid16(CONTROL_POINT_CHARACTERISTIC), Ok(())),
            Expect::write(uuid16(ESL_ADDRESS_CHARACTERISTIC), vec![7, 1]),
            Expect::Disconnect,
        ]]);
        let plan = SessionPlan {
            configure: Some(provisioning()),
            info: None,
        };
        let error = deliver(&central, TAG, address(), &settings(), &plan, CONTENT, HASH)
            .await
            .expect_err("missing");
        central.assert_done();
        assert_eq!(
            error.to_string(),
            "tag has no AP Sync Key Material (0x2BF7) characteristic"
        );
        assert!(!error.retryable());
    }

    /// Delivery up to the confirmed Display State, then the battery read.
    fn through_battery() -> Vec<Vec<Expect>> {
        let mut closing = closing();
        closing.truncate(1);
        vec![
            opening(characteristics()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![Expect::command(&show(), &shown())],
            closing,
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_update_complete_is_success_without_the_full_response_timeout() {
        let mut parts = through_battery();
        parts.push(vec![
            Expect::unanswered(&Command::UpdateComplete { esl_id: 7 }),
            Expect::Disconnect,
        ]);
        let central = script(parts);
        let started = tokio::time::Instant::now();
        let report = run(&central).await.expect("delivered");
        central.assert_done();
        assert_eq!(report.basic_state, None);
        // Only Update Complete's own wait; every scripted step is instant.
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn update_complete_answered_invalid_state_fails_and_asks_for_configuring() {
        let mut parts = through_battery();
        parts.push(vec![
            Expect::command(
                &Command::UpdateComplete { esl_id: 7 },
                &Response::Error(ErrorCode::InvalidState),
            ),
            Expect::Disconnect,
        ]);
        let central = script(parts);
        let error = run(&central).await.expect_err("not configured");
        central.assert_done();
        assert!(error.needs_configuring(), "{error}");
        assert!(error.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_parameters_to_the_first_command_means_a_stale_address() {
        let central = script(vec![
            opening(characteristics()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![
                Expect::command(&show(), &Response::Error(ErrorCode::InvalidParameters)),
                Expect::Disconnect,
            ],
        ]);
        let error = run(&central).await.expect_err("stale");
        central.assert_done();
        assert_eq!(
            error,
            TransportError::StaleAddress {
                step: Step::Command("Display Image")
            }
        );
        assert!(error.retryable());
        assert!(error.needs_configuring());

        // Right after configuring, the ID is fresh: Invalid Parameter(s)
        // is the tag's real answer, not retried.
        let central = script(vec![
            opening(all_characteristics()),
            configuring(&crate::ble::fake_esl::fake_tag_info()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![
                Expect::command(&show(), &Response::Error(ErrorCode::InvalidParameters)),
                Expect::Disconnect,
            ],
        ]);
        let plan = SessionPlan {
            configure: Some(provisioning()),
            info: None,
        };
        let error = deliver(&central, TAG, address(), &settings(), &plan, CONTENT, HASH)
            .await
            .expect_err("invalid");
        central.assert_done();
        assert!(matches!(error, TransportError::Esl { .. }), "{error}");
        assert!(!error.retryable());
        assert!(!error.needs_configuring());
    }

    fn ots_characteristics() -> Vec<Uuid> {
        let mut all = characteristics();
        all.extend(
            [
                OACP_CHARACTERISTIC,
                OLCP_CHARACTERISTIC,
                ots::OBJECT_ID_CHARACTERISTIC,
                OBJECT_SIZE_CHARACTERISTIC,
            ]
            .map(uuid16),
        );
        all
    }

    /// A full-screen image for the fake tag's 296x128 black/white display.
    fn bitmap() -> Vec<u8> {
        (0..296 * 128 / 8).map(|i| (i % 251) as u8).collect()
    }

    fn image_content(display: u8, image: u8, bitmap: &[u8]) -> Vec<u8> {
        use base64::Engine as _;
        serde_json::json!({"ble_image": {
            "display": display,
            "image": image,
            "bitmap": base64::engine::general_purpose::STANDARD.encode(bitmap),
        }})
        .to_string()
        .into_bytes()
    }

    fn known_info() -> SessionPlan {
        SessionPlan {
            configure: None,
            info: Some(crate::ble::fake_esl::fake_tag_info()),
        }
    }

    /// Connect … write address for an OTS delivery.
    fn ots_opening() -> Vec<Expect> {
        vec![
            Expect::Connect(Ok(())),
            Expect::Pair(Ok(Pairing::Existing)),
            Expect::Discover(Ok(ots_characteristics())),
            Expect::Subscribe(uuid16(CONTROL_POINT_CHARACTERISTIC), Ok(())),
            Expect::Subscribe(uuid16(OACP_CHARACTERISTIC), Ok(())),
            Expect::Subscribe(uuid16(OLCP_CHARACTERISTIC), Ok(())),
            Expect::write(uuid16(ESL_ADDRESS_CHARACTERISTIC), vec![7, 1]),
        ]
    }

    fn oacp(request: OacpRequest, result: OacpResult, checksum: Option<u32>) -> Expect {
        Expect::indicate(
            uuid16(OACP_CHARACTERISTIC),
            request.encode(),
            OacpResponse {
                request: request.opcode(),
                result,
                checksum,
            }
            .encode(),
        )
    }

    /// Go To object 0x101 and the Object Size read.
    fn select(current: u32) -> Vec<Expect> {
        vec![
            Expect::indicate(
                uuid16(OLCP_CHARACTERISTIC),
                ots::encode_go_to(0x101),
                ots::encode_go_to_response(OlcpResult::Success),
            ),
            Expect::read(
                uuid16(OBJECT_SIZE_CHARACTERISTIC),
                ots::encode_object_size(current, 4736),
            ),
        ]
    }

    /// Channel, Write, bytes, close, Calculate Checksum answered `crc`.
    fn object_write(bitmap: &[u8], crc: u32) -> Vec<Expect> {
        let length = bitmap.len() as u32;
        vec![
            Expect::OpenChannel(OTS_PSM, Ok(())),
            oacp(
                OacpRequest::Write {
                    offset: 0,
                    length,
                    truncate: false,
                },
                OacpResult::Success,
                None,
            ),
            Expect::Send(bitmap.to_vec(), Ok(())),
            Expect::CloseChannel,
            oacp(
                OacpRequest::CalculateChecksum { offset: 0, length },
                OacpResult::Success,
                Some(crc),
            ),
        ]
    }

    async fn run_image(
        central: &ScriptedCentral,
        content: &[u8],
    ) -> Result<SessionReport, TransportError> {
        deliver(
            central,
            TAG,
            address(),
            &settings(),
            &known_info(),
            content,
            HASH,
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_goes_through_ots_and_is_checked_by_its_checksum() {
        let bitmap = bitmap();
        let central = script(vec![
            ots_opening(),
            select(0),
            object_write(&bitmap, crc32fast::hash(&bitmap)),
            vec![Expect::command(&show(), &shown())],
            closing(),
        ]);
        let report = run_image(&central, &image_content(0, 1, &bitmap))
            .await
            .expect("delivered");
        central.assert_done();
        assert!(report.transferred);
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_the_tag_already_holds_is_not_sent_again() {
        let bitmap = bitmap();
        let length = bitmap.len() as u32;
        let mut held = select(length);
        held.push(oacp(
            OacpRequest::CalculateChecksum { offset: 0, length },
            OacpResult::Success,
            Some(crc32fast::hash(&bitmap)),
        ));
        let central = script(vec![
            ots_opening(),
            held,
            vec![Expect::command(&show(), &shown())],
            closing(),
        ]);
        let report = run_image(&central, &image_content(0, 1, &bitmap))
            .await
            .expect("delivered");
        central.assert_done();
        assert!(!report.transferred);
    }

    #[tokio::test(start_paused = true)]
    async fn a_checksum_that_differs_after_the_transfer_is_an_integrity_error() {
        let bitmap = bitmap();
        let central = script(vec![
            ots_opening(),
            select(0),
            object_write(&bitmap, 0xDEAD_BEEF),
            vec![Expect::Disconnect],
        ]);
        let error = run_image(&central, &image_content(0, 1, &bitmap))
            .await
            .expect_err("integrity");
        central.assert_done();
        assert!(
            error.to_string().contains("tag computes CRC-32 0xDEADBEEF"),
            "{error}"
        );
        assert!(error.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn an_oacp_write_the_tag_refuses_fails_with_its_result() {
        let bitmap = bitmap();
        let central = script(vec![
            ots_opening(),
            select(0),
            vec![
                Expect::OpenChannel(OTS_PSM, Ok(())),
                oacp(
                    OacpRequest::Write {
                        offset: 0,
                        length: bitmap.len() as u32,
                        truncate: false,
                    },
                    OacpResult::ChannelUnavailable,
                    None,
                ),
                Expect::CloseChannel,
                Expect::Disconnect,
            ],
        ]);
        let error = run_image(&central, &image_content(0, 1, &bitmap))
            .await
            .expect_err("refused");
        central.assert_done();
        assert_eq!(
            error.to_string(),
            "OACP Write: tag answered Channel Unavailable (0x06)"
        );
        assert!(error.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_that_does_not_fit_the_display_is_refused_naming_the_expected_size() {
        let cases = [
            (
                image_content(0, 1, &[0; 100]),
                "image does not fit the tag: content.ble_image.bitmap is 100 bytes; display 0 \
                 (296x128, BlackWhite) takes 4736 bytes",
            ),
            (
                image_content(0, 2, &bitmap()),
                "image does not fit the tag: content.ble_image.image is 2; the tag has image \
                 slots 0..=1",
            ),
            (
                image_content(1, 0, &bitmap()),
                "image does not fit the tag: content.ble_image.display is 1; the tag has \
                 displays 0..=0",
            ),
        ];
        for (content, message) in cases {
            let mut steps = ots_opening();
            steps.push(Expect::Disconnect);
            let central = ScriptedCentral::new(steps);
            let error = run_image(&central, &content).await.expect_err("misfit");
            central.assert_done();
            assert_eq!(error.to_string(), message);
            assert!(!error.retryable());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_vendor_path_is_used_only_for_content_without_an_image() {
        // An image for a tag without OTS (vendor characteristic only).
        let central = script(vec![vec![
            Expect::Connect(Ok(())),
            Expect::Pair(Ok(Pairing::Existing)),
            Expect::Discover(Ok(characteristics())),
            Expect::Disconnect,
        ]]);
        let error = run_image(&central, &image_content(0, 1, &bitmap()))
            .await
            .expect_err("no OTS");
        central.assert_done();
        assert_eq!(
            error.to_string(),
            "tag has no Object Transfer Service (0x1825: OACP 0x2AC5, OLCP 0x2AC6) characteristic"
        );
        assert!(!error.retryable());
        assert_eq!(
            error.paths_found(),
            Some(ContentPaths {
                ots: false,
                vendor: true
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_that_lost_its_bond_has_ours_removed_and_is_configured_again() {
        let central = script(vec![vec![
            Expect::Connect(Ok(())),
            Expect::Pair(Err(GattError::BondLost)),
            Expect::RemoveBond,
            Expect::Disconnect,
        ]]);
        let error = run(&central).await.expect_err("bond lost");
        central.assert_done();
        assert_eq!(error, TransportError::BondLost);
        assert!(error.retryable());
        assert!(error.needs_configuring());
    }

    #[tokio::test(start_paused = true)]
    async fn content_the_tag_already_holds_is_not_sent_again() {
        let central = script(vec![
            opening(characteristics()),
            vec![
                Expect::read(
                    content_char(),
                    status(TransferState::Committed, CONTENT, HASH),
                ),
                Expect::command(&show(), &shown()),
            ],
            closing(),
        ]);
        let report = run(&central).await.expect("delivered");
        central.assert_done();
        assert!(!report.transferred);
    }

    #[tokio::test(start_paused = true)]
    async fn without_write_address_the_address_is_not_written() {
        let mut steps = opening(vec![uuid16(CONTROL_POINT_CHARACTERISTIC), content_char()]);
        steps.pop();
        let central = script(vec![
            steps,
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![Expect::command(&show(), &shown())],
            closing(),
        ]);
        let s = SessionSettings {
            write_address: false,
            ..settings()
        };
        deliver(
            &central,
            TAG,
            address(),
            &s,
            &SessionPlan::default(),
            CONTENT,
            HASH,
        )
        .await
        .expect("delivered");
        central.assert_done();
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_response_fails_with_its_code() {
        for (code, retryable) in [
            (ErrorCode::ImageNotAvailable, true),
            (ErrorCode::InvalidImageIndex, false),
            (ErrorCode::InsufficientBattery, false),
            (ErrorCode::Retry, true),
        ] {
            let central = script(vec![
                opening(characteristics()),
                transfer(status(TransferState::Committed, CONTENT, HASH)),
                vec![
                    Expect::command(&show(), &Response::Error(code)),
                    Expect::Disconnect,
                ],
            ]);
            let error = run(&central).await.expect_err("ESL error");
            central.assert_done();
            assert_eq!(
                error,
                TransportError::Esl {
                    step: Step::Command("Display Image"),
                    code
                }
            );
            assert_eq!(error.retryable(), retryable, "{code}");
            assert!(error.to_string().contains(&code.to_string()), "{error}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_response_is_a_clear_error() {
        let central = script(vec![
            opening(characteristics()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![
                // Display State cut short: opcode says 2 parameters, 1 came.
                Expect::command_raw(&show(), vec![0x11, 0x00]),
                Expect::Disconnect,
            ],
        ]);
        let error = run(&central).await.expect_err("malformed");
        central.assert_done();
        assert_eq!(
            error.to_string(),
            "Display Image: malformed response: ESL opcode 0x11 needs 3 bytes in all, got 2"
        );
        assert!(error.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_of_the_wrong_kind_or_image_is_unexpected() {
        let wrong = [
            Response::BasicState(BasicState(0)),
            Response::DisplayState {
                display_index: 0,
                image_index: 2,
            },
        ];
        for response in wrong {
            let central = script(vec![
                opening(characteristics()),
                transfer(status(TransferState::Committed, CONTENT, HASH)),
                vec![Expect::command(&show(), &response), Expect::Disconnect],
            ]);
            let error = run(&central).await.expect_err("unexpected");
            central.assert_done();
            assert!(
                matches!(error, TransportError::Unexpected { .. }),
                "{error}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tag_times_out_and_is_disconnected() {
        let central = script(vec![
            opening(characteristics()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![Expect::unanswered(&show()), Expect::Disconnect],
        ]);
        let started = tokio::time::Instant::now();
        let error = run(&central).await.expect_err("timeout");
        central.assert_done();
        assert_eq!(
            error,
            TransportError::Timeout {
                step: Step::Command("Display Image"),
                after: Duration::from_secs(3)
            }
        );
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert!(error.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_gatt_operation_times_out() {
        let central = script(vec![vec![
            Expect::Connect(Ok(())),
            Expect::Pair(Ok(Pairing::Existing)),
            Expect::Hang,
            Expect::Disconnect,
        ]]);
        let error = run(&central).await.expect_err("timeout");
        central.assert_done();
        assert_eq!(
            error,
            TransportError::Timeout {
                step: Step::Discover,
                after: Duration::from_secs(5)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_connect_is_retryable_and_needs_no_disconnect() {
        let central = script(vec![vec![Expect::Connect(Err(GattError::Failed(
            "le-connection-abort-by-local".to_owned(),
        )))]]);
        let error = run(&central).await.expect_err("connect failed");
        central.assert_done();
        assert_eq!(error.to_string(), "connect: le-connection-abort-by-local");
        assert!(error.retryable());
        assert!(!error.adapter_down());

        let central = script(vec![vec![Expect::Connect(Err(GattError::Adapter(
            "no adapter".to_owned(),
        )))]]);
        assert!(run(&central).await.expect_err("adapter").adapter_down());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_without_the_needed_characteristics_is_not_retried() {
        // A missing content path is certain after the discovery: the
        // error carries what the tag offers, for the driver to keep.
        let cases = [
            (
                vec![uuid16(CONTROL_POINT_CHARACTERISTIC)],
                "tag has no vendor content (radio.ble.content_characteristic) characteristic",
                Some(ContentPaths {
                    ots: false,
                    vendor: false,
                }),
            ),
            (
                vec![content_char(), uuid16(ESL_SERVICE)],
                "tag has no ESL Control Point (0x2BFE) characteristic",
                None,
            ),
        ];
        for (discovered, message, paths) in cases {
            let central = script(vec![vec![
                Expect::Connect(Ok(())),
                Expect::Pair(Ok(Pairing::Existing)),
                Expect::Discover(Ok(discovered)),
                Expect::Disconnect,
            ]]);
            let error = run(&central).await.expect_err("missing");
            central.assert_done();
            assert_eq!(error.to_string(), message);
            assert!(!error.retryable());
            assert_eq!(error.paths_found(), paths, "{message}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transfer_the_tag_did_not_get_intact_fails_the_integrity_check() {
        let mut corrupted = CONTENT.to_vec();
        corrupted[3] ^= 0x01;
        let central = script(vec![
            opening(characteristics()),
            transfer(status(TransferState::Failed, &corrupted, HASH)),
            vec![Expect::Disconnect],
        ]);
        let error = run(&central).await.expect_err("integrity");
        central.assert_done();
        let message = error.to_string();
        assert!(
            message.starts_with("content check failed: sent 33 bytes"),
            "{message}"
        );
        assert!(message.contains("tag reports Failed"), "{message}");
        assert!(error.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_content_status_is_an_error() {
        let central = script(vec![
            opening(characteristics()),
            vec![Expect::read(content_char(), vec![2, 0]), Expect::Disconnect],
        ]);
        let error = run(&central).await.expect_err("bad status");
        central.assert_done();
        assert!(matches!(error, TransportError::Status(_)), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_tag_rejects_fails_the_transfer() {
        let central = script(vec![
            opening(characteristics()),
            vec![
                Expect::read(content_char(), idle()),
                Expect::Write {
                    characteristic: content_char(),
                    value: content::frames(1, CONTENT, HASH, 12).unwrap()[0].clone(),
                    result: Err(GattError::Failed("ATT error 0x80".to_owned())),
                    notify: Vec::new(),
                },
                Expect::Disconnect,
            ],
        ]);
        let error = run(&central).await.expect_err("rejected");
        central.assert_done();
        assert_eq!(error.to_string(), "content transfer: ATT error 0x80");
    }

    #[tokio::test(start_paused = true)]
    async fn battery_level_service_is_the_fallback() {
        let mut discovered = characteristics();
        discovered.push(uuid16(BATTERY_LEVEL_CHARACTERISTIC));
        let central = script(vec![
            opening(discovered),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![
                Expect::command(&show(), &shown()),
                Expect::read(uuid16(BATTERY_LEVEL_CHARACTERISTIC), vec![50]),
                Expect::command(
                    &Command::UpdateComplete { esl_id: 7 },
                    &Response::BasicState(BasicState(0)),
                ),
                Expect::Disconnect,
            ],
        ]);
        let s = SessionSettings {
            battery: BatterySource::BatteryLevel {
                empty_mv: 2000,
                full_mv: 3000,
            },
            ..settings()
        };
        let report = deliver(
            &central,
            TAG,
            address(),
            &s,
            &SessionPlan::default(),
            CONTENT,
            HASH,
        )
        .await
        .expect("delivered");
        central.assert_done();
        assert_eq!(report.battery_mv, Some(2500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_battery_read_after_the_display_does_not_fail_the_delivery() {
        let central = script(vec![
            opening(characteristics()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![
                Expect::command(&show(), &shown()),
                Expect::command(
                    &Command::ReadSensorData {
                        esl_id: 7,
                        sensor_index: 0,
                    },
                    &Response::Error(ErrorCode::InvalidParameters),
                ),
                Expect::unanswered(&Command::UpdateComplete { esl_id: 7 }),
                Expect::Disconnect,
            ],
        ]);
        let report = run(&central).await.expect("the display was confirmed");
        central.assert_done();
        assert_eq!(report.battery_mv, None);
        assert_eq!(report.basic_state, None);
    }

    #[tokio::test(start_paused = true)]
    async fn notifications_of_other_characteristics_are_not_answers() {
        let mut answered = Expect::command(&show(), &shown());
        if let Expect::Write { notify, .. } = &mut answered {
            notify.insert(
                0,
                Notification {
                    characteristic: content_char(),
                    value: vec![0x00, 0x01],
                },
            );
        }
        let central = script(vec![
            opening(characteristics()),
            transfer(status(TransferState::Committed, CONTENT, HASH)),
            vec![answered],
            closing(),
        ]);
        run(&central).await.expect("delivered");
        central.assert_done();
    }

    #[tokio::test(start_paused = true)]
    async fn poll_reads_state_and_battery() {
        let mut steps = opening(characteristics());
        steps.push(Expect::command(
            &Command::Ping { esl_id: 7 },
            &Response::BasicState(BasicState(BasicState::SERVICE_NEEDED)),
        ));
        steps.extend(closing());
        let central = ScriptedCentral::new(steps);
        let report = poll(
            &central,
            TAG,
            address(),
            &settings(),
            &SessionPlan::default(),
        )
        .await
        .expect("polled");
        central.assert_done();
        assert_eq!(report.battery_mv, Some(BATTERY_MV));
        assert!(!report.transferred);
    }

    #[tokio::test(start_paused = true)]
    async fn content_that_cannot_be_framed_is_refused_before_connecting() {
        let central = ScriptedCentral::new([]);
        let error = deliver(
            &central,
            TAG,
            address(),
            &settings(),
            &SessionPlan::default(),
            CONTENT,
            &"h".repeat(40),
        )
        .await
        .expect_err("hash too long");
        assert!(matches!(error, TransportError::Content(_)));
        assert!(!error.retryable());
    }

    #[test]
    fn battery_percent_maps_onto_the_voltage_range() {
        assert_eq!(percent_to_mv(0, 2000, 3000), 2000);
        assert_eq!(percent_to_mv(100, 2000, 3000), 3000);
        assert_eq!(percent_to_mv(37, 2000, 3000), 2370);
        assert_eq!(percent_to_mv(250, 2000, 3000), 3000, "clamped");
    }
}
