//! The ESL application messages carried in ZigBee AF frames between the
//! agent's endpoint and the tags (docs/ZIGBEE.md is the reference).
//!
//! Owns: the message types and their bytes — one version byte
//! ([`APP_VERSION`]), then the [`AppMessage`] in postcard (varints,
//! length-prefixed strings and byte strings, enum variant as a varint).
//! Must not: know about ZNP frames, addresses or the agent; decoding never
//! panics, and anything it cannot read is an [`AppError`] the driver counts.
//!
//! Three messages:
//! - [`CheckIn`] (tag → agent): the tag woke up and listens for a short
//!   while; it says who it is, its battery, the signal it hears from its
//!   parent and what it displays now.
//! - [`Offer`] (agent → tag): new content, in one or more segments;
//!   `handle` names this attempt.
//! - [`UpdateResult`] (tag → agent): the tag shows the offer now, or could
//!   not, and whether trying again makes sense.

use serde::{Deserialize, Serialize};

/// First byte of every message. A tag or agent that sees another value
/// drops the message (and counts it) rather than guess.
pub const APP_VERSION: u8 = 1;
/// ZigBee Home Automation profile: coordinators route it everywhere.
pub const ESL_PROFILE: u16 = 0x0104;
/// Manufacturer-specific cluster id (0xFC00..=0xFFFF is the range for those)
/// that carries every ESL message, both ways.
pub const ESL_CLUSTER: u16 = 0xFC57;
/// Device id the endpoint registers with (HA "simple sensor"-free range).
pub const ESL_DEVICE_ID: u16 = 0x0100;
/// Bytes of a content hash on the air: the agent's `content_hash` is the hex
/// of 8 bytes (PROTOCOL §5).
pub const HASH_LEN: usize = 8;
/// Largest application payload the agent sends in one AF frame. An APS
/// frame to a sleepy end device with network security leaves about 80
/// bytes; anything larger would need APS fragmentation, which sleepy tags
/// rarely support. Larger content is split into offer segments instead.
pub const MAX_APP_PAYLOAD: usize = 80;

pub type ContentHash = [u8; HASH_LEN];

/// One application message, after the version byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppMessage<'a> {
    #[serde(borrow)]
    CheckIn(CheckIn<'a>),
    #[serde(borrow)]
    Offer(Offer<'a>),
    UpdateResult(UpdateResult),
}

/// Tag → agent, at every wake-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckIn<'a> {
    /// The tag's id as the back end knows it (printed on the label).
    pub tag_id: &'a str,
    /// Battery voltage; `None` when the tag cannot measure it.
    pub battery_mv: Option<u16>,
    /// Signal of the parent as the tag hears it, dBm.
    pub rssi_dbm: Option<i8>,
    /// Hash of what the e-paper shows now; `None` when blank.
    pub displayed: Option<ContentHash>,
}

/// Agent → tag: show this. Content that does not fit one frame is split
/// into segments ([`offer_segments`]), sent one after the other (the next
/// once the network confirmed the previous); the tag shows the content when
/// it has them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer<'a> {
    /// Names this attempt; the tag echoes it in its [`UpdateResult`].
    pub handle: u16,
    /// This segment's index, from 0, and the number of segments.
    pub segment: u8,
    pub segments: u8,
    /// Hash of the whole content; the tag reports it in later check-ins.
    pub content_hash: ContentHash,
    /// The agent's task id, for the tag's display log and service tools; in
    /// segment 0 only (empty in the others, to leave room for content).
    pub task_id: &'a str,
    /// This segment's part of the content (canonical JSON of what to show).
    pub content: &'a [u8],
}

/// Most segments one offer may have (the count is one byte).
pub const MAX_SEGMENTS: usize = u8::MAX as usize;

/// The frames of one offer: `content` split so that every encoded segment
/// fits [`MAX_APP_PAYLOAD`]. [`AppError::TooLarge`] when the task id leaves
/// no room or the content needs more than [`MAX_SEGMENTS`].
pub fn offer_segments(
    handle: u16,
    task_id: &str,
    content_hash: ContentHash,
    content: &[u8],
) -> Result<Vec<Vec<u8>>, AppError> {
    let offer = |segment: u8, segments: u8, task_id, content| {
        AppMessage::Offer(Offer {
            handle,
            segment,
            segments,
            content_hash,
            task_id,
            content,
        })
    };
    // Room for content: the limit minus the segment without content. A
    // content length below 128 takes one varint byte, as the empty one does,
    // and the room is always below 128.
    let room = |task_id| -> Result<usize, AppError> {
        let empty = offer(0, 1, task_id, &[]).encode()?.len();
        match MAX_APP_PAYLOAD - empty {
            0 => Err(AppError::TooLarge { len: empty + 1 }),
            room => Ok(room),
        }
    };
    let first_room = room(task_id)?;
    let rest_room = room("")?;
    let rest = content.len().saturating_sub(first_room);
    let count = 1 + rest.div_ceil(rest_room);
    if count > MAX_SEGMENTS {
        return Err(AppError::TooLarge { len: content.len() });
    }
    // `count` fits a byte: checked just above.
    let segments = count as u8;
    let (first, mut rest) = content.split_at(content.len().min(first_room));
    let mut out = vec![offer(0, segments, task_id, first).encode()?];
    for segment in 1..segments {
        let (part, tail) = rest.split_at(rest.len().min(rest_room));
        out.push(offer(segment, segments, "", part).encode()?);
        rest = tail;
    }
    Ok(out)
}

/// Tag → agent: the end of one [`Offer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateResult {
    pub handle: u16,
    pub status: UpdateStatus,
}

/// What became of an offer on the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateStatus {
    /// The tag displays the content now.
    Applied,
    /// The content arrived but did not match its hash (corrupted on the
    /// way): worth another attempt.
    HashMismatch,
    /// The tag is busy (refreshing, low battery pause): try again later.
    Busy,
    /// The tag cannot show this content (layout, size): retrying is useless.
    Unrenderable,
}

impl UpdateStatus {
    /// `None` for [`UpdateStatus::Applied`]; else whether to retry, and why.
    pub fn failure(self) -> Option<(bool, &'static str)> {
        match self {
            UpdateStatus::Applied => None,
            UpdateStatus::HashMismatch => Some((true, "tag received corrupted content")),
            UpdateStatus::Busy => Some((true, "tag busy")),
            UpdateStatus::Unrenderable => Some((false, "tag cannot render the content")),
        }
    }
}

/// An application payload the agent cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    #[error("empty application payload")]
    Empty,
    #[error("application version {0} (this agent speaks {APP_VERSION})")]
    Version(u8),
    #[error("undecodable application message: {0}")]
    Decode(String),
    #[error("application message of {len} bytes is over the {MAX_APP_PAYLOAD}-byte limit")]
    TooLarge { len: usize },
}

impl AppMessage<'_> {
    /// The payload of an AF frame: version byte, then postcard.
    pub fn encode(&self) -> Result<Vec<u8>, AppError> {
        let mut out = vec![APP_VERSION];
        // Serialising plain structs of ints, strings and slices into a
        // growing Vec cannot fail; mapped anyway, not unwrapped.
        let body = postcard::to_allocvec(self).map_err(|e| AppError::Decode(e.to_string()))?;
        out.extend_from_slice(&body);
        if out.len() > MAX_APP_PAYLOAD {
            return Err(AppError::TooLarge { len: out.len() });
        }
        Ok(out)
    }
}

/// Reads an AF payload. Trailing bytes after the message are an error: a
/// newer tag that adds fields must raise [`APP_VERSION`].
pub fn decode(bytes: &[u8]) -> Result<AppMessage<'_>, AppError> {
    let (&version, body) = bytes.split_first().ok_or(AppError::Empty)?;
    if version != APP_VERSION {
        return Err(AppError::Version(version));
    }
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| AppError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(AppError::Decode(format!(
            "{} trailing byte(s) after the message",
            rest.len()
        )));
    }
    Ok(message)
}

/// The agent's hex `content_hash` as the 8 bytes sent on the air.
pub fn hash_from_hex(hex: &str) -> Option<ContentHash> {
    let bytes = hex.as_bytes();
    if bytes.len() != 2 * HASH_LEN {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// The 8 hash bytes as the agent's lowercase hex.
pub fn hash_to_hex(hash: &ContentHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use quickcheck::{quickcheck, TestResult};

    use super::*;

    #[test]
    fn check_in_has_a_stable_compact_encoding() {
        let message = AppMessage::CheckIn(CheckIn {
            tag_id: "ZB01",
            battery_mv: Some(3000),
            rssi_dbm: Some(-60),
            displayed: None,
        });
        let bytes = message.encode().expect("encode");
        // version, variant 0, "ZB01", Some(3000 as varint B8 17),
        // Some(-60 as i8 C4), None.
        assert_eq!(
            bytes,
            [1, 0, 4, b'Z', b'B', b'0', b'1', 1, 0xB8, 0x17, 1, 0xC4, 0]
        );
        assert_eq!(decode(&bytes), Ok(message));
    }

    #[test]
    fn offer_and_result_round_trip() {
        let hash = hash_from_hex("9f86d081884c7d65").expect("hex");
        let offer = AppMessage::Offer(Offer {
            handle: 513,
            segment: 0,
            segments: 1,
            content_hash: hash,
            task_id: "t-1",
            content: br#"{"price":"9.90"}"#,
        });
        let bytes = offer.encode().expect("encode");
        // version, variant, handle (2), segment, segments, hash (8),
        // task id (1 + 3), content (1 + 16).
        assert_eq!(bytes.len(), 1 + 1 + 2 + 1 + 1 + 8 + 4 + 17, "{bytes:?}");
        assert_eq!(decode(&bytes), Ok(offer));
        let result = AppMessage::UpdateResult(UpdateResult {
            handle: 513,
            status: UpdateStatus::Busy,
        });
        assert_eq!(result.encode().expect("encode"), [1, 2, 0x81, 0x04, 2]);
    }

    /// Decodes segments and joins their content, checking the framing.
    fn reassemble(segments: &[Vec<u8>]) -> (String, Vec<u8>) {
        let mut task = String::new();
        let mut content = Vec::new();
        for (i, bytes) in segments.iter().enumerate() {
            assert!(
                bytes.len() <= MAX_APP_PAYLOAD,
                "segment {i}: {} bytes",
                bytes.len()
            );
            let Ok(AppMessage::Offer(offer)) = decode(bytes) else {
                panic!("segment {i} is no offer")
            };
            assert_eq!(usize::from(offer.segment), i);
            assert_eq!(usize::from(offer.segments), segments.len());
            assert_eq!(offer.handle, 7);
            if i == 0 {
                task = offer.task_id.to_owned();
            } else {
                assert_eq!(offer.task_id, "", "task id in segment 0 only");
            }
            content.extend_from_slice(offer.content);
        }
        (task, content)
    }

    #[test]
    fn large_content_is_split_into_segments_that_fit() {
        // PROTOCOL §4's example task: more than one frame with its task id.
        let content = br#"{"currency":"CNY","name":"Milk 1L","price":"9.90"}"#;
        let segments = offer_segments(7, "t-20261127-000123", [1; 8], content).expect("fits");
        assert_eq!(segments.len(), 2);
        assert_eq!(
            reassemble(&segments),
            ("t-20261127-000123".to_owned(), content.to_vec())
        );

        let small = offer_segments(7, "t", [1; 8], b"{}").expect("fits");
        assert_eq!(small.len(), 1);
        let empty = offer_segments(7, "t", [1; 8], b"").expect("fits");
        assert_eq!(reassemble(&empty).1, b"");

        let too_long_id = "x".repeat(MAX_APP_PAYLOAD);
        assert!(matches!(
            offer_segments(7, &too_long_id, [1; 8], b"{}"),
            Err(AppError::TooLarge { .. })
        ));
        let huge = vec![b'x'; 64 * 1024];
        assert!(matches!(
            offer_segments(7, "t", [1; 8], &huge),
            Err(AppError::TooLarge { .. })
        ));
    }
    #[test]
    fn bad_payloads_are_errors() {
        assert_eq!(decode(&[]), Err(AppError::Empty));
        assert_eq!(decode(&[2, 0]), Err(AppError::Version(2)));
        assert!(matches!(decode(&[1, 9]), Err(AppError::Decode(_))));
        assert!(matches!(decode(&[1, 0, 200]), Err(AppError::Decode(_))));
        // A valid result with a byte too many.
        assert!(matches!(decode(&[1, 2, 1, 0, 7]), Err(AppError::Decode(_))));
        let big = AppMessage::Offer(Offer {
            handle: 1,
            segment: 0,
            segments: 1,
            content_hash: [0; 8],
            task_id: "t",
            content: &[b'x'; MAX_APP_PAYLOAD],
        });
        assert!(matches!(big.encode(), Err(AppError::TooLarge { .. })));
    }

    #[test]
    fn hashes_convert_both_ways() {
        let hash = hash_from_hex("00ff10a0b1c2d3e4").expect("hex");
        assert_eq!(hash, [0, 0xff, 0x10, 0xa0, 0xb1, 0xc2, 0xd3, 0xe4]);
        assert_eq!(hash_to_hex(&hash), "00ff10a0b1c2d3e4");
        for bad in [
            "",
            "00ff",
            "00ff10a0b1c2d3e4ff",
            "zzff10a0b1c2d3e4",
            "é0ff10a0b1c2d3e",
        ] {
            assert_eq!(hash_from_hex(bad), None, "{bad}");
        }
    }

    quickcheck! {
        /// Any content up to the segment limit splits into frames that fit
        /// and join back to the content.
        fn segments_join_back(task: String, content: Vec<u8>, handle: u16) -> TestResult {
            if task.len() > 40 {
                return TestResult::discard();
            }
            let segments = offer_segments(handle, &task, [9; 8], &content).expect("fits");
            let mut joined = Vec::new();
            for (i, bytes) in segments.iter().enumerate() {
                let Ok(AppMessage::Offer(offer)) = decode(bytes) else {
                    return TestResult::failed();
                };
                if bytes.len() > MAX_APP_PAYLOAD
                    || usize::from(offer.segment) != i
                    || usize::from(offer.segments) != segments.len()
                    || offer.handle != handle
                {
                    return TestResult::failed();
                }
                joined.extend_from_slice(offer.content);
            }
            TestResult::from_bool(joined == content)
        }

        fn any_bytes_decode_without_panic(bytes: Vec<u8>) -> bool {
            let _ = decode(&bytes);
            true
        }

        fn check_in_round_trips(tag: String, mv: Option<u16>, rssi: Option<i8>, shown: Option<u64>) -> bool {
            let message = AppMessage::CheckIn(CheckIn {
                tag_id: &tag,
                battery_mv: mv,
                rssi_dbm: rssi,
                displayed: shown.map(u64::to_be_bytes),
            });
            match message.encode() {
                Ok(bytes) => decode(&bytes) == Ok(message),
                Err(AppError::TooLarge { len }) => len > MAX_APP_PAYLOAD && tag.len() + 19 > MAX_APP_PAYLOAD,
                Err(_) => false,
            }
        }
    }
}
