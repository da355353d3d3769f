//! What a host does with a real Z-Stack stick before it speaks ZNP: get it
//! out of its serial bootloader (DTR/RTS toggling, then the skip byte),
//! probe for it for a while, and tell the firmware generations apart, whose
//! answers mean different things.
//!
//! Owns: the bootloader-skip sequence, the probe, [`Firmware`] detection
//! and the per-version meaning of `ZDO_STARTUP_FROM_APP`'s status. Must not:
//! touch the network or NV memory (`commission` does), or retry after the
//! probe's deadline (the driver's reconnect loop does).
//!
//! Facts checked against zigpy-znp `api.py` (`_skip_bootloader`,
//! `detect_zstack_version`, pin states and delays in `config.py`),
//! `commands/ubl.py` (the skip byte), `types/commands.py`
//! (`MTCapabilities`), and zigbee-herdsman `adapter/z-stack/znp/znp.ts`
//! (`skipBootloader`), `adapter/zStackAdapter.ts` and `adapter/tstype.ts`
//! (`ZnpVersion` from `SYS_VERSION`'s product id).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep, Instant};
use tracing::debug;

use super::znp::{self, Znp, ZnpError};

/// CC253x serial-bootloader "force run" byte (FORCE_BOOT 0x10 ^ 0xFF).
pub const BOOTLOADER_SKIP_BYTE: u8 = 0xEF;
/// How many skip bytes: zigpy-znp sends 256 in case the bootloader was
/// probed at another baud rate; extra bytes are ignored by a running stick
/// (they are no start byte; the decoder on its side skips them).
const SKIP_BYTES: usize = 256;
/// Pause after each DTR/RTS change (zigpy-znp: 0.15 s).
pub const PIN_TOGGLE_DELAY: Duration = Duration::from_millis(150);
/// The first ping's wait: a running stick answers in milliseconds.
const FIRST_PING: Duration = Duration::from_millis(500);
/// Each later ping's wait while the stick leaves its bootloader.
const PROBE_PING: Duration = Duration::from_millis(1000);
/// `SYS_PING` capability bit of the APP_CNF subsystem (BDB), which Z-Stack
/// 1.2 does not have.
pub const CAP_APP_CNF: u16 = 1 << 10;

/// DTR/RTS states the port goes through at open, and whether the skip byte
/// is sent when the first ping is not answered (`radio.zigbee.bootloader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootloaderSkip {
    /// `(dtr, rts)` pairs, applied in order with [`PIN_TOGGLE_DELAY`]
    /// after each. The default (DTR low, RTS low-high-low) is zigpy-znp's
    /// and zigbee-herdsman's: it resets sticks whose auto-BSL circuit needs
    /// it (e.g. zzh-p) into the application, not the bootloader. Empty:
    /// leave the lines alone (sticks where a toggle enters the bootloader).
    pub pin_states: Vec<(bool, bool)>,
    /// Send [`BOOTLOADER_SKIP_BYTE`] when the stick does not answer at
    /// once (CC2530/CC2531 wait in their bootloader for it).
    pub skip_byte: bool,
    /// Longest probe for an answer before the adapter counts as missing.
    pub probe_timeout: Duration,
}

impl Default for BootloaderSkip {
    fn default() -> Self {
        BootloaderSkip {
            pin_states: vec![(false, false), (false, true), (false, false)],
            skip_byte: true,
            probe_timeout: Duration::from_secs(10),
        }
    }
}

/// The serial control lines. A PTY (the fake) has none: the error is
/// logged and the start-up goes on, as on a USB adapter without them.
pub trait ControlLines {
    fn set_dtr_rts(&mut self, dtr: bool, rts: bool) -> std::io::Result<()>;
}

impl ControlLines for tokio_serial::SerialStream {
    fn set_dtr_rts(&mut self, dtr: bool, rts: bool) -> std::io::Result<()> {
        use tokio_serial::SerialPort;
        self.write_data_terminal_ready(dtr)?;
        self.write_request_to_send(rts)?;
        Ok(())
    }
}

/// Drives DTR/RTS through `skip.pin_states`.
pub async fn toggle_pins(lines: &mut impl ControlLines, skip: &BootloaderSkip) {
    for &(dtr, rts) in &skip.pin_states {
        if let Err(error) = lines.set_dtr_rts(dtr, rts) {
            debug!(%error, "cannot set DTR/RTS; going on without");
            return;
        }
        sleep(PIN_TOGGLE_DELAY).await;
    }
}

/// Pings until the stick answers: once at once, then (after the skip byte,
/// if configured) again and again until `skip.probe_timeout`. Returns the
/// ping's capabilities.
pub async fn probe<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    skip: &BootloaderSkip,
) -> Result<u16, ZnpError> {
    let deadline = Instant::now() + skip.probe_timeout;
    let mut wait = FIRST_PING;
    let mut skipped = false;
    loop {
        let wait_now = wait.min(deadline.saturating_duration_since(Instant::now()));
        match znp.request_within(znp::SYS_PING, vec![], wait_now).await {
            Ok(reply) => return capabilities(&reply),
            Err(error @ ZnpError::Timeout { .. }) => {
                if Instant::now() >= deadline {
                    return Err(ZnpError::Malformed {
                        name: znp::SYS_PING.name,
                        detail: format!(
                            "no ZNP answer within {:?} (bootloader not left, wrong port or baud rate?): {error}",
                            skip.probe_timeout
                        ),
                    });
                }
            }
            Err(error) => return Err(error),
        }
        if skip.skip_byte && !skipped {
            debug!("no answer to SYS_PING: sending the bootloader-skip bytes");
            znp.write_raw(&[BOOTLOADER_SKIP_BYTE; SKIP_BYTES]).await?;
            skipped = true;
        }
        wait = PROBE_PING;
    }
}

fn capabilities(reply: &[u8]) -> Result<u16, ZnpError> {
    match reply {
        [lo, hi, ..] => Ok(u16::from_le_bytes([*lo, *hi])),
        _ => Err(ZnpError::Malformed {
            name: znp::SYS_PING.name,
            detail: format!("reply {reply:02X?} has no capabilities"),
        }),
    }
}

/// Z-Stack generations, whose commissioning differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZStack {
    /// Z-Stack Home 1.2 (CC2530/CC2531): no BDB; `ZDO_STARTUP_FROM_APP`
    /// forms or restores the network.
    V1_2,
    /// Z-Stack 3.0.x (CC2531/CC2538 builds): BDB commissioning.
    V3_0,
    /// Z-Stack 3.x.0 (CC2652/CC1352): BDB commissioning.
    V3x,
}

/// What `ZDO_STARTUP_FROM_APP`'s status means on the running firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupStatus {
    /// The stored network was restored (1.2 status 0).
    Restored,
    /// A new network was formed (1.2 status 1).
    NewNetwork,
    /// Z-Stack 3: the start-up was accepted (status 0 or 1: herdsman takes
    /// both, the end is `ZDO_STATE_CHANGE_IND` = coordinator); 1 is no
    /// "new network" there.
    Starting,
}

impl ZStack {
    /// Data requests the adapter takes at once: its buffers for pending
    /// indirect frames are small (zigbee-herdsman: 16 for Z-Stack 3.x.0,
    /// 2 otherwise; the figure for CC2531 is 4).
    pub fn max_in_flight(self) -> usize {
        match self {
            ZStack::V3x => 16,
            ZStack::V1_2 | ZStack::V3_0 => 4,
        }
    }

    /// The meaning of `ZDO_STARTUP_FROM_APP`'s status byte.
    pub fn startup_status(self, status: u8) -> Result<StartupStatus, String> {
        match (self, status) {
            (ZStack::V1_2, 0) => Ok(StartupStatus::Restored),
            (ZStack::V1_2, 1) => Ok(StartupStatus::NewNetwork),
            (ZStack::V1_2, 2) => {
                Err("the stick left its network and did not start (status 2)".into())
            }
            (ZStack::V3_0 | ZStack::V3x, 0 | 1) => Ok(StartupStatus::Starting),
            (_, other) => Err(format!(
                "the coordinator did not start (status {other:#04x})"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ZStack::V1_2 => "Z-Stack Home 1.2",
            ZStack::V3_0 => "Z-Stack 3.0.x",
            ZStack::V3x => "Z-Stack 3.x.0",
        }
    }
}

/// The firmware on the stick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub stack: ZStack,
    pub capabilities: u16,
    /// `SYS_VERSION`: product id, major.minor.maint, code revision (the
    /// build date on Koenkk's builds); `None` when the stick has no
    /// `SYS_VERSION` (old 1.2 builds).
    pub product: Option<u8>,
    pub release: Option<(u8, u8, u8)>,
    pub revision: Option<u32>,
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.stack.name())?;
        if let Some((major, minor, maint)) = self.release {
            write!(f, " (release {major}.{minor}.{maint}")?;
            if let Some(revision) = self.revision {
                write!(f, ", revision {revision}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Reads `SYS_VERSION` and tells the generation from it and the ping's
/// capabilities: no APP_CNF subsystem is 1.2 (zigpy-znp); otherwise the
/// product id says 3.x.0 (1) or 3.0.x (2) (zigbee-herdsman).
pub async fn detect<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    capabilities: u16,
) -> Result<Firmware, ZnpError> {
    let version = match znp.request(znp::SYS_VERSION, vec![]).await {
        Ok(reply) => Some(reply),
        // Old firmware without SYS_VERSION (herdsman then assumes 1.2).
        Err(ZnpError::Rpc { .. }) => None,
        Err(error) => return Err(error),
    };
    let (product, release, revision) = match version.as_deref() {
        Some([_transport, product, major, minor, maint, rest @ ..]) => {
            let revision = match rest {
                [a, b, c, d, ..] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
                _ => None,
            };
            (Some(*product), Some((*major, *minor, *maint)), revision)
        }
        Some(other) => {
            return Err(ZnpError::Malformed {
                name: znp::SYS_VERSION.name,
                detail: format!("short reply {other:02X?}"),
            })
        }
        None => (None, None, None),
    };
    let stack = if capabilities & CAP_APP_CNF == 0 {
        ZStack::V1_2
    } else if product == Some(1) {
        ZStack::V3x
    } else {
        ZStack::V3_0
    };
    Ok(Firmware {
        stack,
        capabilities,
        product,
        release,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::super::frame::{FrameDecoder, FrameType};
    use super::super::ZigbeeCounters;
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(bool, bool, Instant)>);

    impl ControlLines for Recorder {
        fn set_dtr_rts(&mut self, dtr: bool, rts: bool) -> std::io::Result<()> {
            self.0.push((dtr, rts, Instant::now()));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pins_follow_the_configured_states_with_pauses() {
        let mut lines = Recorder::default();
        let skip = BootloaderSkip::default();
        let start = Instant::now();
        toggle_pins(&mut lines, &skip).await;
        let states: Vec<(bool, bool)> = lines.0.iter().map(|(d, r, _)| (*d, *r)).collect();
        assert_eq!(states, [(false, false), (false, true), (false, false)]);
        assert_eq!(lines.0[1].2 - lines.0[0].2, PIN_TOGGLE_DELAY);
        assert_eq!(start.elapsed(), PIN_TOGGLE_DELAY * 3);
        let mut none = Recorder::default();
        let off = BootloaderSkip {
            pin_states: vec![],
            ..BootloaderSkip::default()
        };
        toggle_pins(&mut none, &off).await;
        assert!(none.0.is_empty());
    }

    fn pair() -> (Znp<DuplexStream>, DuplexStream) {
        let (host, adapter) = duplex(8192);
        let counters = Arc::new(ZigbeeCounters::default());
        (Znp::new(host, Duration::from_secs(1), counters), adapter)
    }

    /// A stick in its bootloader: ignores everything until the skip byte,
    /// then answers pings with `caps`. Returns how many bytes it skipped.
    async fn bootloader_stick(adapter: &mut DuplexStream, caps: u16) -> usize {
        let mut byte = [0u8; 1];
        let mut ignored = 0;
        loop {
            adapter.read_exact(&mut byte).await.expect("host byte");
            if byte[0] == BOOTLOADER_SKIP_BYTE {
                break;
            }
            ignored += 1;
        }
        // Then a running ZNP: answer the next ping.
        let mut decoder = FrameDecoder::new();
        loop {
            adapter.read_exact(&mut byte).await.expect("host byte");
            decoder.extend(&byte);
            while let Some(frame) = decoder.decode() {
                if let Ok(frame) = frame {
                    if znp::SYS_PING.is(&frame, FrameType::Sreq) {
                        let pong = znp::SYS_PING
                            .frame(FrameType::Srsp, caps.to_le_bytes().to_vec())
                            .expect("frame");
                        adapter.write_all(&pong.encode()).await.expect("write");
                        return ignored;
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn probe_sends_the_skip_byte_and_finds_a_stick_in_its_bootloader() {
        let (mut znp, mut adapter) = pair();
        let skip = BootloaderSkip::default();
        let (caps, ignored) = tokio::join!(
            probe(&mut znp, &skip),
            bootloader_stick(&mut adapter, 0x0659)
        );
        assert_eq!(caps.expect("found"), 0x0659);
        assert!(ignored >= 5, "the first ping went unanswered");
    }

    #[tokio::test(start_paused = true)]
    async fn probe_gives_up_at_its_deadline() {
        let (mut znp, _adapter) = pair();
        let skip = BootloaderSkip {
            probe_timeout: Duration::from_secs(10),
            ..BootloaderSkip::default()
        };
        let start = Instant::now();
        let error = probe(&mut znp, &skip).await.expect_err("no stick");
        assert!(error.to_string().contains("bootloader"), "{error}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_millis(10_600),
            "{took:?}"
        );
    }

    #[test]
    fn startup_status_meaning_depends_on_the_version() {
        assert_eq!(
            ZStack::V1_2.startup_status(1),
            Ok(StartupStatus::NewNetwork)
        );
        assert_eq!(ZStack::V1_2.startup_status(0), Ok(StartupStatus::Restored));
        assert!(ZStack::V1_2.startup_status(2).is_err());
        assert_eq!(ZStack::V3x.startup_status(1), Ok(StartupStatus::Starting));
        assert_eq!(ZStack::V3x.startup_status(0), Ok(StartupStatus::Starting));
        assert!(ZStack::V3x.startup_status(2).is_err());
        assert_eq!(ZStack::V3x.max_in_flight(), 16);
        assert_eq!(ZStack::V1_2.max_in_flight(), 4);
    }

    async fn detect_with(caps: u16, version: Option<Vec<u8>>) -> Firmware {
        let (mut znp, mut adapter) = pair();
        let stick = async {
            let mut decoder = FrameDecoder::new();
            let mut byte = [0u8; 1];
            let request = loop {
                if let Some(frame) = decoder.decode() {
                    break frame.expect("good frame");
                }
                adapter.read_exact(&mut byte).await.expect("host byte");
                decoder.extend(&byte);
            };
            assert!(znp::SYS_VERSION.is(&request, FrameType::Sreq));
            let answer = match &version {
                Some(v) => znp::SYS_VERSION.frame(FrameType::Srsp, v.clone()),
                None => {
                    znp::RPC_ERROR.frame(FrameType::Srsp, vec![2, request.cmd0(), request.cmd1()])
                }
            };
            adapter
                .write_all(&answer.expect("frame").encode())
                .await
                .expect("write");
        };
        let (firmware, ()) = tokio::join!(detect(&mut znp, caps), stick);
        firmware.expect("detected")
    }

    #[tokio::test(start_paused = true)]
    async fn versions_are_told_apart() {
        // CC2652 with Koenkk's 20230827 build: product 1.
        let v3 = detect_with(0x0659, Some(vec![2, 1, 2, 7, 1, 0xAB, 0xB2, 0x34, 0x01])).await;
        assert_eq!(v3.stack, ZStack::V3x);
        assert_eq!(v3.revision, Some(20_230_827));
        assert!(v3.to_string().contains("3.x.0"), "{v3}");
        // CC2531 with a Z-Stack 3.0 build: product 2.
        let v30 = detect_with(0x0659, Some(vec![2, 2, 2, 7, 2])).await;
        assert_eq!(v30.stack, ZStack::V3_0);
        // Z-Stack Home 1.2: no APP_CNF capability.
        let v12 = detect_with(0x0179, Some(vec![2, 0, 2, 6, 3, 0, 0, 0, 0])).await;
        assert_eq!(v12.stack, ZStack::V1_2);
        let old = detect_with(0x0179, None).await;
        assert_eq!((old.stack, old.release), (ZStack::V1_2, None));
    }
}
