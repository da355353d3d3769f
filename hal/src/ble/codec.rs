//! Codec for the Bluetooth SIG Electronic Shelf Label Service (ESLS, 0x1857):
//! ESL Control Point (0x2BFE) commands and responses, and the ESL Address
//! characteristic (0x2BF6).
//!
//! Owns: the byte layouts and nothing else. No I/O, no timing, no state; the
//! transport (`transport.rs`) decides what to send and what an answer means,
//! the fake tag (`fake_esl.rs`) decodes commands and encodes responses with
//! the same code, so both ends of every test speak one definition.
//!
//! The length rule: an opcode's high nibble is the number of parameter bytes
//! minus one, its low nibble says which command (or response) it is. So every
//! message is self-delimiting and at most 17 bytes long (opcode + 16). A
//! command's first parameter is always the ESL ID it is meant for
//! ([`BROADCAST_ESL_ID`] = every ESL); responses carry no ESL ID, they come
//! from the ESL the AP talks to.
//!
//! Decoding is strict: a response whose length disagrees with its opcode, an
//! unknown opcode, trailing bytes or an empty notification is a
//! [`CodecError`] naming what is wrong, never a guess.

use std::fmt;

use uuid::Uuid;

/// ESL Service.
pub const ESL_SERVICE: u16 = 0x1857;
/// ESL Address characteristic (write): the tag's ESL ID and Group ID.
pub const ESL_ADDRESS_CHARACTERISTIC: u16 = 0x2BF6;
/// ESL Control Point characteristic (write, notify).
pub const CONTROL_POINT_CHARACTERISTIC: u16 = 0x2BFE;
/// Battery Service, read for the battery when no sensor index is configured.
pub const BATTERY_SERVICE: u16 = 0x180F;
/// Battery Level characteristic (read): percent, 0..=100.
pub const BATTERY_LEVEL_CHARACTERISTIC: u16 = 0x2A19;

/// The ESL ID that addresses every ESL of a group.
pub const BROADCAST_ESL_ID: u8 = 0xFF;
/// Largest Group ID: the group is 7 bits of the ESL Address.
pub const MAX_GROUP_ID: u8 = 0x7F;
/// Opcode plus at most 16 parameter bytes (the high nibble is 0..=15).
pub const MAX_MESSAGE_LEN: usize = 17;
/// Vendor-specific command: ESL ID plus at most 15 bytes of vendor data.
pub const MAX_VENDOR_COMMAND_DATA: usize = 15;
/// Vendor-specific response: at most 16 bytes of vendor data.
pub const MAX_VENDOR_RESPONSE_DATA: usize = 16;
/// Sensor Value response: sensor index plus at most 15 bytes of data.
pub const MAX_SENSOR_DATA: usize = 15;

/// Low nibble of a vendor-specific command or response.
const VENDOR_TAG: u8 = 0x0F;
/// Low nibble of a Sensor Value response.
const SENSOR_VALUE_TAG: u8 = 0x0E;

/// The Bluetooth SIG base UUID with a 16-bit assigned number in it.
pub const fn uuid16(short: u16) -> Uuid {
    Uuid::from_u128(0x0000_0000_0000_1000_8000_0080_5f9b_34fb | ((short as u128) << 96))
}

/// Why bytes are not a valid ESL message (or a message cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty ESL message")]
    Empty,
    #[error("ESL opcode 0x{opcode:02X} needs {expected} bytes in all, got {got}")]
    Length {
        opcode: u8,
        expected: usize,
        got: usize,
    },
    #[error("unknown ESL {what} opcode 0x{opcode:02X}")]
    UnknownOpcode { what: &'static str, opcode: u8 },
    #[error("invalid ESL field {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> CodecError {
    CodecError::Field {
        field,
        reason: reason.into(),
    }
}

/// Total length an opcode announces: opcode byte plus high nibble + 1.
pub const fn message_len(opcode: u8) -> usize {
    (opcode >> 4) as usize + 2
}

/// Builds an opcode from a parameter count (1..=16) and a low-nibble tag.
fn opcode(params: usize, tag: u8) -> u8 {
    debug_assert!((1..=16).contains(&params) && tag <= 0x0F);
    (((params - 1) as u8) << 4) | tag
}

/// Checks the length rule and returns the opcode and its parameters.
fn split(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    let (&op, params) = bytes.split_first().ok_or(CodecError::Empty)?;
    let expected = message_len(op);
    if bytes.len() != expected {
        return Err(CodecError::Length {
            opcode: op,
            expected,
            got: bytes.len(),
        });
    }
    Ok((op, params))
}

/// An ESL's address: ESL ID within a Group (ESL Address characteristic,
/// 16 bits little-endian: bits 0–7 ESL ID, bits 8–14 Group ID, bit 15 RFU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EslAddress {
    group_id: u8,
    esl_id: u8,
}

impl EslAddress {
    /// `esl_id` 0..=0xFE (0xFF is broadcast, not an address), `group_id`
    /// 0..=127.
    pub fn new(group_id: u8, esl_id: u8) -> Result<EslAddress, CodecError> {
        if esl_id == BROADCAST_ESL_ID {
            return Err(field(
                "esl_id",
                "0xFF is the broadcast ID, not an ESL's address",
            ));
        }
        if group_id > MAX_GROUP_ID {
            return Err(field(
                "group_id",
                format!("{group_id} is more than {MAX_GROUP_ID}"),
            ));
        }
        Ok(EslAddress { group_id, esl_id })
    }

    pub fn group_id(self) -> u8 {
        self.group_id
    }

    pub fn esl_id(self) -> u8 {
        self.esl_id
    }

    /// The ESL Address characteristic value.
    pub fn encode(self) -> [u8; 2] {
        u16::from(self.esl_id)
            .wrapping_add(u16::from(self.group_id) << 8)
            .to_le_bytes()
    }

    /// Parses an ESL Address characteristic value; the RFU bit must be 0.
    pub fn decode(bytes: &[u8]) -> Result<EslAddress, CodecError> {
        let raw: [u8; 2] = bytes
            .try_into()
            .map_err(|_| field("esl_address", format!("{} bytes, must be 2", bytes.len())))?;
        let value = u16::from_le_bytes(raw);
        if value & 0x8000 != 0 {
            return Err(field("esl_address", "RFU bit 15 is set"));
        }
        EslAddress::new(raw[1], raw[0])
    }
}

impl fmt::Display for EslAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group {} / ESL {}", self.group_id, self.esl_id)
    }
}

/// LED color and brightness byte (ESLS LED Control): two bits each for red,
/// green, blue and brightness, from bit 0 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedColor {
    pub red: u8,
    pub green: u8,
    pub blue: u8,
    pub brightness: u8,
}

impl LedColor {
    fn encode(self) -> Result<u8, CodecError> {
        let parts = [
            ("led.red", self.red),
            ("led.green", self.green),
            ("led.blue", self.blue),
            ("led.brightness", self.brightness),
        ];
        let mut byte = 0u8;
        for (shift, (name, value)) in parts.into_iter().enumerate() {
            if value > 3 {
                return Err(field(name, format!("{value} is more than 3 (two bits)")));
            }
            byte |= value << (2 * shift);
        }
        Ok(byte)
    }

    fn decode(byte: u8) -> LedColor {
        LedColor {
            red: byte & 3,
            green: (byte >> 2) & 3,
            blue: (byte >> 4) & 3,
            brightness: byte >> 6,
        }
    }
}

/// How often an LED pattern repeats: bit 0 of the Repeats field says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedRepeats {
    /// This many times (0..=0x7FFF).
    Count(u16),
    /// For this many seconds (0..=0x7FFF).
    Seconds(u16),
}

impl LedRepeats {
    fn encode(self) -> Result<u16, CodecError> {
        let (value, kind) = match self {
            LedRepeats::Count(n) => (n, 0),
            LedRepeats::Seconds(s) => (s, 1),
        };
        if value > 0x7FFF {
            return Err(field(
                "led.repeats",
                format!("{value} is more than 32767 (15 bits)"),
            ));
        }
        Ok((value << 1) | kind)
    }

    fn decode(raw: u16) -> LedRepeats {
        if raw & 1 == 0 {
            LedRepeats::Count(raw >> 1)
        } else {
            LedRepeats::Seconds(raw >> 1)
        }
    }
}

/// The LED settings of LED Control and LED Timed Control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedSettings {
    pub color: LedColor,
    /// 40-bit on/off pattern, least significant bit first.
    pub flashing_pattern: [u8; 5],
    /// Duration of an off bit, in 2 ms units.
    pub off_period: u8,
    /// Duration of an on bit, in 2 ms units.
    pub on_period: u8,
    pub repeats: LedRepeats,
}

impl LedSettings {
    /// 10 bytes: color, pattern (5), off, on, repeats (2, LE).
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.push(self.color.encode()?);
        out.extend_from_slice(&self.flashing_pattern);
        out.push(self.off_period);
        out.push(self.on_period);
        out.extend_from_slice(&self.repeats.encode()?.to_le_bytes());
        Ok(())
    }

    fn decode(p: &[u8]) -> LedSettings {
        LedSettings {
            color: LedColor::decode(p[0]),
            flashing_pattern: [p[1], p[2], p[3], p[4], p[5]],
            off_period: p[6],
            on_period: p[7],
            repeats: LedRepeats::decode(u16::from_le_bytes([p[8], p[9]])),
        }
    }
}

/// An ESL Control Point command (ESLS §3.10.2). Every command names the ESL
/// it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// 0x00: asks for the Basic State.
    Ping { esl_id: u8 },
    /// 0x01
    Unassociate { esl_id: u8 },
    /// 0x02
    ServiceReset { esl_id: u8 },
    /// 0x03
    FactoryReset { esl_id: u8 },
    /// 0x04: the AP is done with this update; answered with the Basic State.
    UpdateComplete { esl_id: u8 },
    /// 0x10: answered with a Sensor Value.
    ReadSensorData { esl_id: u8, sensor_index: u8 },
    /// 0x11: redraw the current image; answered with the Display State.
    RefreshDisplay { esl_id: u8, display_index: u8 },
    /// 0x20: show a stored image; answered with the Display State.
    DisplayImage {
        esl_id: u8,
        display_index: u8,
        image_index: u8,
    },
    /// 0x60: show a stored image at an absolute time (ms, ESL clock).
    DisplayTimedImage {
        esl_id: u8,
        display_index: u8,
        image_index: u8,
        absolute_time: u32,
    },
    /// 0xB0: answered with the LED State.
    LedControl {
        esl_id: u8,
        led_index: u8,
        settings: LedSettings,
    },
    /// 0xF0
    LedTimedControl {
        esl_id: u8,
        led_index: u8,
        settings: LedSettings,
        absolute_time: u32,
    },
    /// 0x0F..=0xFF: vendor data (0..=15 bytes) after the ESL ID; the length
    /// is in the opcode.
    VendorSpecific { esl_id: u8, data: Vec<u8> },
}

impl Command {
    /// The ESL the command is for.
    pub fn esl_id(&self) -> u8 {
        match self {
            Command::Ping { esl_id }
            | Command::Unassociate { esl_id }
            | Command::ServiceReset { esl_id }
            | Command::FactoryReset { esl_id }
            | Command::UpdateComplete { esl_id }
            | Command::ReadSensorData { esl_id, .. }
            | Command::RefreshDisplay { esl_id, .. }
            | Command::DisplayImage { esl_id, .. }
            | Command::DisplayTimedImage { esl_id, .. }
            | Command::LedControl { esl_id, .. }
            | Command::LedTimedControl { esl_id, .. }
            | Command::VendorSpecific { esl_id, .. } => *esl_id,
        }
    }

    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ping { .. } => "Ping",
            Command::Unassociate { .. } => "Unassociate",
            Command::ServiceReset { .. } => "Service Reset",
            Command::FactoryReset { .. } => "Factory Reset",
            Command::UpdateComplete { .. } => "Update Complete",
            Command::ReadSensorData { .. } => "Read Sensor Data",
            Command::RefreshDisplay { .. } => "Refresh Display",
            Command::DisplayImage { .. } => "Display Image",
            Command::DisplayTimedImage { .. } => "Display Timed Image",
            Command::LedControl { .. } => "LED Control",
            Command::LedTimedControl { .. } => "LED Timed Control",
            Command::VendorSpecific { .. } => "vendor-specific command",
        }
    }

    /// The bytes to write to the Control Point.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut params = vec![self.esl_id()];
        let tag = match self {
            Command::Ping { .. } => 0x00,
            Command::Unassociate { .. } => 0x01,
            Command::ServiceReset { .. } => 0x02,
            Command::FactoryReset { .. } => 0x03,
            Command::UpdateComplete { .. } => 0x04,
            Command::ReadSensorData { sensor_index, .. } => {
                params.push(*sensor_index);
                0x00
            }
            Command::RefreshDisplay { display_index, .. } => {
                params.push(*display_index);
                0x01
            }
            Command::DisplayImage {
                display_index,
                image_index,
                ..
            } => {
                params.extend_from_slice(&[*display_index, *image_index]);
                0x00
            }
            Command::DisplayTimedImage {
                display_index,
                image_index,
                absolute_time,
                ..
            } => {
                params.extend_from_slice(&[*display_index, *image_index]);
                params.extend_from_slice(&absolute_time.to_le_bytes());
                0x00
            }
            Command::LedControl {
                led_index,
                settings,
                ..
            } => {
                params.push(*led_index);
                settings.encode(&mut params)?;
                0x00
            }
            Command::LedTimedControl {
                led_index,
                settings,
                absolute_time,
                ..
            } => {
                params.push(*led_index);
                settings.encode(&mut params)?;
                params.extend_from_slice(&absolute_time.to_le_bytes());
                0x00
            }
            Command::VendorSpecific { data, .. } => {
                if data.len() > MAX_VENDOR_COMMAND_DATA {
                    return Err(field(
                        "vendor data",
                        format!(
                            "{} bytes, at most {MAX_VENDOR_COMMAND_DATA} fit",
                            data.len()
                        ),
                    ));
                }
                params.extend_from_slice(data);
                VENDOR_TAG
            }
        };
        let mut bytes = Vec::with_capacity(1 + params.len());
        bytes.push(opcode(params.len(), tag));
        bytes.extend_from_slice(&params);
        Ok(bytes)
    }

    /// Parses a Control Point write (the tag's side; used by the fake ESL).
    pub fn decode(bytes: &[u8]) -> Result<Command, CodecError> {
        let (op, p) = split(bytes)?;
        let esl_id = p[0];
        let time = |at: usize| u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        Ok(match op {
            0x00 => Command::Ping { esl_id },
            0x01 => Command::Unassociate { esl_id },
            0x02 => Command::ServiceReset { esl_id },
            0x03 => Command::FactoryReset { esl_id },
            0x04 => Command::UpdateComplete { esl_id },
            0x10 => Command::ReadSensorData {
                esl_id,
                sensor_index: p[1],
            },
            0x11 => Command::RefreshDisplay {
                esl_id,
                display_index: p[1],
            },
            0x20 => Command::DisplayImage {
                esl_id,
                display_index: p[1],
                image_index: p[2],
            },
            0x60 => Command::DisplayTimedImage {
                esl_id,
                display_index: p[1],
                image_index: p[2],
                absolute_time: time(3),
            },
            0xB0 => Command::LedControl {
                esl_id,
                led_index: p[1],
                settings: LedSettings::decode(&p[2..12]),
            },
            0xF0 => Command::LedTimedControl {
                esl_id,
                led_index: p[1],
                settings: LedSettings::decode(&p[2..12]),
                absolute_time: time(12),
            },
            op if op & 0x0F == VENDOR_TAG => Command::VendorSpecific {
                esl_id,
                data: p[1..].to_vec(),
            },
            opcode => {
                return Err(CodecError::UnknownOpcode {
                    what: "command",
                    opcode,
                })
            }
        })
    }
}

/// Error codes of the Error response (ESLS §3.10.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unspecified,
    InvalidOpcode,
    InvalidState,
    InvalidImageIndex,
    ImageNotAvailable,
    InvalidParameters,
    CapacityLimit,
    InsufficientBattery,
    InsufficientResources,
    Retry,
    QueueFull,
    ImplausibleAbsoluteTime,
    /// 0xF0..=0xFF.
    VendorSpecific(u8),
    /// 0x00 and 0x0D..=0xEF: reserved for future use. Kept (not rejected)
    /// so that a newer tag's error still reaches the ack's detail.
    Reserved(u8),
}

impl ErrorCode {
    pub fn from_byte(byte: u8) -> ErrorCode {
        match byte {
            0x01 => ErrorCode::Unspecified,
            0x02 => ErrorCode::InvalidOpcode,
            0x03 => ErrorCode::InvalidState,
            0x04 => ErrorCode::InvalidImageIndex,
            0x05 => ErrorCode::ImageNotAvailable,
            0x06 => ErrorCode::InvalidParameters,
            0x07 => ErrorCode::CapacityLimit,
            0x08 => ErrorCode::InsufficientBattery,
            0x09 => ErrorCode::InsufficientResources,
            0x0A => ErrorCode::Retry,
            0x0B => ErrorCode::QueueFull,
            0x0C => ErrorCode::ImplausibleAbsoluteTime,
            0xF0..=0xFF => ErrorCode::VendorSpecific(byte),
            other => ErrorCode::Reserved(other),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            ErrorCode::Unspecified => 0x01,
            ErrorCode::InvalidOpcode => 0x02,
            ErrorCode::InvalidState => 0x03,
            ErrorCode::InvalidImageIndex => 0x04,
            ErrorCode::ImageNotAvailable => 0x05,
            ErrorCode::InvalidParameters => 0x06,
            ErrorCode::CapacityLimit => 0x07,
            ErrorCode::InsufficientBattery => 0x08,
            ErrorCode::InsufficientResources => 0x09,
            ErrorCode::Retry => 0x0A,
            ErrorCode::QueueFull => 0x0B,
            ErrorCode::ImplausibleAbsoluteTime => 0x0C,
            ErrorCode::VendorSpecific(b) | ErrorCode::Reserved(b) => b,
        }
    }

    /// Whether a later attempt can succeed. Transient conditions (busy, queue
    /// full, "retry", an image that a new transfer will bring, a state a new
    /// connection resets) are; a request the tag cannot ever honour (bad
    /// opcode or parameters, no room, flat battery) is not.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unspecified
                | ErrorCode::InvalidState
                | ErrorCode::ImageNotAvailable
                | ErrorCode::InsufficientResources
                | ErrorCode::Retry
                | ErrorCode::QueueFull
                | ErrorCode::VendorSpecific(_)
                | ErrorCode::Reserved(_)
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorCode::Unspecified => "Unspecified Error",
            ErrorCode::InvalidOpcode => "Invalid Opcode",
            ErrorCode::InvalidState => "Invalid State",
            ErrorCode::InvalidImageIndex => "Invalid Image_Index",
            ErrorCode::ImageNotAvailable => "Image Not Available",
            ErrorCode::InvalidParameters => "Invalid Parameter(s)",
            ErrorCode::CapacityLimit => "Capacity Limit",
            ErrorCode::InsufficientBattery => "Insufficient Battery",
            ErrorCode::InsufficientResources => "Insufficient Resources",
            ErrorCode::Retry => "Retry",
            ErrorCode::QueueFull => "Queue Full",
            ErrorCode::ImplausibleAbsoluteTime => "Implausible Absolute Time",
            ErrorCode::VendorSpecific(_) => "Vendor-specific Error",
            ErrorCode::Reserved(_) => "Reserved Error",
        };
        write!(f, "{name} (0x{:02X})", self.to_byte())
    }
}

/// The Basic State flags (ESLS §3.10.3.3), 16 bits; unknown bits are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BasicState(pub u16);

impl BasicState {
    pub const SERVICE_NEEDED: u16 = 1 << 0;
    pub const SYNCHRONIZED: u16 = 1 << 1;
    pub const ACTIVE_LED: u16 = 1 << 2;
    pub const PENDING_LED_UPDATE: u16 = 1 << 3;
    pub const PENDING_DISPLAY_UPDATE: u16 = 1 << 4;

    pub fn service_needed(self) -> bool {
        self.0 & Self::SERVICE_NEEDED != 0
    }
    pub fn synchronized(self) -> bool {
        self.0 & Self::SYNCHRONIZED != 0
    }
    pub fn active_led(self) -> bool {
        self.0 & Self::ACTIVE_LED != 0
    }
    pub fn pending_led_update(self) -> bool {
        self.0 & Self::PENDING_LED_UPDATE != 0
    }
    pub fn pending_display_update(self) -> bool {
        self.0 & Self::PENDING_DISPLAY_UPDATE != 0
    }
}

/// A Control Point notification from the ESL (ESLS §3.10.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// 0x00
    Error(ErrorCode),
    /// 0x01
    LedState { led_index: u8 },
    /// 0x10
    BasicState(BasicState),
    /// 0x11
    DisplayState { display_index: u8, image_index: u8 },
    /// 0x1E..=0xFE: sensor index and 1..=15 bytes of data.
    SensorValue { sensor_index: u8, data: Vec<u8> },
    /// 0x0F..=0xFF: 1..=16 bytes of vendor data.
    VendorSpecific { data: Vec<u8> },
}

impl Response {
    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Error(_) => "Error",
            Response::LedState { .. } => "LED State",
            Response::BasicState(_) => "Basic State",
            Response::DisplayState { .. } => "Display State",
            Response::SensorValue { .. } => "Sensor Value",
            Response::VendorSpecific { .. } => "vendor-specific response",
        }
    }

    /// The bytes of the notification (the tag's side; used by the fake ESL).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let (tag, params): (u8, Vec<u8>) = match self {
            Response::Error(code) => (0x00, vec![code.to_byte()]),
            Response::LedState { led_index } => (0x01, vec![*led_index]),
            Response::BasicState(state) => (0x00, state.0.to_le_bytes().to_vec()),
            Response::DisplayState {
                display_index,
                image_index,
            } => (0x01, vec![*display_index, *image_index]),
            Response::SensorValue { sensor_index, data } => {
                if data.is_empty() || data.len() > MAX_SENSOR_DATA {
                    return Err(field(
                        "sensor data",
                        format!("{} bytes, must be 1..={MAX_SENSOR_DATA}", data.len()),
                    ));
                }
                let mut params = vec![*sensor_index];
                params.extend_from_slice(data);
                (SENSOR_VALUE_TAG, params)
            }
            Response::VendorSpecific { data } => {
                if data.is_empty() || data.len() > MAX_VENDOR_RESPONSE_DATA {
                    return Err(field(
                        "vendor data",
                        format!(
                            "{} bytes, must be 1..={MAX_VENDOR_RESPONSE_DATA}",
                            data.len()
                        ),
                    ));
                }
                (VENDOR_TAG, data.clone())
            }
        };
        let mut bytes = Vec::with_capacity(1 + params.len());
        bytes.push(opcode(params.len(), tag));
        bytes.extend_from_slice(&params);
        Ok(bytes)
    }

    /// Parses one Control Point notification.
    pub fn decode(bytes: &[u8]) -> Result<Response, CodecError> {
        let (op, p) = split(bytes)?;
        Ok(match op {
            0x00 => Response::Error(ErrorCode::from_byte(p[0])),
            0x01 => Response::LedState { led_index: p[0] },
            0x10 => Response::BasicState(BasicState(u16::from_le_bytes([p[0], p[1]]))),
            0x11 => Response::DisplayState {
                display_index: p[0],
                image_index: p[1],
            },
            op if op & 0x0F == SENSOR_VALUE_TAG => {
                // 0xFE would be 16 parameter bytes: index + 15 data, valid;
                // 0x0E is an index without data.
                if p.len() < 2 {
                    return Err(field("sensor value", "no sensor data after the index"));
                }
                Response::SensorValue {
                    sensor_index: p[0],
                    data: p[1..].to_vec(),
                }
            }
            op if op & 0x0F == VENDOR_TAG => Response::VendorSpecific { data: p.to_vec() },
            opcode => {
                return Err(CodecError::UnknownOpcode {
                    what: "response",
                    opcode,
                })
            }
        })
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Error(code) => write!(f, "Error {code}"),
            Response::BasicState(state) => write!(f, "Basic State 0x{:04X}", state.0),
            Response::DisplayState {
                display_index,
                image_index,
            } => write!(
                f,
                "Display State (display {display_index}, image {image_index})"
            ),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LED: LedSettings = LedSettings {
        color: LedColor {
            red: 3,
            green: 0,
            blue: 1,
            brightness: 2,
        },
        flashing_pattern: [0xAA, 0x55, 0x0F, 0xF0, 0x01],
        off_period: 10,
        on_period: 20,
        repeats: LedRepeats::Count(5),
    };

    /// Every command with the exact bytes it must become (and come from).
    fn command_vectors() -> Vec<(Command, Vec<u8>)> {
        vec![
            (Command::Ping { esl_id: 0x05 }, vec![0x00, 0x05]),
            (Command::Unassociate { esl_id: 0x05 }, vec![0x01, 0x05]),
            (Command::ServiceReset { esl_id: 0x05 }, vec![0x02, 0x05]),
            (Command::FactoryReset { esl_id: 0x05 }, vec![0x03, 0x05]),
            (
                Command::UpdateComplete {
                    esl_id: BROADCAST_ESL_ID,
                },
                vec![0x04, 0xFF],
            ),
            (
                Command::ReadSensorData {
                    esl_id: 0x07,
                    sensor_index: 0x02,
                },
                vec![0x10, 0x07, 0x02],
            ),
            (
                Command::RefreshDisplay {
                    esl_id: 0x07,
                    display_index: 0x01,
                },
                vec![0x11, 0x07, 0x01],
            ),
            (
                Command::DisplayImage {
                    esl_id: 0x07,
                    display_index: 0x00,
                    image_index: 0x03,
                },
                vec![0x20, 0x07, 0x00, 0x03],
            ),
            (
                Command::DisplayTimedImage {
                    esl_id: 0x07,
                    display_index: 0x01,
                    image_index: 0x02,
                    absolute_time: 0x1234_5678,
                },
                vec![0x60, 0x07, 0x01, 0x02, 0x78, 0x56, 0x34, 0x12],
            ),
            (
                Command::LedControl {
                    esl_id: 0x07,
                    led_index: 0x00,
                    settings: LED,
                },
                // color: red 3 | blue 1 << 4 | brightness 2 << 6 = 0x93;
                // repeats: count 5 → 5 << 1 | 0 = 0x000A.
                vec![
                    0xB0, 0x07, 0x00, 0x93, 0xAA, 0x55, 0x0F, 0xF0, 0x01, 10, 20, 0x0A, 0x00,
                ],
            ),
            (
                Command::LedTimedControl {
                    esl_id: 0x07,
                    led_index: 0x01,
                    settings: LedSettings {
                        repeats: LedRepeats::Seconds(0x7FFF),
                        ..LED
                    },
                    absolute_time: 1000,
                },
                vec![
                    0xF0, 0x07, 0x01, 0x93, 0xAA, 0x55, 0x0F, 0xF0, 0x01, 10, 20, 0xFF, 0xFF, 0xE8,
                    0x03, 0x00, 0x00,
                ],
            ),
            (
                Command::VendorSpecific {
                    esl_id: 0x07,
                    data: vec![],
                },
                vec![0x0F, 0x07],
            ),
            (
                Command::VendorSpecific {
                    esl_id: 0x07,
                    data: vec![0xDE, 0xAD],
                },
                vec![0x2F, 0x07, 0xDE, 0xAD],
            ),
            (
                Command::VendorSpecific {
                    esl_id: 0x07,
                    data: vec![0x11; 15],
                },
                [vec![0xFF, 0x07], vec![0x11; 15]].concat(),
            ),
        ]
    }

    #[test]
    fn every_command_encodes_to_its_bytes_and_back() {
        for (command, bytes) in command_vectors() {
            assert_eq!(command.encode().as_ref(), Ok(&bytes), "{}", command.name());
            assert_eq!(Command::decode(&bytes), Ok(command.clone()), "{bytes:02X?}");
            // The length rule holds for every command.
            assert_eq!(bytes.len(), message_len(bytes[0]), "{}", command.name());
            assert!(bytes.len() <= MAX_MESSAGE_LEN);
        }
    }

    /// Every response with the exact bytes it comes as.
    fn response_vectors() -> Vec<(Response, Vec<u8>)> {
        vec![
            (Response::Error(ErrorCode::Unspecified), vec![0x00, 0x01]),
            (Response::Error(ErrorCode::Retry), vec![0x00, 0x0A]),
            (
                Response::Error(ErrorCode::VendorSpecific(0xF3)),
                vec![0x00, 0xF3],
            ),
            (Response::LedState { led_index: 2 }, vec![0x01, 0x02]),
            (
                Response::BasicState(BasicState(
                    BasicState::SYNCHRONIZED | BasicState::PENDING_DISPLAY_UPDATE,
                )),
                vec![0x10, 0x12, 0x00],
            ),
            (
                Response::DisplayState {
                    display_index: 0,
                    image_index: 3,
                },
                vec![0x11, 0x00, 0x03],
            ),
            (
                Response::SensorValue {
                    sensor_index: 1,
                    data: vec![0xB8, 0x0B],
                },
                vec![0x2E, 0x01, 0xB8, 0x0B],
            ),
            (
                Response::SensorValue {
                    sensor_index: 0,
                    data: vec![7; 15],
                },
                [vec![0xFE, 0x00], vec![7; 15]].concat(),
            ),
            (
                Response::VendorSpecific { data: vec![0x42] },
                vec![0x0F, 0x42],
            ),
            (
                Response::VendorSpecific {
                    data: vec![0x42; 16],
                },
                [vec![0xFF], vec![0x42; 16]].concat(),
            ),
        ]
    }

    #[test]
    fn every_response_decodes_from_its_bytes_and_back() {
        for (response, bytes) in response_vectors() {
            assert_eq!(
                Response::decode(&bytes),
                Ok(response.clone()),
                "{bytes:02X?}"
            );
            assert_eq!(response.encode(), Ok(bytes), "{}", response.name());
        }
    }

    #[test]
    fn every_error_code_round_trips_with_its_name() {
        let named = [
            (0x01, "Unspecified Error", true),
            (0x02, "Invalid Opcode", false),
            (0x03, "Invalid State", true),
            (0x04, "Invalid Image_Index", false),
            (0x05, "Image Not Available", true),
            (0x06, "Invalid Parameter(s)", false),
            (0x07, "Capacity Limit", false),
            (0x08, "Insufficient Battery", false),
            (0x09, "Insufficient Resources", true),
            (0x0A, "Retry", true),
            (0x0B, "Queue Full", true),
            (0x0C, "Implausible Absolute Time", false),
            (0x00, "Reserved Error", true),
            (0x0D, "Reserved Error", true),
            (0xEF, "Reserved Error", true),
            (0xF0, "Vendor-specific Error", true),
            (0xFF, "Vendor-specific Error", true),
        ];
        for (byte, name, retryable) in named {
            let code = ErrorCode::from_byte(byte);
            assert_eq!(code.to_byte(), byte);
            assert_eq!(code.to_string(), format!("{name} (0x{byte:02X})"));
            assert_eq!(code.retryable(), retryable, "{code}");
        }
    }

    #[test]
    fn basic_state_flags() {
        let state = BasicState(0b1_1111);
        assert!(state.service_needed());
        assert!(state.synchronized());
        assert!(state.active_led());
        assert!(state.pending_led_update());
        assert!(state.pending_display_update());
        let none = BasicState(0xFFE0);
        assert!(!none.service_needed() && !none.synchronized() && !none.active_led());
        assert!(!none.pending_led_update() && !none.pending_display_update());
    }

    #[test]
    fn malformed_responses_are_rejected_with_a_clear_error() {
        let cases: [(&[u8], CodecError); 7] = [
            (&[], CodecError::Empty),
            // Basic State announces 2 parameter bytes.
            (
                &[0x10, 0x02],
                CodecError::Length {
                    opcode: 0x10,
                    expected: 3,
                    got: 2,
                },
            ),
            // Trailing byte after an Error response.
            (
                &[0x00, 0x01, 0x00],
                CodecError::Length {
                    opcode: 0x00,
                    expected: 2,
                    got: 3,
                },
            ),
            (
                &[0x02, 0x00],
                CodecError::UnknownOpcode {
                    what: "response",
                    opcode: 0x02,
                },
            ),
            (
                &[0x20, 0x00, 0x00, 0x00],
                CodecError::UnknownOpcode {
                    what: "response",
                    opcode: 0x20,
                },
            ),
            (
                &[0x0E, 0x01],
                CodecError::Field {
                    field: "sensor value",
                    reason: "no sensor data after the index".to_owned(),
                },
            ),
            // Display State cut short.
            (
                &[0x11, 0x00],
                CodecError::Length {
                    opcode: 0x11,
                    expected: 3,
                    got: 2,
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Response::decode(bytes), Err(want.clone()), "{bytes:02X?}");
        }
        let message = Response::decode(&[0x10, 0x02]).unwrap_err().to_string();
        assert_eq!(message, "ESL opcode 0x10 needs 3 bytes in all, got 2");
    }

    #[test]
    fn malformed_commands_are_rejected() {
        assert_eq!(Command::decode(&[]), Err(CodecError::Empty));
        assert_eq!(
            Command::decode(&[0x20, 0x01, 0x00]),
            Err(CodecError::Length {
                opcode: 0x20,
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            Command::decode(&[0x05, 0x01]),
            Err(CodecError::UnknownOpcode {
                what: "command",
                opcode: 0x05
            })
        );
        assert_eq!(
            Command::decode(&[0x30, 1, 2, 3, 4]),
            Err(CodecError::UnknownOpcode {
                what: "command",
                opcode: 0x30
            })
        );
    }

    #[test]
    fn values_that_do_not_fit_are_encoding_errors() {
        let too_long = Command::VendorSpecific {
            esl_id: 1,
            data: vec![0; 16],
        };
        assert!(matches!(
            too_long.encode(),
            Err(CodecError::Field {
                field: "vendor data",
                ..
            })
        ));
        let bad_color = Command::LedControl {
            esl_id: 1,
            led_index: 0,
            settings: LedSettings {
                color: LedColor {
                    red: 4,
                    ..LED.color
                },
                ..LED
            },
        };
        assert!(matches!(
            bad_color.encode(),
            Err(CodecError::Field {
                field: "led.red",
                ..
            })
        ));
        let bad_repeats = Command::LedControl {
            esl_id: 1,
            led_index: 0,
            settings: LedSettings {
                repeats: LedRepeats::Count(0x8000),
                ..LED
            },
        };
        assert!(matches!(
            bad_repeats.encode(),
            Err(CodecError::Field {
                field: "led.repeats",
                ..
            })
        ));
        assert!(Response::SensorValue {
            sensor_index: 0,
            data: vec![]
        }
        .encode()
        .is_err());
        assert!(Response::VendorSpecific { data: vec![0; 17] }
            .encode()
            .is_err());
    }

    #[test]
    fn esl_address_layout() {
        let address = EslAddress::new(0x05, 0x2A).expect("valid");
        assert_eq!(address.encode(), [0x2A, 0x05]);
        assert_eq!(EslAddress::decode(&[0x2A, 0x05]), Ok(address));
        let top = EslAddress::new(MAX_GROUP_ID, 0xFE).expect("valid");
        assert_eq!(top.encode(), [0xFE, 0x7F]);
        assert_eq!(top.to_string(), "group 127 / ESL 254");

        assert!(EslAddress::new(0, BROADCAST_ESL_ID).is_err());
        assert!(EslAddress::new(128, 1).is_err());
        assert!(EslAddress::decode(&[0x01, 0x80]).is_err(), "RFU bit");
        assert!(EslAddress::decode(&[0x01]).is_err());
        assert!(EslAddress::decode(&[0xFF, 0x00]).is_err(), "broadcast");
    }

    #[test]
    fn sig_uuids() {
        assert_eq!(
            uuid16(ESL_SERVICE).to_string(),
            "00001857-0000-1000-8000-00805f9b34fb"
        );
        assert_eq!(
            uuid16(CONTROL_POINT_CHARACTERISTIC).to_string(),
            "00002bfe-0000-1000-8000-00805f9b34fb"
        );
    }
}
