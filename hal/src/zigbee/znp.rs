//! ZNP request layer over one open port: one SREQ in flight, its SRSP
//! matched by command, RPC-error replies, timeouts, and the AREQs that
//! arrive meanwhile kept in order for the driver.
//!
//! Owns: the port (any `AsyncRead + AsyncWrite`: a `SerialStream` in the
//! agent, an in-memory pipe in unit tests) and the frame decoder. Must not:
//! interpret AREQs (the driver does) or retry anything (the driver decides).
//! Counts every bad frame in [`ZigbeeCounters`]; never panics on input.
//!
//! Why a request blocks its caller: Z-Stack handles one SREQ at a time and
//! answers it before the next; pipelining would only make matching a late
//! SRSP ambiguous. An SRSP that arrives after its request timed out is
//! stale: counted and dropped, never matched to the next request.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, warn};

use super::frame::{subsystem, Frame, FrameDecoder, FrameError, FrameType};
use super::ZigbeeCounters;

/// AREQs read while waiting for an SRSP and not yet taken by the driver, at
/// most. A request waits a few milliseconds; in that time a busy network
/// brings a handful of check-ins and confirms. Beyond this the oldest is
/// dropped (and counted): the adapter is flooding us or we are stuck.
pub const AREQ_BACKLOG: usize = 256;
/// Bytes asked of the port per read: a few frames.
const READ_CHUNK: usize = 512;

/// One MT command: its name for logs and errors, subsystem and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub name: &'static str,
    pub subsystem: u8,
    pub id: u8,
}

impl Command {
    const fn new(name: &'static str, subsystem: u8, id: u8) -> Command {
        Command {
            name,
            subsystem,
            id,
        }
    }

    /// A frame of `kind` for this command.
    pub fn frame(&self, kind: FrameType, payload: Vec<u8>) -> Result<Frame, FrameError> {
        Frame::new(kind, self.subsystem, self.id, payload)
    }

    /// Whether `frame` is this command as `kind`.
    pub fn is(&self, frame: &Frame, kind: FrameType) -> bool {
        frame.is(kind, self.subsystem, self.id)
    }
}

pub const SYS_RESET_REQ: Command = Command::new("SYS_RESET_REQ", subsystem::SYS, 0x00);
pub const SYS_PING: Command = Command::new("SYS_PING", subsystem::SYS, 0x01);
pub const SYS_RESET_IND: Command = Command::new("SYS_RESET_IND", subsystem::SYS, 0x80);
// Checked against zigpy-znp `commands/sys.py`, `commands/app_config.py`,
// `commands/zdo.py`, `commands/af.py` and zigbee-herdsman
// `adapter/z-stack/znp/definition.ts`.
pub const SYS_VERSION: Command = Command::new("SYS_VERSION", subsystem::SYS, 0x02);
pub const SYS_OSAL_NV_ITEM_INIT: Command =
    Command::new("SYS_OSAL_NV_ITEM_INIT", subsystem::SYS, 0x07);
pub const SYS_OSAL_NV_READ: Command = Command::new("SYS_OSAL_NV_READ", subsystem::SYS, 0x08);
pub const SYS_OSAL_NV_WRITE: Command = Command::new("SYS_OSAL_NV_WRITE", subsystem::SYS, 0x09);
pub const SYS_OSAL_NV_DELETE: Command = Command::new("SYS_OSAL_NV_DELETE", subsystem::SYS, 0x12);
pub const SYS_OSAL_NV_LENGTH: Command = Command::new("SYS_OSAL_NV_LENGTH", subsystem::SYS, 0x13);
/// `SYS_OSAL_NV_READ`/`WRITE` with a 16-bit offset, for items longer than
/// one frame (zigpy-znp `SYS.OSALNVReadExt`, `OSALNVWriteExt`).
pub const SYS_OSAL_NV_READ_EXT: Command =
    Command::new("SYS_OSAL_NV_READ_EXT", subsystem::SYS, 0x1C);
pub const SYS_OSAL_NV_WRITE_EXT: Command =
    Command::new("SYS_OSAL_NV_WRITE_EXT", subsystem::SYS, 0x1D);
/// The extended NV API of Z-Stack 3.30+ (system id, item id, sub id).
pub const SYS_NV_READ: Command = Command::new("SYS_NV_READ", subsystem::SYS, 0x33);
pub const SYS_NV_WRITE: Command = Command::new("SYS_NV_WRITE", subsystem::SYS, 0x34);
pub const APP_CNF_BDB_START_COMMISSIONING: Command =
    Command::new("APP_CNF_BDB_START_COMMISSIONING", subsystem::APP_CNF, 0x05);
pub const APP_CNF_BDB_SET_CHANNEL: Command =
    Command::new("APP_CNF_BDB_SET_CHANNEL", subsystem::APP_CNF, 0x08);
pub const APP_CNF_BDB_COMMISSIONING_NOTIFICATION: Command = Command::new(
    "APP_CNF_BDB_COMMISSIONING_NOTIFICATION",
    subsystem::APP_CNF,
    0x80,
);
pub const ZDO_MGMT_PERMIT_JOIN_REQ: Command =
    Command::new("ZDO_MGMT_PERMIT_JOIN_REQ", subsystem::ZDO, 0x36);
/// Mgmt_NWK_Update_req: with scan duration 0xFE, "switch to the channel
/// in the mask" (zigpy-znp `ZDO.MgmtNWKUpdateReq`, id 0x37 as TI builds
/// use it; herdsman `mgmtNwkUpdateReq`).
pub const ZDO_MGMT_NWK_UPDATE_REQ: Command =
    Command::new("ZDO_MGMT_NWK_UPDATE_REQ", subsystem::ZDO, 0x37);
pub const ZDO_END_DEVICE_ANNCE_IND: Command =
    Command::new("ZDO_END_DEVICE_ANNCE_IND", subsystem::ZDO, 0xC1);
/// A device joined through the trust centre: its network address, IEEE
/// address and parent (zigpy-znp `ZDO.TCDevInd`).
pub const ZDO_TC_DEV_IND: Command = Command::new("ZDO_TC_DEV_IND", subsystem::ZDO, 0xCA);
pub const ZDO_EXT_ROUTE_DISC: Command = Command::new("ZDO_EXT_ROUTE_DISC", subsystem::ZDO, 0x45);
/// The coordinator's association entry of a device, by IEEE (or network)
/// address (zigpy-znp `UTIL.AssocGetWithAddress`).
pub const UTIL_ASSOC_GET_WITH_ADDRESS: Command =
    Command::new("UTIL_ASSOC_GET_WITH_ADDRESS", subsystem::UTIL, 0x4A);
/// Drops a device from the coordinator's association table; only in
/// Koenkk's Z-Stack 3.x.0 builds (zigpy-znp `UTIL.AssocRemove`).
pub const UTIL_ASSOC_REMOVE: Command = Command::new("UTIL_ASSOC_REMOVE", subsystem::UTIL, 0x63);
/// Puts a device back in it (same builds; `UTIL.AssocAdd`).
pub const UTIL_ASSOC_ADD: Command = Command::new("UTIL_ASSOC_ADD", subsystem::UTIL, 0x64);
pub const UTIL_GET_DEVICE_INFO: Command =
    Command::new("UTIL_GET_DEVICE_INFO", subsystem::UTIL, 0x00);
pub const ZDO_STARTUP_FROM_APP: Command =
    Command::new("ZDO_STARTUP_FROM_APP", subsystem::ZDO, 0x40);
pub const ZDO_STATE_CHANGE_IND: Command =
    Command::new("ZDO_STATE_CHANGE_IND", subsystem::ZDO, 0xC0);
pub const AF_REGISTER: Command = Command::new("AF_REGISTER", subsystem::AF, 0x00);
pub const AF_DATA_REQUEST: Command = Command::new("AF_DATA_REQUEST", subsystem::AF, 0x01);
pub const AF_DATA_CONFIRM: Command = Command::new("AF_DATA_CONFIRM", subsystem::AF, 0x80);
pub const AF_INCOMING_MSG: Command = Command::new("AF_INCOMING_MSG", subsystem::AF, 0x81);
/// `AF_INCOMING_MSG` with a 64-bit-capable source address and a 16-bit
/// length: Z-Stack sends it instead for long (fragmented) messages.
pub const AF_INCOMING_MSG_EXT: Command = Command::new("AF_INCOMING_MSG_EXT", subsystem::AF, 0x82);
/// The SRSP Z-Stack sends instead of the real one when it cannot parse a
/// request: payload `[error code, CMD0, CMD1 of the request]`.
pub const RPC_ERROR: Command = Command::new("RPC_ERROR", subsystem::RPC_ERROR, 0x00);

/// `SYS_RESET_REQ` type: soft reset (restart the stack, keep the USB link).
pub const RESET_SOFT: u8 = 1;
/// `UTIL_GET_DEVICE_INFO` / `ZDO_STATE_CHANGE_IND` state: running as the
/// network's coordinator.
pub const DEV_ZB_COORD: u8 = 9;

/// A frame for the log: NV item reads and writes carry key material (the
/// network key, the link-key seed), so their payload is left out.
pub struct Logged<'a>(pub &'a Frame);

impl std::fmt::Debug for Logged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nv = [
            SYS_OSAL_NV_READ,
            SYS_OSAL_NV_WRITE,
            SYS_OSAL_NV_ITEM_INIT,
            SYS_NV_READ,
            SYS_NV_WRITE,
        ];
        let frame = self.0;
        if nv
            .iter()
            .any(|cmd| frame.subsystem() == cmd.subsystem && frame.cmd1() == cmd.id)
        {
            write!(
                f,
                "Frame({:02X} {:02X} [{} bytes of NV data])",
                frame.cmd0(),
                frame.cmd1(),
                frame.payload().len()
            )
        } else {
            frame.fmt(f)
        }
    }
}

/// What went wrong talking to the adapter.
#[derive(Debug, thiserror::Error)]
pub enum ZnpError {
    #[error("serial port error: {0}")]
    Io(#[from] io::Error),
    /// End of file: the device went away (USB unplugged, PTY closed).
    #[error("the serial port was closed")]
    Closed,
    #[error("no answer to {name} within {timeout:?}")]
    Timeout {
        name: &'static str,
        timeout: Duration,
    },
    #[error("the adapter rejected {name}: RPC error {code:#04x} ({})", rpc_error_text(*code))]
    Rpc { name: &'static str, code: u8 },
    #[error("{name}: {detail}")]
    Malformed { name: &'static str, detail: String },
}

impl ZnpError {
    /// Whether the port itself is gone (as opposed to one request failing).
    pub fn is_link_lost(&self) -> bool {
        matches!(self, ZnpError::Io(_) | ZnpError::Closed)
    }
}

fn rpc_error_text(code: u8) -> &'static str {
    match code {
        1 => "invalid subsystem",
        2 => "invalid command id",
        3 => "invalid parameter",
        4 => "invalid length",
        _ => "unknown",
    }
}

/// The request layer on one open port.
pub struct Znp<P> {
    port: P,
    decoder: FrameDecoder,
    areqs: VecDeque<Frame>,
    counters: Arc<ZigbeeCounters>,
    sreq_timeout: Duration,
    /// Bad frames on this port so far, for sparse logging.
    bad_frames: u64,
}

impl<P: AsyncRead + AsyncWrite + Unpin + Send> Znp<P> {
    pub fn new(port: P, sreq_timeout: Duration, counters: Arc<ZigbeeCounters>) -> Znp<P> {
        Znp {
            port,
            decoder: FrameDecoder::new(),
            areqs: VecDeque::new(),
            counters,
            sreq_timeout,
            bad_frames: 0,
        }
    }

    /// Sends an SREQ and returns its SRSP's payload. AREQs that arrive
    /// meanwhile are kept for [`Znp::next_areq`].
    pub async fn request(&mut self, cmd: Command, payload: Vec<u8>) -> Result<Vec<u8>, ZnpError> {
        let wait = self.sreq_timeout;
        self.request_within(cmd, payload, wait).await
    }

    /// [`Znp::request`] with its own time-out, for the commands that take
    /// seconds on real firmware (network start-up and commissioning).
    pub async fn request_within(
        &mut self,
        cmd: Command,
        payload: Vec<u8>,
        wait: Duration,
    ) -> Result<Vec<u8>, ZnpError> {
        let frame = cmd
            .frame(FrameType::Sreq, payload)
            .map_err(|e| ZnpError::Malformed {
                name: cmd.name,
                detail: e.to_string(),
            })?;
        self.write(&frame).await?;
        let deadline = Instant::now() + wait;
        loop {
            let frame = match timeout_at(deadline, self.read_frame()).await {
                Ok(frame) => frame?,
                Err(_) => {
                    ZigbeeCounters::bump(&self.counters.sreq_timeouts);
                    return Err(ZnpError::Timeout {
                        name: cmd.name,
                        timeout: wait,
                    });
                }
            };
            match frame.kind() {
                Some(FrameType::Srsp) if cmd.is(&frame, FrameType::Srsp) => {
                    return Ok(frame.payload().to_vec());
                }
                Some(FrameType::Srsp) if RPC_ERROR.is(&frame, FrameType::Srsp) => {
                    match frame.payload() {
                        [code, cmd0, cmd1, ..]
                            if *cmd1 == cmd.id && cmd0 & 0x1F == cmd.subsystem =>
                        {
                            ZigbeeCounters::bump(&self.counters.rpc_errors);
                            return Err(ZnpError::Rpc {
                                name: cmd.name,
                                code: *code,
                            });
                        }
                        _ => self.stale(&frame),
                    }
                }
                Some(FrameType::Srsp) => self.stale(&frame),
                Some(FrameType::Areq) => self.keep_areq(frame),
                _ => self.unexpected(&frame),
            }
        }
    }

    /// Sends an AREQ (no response expected, e.g. `SYS_RESET_REQ`).
    pub async fn send_areq(&mut self, cmd: Command, payload: Vec<u8>) -> Result<(), ZnpError> {
        let frame = cmd
            .frame(FrameType::Areq, payload)
            .map_err(|e| ZnpError::Malformed {
                name: cmd.name,
                detail: e.to_string(),
            })?;
        self.write(&frame).await
    }

    /// Soft reset: drops every `SYS_RESET_IND` already received or waiting
    /// in the port (a stale one, e.g. the stick's own power-up indication,
    /// must not count as the answer), writes `SYS_RESET_REQ`, and only then
    /// listens for the indication. Returns its payload.
    pub async fn reset(&mut self, wait: Duration) -> Result<Vec<u8>, ZnpError> {
        self.drain_ready().await?;
        let before = self.areqs.len();
        self.areqs
            .retain(|frame| !SYS_RESET_IND.is(frame, FrameType::Areq));
        if self.areqs.len() != before {
            debug!("dropped a SYS_RESET_IND queued before our reset (stale)");
        }
        self.send_areq(SYS_RESET_REQ, vec![RESET_SOFT]).await?;
        // Whatever was queued before the request is older than the reset:
        // the chip restarts and forgets it, so nothing in it is an answer.
        self.areqs.clear();
        self.wait_areq(SYS_RESET_IND, wait, |_| true).await
    }

    /// Reads and drops every frame the port has ready now, without
    /// waiting (before a reset: nothing in it can matter afterwards); late
    /// SRSPs are counted as stale.
    async fn drain_ready(&mut self) -> Result<(), ZnpError> {
        loop {
            // `timeout` polls the read once before it looks at the clock, so
            // a zero wait still takes what is ready.
            match tokio::time::timeout(Duration::ZERO, self.read_frame()).await {
                Ok(frame) => match frame?.kind() {
                    Some(FrameType::Areq) => {}
                    _ => ZigbeeCounters::bump(&self.counters.stale_responses),
                },
                Err(_) => return Ok(()),
            }
        }
    }

    /// Writes raw bytes that are no frame (the bootloader-skip byte).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ZnpError> {
        self.port.write_all(bytes).await?;
        self.port.flush().await?;
        Ok(())
    }

    /// The port, for the serial control lines (DTR/RTS).
    pub fn port_mut(&mut self) -> &mut P {
        &mut self.port
    }

    /// The next AREQ from the adapter. Cancel-safe: bytes read before the
    /// future is dropped stay in the decoder, frames in the backlog.
    pub async fn next_areq(&mut self) -> Result<Frame, ZnpError> {
        if let Some(frame) = self.areqs.pop_front() {
            return Ok(frame);
        }
        loop {
            let frame = self.read_frame().await?;
            match frame.kind() {
                Some(FrameType::Areq) => return Ok(frame),
                Some(FrameType::Srsp) => self.stale(&frame),
                _ => self.unexpected(&frame),
            }
        }
    }

    /// Waits for the AREQ `cmd` whose payload satisfies `wanted`, dropping
    /// other AREQs (start-up only: before the endpoint is registered there
    /// is nothing else to act on).
    pub async fn wait_areq(
        &mut self,
        cmd: Command,
        wait: Duration,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, ZnpError> {
        let deadline = Instant::now() + wait;
        loop {
            match timeout_at(deadline, self.next_areq()).await {
                Ok(frame) => {
                    let frame = frame?;
                    if cmd.is(&frame, FrameType::Areq) && wanted(frame.payload()) {
                        return Ok(frame.payload().to_vec());
                    }
                    debug!(
                        frame = ?Logged(&frame),
                        waiting_for = cmd.name,
                        "ignoring AREQ during start-up"
                    );
                }
                Err(_) => {
                    return Err(ZnpError::Timeout {
                        name: cmd.name,
                        timeout: wait,
                    })
                }
            }
        }
    }

    async fn write(&mut self, frame: &Frame) -> Result<(), ZnpError> {
        self.port.write_all(&frame.encode()).await?;
        self.port.flush().await?;
        Ok(())
    }

    /// The next good frame; bad ones are counted and skipped.
    async fn read_frame(&mut self) -> Result<Frame, ZnpError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            while let Some(decoded) = self.decoder.decode() {
                match decoded {
                    Ok(frame) => return Ok(frame),
                    Err(error) => self.bad_frame(&error),
                }
            }
            let n = self.port.read(&mut chunk).await?;
            if n == 0 {
                return Err(ZnpError::Closed);
            }
            self.decoder.extend(&chunk[..n]);
        }
    }

    fn bad_frame(&mut self, error: &FrameError) {
        let c = &self.counters;
        match error {
            FrameError::Garbage { count } => {
                c.garbage_bytes
                    .fetch_add(*count as u64, std::sync::atomic::Ordering::Relaxed);
            }
            FrameError::BadFcs { .. } => ZigbeeCounters::bump(&c.bad_fcs_frames),
            FrameError::TooLong { .. } => ZigbeeCounters::bump(&c.oversized_frames),
        }
        self.bad_frames += 1;
        // A noisy line must not flood the router's log: the 1st, 2nd, 4th,
        // 8th… bad frame is logged; the counters have them all.
        if self.bad_frames.is_power_of_two() {
            warn!(%error, bad_frames = self.bad_frames,
                "bad data from the ZigBee adapter; resynchronising");
        }
    }

    fn keep_areq(&mut self, frame: Frame) {
        if self.areqs.len() >= AREQ_BACKLOG {
            ZigbeeCounters::bump(&self.counters.areqs_dropped);
            warn!("AREQ backlog full; dropping the oldest");
            self.areqs.pop_front();
        }
        self.areqs.push_back(frame);
    }

    fn stale(&self, frame: &Frame) {
        ZigbeeCounters::bump(&self.counters.stale_responses);
        debug!(
            frame = ?Logged(frame),
            "SRSP without a matching request (late answer); dropped"
        );
    }

    fn unexpected(&self, frame: &Frame) {
        ZigbeeCounters::bump(&self.counters.unexpected_frames);
        debug!(frame = ?Logged(frame), "frame type the adapter should not send; dropped");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::io::{duplex, DuplexStream};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn pair() -> (Znp<DuplexStream>, DuplexStream, Arc<ZigbeeCounters>) {
        let (host, adapter) = duplex(4096);
        let counters = Arc::new(ZigbeeCounters::default());
        (Znp::new(host, TIMEOUT, counters.clone()), adapter, counters)
    }

    /// Reads one frame the host sent.
    async fn read_host_frame(adapter: &mut DuplexStream) -> Frame {
        let mut decoder = FrameDecoder::new();
        let mut byte = [0u8; 1];
        loop {
            if let Some(frame) = decoder.decode() {
                return frame.expect("the host sends good frames");
            }
            adapter.read_exact(&mut byte).await.expect("host frame");
            decoder.extend(&byte);
        }
    }

    async fn send(adapter: &mut DuplexStream, cmd: Command, kind: FrameType, payload: &[u8]) {
        let frame = cmd.frame(kind, payload.to_vec()).expect("frame");
        adapter.write_all(&frame.encode()).await.expect("write");
    }

    #[tokio::test(start_paused = true)]
    async fn srsp_is_matched_and_areqs_meanwhile_are_kept_in_order() {
        let (mut znp, mut adapter, counters) = pair();
        let fake = async {
            let request = read_host_frame(&mut adapter).await;
            assert!(SYS_PING.is(&request, FrameType::Sreq));
            send(&mut adapter, AF_DATA_CONFIRM, FrameType::Areq, &[0, 1, 7]).await;
            // A stale answer to some earlier request, then garbage.
            send(&mut adapter, UTIL_GET_DEVICE_INFO, FrameType::Srsp, &[0]).await;
            adapter.write_all(&[0x13, 0x37]).await.expect("write");
            send(&mut adapter, AF_INCOMING_MSG, FrameType::Areq, &[1]).await;
            send(&mut adapter, SYS_PING, FrameType::Srsp, &[0x59, 0x06]).await;
            adapter
        };
        let (answer, mut adapter) = tokio::join!(znp.request(SYS_PING, vec![]), fake);
        assert_eq!(answer.expect("pong"), [0x59, 0x06]);
        let first = znp.next_areq().await.expect("kept AREQ");
        assert!(AF_DATA_CONFIRM.is(&first, FrameType::Areq));
        let second = znp.next_areq().await.expect("kept AREQ");
        assert!(AF_INCOMING_MSG.is(&second, FrameType::Areq));
        assert_eq!(counters.stale_responses.load(Ordering::Relaxed), 1);
        assert_eq!(counters.garbage_bytes.load(Ordering::Relaxed), 2);

        // And AREQs straight from the port when nothing is kept.
        send(&mut adapter, ZDO_STATE_CHANGE_IND, FrameType::Areq, &[9]).await;
        let third = znp.next_areq().await.expect("AREQ");
        assert_eq!(third.payload(), [9]);
    }

    #[tokio::test(start_paused = true)]
    async fn missing_srsp_times_out_and_a_late_one_is_not_matched_to_the_next_request() {
        let (mut znp, mut adapter, counters) = pair();
        let error = znp.request(SYS_PING, vec![]).await.expect_err("no answer");
        assert!(
            matches!(
                error,
                ZnpError::Timeout {
                    name: "SYS_PING",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(counters.sreq_timeouts.load(Ordering::Relaxed), 1);
        // The late SYS_PING SRSP arrives while the host asks for device info.
        let _ping = read_host_frame(&mut adapter).await;
        send(&mut adapter, SYS_PING, FrameType::Srsp, &[0x59, 0x06]).await;
        let fake = async {
            let request = read_host_frame(&mut adapter).await;
            assert!(UTIL_GET_DEVICE_INFO.is(&request, FrameType::Sreq));
            send(
                &mut adapter,
                UTIL_GET_DEVICE_INFO,
                FrameType::Srsp,
                &[0, 1, 2],
            )
            .await;
        };
        let (info, ()) = tokio::join!(znp.request(UTIL_GET_DEVICE_INFO, vec![]), fake);
        assert_eq!(info.expect("info"), [0, 1, 2]);
        assert_eq!(counters.stale_responses.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rpc_error_fails_the_request_it_names() {
        let (mut znp, mut adapter, counters) = pair();
        let fake = async {
            let request = read_host_frame(&mut adapter).await;
            // An RPC error about another command is stale, not ours.
            send(&mut adapter, RPC_ERROR, FrameType::Srsp, &[2, 0x21, 0x02]).await;
            send(
                &mut adapter,
                RPC_ERROR,
                FrameType::Srsp,
                &[3, request.cmd0(), request.cmd1()],
            )
            .await;
        };
        let (answer, ()) = tokio::join!(znp.request(AF_REGISTER, vec![1, 2]), fake);
        let error = answer.expect_err("rpc error");
        assert!(
            matches!(
                error,
                ZnpError::Rpc {
                    name: "AF_REGISTER",
                    code: 3
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("invalid parameter"), "{error}");
        assert_eq!(counters.rpc_errors.load(Ordering::Relaxed), 1);
        assert_eq!(counters.stale_responses.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_port_is_a_lost_link() {
        let (mut znp, adapter, _) = pair();
        drop(adapter);
        let error = znp.next_areq().await.expect_err("closed");
        assert!(error.is_link_lost(), "{error}");
        let error = znp.request(SYS_PING, vec![]).await.expect_err("closed");
        assert!(error.is_link_lost(), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn bad_frames_are_counted_and_skipped() {
        let (mut znp, mut adapter, counters) = pair();
        // Bad FCS, over-long LEN, then a good AREQ.
        adapter
            .write_all(&[0xFE, 0x00, 0x45, 0xC0, 0x00, 0xFE, 0xFF])
            .await
            .expect("write");
        send(&mut adapter, ZDO_STATE_CHANGE_IND, FrameType::Areq, &[9]).await;
        let frame = znp.next_areq().await.expect("good frame after bad ones");
        assert_eq!(frame.payload(), [9]);
        assert_eq!(counters.bad_fcs_frames.load(Ordering::Relaxed), 1);
        assert_eq!(counters.oversized_frames.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn areq_backlog_is_bounded() {
        let (mut znp, mut adapter, counters) = pair();
        let fake = async {
            let _ = read_host_frame(&mut adapter).await;
            for n in 0..AREQ_BACKLOG + 3 {
                send(
                    &mut adapter,
                    AF_INCOMING_MSG,
                    FrameType::Areq,
                    &[(n % 256) as u8],
                )
                .await;
            }
            send(&mut adapter, SYS_PING, FrameType::Srsp, &[0, 0]).await;
        };
        let (answer, ()) = tokio::join!(znp.request(SYS_PING, vec![]), fake);
        answer.expect("pong");
        assert_eq!(counters.areqs_dropped.load(Ordering::Relaxed), 3);
        let oldest_kept = znp.next_areq().await.expect("AREQ");
        assert_eq!(oldest_kept.payload(), [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_indication_queued_before_the_reset_is_not_its_answer() {
        let (mut znp, mut adapter, _) = pair();
        // The stick's power-up indication, already waiting in the port.
        send(&mut adapter, SYS_RESET_IND, FrameType::Areq, &[0xAA]).await;
        let stick = async {
            let request = read_host_frame(&mut adapter).await;
            assert!(SYS_RESET_REQ.is(&request, FrameType::Areq));
            // The chip reboots for a while, then answers.
            tokio::time::sleep(Duration::from_millis(300)).await;
            send(&mut adapter, SYS_RESET_IND, FrameType::Areq, &[0x00]).await;
        };
        let started = Instant::now();
        let (reset, ()) = tokio::join!(znp.reset(Duration::from_secs(5)), stick);
        assert_eq!(reset.expect("reset"), [0x00], "the fresh indication");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_indication_kept_during_a_request_is_stale_too() {
        let (mut znp, mut adapter, _) = pair();
        let stick = async {
            let _ping = read_host_frame(&mut adapter).await;
            send(&mut adapter, SYS_RESET_IND, FrameType::Areq, &[0xAA]).await;
            send(&mut adapter, SYS_PING, FrameType::Srsp, &[0x59, 0x06]).await;
        };
        let (pong, ()) = tokio::join!(znp.request(SYS_PING, vec![]), stick);
        pong.expect("pong");
        let stick = async {
            let _reset = read_host_frame(&mut adapter).await;
            send(&mut adapter, SYS_RESET_IND, FrameType::Areq, &[0x00]).await;
        };
        let (reset, ()) = tokio::join!(znp.reset(Duration::from_secs(5)), stick);
        assert_eq!(reset.expect("reset"), [0x00]);
    }

    #[test]
    fn nv_payloads_are_not_logged() {
        let key = [0xAB; 16];
        let mut reply = vec![0, 17, 0];
        reply.extend(key);
        let nv = SYS_OSAL_NV_READ
            .frame(FrameType::Srsp, reply)
            .expect("frame");
        let shown = format!("{:?}", Logged(&nv));
        assert!(!shown.contains("AB"), "{shown}");
        assert!(shown.contains("19 bytes of NV data"), "{shown}");
        let ping = SYS_PING
            .frame(FrameType::Srsp, vec![0x59, 0x06])
            .expect("frame");
        assert!(format!("{:?}", Logged(&ping)).contains("59 06"));
    }
}
