//! The agent's saved network, in the Open Coordinator Backup JSON format
//! (`zigpy/open-coordinator-backup`, version 1) that zigpy-znp and
//! Zigbee2MQTT read and write, so a backup moves between them.
//!
//! Owns: the format ([`NetworkBackup`]), its conversion to and from
//! [`StickNetwork`], and the file: written atomically with mode 0600 (it
//! holds the network key), never logged. Must not: talk to the stick
//! (`commission` reads and writes it).
//!
//! Fields checked against zigpy-znp `tools/network_backup.py`
//! (`zigpy_state_to_json_backup`: big-endian hex for addresses and PAN
//! ids, the key's bytes in order) and zigbee-herdsman `utils/backup.ts`
//! (`toUnifiedBackup`/`fromUnifiedBackup`, which parses the PAN id as hex
//! without zero padding; both are accepted here).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::nv::{self, StickNetwork};

/// `metadata.format` of the format.
pub const FORMAT: &str = "zigpy/open-coordinator-backup";
/// `metadata.version` this code writes and reads.
pub const VERSION: u32 = 1;

/// Why a backup could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is no Open Coordinator Backup: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// One Open Coordinator Backup document. Devices are kept as JSON values:
/// [`super::devices`] reads and updates the fields it knows, and whatever
/// else a zigpy or Zigbee2MQTT backup holds stays in the file.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkBackup {
    pub metadata: Metadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_specific: Option<StackSpecific>,
    pub coordinator_ieee: String,
    pub pan_id: String,
    pub extended_pan_id: String,
    pub nwk_update_id: u8,
    pub security_level: u8,
    pub channel: u8,
    pub channel_mask: Vec<u8>,
    pub network_key: NetworkKey,
    #[serde(default)]
    pub devices: Vec<serde_json::Value>,
}

/// Never prints the key.
impl std::fmt::Debug for NetworkBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkBackup")
            .field("pan_id", &self.pan_id)
            .field("extended_pan_id", &self.extended_pan_id)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format: String,
    pub version: u32,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub internal: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackSpecific {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstack: Option<ZStackSpecific>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZStackSpecific {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tclk_seed: Option<String>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkKey {
    pub key: String,
    pub sequence_number: u8,
    pub frame_counter: u32,
}

impl NetworkBackup {
    /// A backup of `network`; `firmware` names the stick's firmware in
    /// `metadata.internal`.
    pub fn from_network(network: &StickNetwork, firmware: &str) -> NetworkBackup {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        NetworkBackup {
            metadata: Metadata {
                format: FORMAT.to_owned(),
                version: VERSION,
                source: Some(format!("esl-agent@{}", env!("CARGO_PKG_VERSION"))),
                internal: Some(serde_json::json!({
                    "creation_time_unix": created,
                    "zstack": { "firmware": firmware },
                    // Where zigpy keeps the trust-centre link key (the
                    // format has no field of its own for it).
                    "network": {
                        "tc_link_key": {
                            "key": hex(&network.tc_link_key),
                            "frame_counter": 0,
                        },
                        "tc_address": format!("{:016x}", network.coordinator_ieee),
                    },
                })),
            },
            stack_specific: network.tclk_seed.map(|seed| StackSpecific {
                zstack: Some(ZStackSpecific {
                    tclk_seed: Some(hex(&seed)),
                }),
            }),
            coordinator_ieee: format!("{:016x}", network.coordinator_ieee),
            pan_id: format!("{:04x}", network.pan_id),
            extended_pan_id: format!("{:016x}", network.extended_pan_id),
            nwk_update_id: network.nwk_update_id,
            security_level: network.security_level,
            channel: network.channel,
            channel_mask: nv::mask_channels(network.channel_mask),
            network_key: NetworkKey {
                key: hex(&network.network_key),
                sequence_number: network.key_sequence,
                frame_counter: network.frame_counter,
            },
            devices: Vec::new(),
        }
    }

    /// The network this backup describes.
    pub fn to_network(&self) -> Result<StickNetwork, String> {
        if self.metadata.format != FORMAT || self.metadata.version != VERSION {
            return Err(format!(
                "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                self.metadata.format, self.metadata.version
            ));
        }
        let pan_id = u16::from_str_radix(&self.pan_id, 16)
            .map_err(|_| format!("pan_id {:?} is no 16-bit hex number", self.pan_id))?;
        let extended_pan_id = u64::from_str_radix(&self.extended_pan_id, 16).map_err(|_| {
            format!(
                "extended_pan_id {:?} is no 64-bit hex number",
                self.extended_pan_id
            )
        })?;
        let coordinator_ieee = u64::from_str_radix(&self.coordinator_ieee, 16).map_err(|_| {
            format!(
                "coordinator_ieee {:?} is no 64-bit hex number",
                self.coordinator_ieee
            )
        })?;
        let network_key =
            unhex16(&self.network_key.key).ok_or("network_key.key is not 32 hex digits")?;
        let tclk_seed = match self
            .stack_specific
            .as_ref()
            .and_then(|s| s.zstack.as_ref())
            .and_then(|z| z.tclk_seed.as_deref())
        {
            Some(seed) => {
                Some(unhex16(seed).ok_or("stack_specific.zstack.tclk_seed is not 32 hex digits")?)
            }
            None => None,
        };
        // zigpy's place for it (`metadata.internal.network.tc_link_key`);
        // a backup without it (zigpy-znp's own tool, Zigbee2MQTT) means the
        // well-known default, as both assume.
        let tc_link_key = match self
            .metadata
            .internal
            .as_ref()
            .and_then(|i| i.pointer("/network/tc_link_key/key"))
        {
            Some(key) => key
                .as_str()
                .and_then(unhex16)
                .ok_or("metadata.internal.network.tc_link_key.key is not 32 hex digits")?,
            None => *super::TcLinkKey::DEFAULT.bytes(),
        };
        if !(11..=26).contains(&self.channel) {
            return Err(format!("channel {} is not 11..=26", self.channel));
        }
        Ok(StickNetwork {
            channel: self.channel,
            channel_mask: nv::channel_mask(&self.channel_mask),
            pan_id,
            extended_pan_id,
            nwk_update_id: self.nwk_update_id,
            security_level: self.security_level,
            network_key,
            key_sequence: self.network_key.sequence_number,
            coordinator_ieee,
            tclk_seed,
            tc_link_key,
            frame_counter: self.network_key.frame_counter,
        })
    }

    /// This backup with `network`'s values (the same network, later: the
    /// channel, update id, key sequence, frame counter may have moved);
    /// devices and other fields read from elsewhere are kept.
    pub fn updated(&self, network: &StickNetwork, firmware: &str) -> NetworkBackup {
        let fresh = NetworkBackup::from_network(network, firmware);
        NetworkBackup {
            devices: self.devices.clone(),
            stack_specific: fresh.stack_specific.or_else(|| self.stack_specific.clone()),
            ..fresh
        }
    }

    /// Reads `path`; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<NetworkBackup>, BackupError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(BackupError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let invalid = |reason: String| BackupError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let backup: NetworkBackup =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        backup.to_network().map_err(invalid)?;
        Ok(Some(backup))
    }

    /// Writes `path` atomically (a temporary file beside it, synced, then
    /// renamed over), readable by the owner only.
    pub fn save(&self, path: &Path) -> Result<(), BackupError> {
        let failed = |source| BackupError::Write {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        // Serialising plain strings and numbers cannot fail.
        let text = serde_json::to_string_pretty(self).expect("a backup serialises");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(failed)?;
        file.write_all(text.as_bytes()).map_err(failed)?;
        file.write_all(b"\n").map_err(failed)?;
        file.sync_all().map_err(failed)?;
        std::fs::rename(&tmp, path).map_err(failed)?;
        Ok(())
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn unhex16(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn network() -> StickNetwork {
        StickNetwork {
            channel: 15,
            channel_mask: nv::channel_mask(&[15]),
            pan_id: 0x1A62,
            extended_pan_id: 0x00124B0012345678,
            nwk_update_id: 2,
            security_level: 5,
            network_key: [
                0x01, 0x03, 0x05, 0x07, 0x09, 0x0B, 0x0D, 0x0F, 0x00, 0x02, 0x04, 0x06, 0x08, 0x0A,
                0x0C, 0x0D,
            ],
            key_sequence: 0,
            coordinator_ieee: 0x00124B0011223344,
            tclk_seed: Some([0x5A; 16]),
            tc_link_key: *b"ZigBeeAlliance09",
            frame_counter: 123_456,
        }
    }

    /// A backup as zigpy-znp writes it (the layout of its
    /// `network_backup.py` output; values made up).
    const ZIGPY_BACKUP: &str = r#"{
        "metadata": {"version": 1, "format": "zigpy/open-coordinator-backup",
                     "source": "zigpy-znp@0.12.0",
                     "internal": {"creation_time": "2023-12-20T10:00:00+00:00", "zstack": {"version": 3.3}}},
        "stack_specific": {"zstack": {"tclk_seed": "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"}},
        "coordinator_ieee": "00124b0011223344",
        "pan_id": "1a62",
        "extended_pan_id": "00124b0012345678",
        "nwk_update_id": 2,
        "security_level": 5,
        "channel": 15,
        "channel_mask": [15],
        "network_key": {"key": "01030507090b0d0f00020406080a0c0d", "sequence_number": 0, "frame_counter": 123456},
        "devices": [{"ieee_address": "00158d0001020304", "nwk_address": "1234", "is_child": true}]
    }"#;

    #[test]
    fn reads_a_zigpy_backup() {
        let backup: NetworkBackup = serde_json::from_str(ZIGPY_BACKUP).expect("parses");
        let net = backup.to_network().expect("valid");
        assert_eq!(net, network());
        assert_eq!(backup.devices.len(), 1, "devices kept");
        assert_eq!(net.frame_counter, 123_456);
    }

    #[test]
    fn the_tc_link_key_is_where_zigpy_keeps_it_and_absent_means_the_default() {
        let mut net = network();
        net.tc_link_key = [0xC3; 16];
        let backup = NetworkBackup::from_network(&net, "Z-Stack Home 1.2");
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&backup).expect("json")).expect("json");
        let at = &json["metadata"]["internal"]["network"];
        assert_eq!(at["tc_link_key"]["key"], "c3".repeat(16));
        assert_eq!(at["tc_address"], "00124b0011223344");
        assert_eq!(backup.to_network().expect("valid").tc_link_key, [0xC3; 16]);
        assert!(!format!("{backup:?}").contains("c3c3"), "no key in Debug");
        // zigpy's own layout of the same place.
        let zigpy = ZIGPY_BACKUP.replace(
            r#""zstack": {"version": 3.3}}"#,
            r#""zstack": {"version": 3.3}, "network": {"tc_link_key": {"key": "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3", "frame_counter": 0}, "tc_address": "00124b0011223344"}}"#,
        );
        let backup: NetworkBackup = serde_json::from_str(&zigpy).expect("parses");
        assert_eq!(backup.to_network().expect("valid").tc_link_key, [0xC3; 16]);
        let bad = zigpy.replace("c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3", "c3");
        let backup: NetworkBackup = serde_json::from_str(&bad).expect("parses");
        let error = backup.to_network().expect_err("short key");
        assert!(error.contains("tc_link_key"), "{error}");
    }

    #[test]
    fn reads_a_herdsman_pan_id_without_padding() {
        let text = ZIGPY_BACKUP.replace(r#""pan_id": "1a62""#, r#""pan_id": "a62""#);
        let backup: NetworkBackup = serde_json::from_str(&text).expect("parses");
        assert_eq!(backup.to_network().expect("valid").pan_id, 0x0A62);
    }

    #[test]
    fn writes_what_it_reads_and_the_fields_zigpy_expects() {
        let backup = NetworkBackup::from_network(&network(), "Z-Stack 3.x.0");
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&backup).expect("json")).expect("json");
        assert_eq!(json["metadata"]["format"], FORMAT);
        assert_eq!(json["metadata"]["version"], 1);
        assert_eq!(json["pan_id"], "1a62");
        assert_eq!(json["extended_pan_id"], "00124b0012345678");
        assert_eq!(json["coordinator_ieee"], "00124b0011223344");
        assert_eq!(json["channel_mask"], serde_json::json!([15]));
        assert_eq!(
            json["network_key"]["key"],
            "01030507090b0d0f00020406080a0c0d"
        );
        assert_eq!(
            json["stack_specific"]["zstack"]["tclk_seed"],
            "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"
        );
        assert_eq!(backup.to_network().expect("valid"), network());
        assert!(!format!("{backup:?}").contains("0103"), "no key in Debug");
    }

    #[test]
    fn saved_file_is_private_and_loads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zigbee-network.json");
        assert!(NetworkBackup::load(&path)
            .expect("no file is fine")
            .is_none());
        let backup = NetworkBackup::from_network(&network(), "Z-Stack 3.x.0");
        backup.save(&path).expect("saved");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = NetworkBackup::load(&path).expect("loads").expect("exists");
        assert_eq!(loaded.to_network().expect("valid"), network());
    }

    #[test]
    fn invalid_backups_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.json");
        let text = ZIGPY_BACKUP.replace("01030507090b0d0f00020406080a0c0d", "0103");
        std::fs::write(&path, text).expect("write");
        let error = NetworkBackup::load(&path).expect_err("bad key");
        assert!(error.to_string().contains("network_key"), "{error}");
        let text = ZIGPY_BACKUP.replace("open-coordinator-backup", "something-else");
        std::fs::write(&path, text).expect("write");
        let error = NetworkBackup::load(&path).expect_err("bad format");
        assert!(error.to_string().contains("format"), "{error}");
    }
}
