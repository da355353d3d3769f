//! What an access point gives an ESL when it configures it, and what it
//! learns back: key material, absolute time, and the four Information
//! characteristics (Display, Image, Sensor, LED).
//!
//! Also [`ProvisionStore`], the interface through which the radio keeps key
//! material, Information, bond state and content paths across restarts
//! (the agent's store implements it; [`MemoryStore`] keeps them for the
//! process's life).
//!
//! Owns: the byte layouts of AP Sync Key Material (0x2BF7), ESL Response Key
//! Material (0x2BF8), ESL Current Absolute Time (0x2BF9), Display / Image /
//! Sensor / LED Information (0x2BFA–0x2BFD), and [`TagInfo`], the per-tag
//! summary the radio keeps and shows. Must not: do I/O or decide when to
//! configure (the transport and the driver do).
//!
//! Facts checked against public definitions (read, not copied):
//! - UUIDs 0x2BF6–0x2BFE, key material = 16-byte session key + 8-byte IV
//!   (24 bytes), Display Information = 5 bytes per display (width u16 LE,
//!   height u16 LE, display type u8), Image Information = Max_Image_Index
//!   (one byte), Sensor Information = per sensor a size byte (0: 2-byte Mesh
//!   Device Property ID, 1: company ID u16 + sensor code u16), LED
//!   Information = one byte per LED (bits 6–7 type: 0 sRGB, 1 monochrome;
//!   bits 0–5 colour), absolute time u32 LE milliseconds: Nordic nRF Connect
//!   SDK `include/bluetooth/services/esl_common.h` and
//!   `subsys/bluetooth/services/esl/esl.c` (the tag side).
//! - Display type assigned numbers 0x01–0x0B: the same `esl_common.h`
//!   (quoting the Bluetooth SIG registry `display_types.yaml`).
//! - Mesh Device Property 0x0059 "Present Input Voltage", GATT Voltage:
//!   uint16 LE in 1/64 V, 0xFFFF unknown: Silicon Labs Gecko SDK
//!   `app/bluetooth/example_host/bt_host_esl_ap/ap_sensor.py` (the AP side).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use rand::RngCore;
use serde::{Deserialize, Serialize};

/// AP Sync Key Material characteristic (write).
pub const AP_SYNC_KEY_CHARACTERISTIC: u16 = 0x2BF7;
/// ESL Response Key Material characteristic (write).
pub const RESPONSE_KEY_CHARACTERISTIC: u16 = 0x2BF8;
/// ESL Current Absolute Time characteristic (write).
pub const ABSOLUTE_TIME_CHARACTERISTIC: u16 = 0x2BF9;
/// ESL Display Information characteristic (read).
pub const DISPLAY_INFO_CHARACTERISTIC: u16 = 0x2BFA;
/// ESL Image Information characteristic (read).
pub const IMAGE_INFO_CHARACTERISTIC: u16 = 0x2BFB;
/// ESL Sensor Information characteristic (read).
pub const SENSOR_INFO_CHARACTERISTIC: u16 = 0x2BFC;
/// ESL LED Information characteristic (read).
pub const LED_INFO_CHARACTERISTIC: u16 = 0x2BFD;

/// Session key (16) plus IV (8).
pub const KEY_MATERIAL_LEN: usize = 24;
/// Mesh Device Property "Present Input Voltage" (GATT Voltage, 1/64 V).
pub const PRESENT_INPUT_VOLTAGE: u16 = 0x0059;
/// Bytes of one Display Information record.
const DISPLAY_RECORD_LEN: usize = 5;

/// 24 bytes of key material, a secret: `Debug` never shows the bytes and
/// there is no `Display`; [`KeyMaterial::expose`] is for the one GATT write
/// and for the store that keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial([u8; KEY_MATERIAL_LEN]);

impl KeyMaterial {
    /// Fresh key material from the operating system's random source.
    pub fn generate() -> KeyMaterial {
        let mut bytes = [0u8; KEY_MATERIAL_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        KeyMaterial(bytes)
    }

    pub fn from_bytes(bytes: [u8; KEY_MATERIAL_LEN]) -> KeyMaterial {
        KeyMaterial(bytes)
    }

    /// The secret bytes: only for the characteristic write and the store.
    pub fn expose(&self) -> &[u8; KEY_MATERIAL_LEN] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(<secret>)")
    }
}

/// What the radio keeps about one tag across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    /// The tag's ESL Response Key material (a secret).
    pub response_key: KeyMaterial,
    /// From the last configuring session.
    pub info: Option<TagInfo>,
    /// This AP holds a bond with the tag: `true` after a session secured
    /// the link with it, `false` once the tag showed it lost it (until a
    /// session pairs again). Shown as `bonded` in the tag's details. The
    /// bond's keys themselves stay with the Bluetooth stack (BlueZ keeps
    /// them under /var/lib/bluetooth).
    pub bonded: bool,
    /// What the tag's last session found (a successful one, or one that
    /// failed because the content's path is missing): the intake check
    /// rejects content the tag can never show from the start of a run.
    /// `None` in records of agents that did not keep it.
    pub content_paths: Option<ContentPaths>,
}

/// Which ways a tag offers to store content. A session finds them in the
/// characteristics it discovered (`transport`); the driver keeps them per
/// tag and the store keeps them across restarts (as this JSON object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentPaths {
    /// The Object Transfer Service (OACP and OLCP): `ble_image` content.
    pub ots: bool,
    /// The vendor content characteristic: any other content.
    pub vendor: bool,
}

impl ContentPaths {
    /// The names the tag's details list (`content_paths`).
    pub fn names(self) -> Vec<&'static str> {
        [(self.ots, "ots"), (self.vendor, "vendor")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }
}

/// Persistence for the radio's secrets and per-tag records. Called from the
/// radio's driver task, so implementations must be quick (an in-memory
/// cache written through to disk is the intended shape) and must never log
/// the key material.
pub trait ProvisionStore: Send + 'static {
    /// This AP's sync key material, if one was saved.
    fn ap_sync_key(&mut self) -> Option<KeyMaterial>;
    fn set_ap_sync_key(&mut self, key: &KeyMaterial);
    fn tag(&mut self, tag: &str) -> Option<TagRecord>;
    fn set_tag(&mut self, tag: &str, record: &TagRecord);
    /// Every tag with a record, so the radio can describe them (and check
    /// content against their Information) from the start. A store that
    /// lists nothing still works: the radio then looks up only the tags in
    /// `radio.ble.tags` at start, and the others at their first session.
    fn tag_ids(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// A [`ProvisionStore`] in memory; clones share it (tests look inside).
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryRecords>>,
}

#[derive(Debug, Default)]
struct MemoryRecords {
    ap_sync_key: Option<KeyMaterial>,
    tags: HashMap<String, TagRecord>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryRecords> {
        // Nothing panics while holding it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ProvisionStore for MemoryStore {
    fn ap_sync_key(&mut self) -> Option<KeyMaterial> {
        self.lock().ap_sync_key.clone()
    }

    fn set_ap_sync_key(&mut self, key: &KeyMaterial) {
        self.lock().ap_sync_key = Some(key.clone());
    }

    fn tag(&mut self, tag: &str) -> Option<TagRecord> {
        self.lock().tags.get(tag).cloned()
    }

    fn set_tag(&mut self, tag: &str, record: &TagRecord) {
        self.lock().tags.insert(tag.to_owned(), record.clone());
    }

    fn tag_ids(&mut self) -> Vec<String> {
        self.lock().tags.keys().cloned().collect()
    }
}

/// Why an Information characteristic could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    #[error("{what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

fn malformed(what: &'static str, reason: impl Into<String>) -> InfoError {
    InfoError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// Display type (assigned numbers); unknown values are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisplayType {
    BlackWhite,
    ThreeGray,
    FourGray,
    EightGray,
    SixteenGray,
    RedBlackWhite,
    YellowBlackWhite,
    RedYellowBlackWhite,
    SevenColor,
    SixteenColor,
    FullRgb,
    Other(u8),
}

impl DisplayType {
    pub fn from_byte(byte: u8) -> DisplayType {
        match byte {
            0x01 => DisplayType::BlackWhite,
            0x02 => DisplayType::ThreeGray,
            0x03 => DisplayType::FourGray,
            0x04 => DisplayType::EightGray,
            0x05 => DisplayType::SixteenGray,
            0x06 => DisplayType::RedBlackWhite,
            0x07 => DisplayType::YellowBlackWhite,
            0x08 => DisplayType::RedYellowBlackWhite,
            0x09 => DisplayType::SevenColor,
            0x0A => DisplayType::SixteenColor,
            0x0B => DisplayType::FullRgb,
            other => DisplayType::Other(other),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            DisplayType::BlackWhite => 0x01,
            DisplayType::ThreeGray => 0x02,
            DisplayType::FourGray => 0x03,
            DisplayType::EightGray => 0x04,
            DisplayType::SixteenGray => 0x05,
            DisplayType::RedBlackWhite => 0x06,
            DisplayType::YellowBlackWhite => 0x07,
            DisplayType::RedYellowBlackWhite => 0x08,
            DisplayType::SevenColor => 0x09,
            DisplayType::SixteenColor => 0x0A,
            DisplayType::FullRgb => 0x0B,
            DisplayType::Other(b) => b,
        }
    }

    /// The type as the tag's details show it: the snake_case name of an
    /// assigned number (`black_white`), else the number (`0x0C`).
    pub fn name(self) -> String {
        match self {
            DisplayType::Other(byte) => format!("0x{byte:02X}"),
            // A unit variant serialises to its name.
            known => serde_json::to_value(known)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        }
    }

    /// Bits per pixel of this radio's packed bitmap for the type: the
    /// fewest bits that hold every colour. The ESL Service leaves the image
    /// format to the implementation; Nordic's sample sizes an image as
    /// width × height × colour depth, which this follows. `None` for a type
    /// with no assigned number.
    pub fn bits_per_pixel(self) -> Option<u32> {
        Some(match self {
            DisplayType::BlackWhite => 1,
            DisplayType::ThreeGray
            | DisplayType::FourGray
            | DisplayType::RedBlackWhite
            | DisplayType::YellowBlackWhite
            | DisplayType::RedYellowBlackWhite => 2,
            DisplayType::EightGray | DisplayType::SevenColor => 3,
            DisplayType::SixteenGray | DisplayType::SixteenColor => 4,
            DisplayType::FullRgb => 24,
            DisplayType::Other(_) => return None,
        })
    }
}

/// One display of a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayInfo {
    pub width: u16,
    pub height: u16,
    pub display_type: DisplayType,
}

impl DisplayInfo {
    /// Bytes of a full-screen image: width × height × bits per pixel,
    /// rounded up to whole bytes.
    pub fn image_bytes(&self) -> Option<usize> {
        let bits = u64::from(self.width)
            * u64::from(self.height)
            * u64::from(self.display_type.bits_per_pixel()?);
        usize::try_from(bits.div_ceil(8)).ok()
    }
}

/// What one sensor measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorType {
    /// A Mesh Device Property ID.
    MeshProperty(u16),
    Vendor {
        company_id: u16,
        sensor_code: u16,
    },
}

/// What one LED is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedType {
    /// Bits 0–5: the colours it can show.
    Srgb {
        color: u8,
    },
    Monochrome {
        color: u8,
    },
    Other(u8),
}

/// The Information characteristics of one tag, as read while configuring.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TagInfo {
    pub displays: Vec<DisplayInfo>,
    /// Max_Image_Index: image slots are `0..=max_image_index`. `None`
    /// when the tag has no Image Information (no display).
    pub max_image_index: Option<u8>,
    pub sensors: Vec<SensorType>,
    pub leds: Vec<LedType>,
}

impl TagInfo {
    /// The Information as the tag's details show it (docs/BLE.md, "Tag
    /// details"): `displays` (index, width, height, type, image_bytes),
    /// `image_slots`, `sensors` and `leds` (each with its index). Compact
    /// on purpose: `tags.list` carries it for every tag.
    pub fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::{json, Value};
        let displays = self.displays.iter().enumerate().map(|(index, d)| {
            json!({
                "index": index,
                "width": d.width,
                "height": d.height,
                "type": d.display_type.name(),
                "image_bytes": d.image_bytes(),
            })
        });
        let sensors = self.sensors.iter().enumerate().map(|(index, s)| match s {
            SensorType::MeshProperty(id) => json!({"index": index, "mesh_property": id}),
            SensorType::Vendor {
                company_id,
                sensor_code,
            } => json!({"index": index, "company_id": company_id, "sensor_code": sensor_code}),
        });
        let leds = self.leds.iter().enumerate().map(|(index, l)| match l {
            LedType::Srgb { color } => json!({"index": index, "type": "srgb", "color": color}),
            LedType::Monochrome { color } => {
                json!({"index": index, "type": "monochrome", "color": color})
            }
            LedType::Other(byte) => json!({"index": index, "type": "other", "byte": byte}),
        });
        let mut summary = serde_json::Map::new();
        summary.insert("displays".into(), Value::Array(displays.collect()));
        summary.insert(
            "image_slots".into(),
            self.max_image_index
                .map_or(0, |max| u16::from(max) + 1)
                .into(),
        );
        summary.insert("sensors".into(), Value::Array(sensors.collect()));
        summary.insert("leds".into(), Value::Array(leds.collect()));
        summary
    }

    /// The sensor that reports the battery voltage, if any.
    pub fn voltage_sensor(&self) -> Option<u8> {
        self.sensors
            .iter()
            .position(|s| *s == SensorType::MeshProperty(PRESENT_INPUT_VOLTAGE))
            .and_then(|i| u8::try_from(i).ok())
    }
}

pub fn decode_displays(bytes: &[u8]) -> Result<Vec<DisplayInfo>, InfoError> {
    const WHAT: &str = "Display Information";
    if !bytes.len().is_multiple_of(DISPLAY_RECORD_LEN) {
        return Err(malformed(
            WHAT,
            format!("{} bytes, not a multiple of 5", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(DISPLAY_RECORD_LEN)
        .map(|r| DisplayInfo {
            width: u16::from_le_bytes([r[0], r[1]]),
            height: u16::from_le_bytes([r[2], r[3]]),
            display_type: DisplayType::from_byte(r[4]),
        })
        .collect())
}

pub fn encode_displays(displays: &[DisplayInfo]) -> Vec<u8> {
    let mut out = Vec::with_capacity(displays.len() * DISPLAY_RECORD_LEN);
    for d in displays {
        out.extend_from_slice(&d.width.to_le_bytes());
        out.extend_from_slice(&d.height.to_le_bytes());
        out.push(d.display_type.to_byte());
    }
    out
}

pub fn decode_max_image_index(bytes: &[u8]) -> Result<u8, InfoError> {
    match bytes {
        [index] => Ok(*index),
        other => Err(malformed(
            "Image Information",
            format!("{} bytes, must be 1", other.len()),
        )),
    }
}

pub fn decode_sensors(bytes: &[u8]) -> Result<Vec<SensorType>, InfoError> {
    const WHAT: &str = "Sensor Information";
    let mut sensors = Vec::new();
    let mut rest = bytes;
    while let Some((&size, tail)) = rest.split_first() {
        let (sensor, len) = match (size, tail) {
            (0, [a, b, ..]) => (SensorType::MeshProperty(u16::from_le_bytes([*a, *b])), 2),
            (1, [a, b, c, d, ..]) => (
                SensorType::Vendor {
                    company_id: u16::from_le_bytes([*a, *b]),
                    sensor_code: u16::from_le_bytes([*c, *d]),
                },
                4,
            ),
            (0 | 1, _) => return Err(malformed(WHAT, "a sensor record is cut short")),
            (other, _) => return Err(malformed(WHAT, format!("size byte {other} is not 0 or 1"))),
        };
        sensors.push(sensor);
        rest = &tail[len..];
    }
    Ok(sensors)
}

pub fn encode_sensors(sensors: &[SensorType]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in sensors {
        match s {
            SensorType::MeshProperty(id) => {
                out.push(0);
                out.extend_from_slice(&id.to_le_bytes());
            }
            SensorType::Vendor {
                company_id,
                sensor_code,
            } => {
                out.push(1);
                out.extend_from_slice(&company_id.to_le_bytes());
                out.extend_from_slice(&sensor_code.to_le_bytes());
            }
        }
    }
    out
}

pub fn decode_leds(bytes: &[u8]) -> Vec<LedType> {
    bytes
        .iter()
        .map(|&b| match b >> 6 {
            0 => LedType::Srgb { color: b & 0x3F },
            1 => LedType::Monochrome { color: b & 0x3F },
            _ => LedType::Other(b),
        })
        .collect()
}

pub fn encode_leds(leds: &[LedType]) -> Vec<u8> {
    leds.iter()
        .map(|l| match l {
            LedType::Srgb { color } => color & 0x3F,
            LedType::Monochrome { color } => 0x40 | (color & 0x3F),
            LedType::Other(b) => *b,
        })
        .collect()
}

/// A Present Input Voltage sensor value (uint16 LE, 1/64 V) in millivolts;
/// `None` for "unknown" (0xFFFF) or a value of the wrong size.
pub fn voltage_mv(data: &[u8]) -> Option<u16> {
    let raw = u16::from_le_bytes(data.try_into().ok()?);
    if raw == 0xFFFF {
        return None;
    }
    u16::try_from(u32::from(raw) * 1000 / 64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_is_random_and_never_printed() {
        let a = KeyMaterial::generate();
        let b = KeyMaterial::generate();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "KeyMaterial(<secret>)");
        assert_eq!(a.expose().len(), KEY_MATERIAL_LEN);
    }

    #[test]
    fn display_information_round_trips_and_sizes_images() {
        let displays = vec![
            DisplayInfo {
                width: 296,
                height: 128,
                display_type: DisplayType::BlackWhite,
            },
            DisplayInfo {
                width: 250,
                height: 122,
                display_type: DisplayType::RedBlackWhite,
            },
        ];
        let bytes = encode_displays(&displays);
        assert_eq!(bytes[..5], [0x28, 0x01, 0x80, 0x00, 0x01]);
        assert_eq!(decode_displays(&bytes).unwrap(), displays);
        assert_eq!(displays[0].image_bytes(), Some(296 * 128 / 8));
        assert_eq!(
            displays[1].image_bytes(),
            Some((250 * 122 * 2usize).div_ceil(8))
        );
        assert!(decode_displays(&bytes[..7]).is_err());
    }

    #[test]
    fn sensor_information_has_two_record_sizes() {
        let bytes = [0, 0x59, 0x00, 1, 0xFF, 0x02, 0xFE, 0xCA, 0, 0x54, 0x00];
        let sensors = decode_sensors(&bytes).unwrap();
        assert_eq!(
            sensors,
            [
                SensorType::MeshProperty(PRESENT_INPUT_VOLTAGE),
                SensorType::Vendor {
                    company_id: 0x02FF,
                    sensor_code: 0xCAFE
                },
                SensorType::MeshProperty(0x0054),
            ]
        );
        assert_eq!(encode_sensors(&sensors), bytes);
        assert!(decode_sensors(&[1, 0xFF, 0x02]).is_err());
        assert!(decode_sensors(&[2, 0, 0]).is_err());
        let info = TagInfo {
            sensors: vec![SensorType::MeshProperty(0x0054), sensors[0]],
            ..TagInfo::default()
        };
        assert_eq!(info.voltage_sensor(), Some(1));
    }

    #[test]
    fn the_summary_lists_every_display_slot_sensor_and_led_with_its_index() {
        let info = TagInfo {
            displays: vec![DisplayInfo {
                width: 296,
                height: 128,
                display_type: DisplayType::BlackWhite,
            }],
            max_image_index: Some(1),
            sensors: vec![
                SensorType::MeshProperty(PRESENT_INPUT_VOLTAGE),
                SensorType::Vendor {
                    company_id: 0x02FF,
                    sensor_code: 7,
                },
            ],
            leds: vec![LedType::Srgb { color: 0x3F }, LedType::Other(0xC1)],
        };
        assert_eq!(
            serde_json::Value::Object(info.summary()),
            serde_json::json!({
                "displays": [{"index": 0, "width": 296, "height": 128,
                              "type": "black_white", "image_bytes": 4736}],
                "image_slots": 2,
                "sensors": [{"index": 0, "mesh_property": 0x0059},
                            {"index": 1, "company_id": 0x02FF, "sensor_code": 7}],
                "leds": [{"index": 0, "type": "srgb", "color": 0x3F},
                         {"index": 1, "type": "other", "byte": 0xC1}],
            })
        );
        assert_eq!(DisplayType::from_byte(0x0C).name(), "0x0C");
        assert_eq!(DisplayType::RedBlackWhite.name(), "red_black_white");
        let empty = TagInfo::default().summary();
        assert_eq!(empty["image_slots"], 0, "no Image Information: no slots");
    }

    #[test]
    fn led_information_and_voltage() {
        let leds = decode_leds(&[0x3F, 0x41]);
        assert_eq!(
            leds,
            [
                LedType::Srgb { color: 0x3F },
                LedType::Monochrome { color: 1 }
            ]
        );
        assert_eq!(encode_leds(&leds), [0x3F, 0x41]);
        // 3.0 V = 192 / 64.
        assert_eq!(voltage_mv(&192u16.to_le_bytes()), Some(3000));
        assert_eq!(voltage_mv(&[0xFF, 0xFF]), None);
        assert_eq!(voltage_mv(&[1]), None);
        assert_eq!(decode_max_image_index(&[3]), Ok(3));
        assert!(decode_max_image_index(&[]).is_err());
    }
}
