//! Framing of the vendor content characteristic: how display content reaches
//! a tag when there is no Object Transfer Service.
//!
//! Owns: the byte layouts of the frames the AP writes and of the status the
//! tag returns when read. No I/O; `transport.rs` writes the frames, the fake
//! tag (`fake_esl.rs`) parses them with the same code.
//!
//! Why it exists: the ESL Service stores images through the Object Transfer
//! Service (OTS, an L2CAP credit-based channel), which btleplug cannot open.
//! So the content travels over one vendor characteristic (UUID configured,
//! `radio.ble.content_characteristic`) as plain GATT writes with response,
//! and the standard Control Point then shows it (Display Image):
//!
//! ```text
//! BEGIN  01 | image u8 | total_len u32 | crc32 u32 | hash_len u8 | hash   (tag: drop partial, expect total_len)
//! DATA   02 | offset u32 | bytes…                                          (tag: bytes must land at `offset`)
//! COMMIT 03                                                                (tag: check length and CRC-32, store in `image`)
//! read → state u8 | image u8 | received u32 | crc32 u32 | hash_len u8 | hash
//! ```
//!
//! Integers are little-endian; CRC-32 is IEEE (zlib's). `hash` is the
//! agent's `content_hash` (ASCII, at most [`MAX_HASH_LEN`] bytes): the tag
//! keeps it with the image and returns it when read, so the AP can tell that
//! a tag already shows some content without sending it again. The explicit
//! `offset` makes a lost or repeated write visible instead of silently
//! shifting the image; a write with response gives ATT-level flow control.

/// First byte of each frame.
pub const BEGIN: u8 = 0x01;
pub const DATA: u8 = 0x02;
pub const COMMIT: u8 = 0x03;

/// Longest `content_hash` the frames carry (the agent's is 16).
pub const MAX_HASH_LEN: usize = 32;
/// Bytes of a DATA frame before the content: kind + offset.
pub const DATA_HEADER_LEN: usize = 5;
/// Bytes of BEGIN and of the status before the hash.
const FIXED_LEN: usize = 11;

/// Why a frame or status is malformed, or content cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("content frame is empty")]
    Empty,
    #[error("unknown content frame kind 0x{0:02X}")]
    UnknownKind(u8),
    #[error("content {what} is {got} bytes, {rule}")]
    Length {
        what: &'static str,
        got: usize,
        rule: String,
    },
    #[error("content hash {0:?} is not 1..=32 ASCII characters")]
    Hash(String),
    #[error("unknown transfer state {0}")]
    State(u8),
    #[error("content.ble_image: {0}")]
    Image(String),
}

/// The key of a task's content object that carries an image for a
/// standard (OTS) ESL: `{"ble_image": {"display": 0, "image": 0,
/// "bitmap": "<base64>"}}`. `bitmap` is the display's native packed format,
/// exactly Display Information width × height × bits per pixel (rounded up
/// to a byte); other keys of the content are ignored.
pub const IMAGE_KEY: &str = "ble_image";
/// [`IMAGE_KEY`] as a task's field, as error details name it.
pub const IMAGE_FIELD: &str = "content.ble_image";

/// An image to store in an ESL's image slot through OTS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageContent {
    pub display_index: u8,
    pub image_index: u8,
    pub bitmap: Vec<u8>,
}

impl ImageContent {
    /// The image in a task's canonical content JSON; `Ok(None)` when the
    /// content has no [`IMAGE_KEY`].
    pub fn from_content(content: &[u8]) -> Result<Option<ImageContent>, ContentError> {
        use base64::Engine as _;

        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wire {
            display: u8,
            image: u8,
            bitmap: String,
        }
        /// The content's top level, reading only [`IMAGE_KEY`]: the rest of
        /// the document (the other fields, which may be large) is skipped,
        /// not built into values. This runs at intake, at delivery and in
        /// the session.
        #[derive(serde::Deserialize)]
        struct Top {
            #[serde(rename = "ble_image", default, deserialize_with = "present")]
            image: Option<serde_json::Value>,
        }
        /// `Some` for any value the key has, `null` included.
        fn present<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<serde_json::Value>, D::Error> {
            serde::Deserialize::deserialize(d).map(Some)
        }
        let Ok(Top { image: Some(value) }) = serde_json::from_slice::<Top>(content) else {
            return Ok(None);
        };
        let wire: Wire =
            serde_json::from_value(value).map_err(|e| ContentError::Image(e.to_string()))?;
        let bitmap = base64::engine::general_purpose::STANDARD
            .decode(wire.bitmap.as_bytes())
            .map_err(|e| ContentError::Image(format!("bitmap is not base64: {e}")))?;
        Ok(Some(ImageContent {
            display_index: wire.display,
            image_index: wire.image,
            bitmap,
        }))
    }
}

/// What the tag has (or has not) received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    /// Nothing received since start (or since the last committed image).
    Idle = 0,
    /// BEGIN seen, COMMIT not yet.
    Receiving = 1,
    /// The last transfer's length and CRC matched; the image is stored.
    Committed = 2,
    /// The last COMMIT found a length or CRC mismatch; nothing stored.
    Failed = 3,
}

/// The header of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    pub image_index: u8,
    pub total_len: u32,
    pub crc32: u32,
    pub content_hash: String,
}

/// One write to the content characteristic, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Begin(Begin),
    Data { offset: u32, bytes: &'a [u8] },
    Commit,
}

/// What the tag answers when the content characteristic is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentStatus {
    pub state: TransferState,
    pub image_index: u8,
    /// Bytes received in the current (or last) transfer.
    pub received: u32,
    /// CRC-32 of the received bytes.
    pub crc32: u32,
    /// The hash that came with the current (or last committed) image.
    pub content_hash: String,
}

fn check_hash(hash: &str) -> Result<(), ContentError> {
    if hash.is_empty() || hash.len() > MAX_HASH_LEN || !hash.is_ascii() {
        return Err(ContentError::Hash(hash.to_owned()));
    }
    Ok(())
}

/// `kind/state | image | len u32 | crc u32 | hash_len | hash`.
fn encode_fixed(first: u8, image: u8, len: u32, crc: u32, hash: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + hash.len());
    out.push(first);
    out.push(image);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    // check_hash bounds the length to 32, so it fits a byte.
    out.push(hash.len() as u8);
    out.extend_from_slice(hash.as_bytes());
    out
}

/// Inverse of [`encode_fixed`]: (first, image, len, crc, hash).
fn decode_fixed(what: &'static str, b: &[u8]) -> Result<(u8, u8, u32, u32, String), ContentError> {
    let bad_len = |rule: String| ContentError::Length {
        what,
        got: b.len(),
        rule,
    };
    if b.len() < FIXED_LEN {
        return Err(bad_len(format!("at least {FIXED_LEN} needed")));
    }
    let hash_len = usize::from(b[10]);
    if b.len() != FIXED_LEN + hash_len {
        return Err(bad_len(format!(
            "{} expected for a {hash_len}-byte hash",
            FIXED_LEN + hash_len
        )));
    }
    let hash = String::from_utf8_lossy(&b[FIXED_LEN..]).into_owned();
    check_hash(&hash)?;
    let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    Ok((b[0], b[1], u32_at(2), u32_at(6), hash))
}

impl Begin {
    pub fn encode(&self) -> Result<Vec<u8>, ContentError> {
        check_hash(&self.content_hash)?;
        Ok(encode_fixed(
            BEGIN,
            self.image_index,
            self.total_len,
            self.crc32,
            &self.content_hash,
        ))
    }
}

/// Every write for `content`, in order: BEGIN, DATA frames of at most
/// `chunk` content bytes each, COMMIT.
pub fn frames(
    image_index: u8,
    content: &[u8],
    content_hash: &str,
    chunk: usize,
) -> Result<Vec<Vec<u8>>, ContentError> {
    let total_len = u32::try_from(content.len()).map_err(|_| ContentError::Length {
        what: "content",
        got: content.len(),
        rule: "more than 4 GiB".to_owned(),
    })?;
    if chunk == 0 {
        return Err(ContentError::Length {
            what: "chunk",
            got: 0,
            rule: "must be at least 1".to_owned(),
        });
    }
    let begin = Begin {
        image_index,
        total_len,
        crc32: crc32fast::hash(content),
        content_hash: content_hash.to_owned(),
    };
    let mut out = Vec::with_capacity(content.len() / chunk + 3);
    out.push(begin.encode()?);
    for (n, piece) in content.chunks(chunk).enumerate() {
        // n * chunk < content.len() ≤ u32::MAX, checked above.
        let offset = (n * chunk) as u32;
        let mut frame = Vec::with_capacity(DATA_HEADER_LEN + piece.len());
        frame.push(DATA);
        frame.extend_from_slice(&offset.to_le_bytes());
        frame.extend_from_slice(piece);
        out.push(frame);
    }
    out.push(vec![COMMIT]);
    Ok(out)
}

/// Parses one write (the tag's side).
pub fn decode_frame(bytes: &[u8]) -> Result<Frame<'_>, ContentError> {
    match bytes.first() {
        None => Err(ContentError::Empty),
        Some(&BEGIN) => {
            let (_, image_index, total_len, crc32, content_hash) = decode_fixed("BEGIN", bytes)?;
            Ok(Frame::Begin(Begin {
                image_index,
                total_len,
                crc32,
                content_hash,
            }))
        }
        Some(&DATA) => {
            if bytes.len() <= DATA_HEADER_LEN {
                return Err(ContentError::Length {
                    what: "DATA",
                    got: bytes.len(),
                    rule: format!("more than {DATA_HEADER_LEN} needed"),
                });
            }
            let offset = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            Ok(Frame::Data {
                offset,
                bytes: &bytes[DATA_HEADER_LEN..],
            })
        }
        Some(&COMMIT) if bytes.len() == 1 => Ok(Frame::Commit),
        Some(&COMMIT) => Err(ContentError::Length {
            what: "COMMIT",
            got: bytes.len(),
            rule: "must be 1".to_owned(),
        }),
        Some(&other) => Err(ContentError::UnknownKind(other)),
    }
}

impl ContentStatus {
    pub fn encode(&self) -> Result<Vec<u8>, ContentError> {
        // An idle tag has no hash yet; "-" keeps the layout fixed.
        let hash = if self.content_hash.is_empty() {
            "-"
        } else {
            &self.content_hash
        };
        check_hash(hash)?;
        Ok(encode_fixed(
            self.state as u8,
            self.image_index,
            self.received,
            self.crc32,
            hash,
        ))
    }

    pub fn decode(bytes: &[u8]) -> Result<ContentStatus, ContentError> {
        let (state, image_index, received, crc32, content_hash) = decode_fixed("status", bytes)?;
        let state = match state {
            0 => TransferState::Idle,
            1 => TransferState::Receiving,
            2 => TransferState::Committed,
            3 => TransferState::Failed,
            other => return Err(ContentError::State(other)),
        };
        Ok(ContentStatus {
            state,
            image_index,
            received,
            crc32,
            content_hash,
        })
    }

    /// Whether the tag holds exactly this content in `image_index`.
    pub fn holds(&self, image_index: u8, content: &[u8], content_hash: &str) -> bool {
        self.state == TransferState::Committed
            && self.image_index == image_index
            && self.content_hash == content_hash
            && usize::try_from(self.received).is_ok_and(|n| n == content.len())
            && self.crc32 == crc32fast::hash(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_image_key_is_read_and_a_null_image_is_an_error() {
        let read = |text: &str| ImageContent::from_content(text.as_bytes());
        let image = read(r#"{"name":"Milk","tags":[1,2,{"x":null}],"ble_image":{"display":1,"image":2,"bitmap":"AAE="}}"#)
            .expect("valid")
            .expect("an image");
        assert_eq!((image.display_index, image.image_index), (1, 2));
        assert_eq!(image.bitmap, [0, 1]);
        assert!(matches!(read(r#"{"price":"1.00"}"#), Ok(None)));
        assert!(matches!(read("not json"), Ok(None)));
        assert!(matches!(
            read(r#"{"ble_image":null}"#),
            Err(ContentError::Image(_))
        ));
    }

    #[test]
    fn frames_of_a_small_content() {
        let content = b"hello, tag";
        let crc = crc32fast::hash(content);
        let frames = frames(2, content, "abc", 4).expect("frames");
        let mut begin = vec![BEGIN, 2, 10, 0, 0, 0];
        begin.extend_from_slice(&crc.to_le_bytes());
        begin.extend_from_slice(&[3, b'a', b'b', b'c']);
        assert_eq!(
            frames,
            vec![
                begin,
                [&[DATA, 0, 0, 0, 0][..], b"hell"].concat(),
                [&[DATA, 4, 0, 0, 0][..], b"o, t"].concat(),
                [&[DATA, 8, 0, 0, 0][..], b"ag"].concat(),
                vec![COMMIT],
            ]
        );
        // And the tag's side reads them back.
        assert_eq!(
            decode_frame(&frames[0]),
            Ok(Frame::Begin(Begin {
                image_index: 2,
                total_len: 10,
                crc32: crc,
                content_hash: "abc".to_owned()
            }))
        );
        assert_eq!(
            decode_frame(&frames[2]),
            Ok(Frame::Data {
                offset: 4,
                bytes: b"o, t"
            })
        );
        assert_eq!(decode_frame(&frames[4]), Ok(Frame::Commit));
    }

    #[test]
    fn empty_content_is_begin_and_commit() {
        let frames = frames(0, b"", "h", 100).expect("frames");
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1], vec![COMMIT]);
    }

    #[test]
    fn status_round_trip_and_holds() {
        let content = b"{\"price\":\"1.99\"}";
        let status = ContentStatus {
            state: TransferState::Committed,
            image_index: 1,
            received: content.len() as u32,
            crc32: crc32fast::hash(content),
            content_hash: "9f86d081884c7d65".to_owned(),
        };
        let bytes = status.encode().expect("encode");
        assert_eq!(bytes.len(), 11 + 16);
        assert_eq!(ContentStatus::decode(&bytes), Ok(status.clone()));
        assert!(status.holds(1, content, "9f86d081884c7d65"));
        assert!(!status.holds(0, content, "9f86d081884c7d65"), "other image");
        assert!(!status.holds(1, b"{}", "9f86d081884c7d65"), "other bytes");
        assert!(!status.holds(1, content, "0000000000000000"), "other hash");
        let failed = ContentStatus {
            state: TransferState::Failed,
            ..status
        };
        assert!(!failed.holds(1, content, "9f86d081884c7d65"));

        let idle = ContentStatus {
            state: TransferState::Idle,
            image_index: 0,
            received: 0,
            crc32: 0,
            content_hash: String::new(),
        };
        let decoded = ContentStatus::decode(&idle.encode().expect("encode")).expect("decode");
        assert_eq!(decoded.state, TransferState::Idle);
        assert_eq!(decoded.content_hash, "-");
    }

    #[test]
    fn malformed_frames_and_status_are_errors() {
        assert_eq!(decode_frame(&[]), Err(ContentError::Empty));
        assert_eq!(decode_frame(&[0x09]), Err(ContentError::UnknownKind(9)));
        assert!(matches!(
            decode_frame(&[DATA, 0, 0, 0, 0]),
            Err(ContentError::Length { what: "DATA", .. })
        ));
        assert!(matches!(
            decode_frame(&[COMMIT, 0]),
            Err(ContentError::Length { what: "COMMIT", .. })
        ));
        // BEGIN whose hash length disagrees with the bytes.
        assert!(matches!(
            decode_frame(&[BEGIN, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, b'a']),
            Err(ContentError::Length { what: "BEGIN", .. })
        ));
        assert!(matches!(
            ContentStatus::decode(&[2, 0, 0]),
            Err(ContentError::Length { what: "status", .. })
        ));
        assert_eq!(
            ContentStatus::decode(&[7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'x']),
            Err(ContentError::State(7))
        );
        assert!(matches!(
            frames(0, b"x", &"h".repeat(33), 10),
            Err(ContentError::Hash(_))
        ));
        assert!(matches!(
            frames(0, b"x", "h", 0),
            Err(ContentError::Length { what: "chunk", .. })
        ));
    }

    #[test]
    fn image_content_is_read_from_the_task_content() {
        let content = br#"{"ble_image":{"display":0,"image":1,"bitmap":"AAEC/w=="},"name":"x"}"#;
        assert_eq!(
            ImageContent::from_content(content),
            Ok(Some(ImageContent {
                display_index: 0,
                image_index: 1,
                bitmap: vec![0, 1, 2, 255],
            }))
        );
        assert_eq!(ImageContent::from_content(br#"{"name":"x"}"#), Ok(None));
        assert_eq!(ImageContent::from_content(b"not json"), Ok(None));
        assert!(ImageContent::from_content(
            br#"{"ble_image":{"display":0,"image":1,"bitmap":"!"}}"#
        )
        .is_err());
        assert!(ImageContent::from_content(br#"{"ble_image":{"display":0}}"#).is_err());
    }
}
