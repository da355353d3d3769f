//! ZigBee backend: a TI Z-Stack coordinator (CC2652-class stick, ZNP
//! firmware) on a serial port, driving ESL tags that are sleepy end devices.
//!
//! Layout: [`frame`] (MT framing), [`znp`] (request layer: SREQ/SRSP,
//! AREQs, timeouts), [`firmware`] (bootloader skip, probe, Z-Stack version),
//! [`nv`] (NV items, the stick's stored network), [`backup`] (the saved
//! network as Open Coordinator Backup JSON), [`devices`] (the devices on
//! the network by IEEE address, and the tag-id rule), [`commission`] (start-up:
//! forming, resuming, restoring or adopting the network), [`app`] (the ESL
//! messages inside AF frames, postcard), `driver` (the one task that owns
//! the port: connect, delivery, adapter loss and reconnect), this file
//! (config, counters and [`ZigbeeRadio`], the agent's handle). `fake`
//! (feature `fake`) is a ZNP coordinator with simulated tags on a
//! pseudo-terminal, for tests.
//!
//! Channels: [`ZigbeeRadio::deliver`] writes `delivery_tx` (bounded,
//! [`DELIVERY_CAPACITY`]); the driver reads it and writes `event_tx`
//! (bounded, [`EVENT_CAPACITY`]); [`ZigbeeRadio::next_event`] reads
//! `event_rx`; [`ZigbeeRadio::permit_join`] and
//! [`ZigbeeRadio::change_channel`] write `command_tx` (bounded,
//! [`COMMAND_CAPACITY`]) with a oneshot for the answer. As in the
//! simulator, the driver never awaits an event send outside its `select!`,
//! so an agent blocked in `deliver` cannot deadlock it.
//!
//! The adapter may vanish at any time (USB unplugged, firmware hung): the
//! driver then reports [`RadioState::Down`](crate::RadioState), fails what
//! was in flight as retryable, answers new deliveries with a retryable
//! failure, and reopens the port with exponential backoff until start-up
//! succeeds again. It ends only when the agent drops the [`ZigbeeRadio`].

pub mod app;
pub mod backup;
pub mod commission;
pub mod devices;
mod driver;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod firmware;
pub mod frame;
pub mod nv;
#[cfg(test)]
mod pty_tests;
mod section;
pub mod znp;

pub use section::ZigbeeSection;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::{
    Delivery, DriverChannels, Radio, RadioCounters, RadioError, RadioErrorKind, RadioEvent,
    RadioInventory,
};

/// Capacity of the delivery channel. The driver sends one AF_DATA_REQUEST
/// per delivery (a few ms each on a 115200 baud line) and takes the next at
/// once, so this only absorbs a burst of tags waking together.
pub const DELIVERY_CAPACITY: usize = 64;
/// Capacity of the event channel: a burst of check-ins and outcomes; the
/// rest waits in the driver's own queue (see `driver`).
pub const EVENT_CAPACITY: usize = 256;

/// Capacity of the network-command channel (permit-join, channel change): an operator's
/// commands, one at a time.
pub const COMMAND_CAPACITY: usize = 4;
/// Longest permit-join in seconds (255 would mean "for ever" in ZigBee,
/// which the agent never asks for).
pub const MAX_PERMIT_JOIN_S: u8 = 254;

/// A network-management command for the driver, answered on `reply`.
#[derive(Debug)]
pub(crate) enum NetworkCommand {
    PermitJoin {
        seconds: u8,
        reply: tokio::sync::oneshot::Sender<Result<(), ZigbeeError>>,
    },
    /// Answered once the coordinator is on `channel` and the network file
    /// says so.
    ChangeChannel {
        channel: u8,
        reply: tokio::sync::oneshot::Sender<Result<(), ZigbeeError>>,
    },
}

impl NetworkCommand {
    /// Answers the command with `result` (a dropped asker is no error).
    pub(crate) fn answer(self, result: Result<(), ZigbeeError>) {
        let reply = match self {
            NetworkCommand::PermitJoin { reply, .. }
            | NetworkCommand::ChangeChannel { reply, .. } => reply,
        };
        let _ = reply.send(result);
    }
}

/// Flow control on the serial line (`radio.zigbee.flow_control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    /// No flow control (most CC2652 sticks at 115200 baud).
    #[default]
    None,
    /// RTS/CTS (CC2530/CC2531 firmware builds that need it).
    Hardware,
    /// XON/XOFF.
    Software,
}

/// What the start-up does when the stick's network is not the saved one
/// (`radio.zigbee.on_network_mismatch`; docs/ZIGBEE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMismatch {
    /// Report the radio down with the reason and the remedies; touch
    /// nothing.
    #[default]
    Report,
    /// Write the saved network to the stick (a replaced or reset stick).
    Restore,
    /// Take the stick's network as the agent's and save it.
    Adopt,
    /// Form a new network (every tag must join again); the old saved
    /// network is kept as `….json.old`.
    Form,
}

impl NetworkMismatch {
    pub fn name(self) -> &'static str {
        match self {
            NetworkMismatch::Report => "report",
            NetworkMismatch::Restore => "restore",
            NetworkMismatch::Adopt => "adopt",
            NetworkMismatch::Form => "form",
        }
    }
}

/// The global trust-centre link key a network is formed with: the key
/// every tag must hold to be sent the network key at joining (`PRECFGKEYS_
/// ENABLE = 0`). A secret: `Debug` never shows it (only whether it is the
/// well-known default).
#[derive(Clone, PartialEq, Eq)]
pub struct TcLinkKey([u8; 16]);

impl TcLinkKey {
    /// "ZigBeeAlliance09", the key of the ZigBee 3.0 and HA specifications
    /// that every tag knows, and the one Z-Stack 3 builds have compiled in
    /// (zigpy-znp `const.DEFAULT_TC_LINK_KEY`).
    pub const DEFAULT: TcLinkKey = TcLinkKey(*b"ZigBeeAlliance09");

    pub fn new(key: [u8; 16]) -> TcLinkKey {
        TcLinkKey(key)
    }

    /// 32 hex digits (surrounding whitespace ignored), the key's bytes in
    /// order, as in the key file and in backups.
    pub fn from_hex(text: &str) -> Option<TcLinkKey> {
        backup::unhex16(text.trim()).map(TcLinkKey)
    }

    /// The key's bytes: only for the stick and the saved network.
    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn is_default(&self) -> bool {
        *self == TcLinkKey::DEFAULT
    }
}

impl Default for TcLinkKey {
    fn default() -> Self {
        TcLinkKey::DEFAULT
    }
}

impl std::fmt::Debug for TcLinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_default() {
            f.write_str("TcLinkKey(default)")
        } else {
            f.write_str("TcLinkKey(<secret>)")
        }
    }
}

/// ZigBee backend settings (`[radio.zigbee]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ZigbeeConfig {
    /// Serial device of the coordinator (`/dev/ttyUSB0`, or better a stable
    /// `/dev/serial/by-id/…` link).
    pub port: PathBuf,
    pub baud_rate: u32,
    pub flow_control: FlowControl,
    /// Our application endpoint on the coordinator (1..=240).
    pub endpoint: u8,
    /// Longest wait for an SRSP.
    pub sreq_timeout: Duration,
    /// DTR/RTS states at open, the bootloader-skip byte and how long to
    /// probe for the stick.
    pub bootloader: firmware::BootloaderSkip,
    /// Where the agent's network is saved (Open Coordinator Backup JSON,
    /// mode 0600: it holds the network key).
    pub network_file: PathBuf,
    /// Channels a new network may use (11..=26); the stick picks the
    /// quietest.
    pub channels: Vec<u8>,
    /// PAN id and extended PAN id of a new network; random when `None`.
    pub pan_id: Option<u16>,
    pub extended_pan_id: Option<u64>,
    pub on_network_mismatch: NetworkMismatch,
    /// The global trust-centre link key of a new network
    /// (`radio.zigbee.tc_link_key_file`, read by the agent; default: the
    /// well-known key). Saved with the network and compared at every
    /// start.
    pub tc_link_key: TcLinkKey,
    /// How often the network file is refreshed from the stick (frame
    /// counter, channel) while it runs; zero: never.
    pub backup_interval: Duration,
    /// Data requests in flight at once; `None`: by firmware (16 on Z-Stack
    /// 3.x.0 sticks, 4 on older ones).
    pub max_in_flight: Option<usize>,
    /// Longest wait for `SYS_RESET_IND` after a soft reset.
    pub reset_timeout: Duration,
    /// Longest wait for the coordinator to come up on its network, and for
    /// each commissioning step (`ZDO_STARTUP_FROM_APP`, BDB formation):
    /// real sticks take seconds (zigbee-herdsman allows 40 s).
    pub startup_timeout: Duration,
    /// Longest wait for `AF_DATA_CONFIRM` after a data request; must cover
    /// the coordinator's indirect-transmission timeout for sleepy tags
    /// (7.68 s by default in Z-Stack).
    pub confirm_timeout: Duration,
    /// Longest wait for the tag's update result after the confirm (e-paper
    /// refresh takes seconds).
    pub result_timeout: Duration,
    /// A quiet adapter is pinged this often; one that does not answer is
    /// treated as lost.
    pub ping_interval: Duration,
    /// First and largest pause between reconnect attempts.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for ZigbeeConfig {
    fn default() -> Self {
        Self {
            port: PathBuf::from("/dev/ttyUSB0"),
            baud_rate: 115_200,
            flow_control: FlowControl::None,
            endpoint: 32,
            bootloader: firmware::BootloaderSkip::default(),
            network_file: PathBuf::from("/var/lib/esl-agent/zigbee-network.json"),
            channels: vec![11, 15, 20, 25],
            pan_id: None,
            extended_pan_id: None,
            on_network_mismatch: NetworkMismatch::Report,
            tc_link_key: TcLinkKey::DEFAULT,
            backup_interval: Duration::from_secs(3600),
            max_in_flight: None,
            sreq_timeout: Duration::from_millis(2_000),
            reset_timeout: Duration::from_millis(10_000),
            startup_timeout: Duration::from_millis(40_000),
            confirm_timeout: Duration::from_millis(10_000),
            result_timeout: Duration::from_millis(10_000),
            ping_interval: Duration::from_millis(10_000),
            reconnect_min: Duration::from_millis(1_000),
            reconnect_max: Duration::from_millis(60_000),
        }
    }
}

/// Why the ZigBee radio could not start.
#[derive(Debug, thiserror::Error)]
pub enum ZigbeeError {
    /// A setting is out of range; `key` is its config key
    /// (`radio.zigbee.endpoint`).
    #[error("invalid {key}: {reason}")]
    InvalidConfig { key: &'static str, reason: String },
    #[error("the ZigBee radio must be started inside a tokio runtime")]
    NoRuntime,
    /// A network request that can never be carried out as asked.
    #[error("{0}")]
    InvalidRequest(String),
    /// The adapter is not connected (unplugged, restarting), or the driver
    /// has stopped; the request may work later.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The coordinator refused or did not answer a network request.
    #[error("the coordinator did not carry out the request")]
    Coordinator(#[source] znp::ZnpError),
}

macro_rules! zigbee_counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// What went wrong on the serial line and the network, since start.
        /// Shown in the agent's status as `zigbee_<name>`.
        #[derive(Debug, Default)]
        pub struct ZigbeeCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl RadioCounters for ZigbeeCounters {
            fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((concat!("zigbee_", stringify!($name)), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

zigbee_counters! {
    /// Bytes skipped while looking for a start byte.
    garbage_bytes,
    /// Frames dropped for a bad checksum.
    bad_fcs_frames,
    /// Frames dropped for a length over 250.
    oversized_frames,
    /// Frames of a type the adapter never sends (SREQ, POLL).
    unexpected_frames,
    /// SREQs without an SRSP in time.
    sreq_timeouts,
    /// SRSPs that matched no outstanding request (late answers).
    stale_responses,
    /// RPC-error replies (the adapter could not parse a request).
    rpc_errors,
    /// AREQs dropped because the backlog was full.
    areqs_dropped,
    /// AF messages on our endpoint that are no valid ESL message.
    bad_app_messages,
    /// Deliveries without AF_DATA_CONFIRM in time.
    confirm_timeouts,
    /// Deliveries confirmed by the network but not answered by the tag.
    result_timeouts,
    /// Confirms and tag results for deliveries no longer in flight.
    late_replies,
    /// Joins and device announces (a device joined, rejoined or moved).
    device_announces,
    /// Route discoveries after a "no route" confirm (0xCD).
    route_discoveries,
    /// Tags dropped as the coordinator's child after two expired offers
    /// (0xF0), and entries put back because the offer failed anyway.
    stale_children_dropped,
    stale_children_restored,
    /// Check-ins dropped because the agent did not keep up.
    checkins_dropped,
    /// Successful start-ups of the adapter, and losses of it.
    adapter_starts,
    adapter_losses,
}

impl ZigbeeCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One counter's value by its short name (`bad_fcs_frames`), for tests.
    pub fn get(&self, name: &str) -> Option<u64> {
        let full = format!("zigbee_{name}");
        self.snapshot()
            .into_iter()
            .find(|(n, _)| *n == full)
            .map(|(_, v)| v)
    }
}

/// The agent's handle on the ZigBee driver task. Dropping it ends the task.
#[derive(Debug)]
pub struct ZigbeeRadio {
    channels: DriverChannels,
    counters: Arc<ZigbeeCounters>,
    command_tx: mpsc::Sender<NetworkCommand>,
}

impl ZigbeeRadio {
    /// Validates `cfg` and spawns the driver on the current tokio runtime.
    /// Returns at once: the adapter is opened in the background, and its
    /// absence is a `RadioState::Down`, not an error.
    pub fn start(cfg: ZigbeeConfig) -> Result<ZigbeeRadio, ZigbeeError> {
        cfg.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ZigbeeError::NoRuntime)?;
        let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
        let (command_tx, command_rx) = mpsc::channel(COMMAND_CAPACITY);
        let counters = Arc::new(ZigbeeCounters::default());
        let driver = driver::Driver::new(cfg, counters.clone(), delivery_rx, event_tx, command_rx);
        runtime.spawn(driver.run());
        Ok(ZigbeeRadio {
            channels: DriverChannels::new("ZigBee driver", delivery_tx, event_rx),
            counters,
            command_tx,
        })
    }

    /// Opens the network for joining for `seconds` (0 closes it), at the
    /// coordinator and every router (`ZDO_MGMT_PERMIT_JOIN_REQ` broadcast).
    /// Fails when the adapter is not up, or `seconds` is over
    /// [`MAX_PERMIT_JOIN_S`].
    pub async fn permit_join(&self, seconds: u8) -> Result<(), ZigbeeError> {
        if seconds > MAX_PERMIT_JOIN_S {
            return Err(ZigbeeError::InvalidRequest(format!(
                "permit-join of {seconds} s: at most {MAX_PERMIT_JOIN_S}"
            )));
        }
        self.command(|reply| NetworkCommand::PermitJoin { seconds, reply })
            .await
    }

    /// Moves the network to `channel` (11..=26): a channel-change request
    /// broadcast to every device, which the coordinator follows too
    /// (`commission::change_channel`); answers once the coordinator is on
    /// the new channel and the network file says so. Tags that missed the
    /// broadcast must rejoin (docs/ZIGBEE.md, "Changing channel"). Fails
    /// when the adapter is not up, or `channel` is out of range.
    pub async fn change_channel(&self, channel: u8) -> Result<(), ZigbeeError> {
        if !(11..=26).contains(&channel) {
            return Err(ZigbeeError::InvalidRequest(format!(
                "channel {channel}: ZigBee channels are 11 to 26"
            )));
        }
        self.command(|reply| NetworkCommand::ChangeChannel { channel, reply })
            .await
    }

    /// Hands a command to the driver and waits for its answer.
    async fn command(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), ZigbeeError>>) -> NetworkCommand,
    ) -> Result<(), ZigbeeError> {
        let stopped = || ZigbeeError::Unavailable("the ZigBee driver has stopped");
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.command_tx
            .send(command(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub fn zigbee_counters(&self) -> &Arc<ZigbeeCounters> {
        &self.counters
    }
}

impl ZigbeeError {
    /// The radio error of a failed network request `what`, this error its
    /// source; its kind says whether asking again can help.
    fn into_radio_error(self, what: &'static str) -> RadioError {
        let kind = match self {
            ZigbeeError::InvalidRequest(_) | ZigbeeError::InvalidConfig { .. } => {
                RadioErrorKind::InvalidRequest
            }
            _ => RadioErrorKind::Unavailable,
        };
        RadioError::new(kind, what).with_source(self)
    }
}

impl ZigbeeConfig {
    /// Checks every setting; the error names the config key.
    pub fn validate(&self) -> Result<(), ZigbeeError> {
        let invalid = |key, reason: &str| {
            Err(ZigbeeError::InvalidConfig {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.port.as_os_str().is_empty() || self.port.to_str().is_none() {
            return invalid("radio.zigbee.port", "must be a non-empty UTF-8 device path");
        }
        if self.baud_rate == 0 {
            return invalid("radio.zigbee.baud_rate", "must be at least 1");
        }
        if !(1..=240).contains(&self.endpoint) {
            return invalid("radio.zigbee.endpoint", "must be between 1 and 240");
        }
        if self.network_file.as_os_str().is_empty() {
            return invalid("radio.zigbee.network_file", "must be a file path");
        }
        if self.channels.is_empty() || self.channels.iter().any(|c| !(11..=26).contains(c)) {
            return invalid(
                "radio.zigbee.channels",
                "must list at least one channel, each in 11..=26",
            );
        }
        if self.pan_id.is_some_and(|p| p == 0 || p > 0xFFF6) {
            return invalid("radio.zigbee.pan_id", "must be between 0x0001 and 0xFFF6");
        }
        if self
            .extended_pan_id
            .is_some_and(|e| e == 0 || e == u64::MAX)
        {
            return invalid(
                "radio.zigbee.extended_pan_id",
                "must not be all zeros or all ones",
            );
        }
        if self.max_in_flight == Some(0) {
            return invalid("radio.zigbee.max_in_flight", "must be at least 1");
        }
        if self.bootloader.pin_states.len() > 16 {
            return invalid("radio.zigbee.bootloader_pins", "at most 16 DTR/RTS states");
        }
        let timeouts = [
            ("radio.zigbee.sreq_timeout_ms", self.sreq_timeout),
            ("radio.zigbee.reset_timeout_ms", self.reset_timeout),
            (
                "radio.zigbee.probe_timeout_ms",
                self.bootloader.probe_timeout,
            ),
            ("radio.zigbee.startup_timeout_ms", self.startup_timeout),
            ("radio.zigbee.confirm_timeout_ms", self.confirm_timeout),
            ("radio.zigbee.result_timeout_ms", self.result_timeout),
            ("radio.zigbee.ping_interval_ms", self.ping_interval),
            ("radio.zigbee.reconnect_min_ms", self.reconnect_min),
        ];
        for (key, value) in timeouts {
            if value.is_zero() {
                return invalid(key, "must be at least 1");
            }
        }
        if self.reconnect_max < self.reconnect_min {
            return invalid(
                "radio.zigbee.reconnect_max_ms",
                "must be at least radio.zigbee.reconnect_min_ms",
            );
        }
        Ok(())
    }
}

impl Radio for ZigbeeRadio {
    async fn next_event(&mut self) -> Result<RadioEvent, RadioError> {
        self.channels.next_event().await
    }

    async fn deliver(&mut self, delivery: Delivery) -> Result<(), RadioError> {
        self.channels.deliver(delivery).await
    }

    fn inventory(&self) -> RadioInventory {
        RadioInventory {
            counters: Some(self.counters.clone()),
            ..RadioInventory::default()
        }
    }

    async fn permit_join(&mut self, seconds: u8) -> Result<(), RadioError> {
        ZigbeeRadio::permit_join(self, seconds)
            .await
            .map_err(|e| e.into_radio_error("permit-join"))
    }

    async fn change_channel(&mut self, channel: u8) -> Result<(), RadioError> {
        ZigbeeRadio::change_channel(self, channel)
            .await
            .map_err(|e| e.into_radio_error("channel change"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_config_names_the_key() {
        let cases = [
            (
                ZigbeeConfig {
                    endpoint: 0,
                    ..ZigbeeConfig::default()
                },
                "radio.zigbee.endpoint",
            ),
            (
                ZigbeeConfig {
                    port: PathBuf::new(),
                    ..ZigbeeConfig::default()
                },
                "radio.zigbee.port",
            ),
            (
                ZigbeeConfig {
                    confirm_timeout: Duration::ZERO,
                    ..ZigbeeConfig::default()
                },
                "radio.zigbee.confirm_timeout_ms",
            ),
            (
                ZigbeeConfig {
                    reconnect_max: Duration::from_millis(1),
                    ..ZigbeeConfig::default()
                },
                "radio.zigbee.reconnect_max_ms",
            ),
        ];
        for (cfg, key) in cases {
            let error = cfg.validate().expect_err("invalid");
            assert!(error.to_string().contains(key), "{error}");
        }
        ZigbeeConfig::default()
            .validate()
            .expect("defaults are valid");
    }

    #[test]
    fn counters_have_prefixed_names() {
        let counters = ZigbeeCounters::default();
        ZigbeeCounters::bump(&counters.bad_fcs_frames);
        let snapshot = counters.snapshot();
        assert!(snapshot.contains(&("zigbee_bad_fcs_frames", 1)));
        assert!(snapshot.iter().all(|(name, _)| name.starts_with("zigbee_")));
        assert_eq!(counters.get("bad_fcs_frames"), Some(1));
    }
}
