//! The poison-message filter: an MQTT byte stream in which every PUBLISH
//! larger than a limit is replaced by a small stand-in, its body read and
//! thrown away as it arrives, never held in memory.
//!
//! Why: rumqttc fails the whole connection on an incoming packet above its
//! `max_incoming_packet_size`, and a persistent session brings the same
//! message back at every reconnect, so one oversized message stopped an AP
//! for good (issue 14). PROTOCOL §4 rule 2 wants every message up to MQTT's
//! limit (256 MiB) PUBACKed and rejected instead. The filter sits between
//! the broker's byte stream (after TLS and WebSocket) and rumqttc's framing
//! (`broker_io` pumps it into rumqttc's socket). The stand-in keeps the
//! fixed header's flags (QoS, DUP, RETAIN), the topic and the packet id, so
//! rumqttc and the broker see an ordinary PUBLISH that is PUBACKed as
//! usual; its payload is a [`Marker`] naming the discarded size, which the
//! link recognises and hands to the engine as "oversized" (a `rejected`
//! ack, counted).
//!
//! Only the broker → agent direction is filtered; writes pass through.
//! Memory per connection: one read chunk plus, for an oversized PUBLISH,
//! its variable header (at most 64 KiB of topic). The stand-in is emitted
//! after the whole body has been discarded, so a connection lost half-way
//! produces nothing (the broker sends the message again). Owns no task.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the inner stream at once.
const READ_CHUNK: usize = 16 * 1024;
/// MQTT packet type of PUBLISH (high nibble of the first byte).
const PUBLISH: u8 = 3;
/// The stand-in payload starts with this (a NUL: no JSON text does).
const MARKER_PREFIX: &[u8] = b"\0esl-agent oversized ";

/// The stand-in payload of one link: the prefix, a per-process random
/// nonce (so no message from the broker can pass for a stand-in), and the
/// size of the discarded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Marker {
    nonce: String,
}

impl Marker {
    pub(crate) fn random() -> Marker {
        use rand::Rng;
        let bytes: [u8; 16] = rand::thread_rng().gen();
        Marker {
            nonce: hex::encode(bytes),
        }
    }

    fn payload(&self, size: usize) -> Vec<u8> {
        let mut p = MARKER_PREFIX.to_vec();
        p.extend_from_slice(format!("{} {size}", self.nonce).as_bytes());
        p
    }

    /// The size of the discarded payload if `payload` is this link's
    /// stand-in.
    pub(crate) fn parse(&self, payload: &[u8]) -> Option<usize> {
        let rest = payload.strip_prefix(MARKER_PREFIX)?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (nonce, size) = rest.split_once(' ')?;
        (nonce == self.nonce).then(|| size.parse().ok())?
    }
}

/// Where the filter is in the stream.
#[derive(Debug)]
enum State {
    /// At a packet boundary, reading the fixed header.
    Header,
    /// Passing this many more bytes of the current packet through.
    Pass(usize),
    /// An oversized PUBLISH whose fixed header was read: waiting for the
    /// topic and packet id.
    OversizedHead { first: u8, remaining: usize },
    /// Throwing away this many more body bytes, then emitting the stand-in.
    Discard { left: usize, standin: Vec<u8> },
    /// Handing out `bytes[pos..]`.
    Emit { bytes: Vec<u8>, pos: usize },
}

/// See the module docs. `S` is the broker's byte stream (read half or
/// whole).
pub(crate) struct OversizeFilter<S> {
    inner: S,
    /// A PUBLISH whose remaining length is above this is replaced.
    limit: usize,
    marker: Marker,
    /// Read from `inner`, not handled yet.
    input: BytesMut,
    state: State,
    eof: bool,
}

impl<S> OversizeFilter<S> {
    pub(crate) fn new(inner: S, limit: usize, marker: Marker) -> Self {
        OversizeFilter {
            inner,
            limit,
            marker,
            input: BytesMut::new(),
            state: State::Header,
            eof: false,
        }
    }

    /// Moves what `input` allows into `out`; returns when `out` is full or
    /// more input is needed.
    fn step(&mut self, out: &mut ReadBuf<'_>) {
        loop {
            if out.remaining() == 0 {
                return;
            }
            match &mut self.state {
                State::Emit { bytes, pos } => {
                    let n = out.remaining().min(bytes.len() - *pos);
                    out.put_slice(&bytes[*pos..*pos + n]);
                    *pos += n;
                    if *pos == bytes.len() {
                        self.state = State::Header;
                    }
                }
                State::Pass(0) => self.state = State::Header,
                State::Pass(n) => {
                    let k = (*n).min(self.input.len()).min(out.remaining());
                    if k == 0 {
                        return;
                    }
                    out.put_slice(&self.input[..k]);
                    self.input.advance(k);
                    *n -= k;
                }
                State::Discard { left, standin } => {
                    let k = (*left).min(self.input.len());
                    self.input.advance(k);
                    *left -= k;
                    if *left > 0 {
                        return;
                    }
                    let bytes = std::mem::take(standin);
                    self.state = State::Emit { bytes, pos: 0 };
                }
                State::Header => {
                    let Some((header_len, remaining)) = fixed_header(&self.input) else {
                        return;
                    };
                    let Some(remaining) = remaining else {
                        // Not MQTT (a remaining length of five bytes):
                        // pass everything and let rumqttc refuse it.
                        self.state = State::Pass(usize::MAX);
                        continue;
                    };
                    let first = self.input[0];
                    if first >> 4 == PUBLISH && remaining > self.limit {
                        self.input.advance(header_len);
                        self.state = State::OversizedHead { first, remaining };
                    } else {
                        self.state = State::Pass(header_len + remaining);
                    }
                }
                State::OversizedHead { first, remaining } => {
                    let (first, remaining) = (*first, *remaining);
                    if self.input.len() < 2 {
                        return;
                    }
                    let topic_len = usize::from(u16::from_be_bytes([self.input[0], self.input[1]]));
                    let qos = (first >> 1) & 3;
                    let head = 2 + topic_len + if qos > 0 { 2 } else { 0 };
                    if head > remaining {
                        // Malformed: nothing to stand in for; drop it whole.
                        self.state = State::Discard {
                            left: remaining,
                            standin: Vec::new(),
                        };
                        continue;
                    }
                    if self.input.len() < head {
                        return;
                    }
                    let payload = self.marker.payload(remaining - head);
                    let mut standin = vec![first];
                    encode_remaining_length(head + payload.len(), &mut standin);
                    standin.extend_from_slice(&self.input[..head]);
                    standin.extend_from_slice(&payload);
                    self.input.advance(head);
                    self.state = State::Discard {
                        left: remaining - head,
                        standin,
                    };
                }
            }
        }
    }

    /// Test hook: how much the filter holds (it must not grow with a
    /// packet's size).
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.input.capacity()
    }
}

/// `(length of the fixed header, remaining length)` once `input` holds a
/// whole fixed header; the remaining length is `None` when it is malformed.
fn fixed_header(input: &[u8]) -> Option<(usize, Option<usize>)> {
    let mut value = 0usize;
    for i in 0..4 {
        let byte = *input.get(1 + i)?;
        value += usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((2 + i, Some(value)));
        }
    }
    Some((5, None))
}

fn encode_remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OversizeFilter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let before = out.filled().len();
            this.step(out);
            if out.filled().len() > before || out.remaining() == 0 || this.eof {
                // Data, or the end of the stream (nothing more will come).
                return Poll::Ready(Ok(()));
            }
            // Straight into the input buffer: no zeroed chunk, no copy.
            this.input.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.input
            ))?;
            if n == 0 {
                this.eof = true;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OversizeFilter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// MQTT's largest remaining length: 256 MiB − 1.
    const MQTT_MAX: usize = 268_435_455;

    /// A PUBLISH packet, QoS 1, packet id `pkid`, with `payload`.
    fn publish(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload);
        let mut p = vec![0x32];
        encode_remaining_length(body.len(), &mut p);
        p.extend(body);
        p
    }

    /// A stream of `head`, then `zeros` zero bytes made up as they are
    /// read (never allocated), then `tail`, in reads of odd sizes.
    struct Synthetic {
        head: Vec<u8>,
        zeros: usize,
        tail: Vec<u8>,
        turn: usize,
    }

    impl AsyncRead for Synthetic {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.turn += 1;
            // Odd read sizes: headers and topics split across reads.
            let max = out.remaining().min([1, 3, 7, 4096, 65536][this.turn % 5]);
            if !this.head.is_empty() {
                let n = max.min(this.head.len());
                out.put_slice(&this.head[..n]);
                this.head.drain(..n);
            } else if this.zeros > 0 {
                let n = max.min(this.zeros);
                out.put_slice(&vec![0u8; n]);
                this.zeros -= n;
            } else {
                let n = max.min(this.tail.len());
                out.put_slice(&this.tail[..n]);
                this.tail.drain(..n);
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Issue 14 item 3: a PUBLISH of MQTT's largest size becomes a small
    /// stand-in with the same flags, topic and packet id; the next packet
    /// passes unchanged; the filter never holds more than a read chunk or
    /// two.
    #[tokio::test]
    async fn a_256_mib_publish_becomes_a_stand_in_without_being_held() {
        let marker = Marker::random();
        let topic = "esl_task/p2p/GID_test@@@dev1";
        let mut header = vec![0x3a]; // PUBLISH, DUP, QoS 1
        encode_remaining_length(MQTT_MAX, &mut header);
        header.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        header.extend_from_slice(topic.as_bytes());
        header.extend_from_slice(&7u16.to_be_bytes());
        let payload_len = MQTT_MAX - 2 - topic.len() - 2;
        let next = publish(topic, 8, br#"{"v":1}"#);
        let mut filter = OversizeFilter::new(
            Synthetic {
                head: header,
                zeros: payload_len,
                tail: next.clone(),
                turn: 0,
            },
            65_536 + 1024,
            marker.clone(),
        );
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        let mut most_held = 0;
        loop {
            let n = filter.read(&mut buf).await.unwrap();
            most_held = most_held.max(filter.buffered_capacity());
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert!(most_held <= 4 * READ_CHUNK, "held {most_held} bytes");
        let standin = publish(topic, 7, &marker.payload(payload_len));
        let mut want = standin.clone();
        want[0] = 0x3a; // the flags survive
        want.extend_from_slice(&next);
        assert_eq!(out, want);
        assert_eq!(
            marker.parse(&marker.payload(payload_len)),
            Some(payload_len)
        );
        assert_eq!(
            Marker::random().parse(&marker.payload(5)),
            None,
            "another nonce"
        );
        assert_eq!(marker.parse(br#"{"v":1}"#), None);
    }

    #[tokio::test]
    async fn packets_within_the_limit_pass_unchanged() {
        let marker = Marker::random();
        let mut stream = publish("a/b", 1, &[b'x'; 2000]);
        stream.extend_from_slice(&[0xd0, 0x00]); // PINGRESP
        stream.extend(publish("a/b", 2, b"{}"));
        let mut filter = OversizeFilter::new(
            Synthetic {
                head: stream.clone(),
                zeros: 0,
                tail: Vec::new(),
                turn: 0,
            },
            2000 + 7,
            marker,
        );
        let mut out = Vec::new();
        filter.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, stream);
    }
}
