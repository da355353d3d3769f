//! `[radio]`: which backend, and each backend's own section. The
//! simulator's and the BLE radio's sections deserialise straight into the
//! hal's config types; ZigBee's keeps times in milliseconds here.

use std::path::PathBuf;

use esl_hal::zigbee::{FlowControl, NetworkMismatch, ZigbeeConfig};
use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, TasksConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RadioKind {
    #[default]
    Sim,
    /// Z-Stack ZNP coordinator on a serial port (docs/ZIGBEE.md).
    Zigbee,
    /// ESL tags over Bluetooth LE (`[radio.ble]`, docs/BLE.md).
    Ble,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RadioConfig {
    pub kind: RadioKind,
    /// PROTOCOL §8; defaults and field docs in `esl_hal::sim::SimConfig`.
    pub sim: esl_hal::sim::SimConfig,
    pub zigbee: ZigbeeRadioConfig,
    /// Validated by `esl_hal::ble::BleConfig::validate` (key names included).
    pub ble: esl_hal::ble::BleConfig,
}

/// `[radio.zigbee]`. Defaults come from `esl_hal::zigbee::ZigbeeConfig`, so
/// they live in one place; times are in milliseconds here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZigbeeRadioConfig {
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

impl Default for ZigbeeRadioConfig {
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

impl ZigbeeRadioConfig {
    /// The backend's settings.
    pub fn to_hal(&self) -> ZigbeeConfig {
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
            // Checked by `validate_zigbee`.
            extended_pan_id: self
                .extended_pan_id
                .as_deref()
                .and_then(parse_extended_pan_id),
            on_network_mismatch: self.on_network_mismatch,
            backup_interval: Duration::from_millis(self.backup_interval_ms),
            bootloader: esl_hal::zigbee::firmware::BootloaderSkip {
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

impl RadioConfig {
    /// Rules of the radio sections; `tasks` for the time-outs the radio
    /// must stay within.
    pub(crate) fn validate(&self, tasks: &TasksConfig) -> Result<(), ConfigError> {
        let s = &self.sim;
        if s.tags > 1_000_000 {
            return Err(invalid("radio.sim.tags", "must be at most 1000000"));
        }
        if s.id_prefix.len() > 26 || !s.id_prefix.chars().all(crate::ids::is_tag_char) {
            return Err(invalid(
                "radio.sim.id_prefix",
                "must be at most 26 characters of letters, digits, '_', '.', ':' and '-'",
            ));
        }
        if s.checkin_interval_ms == 0 {
            return Err(invalid(
                "radio.sim.checkin_interval_ms",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&s.fail_rate) {
            return Err(invalid(
                "radio.sim.fail_rate",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.kind == RadioKind::Ble {
            let ble = &self.ble;
            ble.validate().map_err(|e| invalid(e.key, e.rule))?;
            // The engine must not give up on an attempt the radio still makes.
            let worst = ble.worst_case_attempt();
            if worst >= std::time::Duration::from_millis(tasks.delivery_timeout_ms) {
                return Err(invalid(
                    "tasks.delivery_timeout_ms",
                    format!(
                        "must be more than {} ms, the longest BLE attempt \
                         ((radio.ble.retries + 1) × radio.ble.session_timeout_ms + backoffs)",
                        worst.as_millis()
                    ),
                ));
            }
        }
        if self.kind == RadioKind::Zigbee {
            self.validate_zigbee(tasks)?;
        }
        Ok(())
    }

    fn validate_zigbee(&self, tasks: &TasksConfig) -> Result<(), ConfigError> {
        let z = &self.zigbee;
        if let Some(ext) = &z.extended_pan_id {
            if parse_extended_pan_id(ext).is_none() {
                return Err(invalid(
                    "radio.zigbee.extended_pan_id",
                    format!("{ext:?} is not 16 hex digits"),
                ));
            }
        }
        if let Err(esl_hal::zigbee::ZigbeeError::InvalidConfig { key, reason }) =
            z.to_hal().validate()
        {
            return Err(invalid(key, reason));
        }
        // The engine counts a delivery without an outcome as failed after
        // its own timeout; the radio must answer before that, or a slow but
        // successful update is counted as a failure.
        let radio_wait = z.confirm_timeout_ms.saturating_add(z.result_timeout_ms);
        if radio_wait >= tasks.delivery_timeout_ms {
            return Err(invalid(
                "radio.zigbee.result_timeout_ms",
                format!(
                    "confirm_timeout_ms + result_timeout_ms ({radio_wait}) must be below tasks.delivery_timeout_ms ({})",
                    tasks.delivery_timeout_ms
                ),
            ));
        }
        Ok(())
    }
}
