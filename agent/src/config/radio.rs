//! `[radio]`: which backend, and each backend's own section. Every
//! backend's section deserialises straight into a type of the hal
//! (`SimConfig`, `ZigbeeSection`, `BleConfig`), which holds its defaults
//! and validates it with the keys' full names; only the rules that tie a
//! radio to the other sections (time-outs) are checked here.

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
    /// Validated by `esl_hal::zigbee::ZigbeeSection::validate`.
    pub zigbee: esl_hal::zigbee::ZigbeeSection,
    /// Validated by `esl_hal::ble::BleConfig::validate` (key names included).
    pub ble: esl_hal::ble::BleConfig,
}

impl RadioConfig {
    /// Rules of the radio sections; `tasks` for the time-outs the radio
    /// must stay within.
    pub(crate) fn validate(&self, tasks: &TasksConfig) -> Result<(), ConfigError> {
        if let Err(esl_hal::sim::SimError::InvalidConfig { key, reason }) = self.sim.validate() {
            return Err(invalid(key, reason));
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
        Ok(())
    }

    /// `[radio.zigbee]`, checked after `[security]` (`Config::validate`).
    pub(crate) fn validate_zigbee(&self, tasks: &TasksConfig) -> Result<(), ConfigError> {
        let z = &self.zigbee;
        if let Err(esl_hal::zigbee::ZigbeeError::InvalidConfig { key, reason }) = z.validate() {
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
