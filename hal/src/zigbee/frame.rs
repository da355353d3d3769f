//! ZNP (Z-Stack Monitor and Test) framing on the serial line:
//! `0xFE LEN CMD0 CMD1 payload FCS`, FCS = XOR of LEN through the last
//! payload byte, CMD0 = type << 5 | subsystem.
//!
//! Owns: turning frames into bytes and a byte stream back into frames. Must
//! not: do I/O, know what a command means, or panic on any input. The
//! decoder resynchronises on the next start byte after garbage, a bad FCS or
//! an impossible length, and reports each as a [`FrameError`] so the caller
//! can count it; a frame hidden behind a corrupt header is not lost, because
//! after an error only the start byte is dropped and the search goes on from
//! the byte after it.

/// Start of frame.
pub const SOF: u8 = 0xFE;
/// Largest payload the MT protocol allows (LEN is a byte, but Z-Stack's
/// buffers stop at 250).
pub const MAX_PAYLOAD: usize = 250;
/// SOF, LEN, CMD0, CMD1 and FCS around the payload.
pub const OVERHEAD: usize = 5;

/// The frame type in the top three bits of CMD0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// Host → ZNP, no response (e.g. the adapter polls for queued data).
    Poll,
    /// Synchronous request: exactly one [`FrameType::Srsp`] answers it.
    Sreq,
    /// Asynchronous message, either way (indications, reset requests).
    Areq,
    /// Synchronous response to the one outstanding SREQ.
    Srsp,
}

impl FrameType {
    fn bits(self) -> u8 {
        match self {
            FrameType::Poll => 0,
            FrameType::Sreq => 1,
            FrameType::Areq => 2,
            FrameType::Srsp => 3,
        }
    }

    fn from_bits(bits: u8) -> Option<FrameType> {
        Some(match bits {
            0 => FrameType::Poll,
            1 => FrameType::Sreq,
            2 => FrameType::Areq,
            3 => FrameType::Srsp,
            _ => return None,
        })
    }
}

/// MT subsystems this backend speaks (CMD0 low five bits).
pub mod subsystem {
    /// Only in SRSPs: "your request could not be parsed" (RPC error).
    pub const RPC_ERROR: u8 = 0x00;
    pub const SYS: u8 = 0x01;
    pub const AF: u8 = 0x04;
    pub const ZDO: u8 = 0x05;
    pub const UTIL: u8 = 0x07;
    /// Z-Stack 3 only (BDB commissioning); Z-Stack 1.2 lacks it.
    pub const APP_CNF: u8 = 0x0F;
}

/// One MT frame. The payload is at most [`MAX_PAYLOAD`] bytes: every
/// constructor checks it, so [`Frame::encode`] cannot fail.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    cmd0: u8,
    cmd1: u8,
    payload: Vec<u8>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({:02X} {:02X} [", self.cmd0, self.cmd1)?;
        for (i, b) in self.payload.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02X}")?;
        }
        f.write_str("])")
    }
}

impl Frame {
    /// A frame of `kind` for command `id` of `subsystem` (a [`subsystem`]
    /// constant; only its low five bits are used).
    pub fn new(
        kind: FrameType,
        subsystem: u8,
        id: u8,
        payload: Vec<u8>,
    ) -> Result<Frame, FrameError> {
        Frame::from_raw(kind.bits() << 5 | (subsystem & 0x1F), id, payload)
    }

    /// A frame from the raw CMD0/CMD1 bytes.
    pub fn from_raw(cmd0: u8, cmd1: u8, payload: Vec<u8>) -> Result<Frame, FrameError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLong { len: payload.len() });
        }
        Ok(Frame {
            cmd0,
            cmd1,
            payload,
        })
    }

    pub fn cmd0(&self) -> u8 {
        self.cmd0
    }

    pub fn cmd1(&self) -> u8 {
        self.cmd1
    }

    /// `None` for the one CMD0 type value (4..=7) MT does not define.
    pub fn kind(&self) -> Option<FrameType> {
        FrameType::from_bits(self.cmd0 >> 5)
    }

    pub fn subsystem(&self) -> u8 {
        self.cmd0 & 0x1F
    }

    /// Whether this is `kind` for command `id` of `subsystem`.
    pub fn is(&self, kind: FrameType, subsystem: u8, id: u8) -> bool {
        self.kind() == Some(kind) && self.subsystem() == subsystem && self.cmd1 == id
    }

    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + OVERHEAD);
        out.push(SOF);
        // Checked by every constructor: the length fits a byte.
        out.push(self.payload.len() as u8);
        out.push(self.cmd0);
        out.push(self.cmd1);
        out.extend_from_slice(&self.payload);
        out.push(fcs(&out[1..]));
        out
    }
}

/// XOR of every byte.
fn fcs(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc ^ b)
}

/// Something on the line that is not a good frame. Each is counted by the
/// caller; none stops the decoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bytes before a start byte (line noise, a half frame, a boot banner).
    #[error("skipped {count} byte(s) of garbage before a start byte")]
    Garbage { count: usize },
    /// The checksum does not match; the frame is dropped.
    #[error("bad FCS in frame {cmd0:02X} {cmd1:02X}: expected {expected:02X}, got {got:02X}")]
    BadFcs {
        cmd0: u8,
        cmd1: u8,
        expected: u8,
        got: u8,
    },
    /// LEN is above [`MAX_PAYLOAD`] (on receive), or a payload to send is.
    #[error("frame length {len} is over the {MAX_PAYLOAD}-byte limit")]
    TooLong { len: usize },
}

/// Stream decoder: feed it what the port gave with [`FrameDecoder::extend`],
/// then take frames and errors with [`FrameDecoder::decode`] until it says
/// `None` (needs more bytes).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

/// Bytes kept while waiting for the rest of a frame, at most: one whole
/// frame plus what one read brings. More means the buffer holds garbage
/// without a start byte, which `decode` drops anyway.
const MAX_BUFFERED: usize = 64 * 1024;

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes read from the port.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        debug_assert!(self.buf.len() <= MAX_BUFFERED + bytes.len());
    }

    /// Bytes waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets buffered bytes (after the port was reopened: a half frame
    /// from the old connection must not be glued to the new one).
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The next frame or error in the buffered bytes; `None` when more bytes
    /// are needed.
    pub fn decode(&mut self) -> Option<Result<Frame, FrameError>> {
        let start = match self.buf.iter().position(|&b| b == SOF) {
            Some(start) => start,
            None if self.buf.is_empty() => return None,
            None => {
                let count = self.buf.len();
                self.buf.clear();
                return Some(Err(FrameError::Garbage { count }));
            }
        };
        if start > 0 {
            self.buf.drain(..start);
            return Some(Err(FrameError::Garbage { count: start }));
        }
        let &len = self.buf.get(1)?;
        let len = usize::from(len);
        if len > MAX_PAYLOAD {
            self.buf.drain(..1);
            return Some(Err(FrameError::TooLong { len }));
        }
        let total = len + OVERHEAD;
        if self.buf.len() < total {
            return None;
        }
        let expected = fcs(&self.buf[1..total - 1]);
        let got = self.buf[total - 1];
        if expected != got {
            let (cmd0, cmd1) = (self.buf[2], self.buf[3]);
            // Drop only the start byte: a real frame may begin inside what
            // looked like this one's payload.
            self.buf.drain(..1);
            return Some(Err(FrameError::BadFcs {
                cmd0,
                cmd1,
                expected,
                got,
            }));
        }
        let frame = Frame {
            cmd0: self.buf[2],
            cmd1: self.buf[3],
            payload: self.buf[4..total - 1].to_vec(),
        };
        self.buf.drain(..total);
        Some(Ok(frame))
    }
}

#[cfg(test)]
mod tests {
    use quickcheck::{quickcheck, TestResult};

    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut decoder = FrameDecoder::new();
        decoder.extend(bytes);
        std::iter::from_fn(|| decoder.decode()).collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
            .collect()
    }

    #[test]
    fn known_vectors_encode() {
        // SYS_PING request, as in TI's MT documentation and every ZNP log.
        let ping = Frame::new(FrameType::Sreq, subsystem::SYS, 0x01, vec![]).expect("frame");
        assert_eq!(ping.encode(), hex("FE 00 21 01 20"));
        // SYS_RESET_REQ, soft reset.
        let reset = Frame::new(FrameType::Areq, subsystem::SYS, 0x00, vec![1]).expect("frame");
        assert_eq!(reset.encode(), hex("FE 01 41 00 01 41"));
        // SYS_PING response with capabilities 0x0659 (a CC2652 with Z-Stack 3).
        let pong = Frame::new(FrameType::Srsp, subsystem::SYS, 0x01, vec![0x59, 0x06]).unwrap();
        assert_eq!(pong.encode(), hex("FE 02 61 01 59 06 3D"));
    }

    #[test]
    fn known_vectors_decode() {
        let frames = decode_all(&hex("FE 02 61 01 59 06 3D FE 00 21 01 20"));
        assert_eq!(frames.len(), 2);
        let pong = frames[0].clone().expect("good frame");
        assert!(pong.is(FrameType::Srsp, subsystem::SYS, 0x01));
        assert_eq!(pong.payload(), [0x59, 0x06]);
        let ping = frames[1].clone().expect("good frame");
        assert_eq!(ping.kind(), Some(FrameType::Sreq));
        assert_eq!(ping.payload(), [] as [u8; 0]);
    }

    #[test]
    fn garbage_before_a_frame_is_skipped_and_reported() {
        let frames = decode_all(&hex("00 13 37 FE 00 21 01 20"));
        assert_eq!(frames[0], Err(FrameError::Garbage { count: 3 }));
        assert!(frames[1].as_ref().is_ok_and(|f| f.cmd1() == 0x01));
        assert_eq!(frames.len(), 2);
        // Garbage with no start byte at all is dropped, not kept forever.
        let mut decoder = FrameDecoder::new();
        decoder.extend(&[1, 2, 3]);
        assert_eq!(
            decoder.decode(),
            Some(Err(FrameError::Garbage { count: 3 }))
        );
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn bad_fcs_is_rejected_and_the_next_frame_survives() {
        let frames = decode_all(&hex("FE 00 21 01 21 FE 00 21 01 20"));
        assert_eq!(
            frames[0],
            Err(FrameError::BadFcs {
                cmd0: 0x21,
                cmd1: 0x01,
                expected: 0x20,
                got: 0x21
            })
        );
        assert!(frames
            .iter()
            .any(|f| f.as_ref().is_ok_and(|f| f.cmd0() == 0x21)));
    }

    #[test]
    fn frame_hidden_behind_a_truncated_header_is_found() {
        // A header that claims 8 payload bytes, cut off after two; the real
        // ping that follows must still come out.
        let mut bytes = hex("FE 08 61 01 AA BB");
        bytes.extend(hex("FE 00 21 01 20"));
        bytes.extend(hex("00 00 00 00 00 00")); // enough for the bogus length
        let frames = decode_all(&bytes);
        let good: Vec<_> = frames.iter().filter_map(|f| f.as_ref().ok()).collect();
        assert_eq!(good.len(), 1, "{frames:?}");
        assert_eq!(good[0].encode(), hex("FE 00 21 01 20"));
        assert!(matches!(frames[0], Err(FrameError::BadFcs { .. })));
    }

    #[test]
    fn over_long_length_is_rejected_without_waiting_for_it() {
        let frames = decode_all(&hex("FE FF 21 01 FE 00 21 01 20"));
        assert_eq!(frames[0], Err(FrameError::TooLong { len: 255 }));
        assert!(frames.iter().any(|f| f.is_ok()), "{frames:?}");
        let too_long = Frame::new(FrameType::Sreq, subsystem::AF, 1, vec![0; MAX_PAYLOAD + 1]);
        assert_eq!(too_long, Err(FrameError::TooLong { len: 251 }));
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let bytes = hex("FE 02 61 01 59 06 3D");
        let mut decoder = FrameDecoder::new();
        for (i, b) in bytes.iter().enumerate() {
            decoder.extend(&[*b]);
            let out = decoder.decode();
            if i + 1 < bytes.len() {
                assert_eq!(out, None, "after {} bytes", i + 1);
            } else {
                assert!(out.is_some_and(|f| f.is_ok()));
            }
        }
    }

    quickcheck! {
        /// Any frame encodes to bytes that decode to the same frame, however
        /// the bytes are split into reads.
        fn round_trip(cmd0: u8, cmd1: u8, payload: Vec<u8>, split: usize) -> TestResult {
            if payload.len() > MAX_PAYLOAD {
                return TestResult::discard();
            }
            let frame = Frame::from_raw(cmd0, cmd1, payload).expect("length checked");
            let bytes = frame.encode();
            let split = split % (bytes.len() + 1);
            let mut decoder = FrameDecoder::new();
            decoder.extend(&bytes[..split]);
            let mut out: Vec<_> = std::iter::from_fn(|| decoder.decode()).collect();
            decoder.extend(&bytes[split..]);
            out.extend(std::iter::from_fn(|| decoder.decode()));
            TestResult::from_bool(out == vec![Ok(frame)] && decoder.buffered() == 0)
        }

        /// Arbitrary bytes never panic the decoder, and it always ends with
        /// less buffered than a frame (nothing is kept forever).
        fn arbitrary_bytes_are_survived(bytes: Vec<u8>) -> bool {
            let mut decoder = FrameDecoder::new();
            decoder.extend(&bytes);
            let mut steps = 0;
            while decoder.decode().is_some() {
                steps += 1;
                assert!(steps <= bytes.len(), "the decoder loops");
            }
            decoder.buffered() < MAX_PAYLOAD + OVERHEAD
        }

        /// A good frame after noise is received. (Noise containing a start
        /// byte can, rarely, form a valid-looking frame that swallows the
        /// real start byte; that is the protocol's limit, not the decoder's,
        /// so the noise here has none.)
        fn frame_after_noise_is_received(noise: Vec<u8>, payload: Vec<u8>) -> TestResult {
            if payload.len() > MAX_PAYLOAD {
                return TestResult::discard();
            }
            let frame = Frame::new(FrameType::Areq, subsystem::AF, 0x81, payload).expect("fits");
            let mut bytes: Vec<u8> = noise.into_iter().filter(|&b| b != SOF).collect();
            let noisy = !bytes.is_empty();
            bytes.extend(frame.encode());
            let decoded = decode_all(&bytes);
            let expected = if noisy { 2 } else { 1 };
            TestResult::from_bool(decoded.len() == expected && decoded.last() == Some(&Ok(frame)))
        }
    }
}
