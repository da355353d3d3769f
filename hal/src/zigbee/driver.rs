//! The ZigBee driver task: owns the serial port and everything in flight on
//! it. One task for the adapter and all tags.
//!
//! Reads `delivery_rx` (offers from the agent), `command_rx` (permit-join,
//! channel change)
//! and the adapter's AREQs;
//! writes `event_tx` (check-ins, outcomes, radio state) through its own
//! `outgoing` queue (`crate::outgoing`, every driver's), so that it never waits on the agent outside its
//! `select!` (the agent may be blocked in `deliver` meanwhile).
//!
//! Life cycle, forever until the agent drops its handle:
//! 1. **Connect**: open the port, toggle DTR/RTS, and run the start-up
//!    in `commission` (probe past the bootloader, firmware detection,
//!    stale-safe soft reset, the agent's own network — formed, resumed,
//!    restored or adopted — the sleepy-tag NV settings, coordinator start,
//!    `AF_REGISTER` of the ESL endpoint). Then report `Up`.
//! 2. **Serve**: a delivery becomes an offer of one or more segments, each
//!    an `AF_DATA_REQUEST` sent once the previous one's `AF_DATA_CONFIRM`
//!    (matched by transaction id) says the network delivered it; the tag's
//!    `UpdateResult` (matched by handle) ends the delivery; a second expiry
//!    (0xF0) in a row drops a stale child entry first. Joins and announces
//!    report the tag at once (`RadioEvent::Tag`, `devices`). A
//!    quiet adapter is pinged; no answer, a read error or an unexpected
//!    reset means the adapter is lost.
//! 3. **Lost**: report `Down`, fail what was in flight (retryable), and
//!    while reconnecting with backoff answer new deliveries at once with a
//!    retryable failure.
//!
//! Every delivery gets exactly one outcome: from the tag's result, a confirm
//! failure, a timeout, or the adapter's loss.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_serial::SerialPortBuilderExt;
use tracing::{debug, info, warn};

use super::app::{self, AppMessage, ESL_CLUSTER};
use super::backup::NetworkBackup;
use super::commission::{self, Started};
use super::devices::Devices;
use super::firmware::{self, ZStack};
use super::frame::FrameType;
use super::nv;
use super::znp::{self, Znp, ZnpError};
use super::{FlowControl, NetworkCommand, ZigbeeConfig, ZigbeeCounters, ZigbeeError};
use crate::outgoing::Outgoing;
use crate::{CheckIn, Delivery, DeliveryFailure, Outcome, RadioEvent, RadioState, TagId};

/// Events waiting for room in the event channel, at most. Outcomes are never
/// dropped (the engine waits for one per delivery, and they number at most
/// the deliveries in flight); check-ins beyond this are dropped and counted:
/// the tag checks in again at its next wake-up.
const OUTGOING_LIMIT: usize = 4096;
/// Hops an offer may travel (Z-Stack's default radius).
const RADIUS: u8 = 30;
/// Fixed part of `AF_INCOMING_MSG` before the data: group, cluster, source
/// address, source and destination endpoint, broadcast flag, LQI, security,
/// timestamp, sequence number, length.
const INCOMING_HEADER: usize = 17;
/// Confirm status: no route to the destination.
const NWK_NO_ROUTE: u8 = 0xCD;
/// Fixed part of `AF_INCOMING_MSG_EXT` before the data.
const INCOMING_EXT_HEADER: usize = 27;
/// Address mode of a 16-bit network address.
const ADDR_MODE_16BIT: u8 = 2;
/// Confirm status: the sleeping tag did not poll in time.
const MAC_TRANSACTION_EXPIRED: u8 = 0xF0;
/// First firmware revision (build date) with `UTIL_ASSOC_REMOVE` and
/// `UTIL_ASSOC_ADD` (zigbee-herdsman `supportsAssocAdd`).
const ASSOC_COMMANDS_SINCE: u32 = 20_201_026;
/// `UTIL_ASSOC_GET_WITH_ADDRESS`: the network address of no entry, and
/// the relation of an unused one.
const ASSOC_NO_ADDRESS: u16 = 0xFFFE;
const RELATION_NOT_USED: u8 = 0xFF;
/// `ZDO_EXT_ROUTE_DISC` options: a plain route discovery.
const ROUTE_DISC_OPTIONS: u8 = 0;
/// `ZDO_END_DEVICE_ANNCE_IND` capability bit of a router (full-function
/// device); tags are end devices.
const CAPABILITY_ROUTER: u8 = 0x02;
/// Longest tag id accepted in a check-in (PROTOCOL §4 `tag_id`).
const MAX_TAG_ID: usize = 32;

/// Where a tag answers: its network address and endpoint, from its last
/// check-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Address {
    nwk: u16,
    endpoint: u8,
}

/// One delivery between its data request and its outcome.
#[derive(Debug)]
struct InFlight {
    tag_id: TagId,
    task_id: String,
    address: Address,
    /// Encoded offer segments not sent yet, next first.
    unsent: VecDeque<Vec<u8>>,
    /// The segment waiting for its confirm, to send again after a route
    /// discovery.
    sent: Option<Vec<u8>>,
    /// A route discovery was done for this delivery (once only).
    rediscovered: bool,
    /// What was done about a stale child entry of the tag (`on_confirm`).
    stale: StaleChild,
    stage: Stage,
    /// When the current stage times out (unused in [`Stage::Next`]).
    deadline: Instant,
    /// The outcome waiting for [`Stage::Readd`].
    failure: Option<DeliveryFailure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The next segment is due (the previous one was confirmed).
    Next,
    /// The last segment found no route: discover one, then send it again.
    Rediscover,
    /// The tag's last two offers expired (0xF0): drop its entry from the
    /// coordinator's association table if it has one, then send again.
    DropStale,
    /// The offer failed after a stale entry was dropped: put the entry
    /// back, then end with `InFlight::failure`.
    Readd,
    /// Waiting for `AF_DATA_CONFIRM` with this transaction id.
    Confirm { trans: u8 },
    /// The network delivered every segment; waiting for the tag's result.
    Result,
}

impl Stage {
    /// Whether the stage waits for something with a deadline (the others
    /// are acted on at once by `send_due`).
    fn has_deadline(self) -> bool {
        matches!(self, Stage::Confirm { .. } | Stage::Result)
    }
}

/// A tag's entry in the coordinator's association table, for the 0xF0
/// handling zigbee-herdsman (`zStackAdapter.ts`,
/// `sendZclFrameToEndpointInternal`) and zigpy-znp
/// (`zigbee/application.py`, `RetryMethod.AssocRemove`) share: with child
/// aging off, a tag that moved to another parent stays the coordinator's
/// "child", so frames for it wait for polls that never come. Both hosts
/// drop the entry (`UTIL_ASSOC_REMOVE`) after a second expiry, so the frame
/// is routed to the new parent, and put it back (`UTIL_ASSOC_ADD`) when
/// that fails too.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StaleChild {
    /// Nothing done.
    Unchecked,
    /// Looked at; nothing to drop (or dropping failed).
    Kept,
    /// Dropped: the entry to put back if the offer still fails.
    Dropped { ieee: u64, nwk: u16, relation: u8 },
}

/// Whether a delivery got an SRSP from the adapter (proof that it lives).
enum Answered {
    Yes,
    No,
}

/// Why serving the adapter ended.
enum Stop {
    /// The agent dropped its handle.
    Shutdown,
    /// The adapter is gone or unusable; reconnect.
    Lost(String),
}

impl Stop {
    /// The adapter stopped answering (`error.is_link_lost()`).
    fn lost(error: &ZnpError) -> Stop {
        Stop::Lost(format!("ZigBee adapter lost: {error}"))
    }
}

pub(super) struct Driver {
    /// Also in `state`: this copy is borrowed by the connect future while
    /// the loop around it changes the state.
    cfg: ZigbeeConfig,
    counters: std::sync::Arc<ZigbeeCounters>,
    delivery_rx: mpsc::Receiver<Delivery>,
    event_tx: mpsc::Sender<RadioEvent>,
    command_rx: mpsc::Receiver<NetworkCommand>,
    state: State,
}

/// Everything the driver tracks, apart from its channel ends (so the loop
/// can hold a send permit while it changes the state).
struct State {
    cfg: ZigbeeConfig,
    counters: std::sync::Arc<ZigbeeCounters>,
    /// Events not yet taken by the agent (built when queued).
    outgoing: Outgoing<Infallible>,
    /// The last state reported, so a failing reconnect loop does not repeat
    /// the same `Down`.
    reported: Option<RadioState>,
    tags: HashMap<TagId, Address>,
    /// Devices by IEEE address (joins, announces, check-ins; the saved
    /// network's `devices`), and the tag ids they go by.
    devices: Devices,
    /// By handle.
    in_flight: HashMap<u16, InFlight>,
    next_handle: u16,
    next_trans: u8,
    /// Deliveries in flight at once, at most (by firmware, or
    /// `radio.zigbee.max_in_flight`); more wait in the delivery channel.
    max_in_flight: usize,
    /// The firmware has `UTIL_ASSOC_REMOVE`/`ADD` (Koenkk's Z-Stack 3.x.0
    /// builds from 2020-10-26 on, as zigbee-herdsman checks); cleared when
    /// the stick refuses them.
    assoc_commands: bool,
    /// Tags whose last offer expired (0xF0); a second expiry in a row
    /// checks for a stale child entry.
    expired: std::collections::HashSet<TagId>,
}

impl Driver {
    pub(super) fn new(
        cfg: ZigbeeConfig,
        counters: std::sync::Arc<ZigbeeCounters>,
        delivery_rx: mpsc::Receiver<Delivery>,
        event_tx: mpsc::Sender<RadioEvent>,
        command_rx: mpsc::Receiver<NetworkCommand>,
    ) -> Driver {
        Driver {
            state: State::new(cfg.clone(), counters.clone()),
            cfg,
            counters,
            delivery_rx,
            event_tx,
            command_rx,
        }
    }

    /// Runs until the agent drops the [`super::ZigbeeRadio`].
    pub(super) async fn run(mut self) {
        let port = self.cfg.port.display().to_string();
        self.state.report(RadioState::Down {
            reason: format!("connecting to the ZigBee adapter at {port}"),
        });
        // Tags known from the saved network are listed from the start,
        // with what is known of them (the agent keeps such details in
        // memory only).
        let known: Vec<RadioEvent> = self
            .state
            .devices
            .iter()
            .filter_map(|d| d.details().map(RadioEvent::Tag))
            .collect();
        for event in known {
            self.state.outgoing.event(event);
        }
        let mut backoff = self.cfg.reconnect_min;
        loop {
            let connect = connect(&self.cfg, self.counters.clone());
            let away = Away {
                delivery_rx: &mut self.delivery_rx,
                command_rx: &mut self.command_rx,
                event_tx: &self.event_tx,
                state: &mut self.state,
            };
            let Some(connected) = away.serve_until(connect).await else {
                return;
            };
            match connected {
                Ok((znp, started)) => {
                    // The stick's tables give the IEEE address of every
                    // child (needed to drop a stale one, see `on_confirm`).
                    self.state
                        .devices
                        .update_from_stick(started.devices.iter().cloned());
                    self.state.save_devices();
                    self.state.assoc_commands = started.firmware.stack == ZStack::V3x
                        && started
                            .firmware
                            .revision
                            .is_some_and(|r| r >= ASSOC_COMMANDS_SINCE);
                    self.state.max_in_flight = self
                        .cfg
                        .max_in_flight
                        .unwrap_or_else(|| started.firmware.stack.max_in_flight());
                    info!(%port, "ZigBee adapter up");
                    ZigbeeCounters::bump(&self.counters.adapter_starts);
                    backoff = self.cfg.reconnect_min;
                    self.state.report(RadioState::Up);
                    self.state
                        .outgoing
                        .event(RadioEvent::Details(crate::RadioDetails {
                            firmware: Some(started.firmware.to_string()),
                        }));
                    match self.serve(znp, &started).await {
                        Stop::Shutdown => return,
                        Stop::Lost(reason) => {
                            warn!(%port, %reason, "ZigBee adapter lost; reconnecting");
                            ZigbeeCounters::bump(&self.counters.adapter_losses);
                            // Down first: whoever reads the outcomes below
                            // already knows why they failed.
                            self.state.report(RadioState::Down {
                                reason: reason.clone(),
                            });
                            self.state.fail_all(&reason);
                        }
                    }
                }
                Err(reason) => {
                    debug!(%port, %reason, "ZigBee adapter start-up failed");
                    self.state.report(RadioState::Down { reason });
                }
            }
            // No jitter: one agent, one local device; nobody to stampede.
            let resume = sleep_until(Instant::now() + backoff);
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
            let away = Away {
                delivery_rx: &mut self.delivery_rx,
                command_rx: &mut self.command_rx,
                event_tx: &self.event_tx,
                state: &mut self.state,
            };
            if away.serve_until(resume).await.is_none() {
                return;
            }
        }
    }

    /// Serves a started adapter until it is lost or the agent leaves.
    async fn serve<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        mut znp: Znp<P>,
        started: &Started,
    ) -> Stop {
        let mut next_ping = Instant::now() + self.cfg.ping_interval;
        // `None`: scheduled backups are off.
        let mut next_backup = (!self.cfg.backup_interval.is_zero())
            .then(|| Instant::now() + self.cfg.backup_interval);
        loop {
            let timers = next_backup.map_or(next_ping, |b| b.min(next_ping));
            let wake = self.state.next_deadline().map_or(timers, |d| d.min(timers));
            tokio::select! {
                biased;
                // Beyond the cap, deliveries wait in the channel (and the
                // agent in `deliver`): the adapter's buffers for frames to
                // sleeping tags are small.
                received = self.delivery_rx.recv(),
                    if self.state.in_flight.len() < self.state.max_in_flight => match received {
                    Some(delivery) => match self.state.deliver(&mut znp, delivery).await {
                        // The adapter answered: no need to ping it soon.
                        Ok(Answered::Yes) => next_ping = Instant::now() + self.cfg.ping_interval,
                        Ok(Answered::No) => {}
                        Err(stop) => return stop,
                    },
                    None => return Stop::Shutdown,
                },
                Some(command) = self.command_rx.recv() => {
                    if let Err(stop) = network_command(&mut self.state, &mut znp, started, command).await {
                        return stop;
                    }
                    // The adapter answered.
                    next_ping = Instant::now() + self.cfg.ping_interval;
                }
                // AREQs do not put the ping off: an adapter whose request
                // handling hangs may still pass on indications.
                frame = znp.next_areq() => match frame {
                    Ok(frame) => {
                        if let Err(stop) = self.state.on_areq(&frame) {
                            return stop;
                        }
                        if let Err(stop) = self.state.send_due(&mut znp).await {
                            return stop;
                        }
                    }
                    Err(error) => return Stop::lost(&error),
                },
                permit = self.event_tx.reserve(), if !self.state.outgoing.is_empty() => match permit {
                    Ok(permit) => permit.send(self.state.outgoing.pop_event().expect("checked non-empty")),
                    Err(_) => return Stop::Shutdown,
                },
                () = sleep_until(wake) => {
                    let now = Instant::now();
                    self.state.expire(now);
                    // An expired offer may have a child entry to put back.
                    if let Err(stop) = self.state.send_due(&mut znp).await {
                        return stop;
                    }
                    if now >= next_ping {
                        if let Err(stop) = check_alive(&mut znp).await {
                            return stop;
                        }
                        next_ping = Instant::now() + self.cfg.ping_interval;
                    }
                    if next_backup.is_some_and(|at| now >= at) {
                        if let Err(stop) = refresh_backup(&mut self.state, &mut znp, started).await {
                            return stop;
                        }
                        next_backup = Some(Instant::now() + self.cfg.backup_interval);
                    }
                }
            }
        }
    }
}

/// The driver's channel ends and state while no adapter is up (starting,
/// or waiting to reconnect).
struct Away<'a> {
    delivery_rx: &'a mut mpsc::Receiver<Delivery>,
    command_rx: &'a mut mpsc::Receiver<NetworkCommand>,
    event_tx: &'a mpsc::Sender<RadioEvent>,
    state: &'a mut State,
}

impl Away<'_> {
    /// Refuses deliveries and passes events on until `until` is done;
    /// `None` when the agent dropped its handle meanwhile.
    async fn serve_until<F: std::future::Future>(self, until: F) -> Option<F::Output> {
        tokio::pin!(until);
        loop {
            tokio::select! {
                biased;
                received = self.delivery_rx.recv() => match received {
                    Some(delivery) => self.state.refuse(delivery, "ZigBee adapter not connected"),
                    None => return None,
                },
                Some(command) = self.command_rx.recv() => {
                    command.answer(Err(ZigbeeError::Unavailable("ZigBee adapter not connected")));
                }
                permit = self.event_tx.reserve(), if !self.state.outgoing.is_empty() => match permit {
                    Ok(permit) => permit.send(self.state.outgoing.pop_event().expect("checked non-empty")),
                    Err(_) => return None,
                },
                output = &mut until => return Some(output),
            }
        }
    }
}

/// Carries out an operator's network command on the started adapter and
/// answers it; `Err` when the adapter was lost meanwhile.
async fn network_command<P: AsyncRead + AsyncWrite + Unpin + Send>(
    state: &mut State,
    znp: &mut Znp<P>,
    started: &Started,
    command: NetworkCommand,
) -> Result<(), Stop> {
    let result = match &command {
        NetworkCommand::PermitJoin { seconds, .. } => {
            let seconds = *seconds;
            commission::permit_join(znp, seconds)
                .await
                .inspect(|()| info!(seconds, "ZigBee network open for joining"))
        }
        NetworkCommand::ChangeChannel { channel, .. } => {
            let channel = *channel;
            commission::change_channel(znp, &state.cfg, channel)
                .await
                .map(|nib| {
                    warn!(
                        channel,
                        update_id = nib.update_id,
                        "ZigBee network moved to another channel: tags that missed the change must rejoin"
                    )
                })
        }
    };
    match result {
        Ok(()) => {
            if matches!(command, NetworkCommand::ChangeChannel { .. }) {
                // The saved network follows the channel at once.
                if let Err(stop) = refresh_backup(state, znp, started).await {
                    command.answer(Err(ZigbeeError::Unavailable("ZigBee adapter lost")));
                    return Err(stop);
                }
            }
            command.answer(Ok(()));
            Ok(())
        }
        Err(error) if error.is_link_lost() => {
            let lost = Stop::lost(&error);
            command.answer(Err(ZigbeeError::Coordinator(error)));
            Err(lost)
        }
        Err(error) => {
            command.answer(Err(ZigbeeError::Coordinator(error)));
            Ok(())
        }
    }
}

/// The backup taken on schedule and after a channel change: the stick's
/// network, read again (the frame counter and channel move), saved over
/// the network file. A stick that shows another network is not saved:
/// the next start decides.
async fn refresh_backup<P: AsyncRead + AsyncWrite + Unpin + Send>(
    state: &mut State,
    znp: &mut Znp<P>,
    started: &Started,
) -> Result<(), Stop> {
    match nv::read_network(znp, started.firmware.stack).await {
        Ok(Some(network)) if network.same_network(&started.network) => {
            match nv::read_devices(znp, started.firmware.stack, network.tclk_seed.as_ref()).await {
                Ok(devices) => state.devices.update_from_stick(devices),
                Err(error) if error.is_link_lost() => return Err(Stop::lost(&error)),
                Err(error) => warn!(%error, "ZigBee backup: cannot read the devices"),
            }
            let cfg = &state.cfg;
            match commission::save(cfg, &network, &started.firmware)
                .and_then(|()| commission::save_devices(cfg, &state.devices))
            {
                Ok(()) => debug!(
                    frame_counter = network.frame_counter,
                    channel = network.channel,
                    "ZigBee network file refreshed"
                ),
                Err(error) => warn!(%error, "ZigBee backup failed"),
            }
            Ok(())
        }
        Ok(_) => {
            warn!("the stick no longer shows the agent's network; backup skipped");
            Ok(())
        }
        Err(error) if error.is_link_lost() => Err(Stop::lost(&error)),
        Err(error) => {
            warn!(%error, "ZigBee backup: cannot read the network");
            Ok(())
        }
    }
}

/// Pings the adapter; no answer means it is lost.
async fn check_alive<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
) -> Result<(), Stop> {
    match znp.request(znp::SYS_PING, vec![]).await {
        Ok(_) => Ok(()),
        Err(error) => Err(Stop::Lost(format!(
            "ZigBee adapter stopped answering: {error}"
        ))),
    }
}

/// Opens the port (exclusively) and toggles DTR/RTS as configured.
pub(super) async fn open_port(
    cfg: &ZigbeeConfig,
    counters: std::sync::Arc<ZigbeeCounters>,
) -> Result<Znp<tokio_serial::SerialStream>, String> {
    // `validate` checked that the path is UTF-8.
    let path = cfg.port.to_string_lossy();
    let flow = match cfg.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
        FlowControl::Software => tokio_serial::FlowControl::Software,
    };
    let port = tokio_serial::new(path.as_ref(), cfg.baud_rate)
        .flow_control(flow)
        .open_native_async()
        .map_err(|e| format!("cannot open ZigBee adapter {path}: {e}"))?;
    let mut znp = Znp::new(port, cfg.sreq_timeout, counters);
    firmware::toggle_pins(znp.port_mut(), &cfg.bootloader).await;
    Ok(znp)
}

/// Opens the port and runs the start-up sequence.
async fn connect(
    cfg: &ZigbeeConfig,
    counters: std::sync::Arc<ZigbeeCounters>,
) -> Result<(Znp<tokio_serial::SerialStream>, Started), String> {
    let path = cfg.port.to_string_lossy();
    let mut znp = open_port(cfg, counters).await?;
    let started = commission::start_up(&mut znp, cfg)
        .await
        .map_err(|e| format!("ZigBee adapter {path} did not start: {e}"))?;
    info!(firmware = %started.firmware, outcome = ?started.outcome,
        channel = started.network.channel,
        pan_id = format_args!("{:#06x}", started.network.pan_id),
        "ZigBee coordinator on the agent's network");
    Ok((znp, started))
}

fn retry_later(reason: String) -> DeliveryFailure {
    DeliveryFailure {
        retryable: true,
        reason,
    }
}

/// Whether a failed `AF_DATA_CONFIRM` (or `AF_DATA_REQUEST`) status is worth
/// another attempt, and what it means.
pub(super) fn confirm_failure(status: u8) -> DeliveryFailure {
    let (retryable, what) = match status {
        0xF0 => (
            true,
            "tag did not poll in time (asleep): MAC transaction expired",
        ),
        0xE9 => (true, "no MAC acknowledgement from the tag"),
        0xE1 => (true, "radio channel busy"),
        0xF1 => (true, "coordinator's queue for sleeping tags is full"),
        0x10 | 0x11 => (true, "adapter out of buffers"),
        0xCD => (true, "no route to the tag"),
        0xB7 => (true, "no APS acknowledgement from the tag"),
        0xC8 => (true, "tag unknown to the network (left or not joined)"),
        0x02 | 0xB3 | 0xC1 | 0xC2 => (false, "the adapter rejected the request as invalid"),
        0xB6 => (false, "the adapter does not support the request"),
        _ => (true, "delivery failed"),
    };
    DeliveryFailure {
        retryable,
        reason: format!("{what} (status {status:#04x})"),
    }
}

/// A little-endian IEEE address from its first 8 bytes (`bytes` has them).
fn le_u64(bytes: &[u8]) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(le)
}

fn is_tag_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TAG_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
}

impl State {
    fn new(cfg: ZigbeeConfig, counters: std::sync::Arc<ZigbeeCounters>) -> State {
        // Handles start somewhere random so that a result from before a
        // restart of the agent is unlikely to match a new offer.
        let first_handle: u16 = SmallRng::from_entropy().gen();
        let devices = match NetworkBackup::load(&cfg.network_file) {
            Ok(Some(backup)) => Devices::from_backup(&backup.devices),
            Ok(None) => Devices::default(),
            Err(error) => {
                // The start-up reports it (the file decides the network).
                debug!(%error, "no devices from the saved network");
                Devices::default()
            }
        };
        State {
            devices,
            cfg,
            counters,
            outgoing: Outgoing::default(),
            reported: None,
            tags: HashMap::new(),
            in_flight: HashMap::new(),
            next_handle: first_handle,
            next_trans: first_handle as u8,
            max_in_flight: 1,
            assoc_commands: false,
            expired: std::collections::HashSet::new(),
        }
    }

    fn report(&mut self, state: RadioState) {
        if self.reported.as_ref() != Some(&state) {
            self.reported = Some(state.clone());
            self.outgoing.event(RadioEvent::State(state));
        }
    }

    fn outcome(&mut self, tag_id: TagId, task_id: String, result: Result<(), DeliveryFailure>) {
        if let Err(failure) = &result {
            debug!(%tag_id, %task_id, reason = %failure.reason, retryable = failure.retryable, "delivery failed");
        }
        self.outgoing.event(RadioEvent::Outcome(Outcome {
            tag_id,
            task_id,
            result,
        }));
    }

    fn fail(&mut self, delivery: Delivery, retryable: bool, reason: impl Into<String>) {
        let failure = DeliveryFailure {
            retryable,
            reason: reason.into(),
        };
        self.outcome(delivery.tag_id, delivery.task_id, Err(failure));
    }

    /// A delivery while the adapter is away: retry at a later check-in.
    fn refuse(&mut self, delivery: Delivery, reason: &str) {
        self.fail(delivery, true, reason);
    }

    /// The adapter is gone: everything in flight failed, retryably.
    fn fail_all(&mut self, reason: &str) {
        let lost: Vec<InFlight> = self.in_flight.drain().map(|(_, f)| f).collect();
        for flight in lost {
            let failure = retry_later(reason.to_owned());
            self.outcome(flight.tag_id, flight.task_id, Err(failure));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.in_flight
            .values()
            .filter(|f| f.stage.has_deadline())
            .map(|f| f.deadline)
            .min()
    }

    /// Ends every delivery whose confirm or result is overdue.
    fn expire(&mut self, now: Instant) {
        let overdue: Vec<(u16, Stage)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.stage.has_deadline() && f.deadline <= now)
            .map(|(handle, f)| (*handle, f.stage))
            .collect();
        for (handle, stage) in overdue {
            let reason = match stage {
                Stage::Next | Stage::Rediscover | Stage::DropStale | Stage::Readd => continue,
                Stage::Confirm { .. } => {
                    ZigbeeCounters::bump(&self.counters.confirm_timeouts);
                    format!("no AF_DATA_CONFIRM within {:?}", self.cfg.confirm_timeout)
                }
                Stage::Result => {
                    ZigbeeCounters::bump(&self.counters.result_timeouts);
                    format!(
                        "tag did not report the update within {:?}",
                        self.cfg.result_timeout
                    )
                }
            };
            self.fail_or_readd(handle, retry_later(reason));
        }
    }

    /// Ends offer `handle` with `failure`, unless a stale child entry was
    /// dropped for it: then `send_due` puts the entry back first.
    fn fail_or_readd(&mut self, handle: u16, failure: DeliveryFailure) {
        match self.in_flight.get_mut(&handle) {
            Some(flight) if matches!(flight.stale, StaleChild::Dropped { .. }) => {
                flight.failure = Some(failure);
                flight.stage = Stage::Readd;
            }
            _ => self.finish(handle, Err(failure)),
        }
    }

    fn take_handle(&mut self) -> u16 {
        while self.in_flight.contains_key(&self.next_handle) {
            self.next_handle = self.next_handle.wrapping_add(1);
        }
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        handle
    }

    /// A transaction id not awaiting a confirm. With more than 256 offers
    /// waiting for confirms an id may repeat; the confirm then ends the
    /// oldest, and the other one times out (retryable).
    fn take_trans(&mut self) -> u8 {
        for _ in 0..=u8::MAX {
            let trans = self.next_trans;
            self.next_trans = self.next_trans.wrapping_add(1);
            let busy = self
                .in_flight
                .values()
                .any(|f| f.stage == Stage::Confirm { trans });
            if !busy {
                return trans;
            }
        }
        self.next_trans
    }

    /// Starts one offer: its first segment goes out now, the others after
    /// their predecessor's confirm. `Err` only when the adapter is lost.
    async fn deliver<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        znp: &mut Znp<P>,
        delivery: Delivery,
    ) -> Result<Answered, Stop> {
        let Some(hash) = app::hash_from_hex(&delivery.content_hash) else {
            let reason = format!(
                "content hash {:?} is not 16 hex digits",
                delivery.content_hash
            );
            self.fail(delivery, false, reason);
            return Ok(Answered::No);
        };
        let Some(address) = self.tags.get(&delivery.tag_id).copied() else {
            self.fail(
                delivery,
                true,
                "tag not heard since the ZigBee radio started",
            );
            return Ok(Answered::No);
        };
        let handle = self.take_handle();
        let segments = match app::offer_segments(handle, &delivery.task_id, hash, &delivery.content)
        {
            Ok(segments) => segments,
            Err(error) => {
                let reason = format!("content too large for a ZigBee offer: {error}");
                self.fail(delivery, false, reason);
                return Ok(Answered::No);
            }
        };
        debug!(tag_id = %delivery.tag_id, task_id = %delivery.task_id, handle,
            segments = segments.len(), nwk = format_args!("{:#06x}", address.nwk), "offering");
        self.in_flight.insert(
            handle,
            InFlight {
                tag_id: delivery.tag_id,
                task_id: delivery.task_id,
                address,
                unsent: segments.into(),
                sent: None,
                rediscovered: false,
                stale: StaleChild::Unchecked,
                stage: Stage::Next,
                deadline: Instant::now(),
                failure: None,
            },
        );
        self.send_next(znp, handle).await
    }

    /// Sends the next segment of every offer whose previous one was
    /// confirmed. `Err` only when the adapter is lost.
    async fn send_due<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        znp: &mut Znp<P>,
    ) -> Result<(), Stop> {
        let due: Vec<(u16, Stage)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| !f.stage.has_deadline())
            .map(|(handle, f)| (*handle, f.stage))
            .collect();
        for (handle, stage) in due {
            match stage {
                Stage::Rediscover => self.rediscover(znp, handle).await?,
                Stage::DropStale => {
                    if !self.drop_stale_child(znp, handle).await? {
                        continue;
                    }
                }
                Stage::Readd => {
                    self.readd_child(znp, handle).await?;
                    continue;
                }
                Stage::Next | Stage::Confirm { .. } | Stage::Result => {}
            }
            self.send_next(znp, handle).await?;
        }
        Ok(())
    }

    /// The tag of offer `handle` let two offers expire: if the coordinator
    /// holds it as a child (`UTIL_ASSOC_GET_WITH_ADDRESS` by its IEEE
    /// address), the entry is dropped (`UTIL_ASSOC_REMOVE`), a route
    /// discovered (as zigpy-znp does right after) and the segment queued
    /// again: `Ok(true)`. Otherwise the offer ends as expired: `Ok(false)`.
    /// `Err` only when the adapter is lost.
    async fn drop_stale_child<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        znp: &mut Znp<P>,
        handle: u16,
    ) -> Result<bool, Stop> {
        let Some(flight) = self.in_flight.get_mut(&handle) else {
            return Ok(false);
        };
        flight.stale = StaleChild::Kept;
        let ieee = self
            .devices
            .by_tag_id(&flight.tag_id)
            .or_else(|| self.devices.by_nwk(flight.address.nwk))
            .map(|d| d.ieee);
        let expired = confirm_failure(MAC_TRANSACTION_EXPIRED);
        let Some(ieee) = ieee else {
            self.finish(handle, Err(expired));
            return Ok(false);
        };
        let mut lookup = ieee.to_le_bytes().to_vec();
        // The IEEE address takes priority over this network address.
        lookup.extend(0u16.to_le_bytes());
        let entry = match self
            .assoc_request(znp, znp::UTIL_ASSOC_GET_WITH_ADDRESS, lookup)
            .await?
        {
            Some(reply) => reply,
            None => {
                self.finish(handle, Err(expired));
                return Ok(false);
            }
        };
        let (nwk, relation) = match entry.as_slice() {
            [lo, hi, _, _, relation, ..] => (u16::from_le_bytes([*lo, *hi]), *relation),
            _ => (ASSOC_NO_ADDRESS, RELATION_NOT_USED),
        };
        if nwk == ASSOC_NO_ADDRESS || relation == RELATION_NOT_USED {
            // Not the coordinator's child: it was simply asleep.
            self.finish(handle, Err(expired));
            return Ok(false);
        }
        match self
            .assoc_request(znp, znp::UTIL_ASSOC_REMOVE, ieee.to_le_bytes().to_vec())
            .await?
        {
            Some(reply) if reply.first() == Some(&0) => {}
            _ => {
                self.finish(handle, Err(expired));
                return Ok(false);
            }
        }
        ZigbeeCounters::bump(&self.counters.stale_children_dropped);
        info!(ieee = format_args!("{ieee:016x}"), nwk = format_args!("{nwk:#06x}"),
            "offers to the tag expired twice: dropped it as the coordinator's child so frames are routed to its parent");
        if let Some(flight) = self.in_flight.get_mut(&handle) {
            flight.stale = StaleChild::Dropped {
                ieee,
                nwk,
                relation,
            };
            // The route discovery below, once, stands for the one 0xCD
            // would ask for.
            flight.rediscovered = false;
            flight.stage = Stage::Rediscover;
        }
        self.rediscover(znp, handle).await?;
        Ok(true)
    }

    /// Puts back the child entry dropped for offer `handle` (the offer
    /// failed anyway: the tag may still be the coordinator's child), then
    /// ends the offer with its failure. `Err` only when the adapter is
    /// lost.
    async fn readd_child<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        znp: &mut Znp<P>,
        handle: u16,
    ) -> Result<(), Stop> {
        let Some(flight) = self.in_flight.get_mut(&handle) else {
            return Ok(());
        };
        let failure = flight
            .failure
            .take()
            .unwrap_or_else(|| confirm_failure(MAC_TRANSACTION_EXPIRED));
        // Two more expiries before the next try.
        let tag_id = flight.tag_id.clone();
        self.expired.remove(&tag_id);
        let Some(flight) = self.in_flight.get_mut(&handle) else {
            return Ok(());
        };
        if let StaleChild::Dropped {
            ieee,
            nwk,
            relation,
        } = std::mem::replace(&mut flight.stale, StaleChild::Kept)
        {
            let mut entry = nwk.to_le_bytes().to_vec();
            entry.extend(ieee.to_le_bytes());
            entry.push(relation);
            if self
                .assoc_request(znp, znp::UTIL_ASSOC_ADD, entry)
                .await?
                .is_some()
            {
                ZigbeeCounters::bump(&self.counters.stale_children_restored);
                debug!(ieee = format_args!("{ieee:016x}"), "child entry put back");
            }
        }
        self.finish(handle, Err(failure));
        Ok(())
    }

    /// One association-table request; `None` when the stick refused it
    /// (then the firmware is taken not to have these commands). `Err`
    /// only when the adapter is lost.
    async fn assoc_request<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        znp: &mut Znp<P>,
        command: znp::Command,
        payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, Stop> {
        match znp.request(command, payload).await {
            Ok(reply) => Ok(Some(reply)),
            Err(error) if error.is_link_lost() => Err(Stop::lost(&error)),
            Err(error) => {
                warn!(%error, command = command.name, "association-table command refused; not used again");
                self.assoc_commands = false;
                Ok(None)
            }
        }
    }

    /// `ZDO_EXT_ROUTE_DISC` to offer `handle`'s tag, and its last segment
    /// queued again: what zigbee-herdsman does on NWK_NO_ROUTE
    /// (`zStackAdapter.ts`, `discoverRoute`). Only an adapter loss is an
    /// error; a refused discovery still lets the segment go once more.
    async fn rediscover<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        znp: &mut Znp<P>,
        handle: u16,
    ) -> Result<(), Stop> {
        let Some(flight) = self.in_flight.get_mut(&handle) else {
            return Ok(());
        };
        flight.rediscovered = true;
        flight.stage = Stage::Next;
        if let Some(segment) = flight.sent.take() {
            flight.unsent.push_front(segment);
        }
        let nwk = flight.address.nwk;
        let mut request = nwk.to_le_bytes().to_vec();
        request.extend([ROUTE_DISC_OPTIONS, RADIUS]);
        ZigbeeCounters::bump(&self.counters.route_discoveries);
        debug!(
            nwk = format_args!("{nwk:#06x}"),
            "no route to the tag: discovering one"
        );
        match znp.request(znp::ZDO_EXT_ROUTE_DISC, request).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_link_lost() => Err(Stop::lost(&error)),
            Err(error) => {
                debug!(%error, "route discovery refused; sending again anyway");
                Ok(())
            }
        }
    }

    /// One `AF_DATA_REQUEST` with offer `handle`'s next segment.
    async fn send_next<P: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        znp: &mut Znp<P>,
        handle: u16,
    ) -> Result<Answered, Stop> {
        let trans = self.take_trans();
        let Some(flight) = self.in_flight.get_mut(&handle) else {
            return Ok(Answered::No);
        };
        let Some(data) = flight.unsent.pop_front() else {
            flight.stage = Stage::Result;
            flight.deadline = Instant::now() + self.cfg.result_timeout;
            return Ok(Answered::No);
        };
        flight.sent = Some(data.clone());
        let address = flight.address;
        let mut request = Vec::with_capacity(10 + data.len());
        request.extend(address.nwk.to_le_bytes());
        request.push(address.endpoint);
        request.push(self.cfg.endpoint);
        request.extend(ESL_CLUSTER.to_le_bytes());
        // Options: none (the tag's result is our end-to-end acknowledgement).
        request.extend([trans, 0, RADIUS]);
        // Segments fit MAX_APP_PAYLOAD, far below 255.
        request.push(data.len() as u8);
        request.extend(&data);
        match znp.request(znp::AF_DATA_REQUEST, request).await {
            Ok(reply) if reply.first() == Some(&0) => {
                if let Some(flight) = self.in_flight.get_mut(&handle) {
                    flight.stage = Stage::Confirm { trans };
                    flight.deadline = Instant::now() + self.cfg.confirm_timeout;
                }
                Ok(Answered::Yes)
            }
            Ok(reply) => {
                let failure = confirm_failure(reply.first().copied().unwrap_or(0xFF));
                self.finish(handle, Err(failure));
                Ok(Answered::Yes)
            }
            Err(error) if error.is_link_lost() => {
                let reason = format!("ZigBee adapter lost: {error}");
                self.finish(handle, Err(retry_later(reason.clone())));
                Err(Stop::Lost(reason))
            }
            Err(error @ ZnpError::Timeout { .. }) => {
                self.finish(handle, Err(retry_later(error.to_string())));
                // One missing answer may be noise on the line; two in a row
                // (this and the ping) mean the adapter hangs.
                check_alive(znp).await.map(|()| Answered::Yes)
            }
            Err(error) => {
                // An RPC error is an answer too.
                self.finish(handle, Err(retry_later(error.to_string())));
                Ok(Answered::Yes)
            }
        }
    }

    /// Ends offer `handle` with `result`, if it is still in flight.
    fn finish(&mut self, handle: u16, result: Result<(), DeliveryFailure>) {
        if let Some(flight) = self.in_flight.remove(&handle) {
            self.outcome(flight.tag_id, flight.task_id, result);
        }
    }

    /// Acts on one AREQ. `Err` when it shows the adapter restarted or left
    /// its network.
    fn on_areq(&mut self, frame: &super::frame::Frame) -> Result<(), Stop> {
        let payload = frame.payload();
        if znp::AF_INCOMING_MSG.is(frame, FrameType::Areq) {
            self.on_incoming(payload);
        } else if znp::AF_INCOMING_MSG_EXT.is(frame, FrameType::Areq) {
            self.on_incoming_ext(payload);
        } else if znp::AF_DATA_CONFIRM.is(frame, FrameType::Areq) {
            match payload {
                [status, _endpoint, trans, ..] => self.on_confirm(*status, *trans),
                _ => ZigbeeCounters::bump(&self.counters.unexpected_frames),
            }
        } else if znp::SYS_RESET_IND.is(frame, FrameType::Areq) {
            return Err(Stop::Lost(format!(
                "the ZigBee adapter reset itself (reason {:02X?})",
                payload.first()
            )));
        } else if znp::ZDO_END_DEVICE_ANNCE_IND.is(frame, FrameType::Areq) {
            // Source, network address, IEEE address, capabilities.
            match payload {
                [_, _, lo, hi, ieee @ ..] if ieee.len() >= 9 => {
                    let end_device = ieee[8] & CAPABILITY_ROUTER == 0;
                    self.on_join(
                        u16::from_le_bytes([*lo, *hi]),
                        le_u64(ieee),
                        None,
                        end_device,
                    );
                }
                _ => ZigbeeCounters::bump(&self.counters.unexpected_frames),
            }
        } else if znp::ZDO_TC_DEV_IND.is(frame, FrameType::Areq) {
            // Network address, IEEE address, parent's network address.
            match payload {
                [lo, hi, ieee @ ..] if ieee.len() >= 10 => {
                    let parent = u16::from_le_bytes([ieee[8], ieee[9]]);
                    self.on_join(
                        u16::from_le_bytes([*lo, *hi]),
                        le_u64(ieee),
                        Some(parent),
                        false,
                    );
                }
                _ => ZigbeeCounters::bump(&self.counters.unexpected_frames),
            }
        } else if znp::ZDO_STATE_CHANGE_IND.is(frame, FrameType::Areq) {
            if payload.first() != Some(&znp::DEV_ZB_COORD) {
                return Err(Stop::Lost(format!(
                    "the coordinator left its network (state {:02X?})",
                    payload.first()
                )));
            }
        } else {
            debug!(?frame, "AREQ not used by the ESL backend");
        }
        Ok(())
    }

    /// A device joined (`ZDO_TC_DEV_IND`, with its parent; its announce
    /// follows) or announced itself (`ZDO_END_DEVICE_ANNCE_IND`: joined,
    /// rejoined, or moved to another parent). An end device is reported as
    /// a tag at once, under its tag id (`devices`), and a tag that rejoined
    /// at a new address is answered there.
    fn on_join(&mut self, nwk: u16, ieee: u64, parent: Option<u16>, end_device: bool) {
        ZigbeeCounters::bump(&self.counters.device_announces);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The network file changes only when what it keeps of a device
        // does (a join reports twice: TC_DEV_IND, then the announce; a
        // rejoin at the same address changes nothing kept).
        let displaced = self.devices.by_nwk(nwk).is_some_and(|d| d.ieee != ieee);
        let before = self.devices.entry_of(ieee);
        let device = self
            .devices
            .announced(ieee, nwk, parent, end_device, now_ms);
        info!(tag_id = ?device.tag_id, nwk = format_args!("{nwk:#06x}"),
            ieee = format_args!("{ieee:016x}"), "device joined or announced itself");
        if let Some(details) = device.details() {
            if let Some(address) = self.tags.get_mut(&details.tag_id) {
                address.nwk = nwk;
            }
            self.outgoing.event(RadioEvent::Tag(details));
        }
        if displaced || before != self.devices.entry_of(ieee) {
            self.save_devices();
        }
    }

    /// Writes the device table into the saved network (its `devices`).
    /// A failure is logged: the table is rebuilt from joins and check-ins.
    fn save_devices(&self) {
        if let Err(error) = commission::save_devices(&self.cfg, &self.devices) {
            warn!(%error, "cannot save the ZigBee devices in the network file");
        }
    }

    fn on_confirm(&mut self, status: u8, trans: u8) {
        let found = self
            .in_flight
            .iter_mut()
            .find(|(_, f)| f.stage == Stage::Confirm { trans });
        let Some((&handle, flight)) = found else {
            ZigbeeCounters::bump(&self.counters.late_replies);
            debug!(trans, status, "AF_DATA_CONFIRM for nothing in flight");
            return;
        };
        let tag_id = flight.tag_id.clone();
        if status == MAC_TRANSACTION_EXPIRED
            && self.assoc_commands
            && flight.stale == StaleChild::Unchecked
            && self.expired.contains(&tag_id)
        {
            // Expired twice in a row: `send_due` looks for a stale child
            // entry.
            flight.stage = Stage::DropStale;
            return;
        }
        if status == MAC_TRANSACTION_EXPIRED {
            self.expired.insert(tag_id);
        } else if status == 0 {
            self.expired.remove(&tag_id);
        }
        let Some(flight) = self.in_flight.get_mut(&handle) else {
            return;
        };
        if status == 0 && matches!(flight.stale, StaleChild::Dropped { .. }) {
            // Routed to the tag's parent: the entry stays dropped, whatever
            // the tag answers.
            flight.stale = StaleChild::Kept;
        }
        if status == NWK_NO_ROUTE && !flight.rediscovered {
            // `send_due` discovers a route and sends the segment again.
            flight.stage = Stage::Rediscover;
        } else if status != 0 {
            self.fail_or_readd(handle, confirm_failure(status));
        } else if flight.unsent.is_empty() {
            flight.stage = Stage::Result;
            flight.deadline = Instant::now() + self.cfg.result_timeout;
        } else {
            // `send_due` sends it right after this AREQ.
            flight.stage = Stage::Next;
        }
    }

    fn bad_message(&self, source: u16, why: &dyn std::fmt::Display) {
        let seen = self
            .counters
            .bad_app_messages
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        // One broken tag must not flood the log: the 1st, 2nd, 4th… is
        // logged at warn, the rest at debug; the counter has them all.
        if seen.is_power_of_two() {
            warn!(source = format_args!("{source:#06x}"), %why, bad_messages = seen,
                "bad ESL message; dropped");
        } else {
            debug!(source = format_args!("{source:#06x}"), %why, "bad ESL message; dropped");
        }
    }

    /// An `AF_INCOMING_MSG`: group, cluster, source address (16-bit),
    /// source and destination endpoint, broadcast flag, LQI, security,
    /// timestamp, sequence number, length (one byte), data.
    fn on_incoming(&mut self, payload: &[u8]) {
        if payload.len() < INCOMING_HEADER {
            ZigbeeCounters::bump(&self.counters.unexpected_frames);
            return;
        }
        let cluster = u16::from_le_bytes([payload[2], payload[3]]);
        let source = u16::from_le_bytes([payload[4], payload[5]]);
        let (source_endpoint, endpoint) = (payload[6], payload[7]);
        let lqi = payload[9];
        let len = usize::from(payload[16]);
        if cluster != ESL_CLUSTER || endpoint != self.cfg.endpoint {
            debug!(cluster, endpoint, "AF message for another application");
            return;
        }
        let Some(data) = payload.get(INCOMING_HEADER..INCOMING_HEADER + len) else {
            self.bad_message(source, &"AF_INCOMING_MSG shorter than its length byte");
            return;
        };
        self.on_app_data(source, source_endpoint, lqi, data);
    }

    /// An `AF_INCOMING_MSG_EXT` (layout checked against zigbee-herdsman
    /// `definition.ts` `incomingMsgExt` and zigpy-znp `commands/af.py`):
    /// group, cluster, address mode, source address (8 bytes; a 16-bit one
    /// in the first two), source endpoint, source PAN, destination
    /// endpoint, broadcast flag, LQI, security, timestamp, sequence number,
    /// length (two bytes), data.
    fn on_incoming_ext(&mut self, payload: &[u8]) {
        if payload.len() < INCOMING_EXT_HEADER {
            ZigbeeCounters::bump(&self.counters.unexpected_frames);
            return;
        }
        let cluster = u16::from_le_bytes([payload[2], payload[3]]);
        let mode = payload[4];
        let source = u16::from_le_bytes([payload[5], payload[6]]);
        let (source_endpoint, endpoint) = (payload[13], payload[16]);
        let lqi = payload[18];
        let len = usize::from(u16::from_le_bytes([payload[25], payload[26]]));
        if cluster != ESL_CLUSTER || endpoint != self.cfg.endpoint {
            debug!(cluster, endpoint, "AF message for another application");
            return;
        }
        if mode != ADDR_MODE_16BIT {
            self.bad_message(
                source,
                &format_args!(
                    "AF_INCOMING_MSG_EXT with address mode {mode}: no network address to answer"
                ),
            );
            return;
        }
        // Z-Stack leaves out data too long for one MT frame (to be fetched
        // with AF_DATA_RETRIEVE); ESL messages are far shorter.
        let Some(data) = payload.get(INCOMING_EXT_HEADER..INCOMING_EXT_HEADER + len) else {
            self.bad_message(source, &"AF_INCOMING_MSG_EXT without its data");
            return;
        };
        self.on_app_data(source, source_endpoint, lqi, data);
    }

    fn on_app_data(&mut self, source: u16, source_endpoint: u8, lqi: u8, data: &[u8]) {
        let message = match app::decode(data) {
            Ok(message) => message,
            Err(error) => {
                self.bad_message(source, &error);
                return;
            }
        };
        match message {
            AppMessage::CheckIn(c) => {
                if !is_tag_id(c.tag_id) {
                    self.bad_message(source, &format_args!("invalid tag id {:?}", c.tag_id));
                    return;
                }
                debug!(
                    tag_id = c.tag_id,
                    lqi,
                    nwk = format_args!("{source:#06x}"),
                    "check-in"
                );
                let address = Address {
                    nwk: source,
                    endpoint: source_endpoint,
                };
                self.tags.insert(c.tag_id.to_owned(), address);
                if let Some((device, before)) = self.devices.checked_in(source, c.tag_id) {
                    info!(
                        tag_id = c.tag_id,
                        ieee = format_args!("{:016x}", device.ieee),
                        "tag id bound to the device"
                    );
                    if let Some(mut details) = device.details() {
                        // Listed under its IEEE id since it joined: the
                        // agent drops that entry.
                        details.replaces = before;
                        self.outgoing.event(RadioEvent::Tag(details));
                    }
                    self.save_devices();
                }
                if self.outgoing.len() >= OUTGOING_LIMIT {
                    ZigbeeCounters::bump(&self.counters.checkins_dropped);
                    return;
                }
                self.outgoing.event(RadioEvent::CheckIn(CheckIn {
                    tag_id: c.tag_id.to_owned(),
                    battery_mv: c.battery_mv,
                    rssi: c.rssi_dbm.map(i16::from),
                    content_hash: c.displayed.as_ref().map(app::hash_to_hex),
                }));
            }
            AppMessage::UpdateResult(result) => {
                let Some(flight) = self.in_flight.get(&result.handle) else {
                    ZigbeeCounters::bump(&self.counters.late_replies);
                    debug!(
                        handle = result.handle,
                        "update result for nothing in flight"
                    );
                    return;
                };
                if flight.address.nwk != source {
                    self.bad_message(
                        source,
                        &format_args!("result for handle {} from the wrong tag", result.handle),
                    );
                    return;
                }
                // A result before its confirm (confirm lost or late) still
                // ends the delivery: the tag has it.
                let outcome = match result.status.failure() {
                    None => Ok(()),
                    Some((retryable, reason)) => Err(DeliveryFailure {
                        retryable,
                        reason: reason.to_owned(),
                    }),
                };
                self.finish(result.handle, outcome);
            }
            AppMessage::Offer(_) => {
                self.bad_message(source, &"an offer sent to the agent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::advance;

    use super::super::app::{UpdateResult, UpdateStatus};
    use super::*;

    const CONFIRM: Duration = Duration::from_millis(1000);
    const RESULT: Duration = Duration::from_millis(3000);
    const TAG_NWK: u16 = 0x1234;

    fn state() -> State {
        let cfg = ZigbeeConfig {
            confirm_timeout: CONFIRM,
            result_timeout: RESULT,
            ..ZigbeeConfig::default()
        };
        State::new(cfg, Arc::new(ZigbeeCounters::default()))
    }

    /// Puts an offer for `task` in flight, waiting for the confirm of
    /// transaction `trans`, with `more` segments still to send.
    fn in_flight(state: &mut State, handle: u16, task: &str, trans: u8, more: usize) {
        state.in_flight.insert(
            handle,
            InFlight {
                tag_id: "ZB1".to_owned(),
                task_id: task.to_owned(),
                address: Address {
                    nwk: TAG_NWK,
                    endpoint: 1,
                },
                unsent: vec![vec![0u8]; more].into(),
                sent: Some(vec![0u8]),
                rediscovered: false,
                stale: StaleChild::Unchecked,
                stage: Stage::Confirm { trans },
                deadline: Instant::now() + CONFIRM,
                failure: None,
            },
        );
    }

    fn outcomes(state: &mut State) -> Vec<Outcome> {
        std::iter::from_fn(|| state.outgoing.pop_event())
            .filter_map(|e| match e {
                RadioEvent::Outcome(o) => Some(o),
                _ => None,
            })
            .collect()
    }

    /// An `AF_INCOMING_MSG` payload from `nwk` on our endpoint.
    fn incoming(state: &State, nwk: u16, message: AppMessage<'_>) -> Vec<u8> {
        let data = message.encode().expect("fits");
        let mut p = vec![0, 0];
        p.extend(ESL_CLUSTER.to_le_bytes());
        p.extend(nwk.to_le_bytes());
        p.extend([1, state.cfg.endpoint, 0, 180, 0, 0, 0, 0, 0, 0]);
        p.push(data.len() as u8);
        p.extend(data);
        p
    }

    #[tokio::test(start_paused = true)]
    async fn confirm_timeout_fires_at_its_deadline_not_before() {
        let mut s = state();
        in_flight(&mut s, 1, "t1", 7, 0);
        assert_eq!(s.next_deadline(), Some(Instant::now() + CONFIRM));
        advance(CONFIRM - Duration::from_millis(1)).await;
        s.expire(Instant::now());
        assert!(outcomes(&mut s).is_empty(), "not yet");
        advance(Duration::from_millis(1)).await;
        s.expire(Instant::now());
        let out = outcomes(&mut s);
        assert_eq!(out.len(), 1);
        let failure = out[0].result.clone().expect_err("timed out");
        assert!(
            failure.retryable && failure.reason.contains("AF_DATA_CONFIRM"),
            "{failure:?}"
        );
        assert_eq!(s.counters.get("confirm_timeouts"), Some(1));
        assert!(s.in_flight.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn confirm_starts_the_result_wait_and_the_result_ends_it() {
        let mut s = state();
        in_flight(&mut s, 1, "t1", 7, 0);
        advance(Duration::from_millis(500)).await;
        s.on_confirm(0, 7);
        assert_eq!(s.in_flight[&1].stage, Stage::Result);
        // The result wait runs from the confirm, not from the request.
        assert_eq!(s.next_deadline(), Some(Instant::now() + RESULT));
        advance(RESULT - Duration::from_millis(1)).await;
        s.expire(Instant::now());
        assert!(outcomes(&mut s).is_empty());
        let result = AppMessage::UpdateResult(UpdateResult {
            handle: 1,
            status: UpdateStatus::Applied,
        });
        let payload = incoming(&s, TAG_NWK, result);
        s.on_incoming(&payload);
        let out = outcomes(&mut s);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].result, Ok(()));
        assert_eq!(out[0].task_id, "t1");
    }

    #[tokio::test(start_paused = true)]
    async fn missing_result_times_out_retryably() {
        let mut s = state();
        in_flight(&mut s, 1, "t1", 7, 0);
        s.on_confirm(0, 7);
        advance(RESULT).await;
        s.expire(Instant::now());
        let failure = outcomes(&mut s)[0].result.clone().expect_err("no result");
        assert!(
            failure.retryable && failure.reason.contains("did not report"),
            "{failure:?}"
        );
        assert_eq!(s.counters.get("result_timeouts"), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn confirmed_segment_with_more_to_send_waits_for_no_timer() {
        let mut s = state();
        in_flight(&mut s, 1, "t1", 7, 2);
        s.on_confirm(0, 7);
        assert_eq!(s.in_flight[&1].stage, Stage::Next);
        assert_eq!(s.next_deadline(), None, "the next segment is sent at once");
        advance(RESULT * 10).await;
        s.expire(Instant::now());
        assert!(outcomes(&mut s).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_late_and_foreign_replies() {
        let mut s = state();
        in_flight(&mut s, 1, "t1", 7, 0);
        in_flight(&mut s, 2, "t2", 8, 0);
        // A confirm nobody waits for.
        s.on_confirm(0, 99);
        assert_eq!(s.counters.get("late_replies"), Some(1));
        // A sleeping tag.
        s.on_confirm(0xF0, 7);
        let out = outcomes(&mut s);
        let failure = out[0].result.clone().expect_err("expired");
        assert!(
            failure.retryable && failure.reason.contains("0xf0"),
            "{failure:?}"
        );
        // A result for t2 from another address is not t2's.
        let result = AppMessage::UpdateResult(UpdateResult {
            handle: 2,
            status: UpdateStatus::Applied,
        });
        let payload = incoming(&s, TAG_NWK + 1, result);
        s.on_incoming(&payload);
        assert!(outcomes(&mut s).is_empty());
        assert_eq!(s.counters.get("bad_app_messages"), Some(1));
        // A result before its confirm still ends the delivery.
        let result = AppMessage::UpdateResult(UpdateResult {
            handle: 2,
            status: UpdateStatus::Unrenderable,
        });
        let payload = incoming(&s, TAG_NWK, result);
        s.on_incoming(&payload);
        let failure = outcomes(&mut s)[0]
            .result
            .clone()
            .expect_err("unrenderable");
        assert!(!failure.retryable, "{failure:?}");
        assert!(s.in_flight.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn adapter_loss_fails_everything_in_flight_once() {
        let mut s = state();
        in_flight(&mut s, 1, "t1", 7, 0);
        in_flight(&mut s, 2, "t2", 8, 3);
        s.fail_all("adapter lost");
        let mut out = outcomes(&mut s);
        out.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|o| o.result.as_ref().is_err_and(|f| f.retryable)));
        advance(RESULT * 2).await;
        s.expire(Instant::now());
        assert!(outcomes(&mut s).is_empty(), "no second outcome");
    }

    #[tokio::test(start_paused = true)]
    async fn check_in_records_the_address_and_bad_ids_are_counted() {
        let mut s = state();
        let good = AppMessage::CheckIn(app::CheckIn {
            tag_id: "ZB1",
            battery_mv: Some(2900),
            rssi_dbm: Some(-70),
            displayed: Some([0xAB; 8]),
        });
        let payload = incoming(&s, TAG_NWK, good);
        s.on_incoming(&payload);
        assert_eq!(s.tags["ZB1"].nwk, TAG_NWK);
        let Some(RadioEvent::CheckIn(c)) = s.outgoing.pop_event() else {
            panic!("a check-in event")
        };
        assert_eq!(c.content_hash.as_deref(), Some("abababababababab"));
        assert_eq!((c.battery_mv, c.rssi), (Some(2900), Some(-70)));
        let bad = AppMessage::CheckIn(app::CheckIn {
            tag_id: "no spaces",
            battery_mv: None,
            rssi_dbm: None,
            displayed: None,
        });
        let payload = incoming(&s, TAG_NWK, bad);
        s.on_incoming(&payload);
        assert!(s.outgoing.is_empty());
        assert_eq!(s.counters.get("bad_app_messages"), Some(1));
        // Garbage in the data, and a length byte longer than the frame.
        let mut garbage = incoming(
            &s,
            TAG_NWK,
            AppMessage::UpdateResult(UpdateResult {
                handle: 1,
                status: UpdateStatus::Busy,
            }),
        );
        let data_at = INCOMING_HEADER;
        garbage[data_at] = 9;
        s.on_incoming(&garbage);
        garbage[INCOMING_HEADER - 1] = 200;
        s.on_incoming(&garbage);
        assert_eq!(s.counters.get("bad_app_messages"), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn no_route_asks_for_a_route_discovery_once_then_fails() {
        let mut s = state();
        in_flight(&mut s, 1, "t1", 7, 0);
        s.on_confirm(0xCD, 7);
        assert_eq!(s.in_flight[&1].stage, Stage::Rediscover);
        assert!(outcomes(&mut s).is_empty(), "not failed yet");
        assert_eq!(s.next_deadline(), None, "acted on at once");
        // After the discovery the segment went again and found no route
        // again: now it fails, retryably.
        let flight = s.in_flight.get_mut(&1).expect("in flight");
        flight.rediscovered = true;
        flight.stage = Stage::Confirm { trans: 8 };
        s.on_confirm(0xCD, 8);
        let failure = outcomes(&mut s)[0].result.clone().expect_err("no route");
        assert!(
            failure.retryable && failure.reason.contains("route"),
            "{failure:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn extended_incoming_messages_are_read_like_short_ones() {
        let mut s = state();
        let check_in = AppMessage::CheckIn(app::CheckIn {
            tag_id: "ZB7",
            battery_mv: None,
            rssi_dbm: None,
            displayed: None,
        });
        let data = check_in.encode().expect("fits");
        let mut p = vec![0, 0];
        p.extend(ESL_CLUSTER.to_le_bytes());
        p.push(ADDR_MODE_16BIT);
        p.extend(TAG_NWK.to_le_bytes());
        p.extend([0; 6]);
        p.push(1); // source endpoint
        p.extend([0x62, 0x1A]); // source PAN
        p.push(s.cfg.endpoint);
        p.extend([0, 200, 0, 0, 0, 0, 0, 0]); // broadcast, LQI, security, time, seq
        p.extend((data.len() as u16).to_le_bytes());
        p.extend(&data);
        let frame = znp::AF_INCOMING_MSG_EXT
            .frame(FrameType::Areq, p.clone())
            .expect("fits");
        assert!(s.on_areq(&frame).is_ok());
        assert_eq!(s.tags["ZB7"].nwk, TAG_NWK);
        assert!(
            matches!(s.outgoing.pop_event(), Some(RadioEvent::CheckIn(c)) if c.tag_id == "ZB7")
        );
        // A 64-bit source cannot be answered; data left out is refused.
        let mut ieee = p.clone();
        ieee[4] = 3;
        s.on_incoming_ext(&ieee);
        let mut cut = p;
        cut.truncate(INCOMING_EXT_HEADER + 2);
        s.on_incoming_ext(&cut);
        assert!(s.outgoing.is_empty());
        assert_eq!(s.counters.get("bad_app_messages"), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_offer_failing_after_a_dropped_child_entry_puts_it_back_unless_it_was_routed() {
        let mut s = state();
        s.assoc_commands = true;
        let dropped = StaleChild::Dropped {
            ieee: 1,
            nwk: TAG_NWK,
            relation: 1,
        };
        // Routed (confirm 0), then no result: the entry stays dropped.
        in_flight(&mut s, 1, "t1", 7, 0);
        s.in_flight.get_mut(&1).expect("in flight").stale = dropped.clone();
        s.on_confirm(0, 7);
        advance(RESULT).await;
        s.expire(Instant::now());
        assert!(outcomes(&mut s)[0].result.is_err());
        // Expired again after the drop: put back first (`send_due`), then
        // failed.
        in_flight(&mut s, 2, "t2", 8, 0);
        s.in_flight.get_mut(&2).expect("in flight").stale = dropped;
        s.on_confirm(0xF0, 8);
        assert_eq!(s.in_flight[&2].stage, Stage::Readd);
        assert!(outcomes(&mut s).is_empty(), "not before the entry is back");
        // A first expiry is a plain retryable failure; the second in a row
        // looks for a stale entry.
        s.expired.clear();
        in_flight(&mut s, 3, "t3", 9, 0);
        s.on_confirm(0xF0, 9);
        assert!(!s.in_flight.contains_key(&3));
        assert!(s.expired.contains("ZB1"));
        in_flight(&mut s, 4, "t4", 10, 0);
        s.on_confirm(0xF0, 10);
        assert_eq!(s.in_flight[&4].stage, Stage::DropStale);
    }

    #[test]
    fn confirm_statuses_map_to_retry_or_fail() {
        for status in [0xF0, 0xE9, 0xE1, 0xF1, 0x10, 0x11, 0xCD, 0xB7, 0x01, 0x77] {
            assert!(confirm_failure(status).retryable, "{status:#04x}");
        }
        for status in [0x02, 0xB3, 0xB6, 0xC1, 0xC2] {
            assert!(!confirm_failure(status).retryable, "{status:#04x}");
        }
        let expired = confirm_failure(0xF0);
        assert!(expired.reason.contains("asleep"), "{}", expired.reason);
        assert!(expired.reason.contains("0xf0"), "{}", expired.reason);
    }

    #[test]
    fn tag_ids_follow_the_task_rule() {
        assert!(is_tag_id("ZB-0011:22.33_x"));
        for bad in ["", "a b", "tag/1", &"x".repeat(33), "tägg"] {
            assert!(!is_tag_id(bad), "{bad:?}");
        }
    }
}
