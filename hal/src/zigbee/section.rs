//! The `[radio.zigbee]` section of the agent's config file, owned here
//! like every backend's section, so the agent embeds it as it is.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{firmware, FlowControl, NetworkMismatch, TcLinkKey, ZigbeeConfig, ZigbeeError};

/// `[radio.zigbee]` as written in the agent's config file: times in
/// milliseconds, the extended PAN id as 16 hex digits. Defaults come from
/// [`ZigbeeConfig`], so they live in one place; [`ZigbeeSection::settings`]
/// turns it into the backend's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZigbeeSection {
    /// Serial device of the coordinator stick.
    pub port: PathBuf,
    pub baud_rate: u32,
    /// `"none"`, `"hardware"` (RTS/CTS) or `"software"` (XON/XOFF).
    pub flow_control: FlowControl,
    /// The agent's application endpoint on the coordinator.
    pub endpoint: u8,
    /// The agent's saved network (Open Coordinator Backup JSON, 0600);
    /// default: `zigbee-network.json` next to the store.
    pub network_file: Option<PathBuf>,
    /// Channels a new network may use.
    pub channels: Vec<u8>,
    /// PAN id and extended PAN id (16 hex digits) of a new network; random
    /// when absent.
    pub pan_id: Option<u16>,
    pub extended_pan_id: Option<String>,
    /// `"report"`, `"restore"`, `"adopt"` or `"form"` (docs/ZIGBEE.md).
    pub on_network_mismatch: NetworkMismatch,
    /// A file (mode 0600) holding the global trust-centre link key of a
    /// new network as 32 hex digits; absent: the well-known default. A
    /// secret: the agent reads it like its other secret files and hands
    /// it to [`ZigbeeSection::settings_with`].
    pub tc_link_key_file: Option<PathBuf>,
    /// Refresh of the network file from the stick; 0: never.
    pub backup_interval_ms: u64,
    /// `[dtr, rts]` states at open; `[]` leaves the lines alone.
    pub bootloader_pins: Vec<[bool; 2]>,
    pub bootloader_skip_byte: bool,
    pub probe_timeout_ms: u64,
    /// Data requests in flight at once; default by firmware.
    pub max_in_flight: Option<usize>,
    pub sreq_timeout_ms: u64,
    pub reset_timeout_ms: u64,
    pub startup_timeout_ms: u64,
    pub confirm_timeout_ms: u64,
    pub result_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for ZigbeeSection {
    fn default() -> Self {
        let d = ZigbeeConfig::default();
        let ms = |t: std::time::Duration| u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
        Self {
            port: d.port,
            baud_rate: d.baud_rate,
            flow_control: d.flow_control,
            endpoint: d.endpoint,
            network_file: None,
            channels: d.channels,
            pan_id: d.pan_id,
            extended_pan_id: None,
            on_network_mismatch: d.on_network_mismatch,
            tc_link_key_file: None,
            backup_interval_ms: ms(d.backup_interval),
            bootloader_pins: d
                .bootloader
                .pin_states
                .iter()
                .map(|&(dtr, rts)| [dtr, rts])
                .collect(),
            bootloader_skip_byte: d.bootloader.skip_byte,
            probe_timeout_ms: ms(d.bootloader.probe_timeout),
            max_in_flight: d.max_in_flight,
            sreq_timeout_ms: ms(d.sreq_timeout),
            reset_timeout_ms: ms(d.reset_timeout),
            startup_timeout_ms: ms(d.startup_timeout),
            confirm_timeout_ms: ms(d.confirm_timeout),
            result_timeout_ms: ms(d.result_timeout),
            ping_interval_ms: ms(d.ping_interval),
            reconnect_min_ms: ms(d.reconnect_min),
            reconnect_max_ms: ms(d.reconnect_max),
        }
    }
}

impl ZigbeeSection {
    /// Checks every key; the error names it (`radio.zigbee.endpoint`).
    pub fn validate(&self) -> Result<(), ZigbeeError> {
        if let Some(ext) = &self.extended_pan_id {
            if parse_extended_pan_id(ext).is_none() {
                return Err(ZigbeeError::InvalidConfig {
                    key: "radio.zigbee.extended_pan_id",
                    reason: format!("{ext:?} is not 16 hex digits"),
                });
            }
        }
        self.settings().validate()
    }

    /// The backend's settings with the trust-centre link key read from
    /// `tc_link_key_file` (its text; `None` when the key is not set): the
    /// error names the key and never shows the file's content.
    pub fn settings_with(&self, key_file_text: Option<&str>) -> Result<ZigbeeConfig, ZigbeeError> {
        let mut settings = self.settings();
        if let Some(text) = key_file_text {
            settings.tc_link_key =
                TcLinkKey::from_hex(text).ok_or_else(|| ZigbeeError::InvalidConfig {
                    key: "radio.zigbee.tc_link_key_file",
                    reason: "the file must hold the key as 32 hex digits".to_owned(),
                })?;
        }
        Ok(settings)
    }

    /// The backend's settings, the trust-centre link key left at the
    /// default (see [`ZigbeeSection::settings_with`]).
    pub fn settings(&self) -> ZigbeeConfig {
        use std::time::Duration;
        let d = ZigbeeConfig::default();
        ZigbeeConfig {
            port: self.port.clone(),
            baud_rate: self.baud_rate,
            flow_control: self.flow_control,
            endpoint: self.endpoint,
            network_file: self.network_file.clone().unwrap_or(d.network_file),
            channels: self.channels.clone(),
            pan_id: self.pan_id,
            // Checked by `validate`.
            extended_pan_id: self
                .extended_pan_id
                .as_deref()
                .and_then(parse_extended_pan_id),
            on_network_mismatch: self.on_network_mismatch,
            tc_link_key: TcLinkKey::DEFAULT,
            backup_interval: Duration::from_millis(self.backup_interval_ms),
            bootloader: firmware::BootloaderSkip {
                pin_states: self.bootloader_pins.iter().map(|[d, r]| (*d, *r)).collect(),
                skip_byte: self.bootloader_skip_byte,
                probe_timeout: Duration::from_millis(self.probe_timeout_ms),
            },
            max_in_flight: self.max_in_flight,
            sreq_timeout: Duration::from_millis(self.sreq_timeout_ms),
            reset_timeout: Duration::from_millis(self.reset_timeout_ms),
            startup_timeout: Duration::from_millis(self.startup_timeout_ms),
            confirm_timeout: Duration::from_millis(self.confirm_timeout_ms),
            result_timeout: Duration::from_millis(self.result_timeout_ms),
            ping_interval: Duration::from_millis(self.ping_interval_ms),
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
        }
    }
}

/// 16 hex digits, as in Open Coordinator Backups.
fn parse_extended_pan_id(text: &str) -> Option<u64> {
    (text.len() == 16)
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}
