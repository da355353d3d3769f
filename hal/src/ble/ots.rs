//! Codec for the Object Transfer Service (OTS, 0x1825) as an ESL uses it to
//! receive images: Object List Control Point (OLCP, 0x2AC6) Go To, Object
//! Action Control Point (OACP, 0x2AC5) Write and Calculate Checksum, their
//! responses, and Object Size (0x2AC0). The object bytes themselves travel
//! over an L2CAP LE credit-based channel on PSM 0x0025
//! ([`super::transport::ObjectChannel`]).
//!
//! Owns: byte layouts only (no I/O, no sequencing: `transport.rs` decides
//! what to send, `fake_esl.rs` decodes requests and encodes responses with
//! this same code).
//!
//! Facts checked against public definitions (read, not copied):
//! - Opcodes, result codes, parameter sizes (OACP Write: offset u32, length
//!   u32, mode u8 with bit 1 = truncate; Calculate Checksum: offset u32,
//!   length u32, answered with a u32 checksum; OLCP Go To: 48-bit object
//!   ID), response opcodes 0x60 / 0x70 followed by the request opcode and
//!   the result: Zephyr `subsys/bluetooth/services/ots/ots_oacp_internal.h`,
//!   `ots_olcp_internal.h` and `ots_oacp.c` (the server side; the channel
//!   must be open before OACP Write, else Channel Unavailable).
//! - The checksum is IEEE CRC-32 (Zephyr's OTS computes it with its
//!   `crc32_ieee`-based `bt_ots_client_calc_checksum`).
//! - Object IDs start at 0x000000000100 (`BT_OTS_OBJ_ID_MIN`, Zephyr
//!   `ots.h`), and an ESL's image `n` is object 0x100 + n (Nordic nRF
//!   Connect SDK `subsys/bluetooth/services/esl/esl.c`: object index = ID −
//!   `BT_OTS_OBJ_ID_MIN`).
//! - UUIDs 0x1825, 0x2AC0, 0x2AC3, 0x2AC5, 0x2AC6 and PSM 0x0025: the
//!   Bluetooth SIG assigned numbers as used by the same Zephyr service.

use std::fmt;

/// Object Transfer Service.
pub const OTS_SERVICE: u16 = 0x1825;
/// Object Size characteristic (read): current size u32, allocated u32.
pub const OBJECT_SIZE_CHARACTERISTIC: u16 = 0x2AC0;
/// Object ID characteristic (read): the current object, 48 bits LE.
pub const OBJECT_ID_CHARACTERISTIC: u16 = 0x2AC3;
/// Object Action Control Point (write, indicate).
pub const OACP_CHARACTERISTIC: u16 = 0x2AC5;
/// Object List Control Point (write, indicate).
pub const OLCP_CHARACTERISTIC: u16 = 0x2AC6;
/// L2CAP PSM of the OTS object transfer channel.
pub const OTS_PSM: u16 = 0x0025;
/// Smallest object ID an object may have.
pub const OBJECT_ID_MIN: u64 = 0x0000_0000_0100;

const OACP_WRITE: u8 = 0x06;
const OACP_CALCULATE_CHECKSUM: u8 = 0x03;
const OACP_RESPONSE: u8 = 0x60;
const OLCP_GO_TO: u8 = 0x05;
const OLCP_RESPONSE: u8 = 0x70;
/// OACP Write mode bit 1: truncate the object after the written bytes.
const WRITE_MODE_TRUNCATE: u8 = 1 << 1;

/// The object that holds image `image_index` of an ESL.
pub fn image_object_id(image_index: u8) -> u64 {
    OBJECT_ID_MIN + u64::from(image_index)
}

/// Why bytes are not a valid OTS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtsError {
    #[error("OTS {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

fn malformed(what: &'static str, reason: impl Into<String>) -> OtsError {
    OtsError::Malformed {
        what,
        reason: reason.into(),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// An OACP request this radio sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OacpRequest {
    Write {
        offset: u32,
        length: u32,
        truncate: bool,
    },
    CalculateChecksum {
        offset: u32,
        length: u32,
    },
}

impl OacpRequest {
    pub fn opcode(self) -> u8 {
        match self {
            OacpRequest::Write { .. } => OACP_WRITE,
            OacpRequest::CalculateChecksum { .. } => OACP_CALCULATE_CHECKSUM,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OacpRequest::Write { .. } => "OACP Write",
            OacpRequest::CalculateChecksum { .. } => "OACP Calculate Checksum",
        }
    }

    pub fn encode(self) -> Vec<u8> {
        let mut out = vec![self.opcode()];
        match self {
            OacpRequest::Write {
                offset,
                length,
                truncate,
            } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&length.to_le_bytes());
                out.push(if truncate { WRITE_MODE_TRUNCATE } else { 0 });
            }
            OacpRequest::CalculateChecksum { offset, length } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&length.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<OacpRequest, OtsError> {
        match bytes {
            [OACP_WRITE, rest @ ..] if rest.len() == 9 => Ok(OacpRequest::Write {
                offset: u32_at(rest, 0),
                length: u32_at(rest, 4),
                truncate: rest[8] & WRITE_MODE_TRUNCATE != 0,
            }),
            [OACP_CALCULATE_CHECKSUM, rest @ ..] if rest.len() == 8 => {
                Ok(OacpRequest::CalculateChecksum {
                    offset: u32_at(rest, 0),
                    length: u32_at(rest, 4),
                })
            }
            _ => Err(malformed(
                "OACP request",
                format!("{bytes:02X?} is not Write or Calculate Checksum"),
            )),
        }
    }
}

/// OACP result codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OacpResult {
    Success,
    OpcodeNotSupported,
    InvalidParameter,
    InsufficientResources,
    InvalidObject,
    ChannelUnavailable,
    UnsupportedType,
    ProcedureNotPermitted,
    ObjectLocked,
    OperationFailed,
    Other(u8),
}

impl OacpResult {
    pub fn from_byte(byte: u8) -> OacpResult {
        match byte {
            0x01 => OacpResult::Success,
            0x02 => OacpResult::OpcodeNotSupported,
            0x03 => OacpResult::InvalidParameter,
            0x04 => OacpResult::InsufficientResources,
            0x05 => OacpResult::InvalidObject,
            0x06 => OacpResult::ChannelUnavailable,
            0x07 => OacpResult::UnsupportedType,
            0x08 => OacpResult::ProcedureNotPermitted,
            0x09 => OacpResult::ObjectLocked,
            0x0A => OacpResult::OperationFailed,
            other => OacpResult::Other(other),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            OacpResult::Success => 0x01,
            OacpResult::OpcodeNotSupported => 0x02,
            OacpResult::InvalidParameter => 0x03,
            OacpResult::InsufficientResources => 0x04,
            OacpResult::InvalidObject => 0x05,
            OacpResult::ChannelUnavailable => 0x06,
            OacpResult::UnsupportedType => 0x07,
            OacpResult::ProcedureNotPermitted => 0x08,
            OacpResult::ObjectLocked => 0x09,
            OacpResult::OperationFailed => 0x0A,
            OacpResult::Other(b) => b,
        }
    }

    /// Whether another session may get a different answer.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            OacpResult::InsufficientResources
                | OacpResult::ChannelUnavailable
                | OacpResult::ObjectLocked
                | OacpResult::OperationFailed
                | OacpResult::Other(_)
        )
    }
}

impl fmt::Display for OacpResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            OacpResult::Success => "Success",
            OacpResult::OpcodeNotSupported => "Op Code Not Supported",
            OacpResult::InvalidParameter => "Invalid Parameter",
            OacpResult::InsufficientResources => "Insufficient Resources",
            OacpResult::InvalidObject => "Invalid Object",
            OacpResult::ChannelUnavailable => "Channel Unavailable",
            OacpResult::UnsupportedType => "Unsupported Type",
            OacpResult::ProcedureNotPermitted => "Procedure Not Permitted",
            OacpResult::ObjectLocked => "Object Locked",
            OacpResult::OperationFailed => "Operation Failed",
            OacpResult::Other(_) => "Reserved result",
        };
        write!(f, "{name} (0x{:02X})", self.to_byte())
    }
}

/// An OACP response: `0x60 | request opcode | result | [checksum u32]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OacpResponse {
    pub request: u8,
    pub result: OacpResult,
    /// Only in a successful Calculate Checksum response.
    pub checksum: Option<u32>,
}

impl OacpResponse {
    pub fn encode(self) -> Vec<u8> {
        let mut out = vec![OACP_RESPONSE, self.request, self.result.to_byte()];
        if let Some(checksum) = self.checksum {
            out.extend_from_slice(&checksum.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<OacpResponse, OtsError> {
        let what = "OACP response";
        match bytes {
            [OACP_RESPONSE, request, result] => Ok(OacpResponse {
                request: *request,
                result: OacpResult::from_byte(*result),
                checksum: None,
            }),
            [OACP_RESPONSE, request, result, rest @ ..] if rest.len() == 4 => Ok(OacpResponse {
                request: *request,
                result: OacpResult::from_byte(*result),
                checksum: Some(u32_at(rest, 0)),
            }),
            [OACP_RESPONSE, ..] => Err(malformed(what, format!("{} bytes", bytes.len()))),
            _ => Err(malformed(
                what,
                format!("{bytes:02X?} does not start with 0x60"),
            )),
        }
    }
}

/// OLCP result codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OlcpResult {
    Success,
    OpcodeNotSupported,
    InvalidParameter,
    OperationFailed,
    OutOfBounds,
    TooManyObjects,
    NoObject,
    ObjectIdNotFound,
    Other(u8),
}

impl OlcpResult {
    pub fn from_byte(byte: u8) -> OlcpResult {
        match byte {
            0x01 => OlcpResult::Success,
            0x02 => OlcpResult::OpcodeNotSupported,
            0x03 => OlcpResult::InvalidParameter,
            0x04 => OlcpResult::OperationFailed,
            0x05 => OlcpResult::OutOfBounds,
            0x06 => OlcpResult::TooManyObjects,
            0x07 => OlcpResult::NoObject,
            0x08 => OlcpResult::ObjectIdNotFound,
            other => OlcpResult::Other(other),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            OlcpResult::Success => 0x01,
            OlcpResult::OpcodeNotSupported => 0x02,
            OlcpResult::InvalidParameter => 0x03,
            OlcpResult::OperationFailed => 0x04,
            OlcpResult::OutOfBounds => 0x05,
            OlcpResult::TooManyObjects => 0x06,
            OlcpResult::NoObject => 0x07,
            OlcpResult::ObjectIdNotFound => 0x08,
            OlcpResult::Other(b) => b,
        }
    }
}

impl fmt::Display for OlcpResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            OlcpResult::Success => "Success",
            OlcpResult::OpcodeNotSupported => "Op Code Not Supported",
            OlcpResult::InvalidParameter => "Invalid Parameter",
            OlcpResult::OperationFailed => "Operation Failed",
            OlcpResult::OutOfBounds => "Out Of Bounds",
            OlcpResult::TooManyObjects => "Too Many Objects",
            OlcpResult::NoObject => "No Object",
            OlcpResult::ObjectIdNotFound => "Object ID Not Found",
            OlcpResult::Other(_) => "Reserved result",
        };
        write!(f, "{name} (0x{:02X})", self.to_byte())
    }
}

/// OLCP Go To: selects the object with this 48-bit ID.
pub fn encode_go_to(object_id: u64) -> Vec<u8> {
    let mut out = vec![OLCP_GO_TO];
    out.extend_from_slice(&object_id.to_le_bytes()[..6]);
    out
}

pub fn decode_go_to(bytes: &[u8]) -> Result<u64, OtsError> {
    match bytes {
        [OLCP_GO_TO, id @ ..] if id.len() == 6 => {
            let mut wide = [0u8; 8];
            wide[..6].copy_from_slice(id);
            Ok(u64::from_le_bytes(wide))
        }
        _ => Err(malformed(
            "OLCP request",
            format!("{bytes:02X?} is not Go To"),
        )),
    }
}

/// The OLCP response to Go To: `0x70 | 0x05 | result`.
pub fn encode_go_to_response(result: OlcpResult) -> Vec<u8> {
    vec![OLCP_RESPONSE, OLCP_GO_TO, result.to_byte()]
}

/// The result of an OLCP Go To response.
pub fn decode_go_to_response(bytes: &[u8]) -> Result<OlcpResult, OtsError> {
    match bytes {
        [OLCP_RESPONSE, OLCP_GO_TO, result] => Ok(OlcpResult::from_byte(*result)),
        _ => Err(malformed(
            "OLCP response",
            format!("{bytes:02X?} is not a Go To response"),
        )),
    }
}

/// Object Size: (current, allocated).
pub fn decode_object_size(bytes: &[u8]) -> Result<(u32, u32), OtsError> {
    if bytes.len() != 8 {
        return Err(malformed(
            "Object Size",
            format!("{} bytes, must be 8", bytes.len()),
        ));
    }
    Ok((u32_at(bytes, 0), u32_at(bytes, 4)))
}

pub fn encode_object_size(current: u32, allocated: u32) -> Vec<u8> {
    let mut out = current.to_le_bytes().to_vec();
    out.extend_from_slice(&allocated.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oacp_requests_have_the_documented_layout() {
        let write = OacpRequest::Write {
            offset: 0,
            length: 4736,
            truncate: false,
        };
        assert_eq!(write.encode(), [0x06, 0, 0, 0, 0, 0x80, 0x12, 0, 0, 0]);
        assert_eq!(OacpRequest::decode(&write.encode()), Ok(write));
        let truncating = OacpRequest::Write {
            offset: 1,
            length: 2,
            truncate: true,
        };
        assert_eq!(truncating.encode()[9], 0x02);
        let checksum = OacpRequest::CalculateChecksum {
            offset: 0,
            length: 16,
        };
        assert_eq!(checksum.encode(), [0x03, 0, 0, 0, 0, 16, 0, 0, 0]);
        assert_eq!(OacpRequest::decode(&checksum.encode()), Ok(checksum));
        assert!(OacpRequest::decode(&[0x06, 0]).is_err());
    }

    #[test]
    fn oacp_responses_carry_the_request_and_the_checksum() {
        let ok = OacpResponse {
            request: 0x03,
            result: OacpResult::Success,
            checksum: Some(0xCBF4_3926),
        };
        assert_eq!(ok.encode(), [0x60, 0x03, 0x01, 0x26, 0x39, 0xF4, 0xCB]);
        assert_eq!(OacpResponse::decode(&ok.encode()), Ok(ok));
        let refused = OacpResponse {
            request: 0x06,
            result: OacpResult::ChannelUnavailable,
            checksum: None,
        };
        assert_eq!(refused.encode(), [0x60, 0x06, 0x06]);
        assert_eq!(OacpResponse::decode(&refused.encode()), Ok(refused));
        assert!(OacpResponse::decode(&[0x60, 0x03, 0x01, 0]).is_err());
        assert!(OacpResponse::decode(&[0x70, 0x05, 0x01]).is_err());
        // The IEEE CRC-32 check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn olcp_go_to_selects_an_image_object() {
        assert_eq!(image_object_id(1), 0x101);
        let bytes = encode_go_to(image_object_id(1));
        assert_eq!(bytes, [0x05, 0x01, 0x01, 0, 0, 0, 0]);
        assert_eq!(decode_go_to(&bytes), Ok(0x101));
        assert_eq!(
            decode_go_to_response(&encode_go_to_response(OlcpResult::ObjectIdNotFound)),
            Ok(OlcpResult::ObjectIdNotFound)
        );
        assert_eq!(
            encode_go_to_response(OlcpResult::Success),
            [0x70, 0x05, 0x01]
        );
        assert_eq!(
            decode_object_size(&encode_object_size(10, 20)),
            Ok((10, 20))
        );
        assert!(decode_object_size(&[0; 4]).is_err());
    }
}
