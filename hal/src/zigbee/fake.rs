//! A fake Z-Stack ZNP coordinator with simulated sleepy ESL tags, on a
//! pseudo-terminal: test support for this crate's driver tests and the
//! agent's end-to-end tests (feature `fake`). Not for builds that ship.
//!
//! Owns: the PTY (master end, plus a slave fd held open so the master never
//! sees a hang-up between two opens of the agent), a symlink at
//! [`FakeConfig::link`] pointing at the current slave device (as udev's
//! `/dev/serial/by-id/…` links do), the simulated coordinator state and the
//! tags. One task ([`FakeCoordinator`] is its handle) does all of it.
//!
//! What it speaks: `SYS_PING` (capabilities by firmware), `SYS_VERSION`,
//! `SYS_RESET_REQ` → `SYS_RESET_IND` (after a reboot time in which it hears
//! nothing), the OSAL NV item commands over an NV memory it keeps across
//! unplugs, `UTIL_GET_DEVICE_INFO`, `ZDO_STARTUP_FROM_APP` →
//! `ZDO_STATE_CHANGE_IND`, on Z-Stack 3 the BDB channel and commissioning
//! commands (formation from the NV items), `AF_REGISTER`, `AF_DATA_REQUEST`
//! → `AF_DATA_CONFIRM`, and `AF_INCOMING_MSG` for the tags' check-ins and
//! results; any other SREQ gets an RPC error (Z-Stack 1.2: the whole
//! APP_CNF subsystem).
//!
//! The stick it models ([`FakeConfig::firmware`], [`FakeConfig::network`],
//! [`FakeConfig::in_bootloader`]): Z-Stack 3.x.0 (CC2652: aligned NIB,
//! BDB, extended NV, `UTIL_ASSOC_*`), 3.0.x (CC2531: packed NIB, BDB, the
//! frame counter in the legacy security-material items) or Home 1.2
//! (CC2531: packed NIB, no APP_CNF, no active-key item,
//! `ZDO_STARTUP_FROM_APP` forms); an address manager holding the tags that
//! joined (all configured ones unless [`FakeConfig::tags_joined`] is off;
//! offers to a tag it does not know find no route); tags that moved to
//! another parent ([`FakeConfig::moved`]); new tags joining while joining
//! is open, and tags rejoining, with `ZDO_TC_DEV_IND` and
//! `ZDO_END_DEVICE_ANNCE_IND`; a channel change (`ZDO_MGMT_NWK_UPDATE_REQ`)
//! that the coordinator and the tags that hear it follow, while the others
//! stay on the old channel until they rejoin
//! ([`FakeConfig::asleep_at_channel_change`]); blank (no network; a start-up without
//! forming makes the firmware pick its defaults, as a real stick does), or
//! formed by someone else; waiting in its serial bootloader until the skip
//! byte 0xEF, then sending its power-up `SYS_RESET_IND`. NV layouts are
//! [`super::nv`]'s, whose ids and layouts were checked against zigpy-znp and
//! zigbee-herdsman; that the fake agrees with the host proves only that
//! both read those sources the same way. Tags check in only while the coordinator runs with the ESL
//! endpoint registered (Z-Stack drops messages for unregistered endpoints),
//! listen for `awake_ms` after each check-in, and answer an offer with an
//! `UpdateResult`. An offer to a sleeping tag expires with status 0xF0.
//!
//! Faults on command: unplug/replug (the PTY is closed and a new one
//! appears behind the same link), raw bytes injected into the stream, data
//! requests swallowed after their SRSP (no confirm, tag never hears it), and
//! silence (the adapter stops answering).
//!
//! The display journal has the simulator's format (PROTOCOL §8): one JSON
//! line `{"tag_id","task_id","content_hash","at"}` per content shown.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use std::collections::HashMap;

use super::app::{self, AppMessage, CheckIn, UpdateResult, UpdateStatus, ESL_CLUSTER};
use super::firmware::BOOTLOADER_SKIP_BYTE;
use super::frame::{Frame, FrameDecoder, FrameType};
use super::nv::{self, id as nvid, Nib};
use super::znp::{self, Command};

/// Control requests waiting for the fake, at most: tests send a handful.
const CONTROL_CAPACITY: usize = 16;
/// The first tag's network address; tag `i` has `FIRST_NWK + i`.
const FIRST_NWK: u16 = 0x1000;
/// Endpoint of the ESL application on every tag.
const TAG_ENDPOINT: u8 = 1;
/// Entries of the fake stick's address manager and TCLK table at least
/// (real builds have tens); more when more tags are configured.
const ADDRMGR_MIN: u16 = 32;
/// Time the fake takes for an SRSP-less step (reset, network start, confirm
/// of an awake tag).
const STEP: Duration = Duration::from_millis(5);

/// The firmware the fake runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeFirmware {
    /// Z-Stack 3.x.0 on a CC2652 (product 1, APP_CNF, aligned NIB).
    #[default]
    ZStack3x,
    /// Z-Stack Home 1.2 on a CC2531 (no APP_CNF, packed NIB).
    ZStack12,
    /// Z-Stack 3.0.x on a CC2531 (product 2, APP_CNF, packed NIB, no
    /// extended NV: the frame counter in the legacy security-material items
    /// 0x0075…, no address manager modelled, no `UTIL_ASSOC_*`).
    ZStack30,
}

impl FakeFirmware {
    fn capabilities(self) -> u16 {
        match self {
            // SYS AF ZDO UTIL GP APP_CNF (SYS_PING of a CC2652 build).
            FakeFirmware::ZStack3x => 0x0659,
            // SYS AF ZDO SAPI UTIL APP, no APP_CNF.
            FakeFirmware::ZStack12 => 0x0179,
            // SYS AF ZDO UTIL GP APP_CNF.
            FakeFirmware::ZStack30 => 0x0659,
        }
    }
}

/// A network on the fake stick.
#[derive(Clone, PartialEq, Eq)]
pub struct FakeNetwork {
    pub channel: u8,
    pub pan_id: u16,
    pub extended_pan_id: u64,
    pub network_key: [u8; 16],
}

impl std::fmt::Debug for FakeNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FakeNetwork(channel {}, PAN {:#06x}, ext {:016x})",
            self.channel, self.pan_id, self.extended_pan_id
        )
    }
}

/// The fake stick's IEEE address.
pub const FAKE_IEEE: u64 = 0x00124B00_11223344;
/// The first tag's IEEE address; tag `i` has `FIRST_TAG_IEEE + i`.
pub const FIRST_TAG_IEEE: u64 = 0x00124B00_AA000000;
/// `ZDO_END_DEVICE_ANNCE_IND` capabilities of a sleepy tag: allocate
/// address, receiver off when idle.
const SLEEPY_CAPABILITIES: u8 = 0x80;

/// A tag that joined the fake's network ([`FakeCoordinator::join_tag`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeJoin {
    /// Its IEEE address as a tag id (the rule in `devices`).
    pub tag_id: String,
    pub ieee: u64,
    pub nwk: u16,
}

/// Settings of the fake coordinator and its tags. Tag ids follow the
/// simulator's scheme (`{id_prefix}{index:06}`), so tests can use the same
/// helpers for both radios.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Where the symlink to the current PTY slave goes; the agent opens it.
    pub link: PathBuf,
    pub tags: u32,
    pub id_prefix: String,
    pub checkin_interval_ms: u64,
    /// Probability that a tag answers an offer with "busy".
    pub fail_rate: f64,
    /// Tags that never check in.
    pub offline: Vec<String>,
    pub seed: u64,
    pub journal: Option<PathBuf>,
    /// How long a tag listens after its check-in.
    pub awake_ms: u64,
    /// Time a tag takes to render and report the result.
    pub apply_ms: u64,
    /// Time after which an offer to a sleeping tag expires (0xF0).
    pub expire_ms: u64,
    pub firmware: FakeFirmware,
    /// A network someone else formed on the stick; `None`: blank.
    pub network: Option<FakeNetwork>,
    /// The stick waits in its serial bootloader for the skip byte.
    pub in_bootloader: bool,
    /// Time the stick takes to reboot (reset, bootloader exit); frames that
    /// arrive meanwhile are lost, as on a real chip.
    pub reboot_ms: u64,
    /// Tags the coordinator has no route to (confirm 0xCD) until a
    /// `ZDO_EXT_ROUTE_DISC` names them.
    pub unrouted: Vec<String>,
    /// The configured tags are children of the stick (in its address
    /// manager, Z-Stack 3.x.0) once it has a network; `false` models a
    /// new stick that knows none of them: offers to them find no route
    /// (0xCD) until a restore writes them back.
    pub tags_joined: bool,
    /// Tags that moved to another parent while the coordinator still holds
    /// them as children (child aging off): offers to them expire (0xF0)
    /// until `UTIL_ASSOC_REMOVE` drops the stale entry; then they are
    /// routed to the new parent.
    pub moved: Vec<String>,
    /// Tags whose parent drops a channel change broadcast before they
    /// poll: they stay on the old channel (their check-ins are lost and
    /// offers to them expire) until they rejoin ([`FakeCoordinator::rejoin`]).
    pub asleep_at_channel_change: Vec<String>,
}

impl FakeConfig {
    /// Eight tags checking in every 100 ms, at `link`.
    pub fn new(link: impl Into<PathBuf>) -> FakeConfig {
        FakeConfig {
            link: link.into(),
            tags: 8,
            id_prefix: "SIM".to_owned(),
            checkin_interval_ms: 100,
            fail_rate: 0.0,
            offline: Vec::new(),
            seed: 1,
            journal: None,
            awake_ms: 60,
            apply_ms: 20,
            expire_ms: 200,
            firmware: FakeFirmware::default(),
            network: None,
            in_bootloader: false,
            reboot_ms: 5,
            unrouted: Vec::new(),
            tags_joined: true,
            moved: Vec::new(),
            asleep_at_channel_change: Vec::new(),
        }
    }
}

/// What the fake saw and did, for assertions.
#[derive(Debug, Default)]
pub struct FakeStats {
    pub resets: AtomicU64,
    pub startups: AtomicU64,
    pub registrations: AtomicU64,
    pub pings: AtomicU64,
    pub data_requests: AtomicU64,
    pub data_requests_swallowed: AtomicU64,
    pub confirms_ok: AtomicU64,
    pub confirms_expired: AtomicU64,
    /// Offers a tag received completely (all segments).
    pub offers_received: AtomicU64,
    pub checkins_sent: AtomicU64,
    pub results_sent: AtomicU64,
    /// Frames from the host the fake could not decode (must stay 0).
    pub bad_host_frames: AtomicU64,
    /// Frames the fake wrote while the PTY buffer was full (nobody reading).
    pub frames_lost: AtomicU64,
    /// Frames from the host that arrived while the stick rebooted (lost).
    pub frames_while_rebooting: AtomicU64,
    /// Times the stick left its bootloader on the skip byte.
    pub bootloader_exits: AtomicU64,
    /// Networks formed (BDB formation, or a 1.2 start-up without one).
    pub formations: AtomicU64,
    pub nv_writes: AtomicU64,
    pub route_discoveries: AtomicU64,
    pub permit_join_requests: AtomicU64,
    /// Seconds of the last permit-join request (u64::MAX: none yet).
    pub last_permit_join_s: AtomicU64,
    /// Most offers tags were receiving or rendering at the same time.
    pub max_offers_at_once: AtomicU64,
    /// `UTIL_ASSOC_REMOVE` and `UTIL_ASSOC_ADD` requests that changed the
    /// association table.
    pub assoc_removals: AtomicU64,
    pub assoc_adds: AtomicU64,
    /// Times the coordinator moved its network to another channel.
    pub channel_changes: AtomicU64,
    /// Check-ins of tags left on an old channel, heard by nobody.
    pub checkins_lost: AtomicU64,
}

impl FakeStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

enum Control {
    Unplug(oneshot::Sender<()>),
    Replug(oneshot::Sender<io::Result<()>>),
    Inject(Vec<u8>, oneshot::Sender<()>),
    SwallowRequests(u32),
    Silent(bool),
    CheckinInterval(u64),
    Network(oneshot::Sender<Option<FakeNetwork>>),
    NvItem(u16, oneshot::Sender<Option<Vec<u8>>>),
    SetNvItem(u16, Vec<u8>, oneshot::Sender<()>),
    FrameCounter(oneshot::Sender<Option<u32>>),
    Join {
        checks_in: bool,
        reply: oneshot::Sender<Result<FakeJoin, String>>,
    },
    Rejoin(String, oneshot::Sender<Option<u16>>),
}

/// Handle on the fake's task. Dropping it stops the task and closes the PTY.
#[derive(Debug)]
pub struct FakeCoordinator {
    control_tx: mpsc::Sender<Control>,
    stats: Arc<FakeStats>,
    link: PathBuf,
}

impl FakeCoordinator {
    /// Opens the PTY, points `cfg.link` at it and starts the task on the
    /// current tokio runtime.
    pub fn start(cfg: FakeConfig) -> io::Result<FakeCoordinator> {
        let pty = Pty::open(&cfg.link)?;
        let journal = match &cfg.journal {
            Some(path) => Some(OpenOptions::new().create(true).append(true).open(path)?),
            None => None,
        };
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let now = Instant::now();
        let mut timers = Timers::default();
        let tags: Vec<FakeTag> = (0..cfg.tags)
            .map(|i| {
                let id = format!("{}{i:06}", cfg.id_prefix);
                let offline = cfg.offline.contains(&id);
                let first = Duration::from_millis(rng.gen_range(0..cfg.checkin_interval_ms.max(1)));
                if !offline {
                    timers.add(now + first, Action::CheckIn(i as usize));
                }
                FakeTag {
                    id,
                    ieee: FIRST_TAG_IEEE + u64::from(i),
                    nwk: FIRST_NWK + i as u16,
                    awake_until: None,
                    receiving: None,
                    displayed: None,
                    lost_channel: false,
                    battery_mv: rng.gen_range(2900..3100),
                    rssi_dbm: rng.gen_range(-90..-40),
                }
            })
            .collect();
        let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let stats = Arc::new(FakeStats::default());
        stats.last_permit_join_s.store(u64::MAX, Ordering::Relaxed);
        let link = cfg.link.clone();
        let mut nv = default_nv();
        if cfg.firmware == FakeFirmware::ZStack12 {
            // 1.2 keeps the global trust-centre link key in NV, the
            // well-known one from the factory.
            nv.insert(
                nvid::TCLK_TABLE_START_12,
                nv::global_tc_link_key_entry(super::TcLinkKey::DEFAULT.bytes()),
            );
        }
        let mut ex_nv = HashMap::new();
        if let Some(network) = &cfg.network {
            store_network(&mut nv, &mut ex_nv, &cfg, network);
        }
        let task = FakeTask {
            joining_until: None,
            in_bootloader: cfg.in_bootloader,
            rebooting_until: None,
            bdb_channels: 0,
            routed: std::collections::HashSet::new(),
            offers_at_once: 0,
            nv,
            ex_nv,
            cfg,
            pty: Some(pty),
            decoder: FrameDecoder::new(),
            running: false,
            registered: None,
            tags,
            timers,
            rng,
            journal,
            swallow: 0,
            silent: false,
            stats: stats.clone(),
            control_rx,
        };
        let mut task = task;
        if task.cfg.network.is_some() {
            task.join_configured_tags();
        }
        tokio::spawn(task.run());
        Ok(FakeCoordinator {
            control_tx,
            stats,
            link,
        })
    }

    /// The path the agent should open (the symlink).
    pub fn port(&self) -> &Path {
        &self.link
    }

    pub fn stats(&self) -> &FakeStats {
        &self.stats
    }

    async fn control(&self, control: Control) {
        self.control_tx
            .send(control)
            .await
            .expect("the fake coordinator task runs while its handle lives");
    }

    /// Pulls the stick: the PTY closes (the agent reads EOF or EIO) and the
    /// link disappears. The coordinator forgets its running state, as a
    /// powered-off stick does.
    pub async fn unplug(&self) {
        let (tx, rx) = oneshot::channel();
        self.control(Control::Unplug(tx)).await;
        rx.await.expect("the fake answers");
    }

    /// Plugs it back: a new PTY behind the same link.
    pub async fn replug(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.control(Control::Replug(tx)).await;
        rx.await.expect("the fake answers")
    }

    /// Writes raw bytes into the stream towards the agent, between frames.
    pub async fn inject(&self, bytes: Vec<u8>) {
        let (tx, rx) = oneshot::channel();
        self.control(Control::Inject(bytes, tx)).await;
        rx.await.expect("the fake answers");
    }

    /// The next `n` data requests get their SRSP and then vanish: no
    /// confirm, and the tag never hears them.
    pub async fn swallow_requests(&self, n: u32) {
        self.control(Control::SwallowRequests(n)).await;
    }

    /// A silent adapter reads everything and sends nothing (hung firmware).
    pub async fn set_silent(&self, silent: bool) {
        self.control(Control::Silent(silent)).await;
    }

    /// The network the stick has stored now; `None` when blank.
    pub async fn network(&self) -> Option<FakeNetwork> {
        let (tx, rx) = oneshot::channel();
        self.control(Control::Network(tx)).await;
        rx.await.expect("the fake answers")
    }

    /// The network frame counter the stick would send with next.
    pub async fn frame_counter(&self) -> Option<u32> {
        let (tx, rx) = oneshot::channel();
        self.control(Control::FrameCounter(tx)).await;
        rx.await.expect("the fake answers")
    }

    /// One NV item's value, for assertions.
    pub async fn nv_item(&self, item: u16) -> Option<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        self.control(Control::NvItem(item, tx)).await;
        rx.await.expect("the fake answers")
    }

    /// Overwrites one NV item, as another tool writing the stick's NV
    /// memory would.
    pub async fn set_nv_item(&self, item: u16, value: Vec<u8>) {
        let (tx, rx) = oneshot::channel();
        self.control(Control::SetNvItem(item, value, tx)).await;
        rx.await.expect("the fake answers");
    }

    /// A new tag joins the network (only while joining is open, as on a
    /// real network: `Err` otherwise): the coordinator reports it
    /// (`ZDO_TC_DEV_IND`) and the tag announces itself
    /// (`ZDO_END_DEVICE_ANNCE_IND`). Its id is its IEEE address; it checks
    /// in every interval when `checks_in`, else never.
    pub async fn join_tag(&self, checks_in: bool) -> Result<FakeJoin, String> {
        let (reply, rx) = oneshot::channel();
        self.control(Control::Join { checks_in, reply }).await;
        rx.await.expect("the fake answers")
    }

    /// Tag `tag_id` rejoins at a new network address and announces
    /// itself; returns the address (`None`: no such tag).
    pub async fn rejoin(&self, tag_id: &str) -> Option<u16> {
        let (tx, rx) = oneshot::channel();
        self.control(Control::Rejoin(tag_id.to_owned(), tx)).await;
        rx.await.expect("the fake answers")
    }

    /// Changes the tags' check-in interval; each tag's next check-in comes
    /// within the new interval.
    pub async fn set_checkin_interval(&self, ms: u64) {
        self.control(Control::CheckinInterval(ms)).await;
    }
}

/// The master end of a PTY, the slave fd held open, and the slave's path.
struct Pty {
    master: AsyncFd<File>,
    _slave: OwnedFd,
}

impl Pty {
    /// A new PTY in raw mode, with `link` pointing at its slave.
    fn open(link: &Path) -> io::Result<Pty> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

        let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
        // Raw before anyone opens the slave: no echo, no CR/LF translation
        // of binary frames.
        let mut termios = tcgetattr(&pty.slave).map_err(io::Error::from)?;
        cfmakeraw(&mut termios);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &termios).map_err(io::Error::from)?;
        let flags = fcntl(pty.master.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(pty.master.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))?;
        // Replace the link atomically: a new link next to it, renamed over.
        let tmp = link.with_extension("new-link");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&slave_path, &tmp)?;
        std::fs::rename(&tmp, link)?;
        let master = File::from(pty.master);
        // SAFETY: the `File` owns the master fd; it stays open, and the same
        // fd, until the `AsyncFd` (which owns the `File`) is dropped.
        let master = unsafe { AsyncFd::register(master) }?;
        Ok(Pty {
            master,
            _slave: pty.slave,
        })
    }
}

struct FakeTag {
    id: String,
    ieee: u64,
    nwk: u16,
    awake_until: Option<Instant>,
    /// The offer being received, segment by segment.
    receiving: Option<Receiving>,
    displayed: Option<app::ContentHash>,
    /// Missed a channel change: on the old channel until it rejoins.
    lost_channel: bool,
    battery_mv: u16,
    rssi_dbm: i8,
}

/// An offer a tag has received part of.
struct Receiving {
    handle: u16,
    task_id: String,
    hash: app::ContentHash,
    next: u8,
    content: Vec<u8>,
}

/// Something the fake does later.
#[derive(Debug)]
enum Action {
    CheckIn(usize),
    Send(Frame),
    /// The coordinator is up on its network.
    NetworkUp,
    /// The broadcast delivery time after a channel change request is
    /// over: the coordinator and the tags that heard it switch.
    MoveChannel {
        channel: u8,
        missed: Vec<usize>,
    },
    /// Tag `tag` finished rendering offer `handle`.
    Apply {
        tag: usize,
        handle: u16,
        task_id: String,
        hash: app::ContentHash,
        busy: bool,
    },
}

/// Timed actions, earliest first; the sequence number keeps insertion order
/// among equal instants.
#[derive(Default)]
struct Timers {
    queue: BTreeMap<(Instant, u64), Action>,
    seq: u64,
}

impl Timers {
    fn add(&mut self, at: Instant, action: Action) {
        self.seq += 1;
        self.queue.insert((at, self.seq), action);
    }

    fn next(&self) -> Option<Instant> {
        self.queue.keys().next().map(|(at, _)| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Action> {
        let (&(at, seq), _) = self.queue.iter().next()?;
        if at > now {
            return None;
        }
        self.queue.remove(&(at, seq))
    }
}

struct FakeTask {
    cfg: FakeConfig,
    /// Joining is open until then (`ZDO_MGMT_PERMIT_JOIN_REQ`).
    joining_until: Option<Instant>,
    in_bootloader: bool,
    /// Frames are lost until then.
    rebooting_until: Option<Instant>,
    /// `APP_CNF_BDB_SET_CHANNEL`'s primary mask.
    bdb_channels: u32,
    /// Network addresses a route discovery was asked for.
    routed: std::collections::HashSet<u16>,
    /// Offers tags are receiving or rendering now.
    offers_at_once: u64,
    nv: HashMap<u16, Vec<u8>>,
    /// Extended NV (Z-Stack 3.30+) of system ZSTACK, by item and sub id.
    ex_nv: HashMap<(u16, u16), Vec<u8>>,
    pty: Option<Pty>,
    decoder: FrameDecoder,
    /// The coordinator runs on its network (device state 9).
    running: bool,
    registered: Option<u8>,
    tags: Vec<FakeTag>,
    timers: Timers,
    rng: SmallRng,
    journal: Option<File>,
    swallow: u32,
    silent: bool,
    stats: Arc<FakeStats>,
    control_rx: mpsc::Receiver<Control>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl FakeTask {
    async fn run(mut self) {
        let mut chunk = [0u8; 512];
        loop {
            let wake = self.timers.next();
            tokio::select! {
                control = self.control_rx.recv() => match control {
                    Some(control) => self.on_control(control),
                    None => break,
                },
                read = read_master(self.pty.as_ref(), &mut chunk) => match read {
                    Ok(0) => {}
                    Ok(n) if self.in_bootloader => self.in_bootloader_read(&chunk[..n]),
                    Ok(n) => {
                        self.decoder.extend(&chunk[..n]);
                        while let Some(decoded) = self.decoder.decode() {
                            match decoded {
                                Ok(frame) => self.on_host_frame(frame),
                                Err(_) => bump(&self.stats.bad_host_frames),
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "fake coordinator: PTY read failed; unplugging");
                        self.unplug();
                    }
                },
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    let now = Instant::now();
                    while let Some(action) = self.timers.pop_due(now) {
                        self.on_action(action, now);
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&self.cfg.link);
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Unplug(done) => {
                self.unplug();
                let _ = done.send(());
            }
            Control::Replug(done) => {
                let result = Pty::open(&self.cfg.link).map(|pty| {
                    self.pty = Some(pty);
                });
                let _ = done.send(result);
            }
            Control::Inject(bytes, done) => {
                self.write(&bytes);
                let _ = done.send(());
            }
            Control::SwallowRequests(n) => self.swallow = n,
            Control::Network(reply) => {
                let _ = reply.send(read_network(&self.nv));
            }
            Control::FrameCounter(reply) => {
                let _ = reply.send(self.frame_counter());
            }
            Control::NvItem(item, reply) => {
                let _ = reply.send(self.nv.get(&item).cloned());
            }
            Control::SetNvItem(item, value, done) => {
                self.nv.insert(item, value);
                let _ = done.send(());
            }
            Control::Silent(silent) => self.silent = silent,
            Control::Join { checks_in, reply } => {
                let _ = reply.send(self.join(checks_in));
            }
            Control::Rejoin(tag_id, reply) => {
                let index = self.tags.iter().position(|t| t.id == tag_id);
                let nwk = index.map(|i| {
                    // A fresh address above every other one.
                    let nwk = self.tags.iter().map(|t| t.nwk).max().unwrap_or(FIRST_NWK) + 1;
                    self.tags[i].nwk = nwk;
                    // A tag rejoins by scanning every channel.
                    self.tags[i].lost_channel = false;
                    if let Some((_, user)) = self.addrmgr_find(self.tags[i].ieee) {
                        self.addrmgr_set(self.tags[i].ieee, nwk, user);
                    }
                    self.announce(i, None);
                    nwk
                });
                let _ = reply.send(nwk);
            }
            Control::CheckinInterval(ms) => {
                self.cfg.checkin_interval_ms = ms.max(1);
                let now = Instant::now();
                let pending: Vec<(Instant, u64)> = self
                    .timers
                    .queue
                    .iter()
                    .filter(|(_, action)| matches!(action, Action::CheckIn(_)))
                    .map(|(key, _)| *key)
                    .collect();
                for key in pending {
                    if let Some(action) = self.timers.queue.remove(&key) {
                        let first = self.rng.gen_range(0..self.cfg.checkin_interval_ms);
                        self.timers.add(now + Duration::from_millis(first), action);
                    }
                }
            }
        }
    }

    fn join(&mut self, checks_in: bool) -> Result<FakeJoin, String> {
        let now = Instant::now();
        if !self.running || self.joining_until.is_none_or(|until| now >= until) {
            return Err("joining is closed".into());
        }
        let index = self.tags.len();
        let ieee = FIRST_TAG_IEEE + index as u64;
        let nwk = self.tags.iter().map(|t| t.nwk).max().unwrap_or(FIRST_NWK) + 1;
        let tag_id = super::devices::ieee_tag_id(ieee);
        self.tags.push(FakeTag {
            id: tag_id.clone(),
            ieee,
            nwk,
            awake_until: None,
            receiving: None,
            displayed: None,
            lost_channel: false,
            battery_mv: 3000,
            rssi_dbm: -60,
        });
        self.admit(ieee, nwk);
        if checks_in {
            let first = Duration::from_millis(self.cfg.checkin_interval_ms);
            self.timers.add(now + first, Action::CheckIn(index));
        }
        self.announce(index, Some(0x0000));
        Ok(FakeJoin { tag_id, ieee, nwk })
    }

    /// The configured tags become the stick's children, when they are
    /// joined (`tags_joined`).
    fn join_configured_tags(&mut self) {
        if !self.cfg.tags_joined {
            return;
        }
        let joined: Vec<(u64, u16)> = self.tags.iter().map(|t| (t.ieee, t.nwk)).collect();
        for (ieee, nwk) in joined {
            self.admit(ieee, nwk);
        }
    }

    /// A tag joined: the coordinator's child, with a hashed link key in
    /// the TCLK table (Z-Stack 3; its shift and counters made up from its
    /// address).
    fn admit(&mut self, ieee: u64, nwk: u16) {
        self.addrmgr_set(ieee, nwk, nv::ADDRMGR_ASSOC | nv::ADDRMGR_SECURITY);
        let low = (ieee & 0xFF) as u32;
        let key = super::devices::LinkKey {
            key: [0; 16],
            tx_counter: 100 + low,
            rx_counter: 200 + low,
        };
        let shift = (ieee % 16) as u8;
        match self.cfg.firmware {
            FakeFirmware::ZStack12 => {}
            FakeFirmware::ZStack3x => {
                let free = (0..table_size(&self.cfg)).find(|sub| {
                    self.ex_nv
                        .get(&(nvid::EX_TCLK_TABLE, *sub))
                        .is_some_and(|e| e[8..16] == [0; 8])
                });
                if let Some(sub) = free {
                    // The entry as stored: the counter the stick has now.
                    let mut entry = nv::tclk_entry(ieee, &key, shift, true);
                    entry[..4].copy_from_slice(&key.tx_counter.to_le_bytes());
                    self.ex_nv.insert((nvid::EX_TCLK_TABLE, sub), entry);
                }
            }
            FakeFirmware::ZStack30 => {
                let legacy = nvid::LEGACY_TCLK_TABLE_START..=nvid::LEGACY_TCLK_TABLE_END;
                if let Some(item) = legacy.into_iter().find(|i| !self.nv.contains_key(i)) {
                    let mut entry = nv::tclk_entry(ieee, &key, shift, false);
                    entry[..4].copy_from_slice(&key.tx_counter.to_le_bytes());
                    self.nv.insert(item, entry);
                }
            }
        }
    }

    /// The address manager's entries in order: on 3.x.0 one extended-NV
    /// entry per sub id (aligned), on older firmware one OSAL item holding
    /// the table (packed, as on a CC2531).
    fn addrmgr_entries(&self) -> Vec<Vec<u8>> {
        if self.aligned() {
            (0..table_size(&self.cfg))
                .map_while(|sub| self.ex_nv.get(&(nvid::EX_ADDRMGR, sub)).cloned())
                .collect()
        } else {
            self.nv.get(&nvid::ADDRMGR).map_or_else(Vec::new, |table| {
                table
                    .chunks_exact(nv::ADDRMGR_ENTRY_LEN_PACKED)
                    .map(<[u8]>::to_vec)
                    .collect()
            })
        }
    }

    /// Whether this stick aligns its structs (CC26x2) or packs them.
    fn aligned(&self) -> bool {
        self.cfg.firmware == FakeFirmware::ZStack3x
    }

    /// The IEEE address in an address-manager entry.
    fn entry_ieee(&self, entry: &[u8]) -> Option<u64> {
        let at = 3 + usize::from(self.aligned());
        Some(u64::from_le_bytes(entry.get(at..at + 8)?.try_into().ok()?))
    }

    /// `ieee`'s address-manager entry: its index and user type.
    fn addrmgr_find(&self, ieee: u64) -> Option<(usize, u8)> {
        self.addrmgr_entries()
            .iter()
            .enumerate()
            .find(|(_, e)| self.entry_ieee(e) == Some(ieee))
            .map(|(index, e)| (index, e[0]))
    }

    /// Sets `ieee`'s entry (its own, else the first free one; a full table
    /// keeps nothing).
    fn addrmgr_set(&mut self, ieee: u64, nwk: u16, user: u8) {
        let entries = self.addrmgr_entries();
        let index = self.addrmgr_find(ieee).map(|(i, _)| i).or_else(|| {
            entries
                .iter()
                .position(|e| self.entry_ieee(e) == Some(u64::MAX))
        });
        let Some(index) = index else {
            return;
        };
        let device = super::devices::Device::new(ieee, nwk, true);
        let mut entry = nv::addrmgr_entry(&device, self.aligned());
        entry[0] = user;
        if self.aligned() {
            // The table has `table_size` entries, a u16.
            self.ex_nv.insert((nvid::EX_ADDRMGR, index as u16), entry);
        } else if let Some(table) = self.nv.get_mut(&nvid::ADDRMGR) {
            let at = index * nv::ADDRMGR_ENTRY_LEN_PACKED;
            table[at..at + entry.len()].copy_from_slice(&entry);
        }
    }

    /// Whether offers to tag `index` find it: `Err(status)` with the
    /// confirm status when they do not.
    fn reachable(&self, index: usize) -> Result<(), u8> {
        let tag = &self.tags[index];
        match self.addrmgr_find(tag.ieee) {
            // Neither a child nor a known device: no route.
            None => Err(0xCD),
            Some((_, user))
                if user & nv::ADDRMGR_ASSOC != 0 && self.cfg.moved.contains(&tag.id) =>
            {
                Err(0xF0)
            }
            // Held for a poll on this channel, which never comes.
            Some(_) if tag.lost_channel => Err(0xF0),
            Some(_) => Ok(()),
        }
    }

    /// Tag `index` joined through `parent` (the trust centre says so), and
    /// announces itself.
    fn announce(&mut self, index: usize, parent: Option<u16>) {
        let (nwk, ieee) = (self.tags[index].nwk, self.tags[index].ieee);
        if let Some(parent) = parent {
            let mut joined = nwk.to_le_bytes().to_vec();
            joined.extend(ieee.to_le_bytes());
            joined.extend(parent.to_le_bytes());
            self.send(znp::ZDO_TC_DEV_IND, FrameType::Areq, joined);
        }
        let mut announce = nwk.to_le_bytes().to_vec();
        announce.extend(nwk.to_le_bytes());
        announce.extend(ieee.to_le_bytes());
        announce.push(SLEEPY_CAPABILITIES);
        self.send(znp::ZDO_END_DEVICE_ANNCE_IND, FrameType::Areq, announce);
    }

    fn unplug(&mut self) {
        self.pty = None;
        self.decoder.clear();
        self.running = false;
        self.registered = None;
        let _ = std::fs::remove_file(&self.cfg.link);
    }

    /// Writes to the agent; a full PTY buffer (nobody reading) loses the
    /// bytes, as a UART with nobody listening would.
    fn write(&mut self, bytes: &[u8]) {
        let Some(pty) = &self.pty else {
            return;
        };
        if self.silent {
            return;
        }
        let mut file = pty.master.get_ref();
        match file.write_all(bytes) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                bump(&self.stats.frames_lost);
            }
            Err(error) => tracing::warn!(%error, "fake coordinator: PTY write failed"),
        }
    }

    fn send(&mut self, cmd: Command, kind: FrameType, payload: Vec<u8>) {
        // The fake builds only small frames; a failure is a bug in the fake.
        let frame = cmd.frame(kind, payload).expect("fake frames fit");
        self.write(&frame.encode());
    }

    fn on_host_frame(&mut self, frame: Frame) {
        if self.silent {
            return;
        }
        let now = Instant::now();
        let payload = frame.payload().to_vec();
        if self.rebooting_until.is_some_and(|until| now < until) {
            bump(&self.stats.frames_while_rebooting);
            return;
        }
        if znp::SYS_RESET_REQ.is(&frame, FrameType::Areq) {
            bump(&self.stats.resets);
            let option = self
                .nv
                .get(&nvid::STARTUP_OPTION)
                .and_then(|v| v.first().copied());
            if option.is_some_and(|o| o & 0x02 != 0) {
                let legacy = nvid::LEGACY_NWK_SEC_MATERIAL_TABLE_START
                    ..=nvid::LEGACY_NWK_SEC_MATERIAL_TABLE_END;
                let tclk = nvid::LEGACY_TCLK_TABLE_START..=nvid::LEGACY_TCLK_TABLE_END;
                for item in NETWORK_STATE_ITEMS.into_iter().chain(legacy).chain(tclk) {
                    self.nv.remove(&item);
                }
                self.ex_nv.clear();
            }
            if option.is_some_and(|o| o & 0x01 != 0) {
                let defaults = default_nv();
                for item in CONFIG_ITEMS {
                    match defaults.get(&item) {
                        Some(value) => self.nv.insert(item, value.clone()),
                        None => self.nv.remove(&item),
                    };
                }
            }
            self.reboot(now);
            return;
        }
        if frame.kind() != Some(FrameType::Sreq) {
            return;
        }
        let z12 = self.cfg.firmware == FakeFirmware::ZStack12;
        // Extended NV and the association commands: 3.x.0 builds only.
        let z3x = self.cfg.firmware == FakeFirmware::ZStack3x;
        if frame.subsystem() == super::frame::subsystem::APP_CNF && z12 {
            // Invalid subsystem: 1.2 has no APP_CNF.
            let error = vec![1, frame.cmd0(), frame.cmd1()];
            self.send(znp::RPC_ERROR, FrameType::Srsp, error);
        } else if znp::SYS_PING.is(&frame, FrameType::Sreq) {
            bump(&self.stats.pings);
            let caps = self.cfg.firmware.capabilities().to_le_bytes().to_vec();
            self.send(znp::SYS_PING, FrameType::Srsp, caps);
        } else if znp::SYS_VERSION.is(&frame, FrameType::Sreq) {
            // Transport 2; product 1 = Z-Stack 3.x.0, 0 = 1.2; release;
            // code revision (a build date).
            let version = match self.cfg.firmware {
                FakeFirmware::ZStack3x => vec![2, 1, 2, 7, 1, 0xAB, 0xB2, 0x34, 0x01],
                FakeFirmware::ZStack12 => vec![2, 0, 2, 6, 3, 0x7D, 0x7A, 0x34, 0x01],
                // 2.7.2, 20190608.
                FakeFirmware::ZStack30 => vec![2, 2, 2, 7, 2, 0x90, 0x15, 0x34, 0x01],
            };
            self.send(znp::SYS_VERSION, FrameType::Srsp, version);
        } else if znp::SYS_OSAL_NV_READ.is(&frame, FrameType::Sreq) {
            let reply = match payload.as_slice() {
                [lo, hi, offset] => match self.nv.get(&u16::from_le_bytes([*lo, *hi])) {
                    Some(value) => {
                        let rest = value.get(usize::from(*offset)..).unwrap_or(&[]);
                        let rest = &rest[..rest.len().min(246)];
                        let mut r = vec![0, rest.len() as u8];
                        r.extend(rest);
                        r
                    }
                    None => vec![NV_OPER_FAILED, 0],
                },
                _ => vec![0x02, 0],
            };
            self.send(znp::SYS_OSAL_NV_READ, FrameType::Srsp, reply);
        } else if znp::SYS_OSAL_NV_WRITE.is(&frame, FrameType::Sreq) {
            let status = match payload.as_slice() {
                [lo, hi, offset, len, value @ ..] if value.len() == usize::from(*len) => {
                    match self.nv.get_mut(&u16::from_le_bytes([*lo, *hi])) {
                        Some(item) => {
                            bump(&self.stats.nv_writes);
                            let at = usize::from(*offset);
                            if item.len() < at + value.len() {
                                item.resize(at + value.len(), 0);
                            }
                            item[at..at + value.len()].copy_from_slice(value);
                            0
                        }
                        None => NV_ITEM_UNINIT,
                    }
                }
                _ => 0x02,
            };
            self.send(znp::SYS_OSAL_NV_WRITE, FrameType::Srsp, vec![status]);
        } else if znp::SYS_OSAL_NV_LENGTH.is(&frame, FrameType::Sreq) {
            let len = match payload.as_slice() {
                [lo, hi] => self
                    .nv
                    .get(&u16::from_le_bytes([*lo, *hi]))
                    .map_or(0, Vec::len),
                _ => 0,
            };
            // Fake items are short.
            let reply = (len as u16).to_le_bytes().to_vec();
            self.send(znp::SYS_OSAL_NV_LENGTH, FrameType::Srsp, reply);
        } else if znp::SYS_OSAL_NV_READ_EXT.is(&frame, FrameType::Sreq) {
            let reply = match payload.as_slice() {
                [lo, hi, ol, oh] => match self.nv.get(&u16::from_le_bytes([*lo, *hi])) {
                    Some(value) => {
                        let at = usize::from(u16::from_le_bytes([*ol, *oh]));
                        let rest = value.get(at..).unwrap_or(&[]);
                        let rest = &rest[..rest.len().min(246)];
                        let mut r = vec![0, rest.len() as u8];
                        r.extend(rest);
                        r
                    }
                    None => vec![NV_OPER_FAILED, 0],
                },
                _ => vec![0x02, 0],
            };
            self.send(znp::SYS_OSAL_NV_READ_EXT, FrameType::Srsp, reply);
        } else if znp::SYS_OSAL_NV_WRITE_EXT.is(&frame, FrameType::Sreq) {
            let status = match payload.as_slice() {
                [lo, hi, ol, oh, ll, lh, value @ ..]
                    if value.len() == usize::from(u16::from_le_bytes([*ll, *lh])) =>
                {
                    let at = usize::from(u16::from_le_bytes([*ol, *oh]));
                    match self.nv.get_mut(&u16::from_le_bytes([*lo, *hi])) {
                        Some(item) if at + value.len() <= item.len() => {
                            bump(&self.stats.nv_writes);
                            item[at..at + value.len()].copy_from_slice(value);
                            0
                        }
                        Some(_) => 0x02,
                        None => NV_ITEM_UNINIT,
                    }
                }
                _ => 0x02,
            };
            self.send(znp::SYS_OSAL_NV_WRITE_EXT, FrameType::Srsp, vec![status]);
        } else if znp::SYS_NV_READ.is(&frame, FrameType::Sreq) && z3x {
            let reply = match payload.as_slice() {
                [1, il, ih, sl, sh, ol, oh, len] => {
                    let key = (
                        u16::from_le_bytes([*il, *ih]),
                        u16::from_le_bytes([*sl, *sh]),
                    );
                    match self.ex_nv.get(&key) {
                        Some(value) => {
                            let at = usize::from(u16::from_le_bytes([*ol, *oh]));
                            let rest = value.get(at..).unwrap_or(&[]);
                            let rest = &rest[..rest.len().min(usize::from(*len))];
                            let mut r = vec![0, rest.len() as u8];
                            r.extend(rest);
                            r
                        }
                        None => vec![NV_ITEM_UNINIT, 0],
                    }
                }
                _ => vec![0x02, 0],
            };
            self.send(znp::SYS_NV_READ, FrameType::Srsp, reply);
        } else if znp::SYS_NV_WRITE.is(&frame, FrameType::Sreq) && z3x {
            let status = match payload.as_slice() {
                [1, il, ih, sl, sh, ol, oh, len, value @ ..]
                    if value.len() == usize::from(*len) =>
                {
                    let key = (
                        u16::from_le_bytes([*il, *ih]),
                        u16::from_le_bytes([*sl, *sh]),
                    );
                    match self.ex_nv.get_mut(&key) {
                        Some(item) => {
                            bump(&self.stats.nv_writes);
                            let at = usize::from(u16::from_le_bytes([*ol, *oh]));
                            if item.len() < at + value.len() {
                                item.resize(at + value.len(), 0);
                            }
                            item[at..at + value.len()].copy_from_slice(value);
                            0
                        }
                        None => NV_ITEM_UNINIT,
                    }
                }
                _ => 0x02,
            };
            self.send(znp::SYS_NV_WRITE, FrameType::Srsp, vec![status]);
        } else if znp::SYS_OSAL_NV_ITEM_INIT.is(&frame, FrameType::Sreq) {
            let status = match payload.as_slice() {
                [lo, hi, _, _, init_len, value @ ..] if value.len() == usize::from(*init_len) => {
                    let item = u16::from_le_bytes([*lo, *hi]);
                    if let std::collections::hash_map::Entry::Vacant(e) = self.nv.entry(item) {
                        bump(&self.stats.nv_writes);
                        e.insert(value.to_vec());
                        NV_ITEM_UNINIT
                    } else {
                        0
                    }
                }
                _ => 0x02,
            };
            self.send(znp::SYS_OSAL_NV_ITEM_INIT, FrameType::Srsp, vec![status]);
        } else if znp::APP_CNF_BDB_SET_CHANNEL.is(&frame, FrameType::Sreq) {
            if let [1, a, b, c, d] = payload.as_slice() {
                self.bdb_channels = u32::from_le_bytes([*a, *b, *c, *d]);
            }
            self.send(znp::APP_CNF_BDB_SET_CHANNEL, FrameType::Srsp, vec![0]);
        } else if znp::APP_CNF_BDB_START_COMMISSIONING.is(&frame, FrameType::Sreq) {
            self.send(
                znp::APP_CNF_BDB_START_COMMISSIONING,
                FrameType::Srsp,
                vec![0],
            );
            // Formation: status Success, or FormationFailure when the stick
            // has a network already (zigpy-znp `start_network`); mode 4,
            // nothing remaining.
            let status = if payload.first() == Some(&0x04) && read_network(&self.nv).is_none() {
                self.form();
                0x00
            } else {
                0x08
            };
            let note = znp::APP_CNF_BDB_COMMISSIONING_NOTIFICATION
                .frame(FrameType::Areq, vec![status, 0x04, 0x00])
                .expect("fits");
            self.timers.add(now + STEP, Action::Send(note));
            self.timers.add(now + STEP, Action::NetworkUp);
        } else if znp::ZDO_MGMT_PERMIT_JOIN_REQ.is(&frame, FrameType::Sreq) {
            // Address mode, destination, duration, TC significance.
            let status = match payload.as_slice() {
                [_, _, _, seconds, _] => {
                    bump(&self.stats.permit_join_requests);
                    self.joining_until =
                        (*seconds > 0).then(|| now + Duration::from_secs(u64::from(*seconds)));
                    self.stats
                        .last_permit_join_s
                        .store(u64::from(*seconds), Ordering::Relaxed);
                    0
                }
                _ => 0x02,
            };
            self.send(znp::ZDO_MGMT_PERMIT_JOIN_REQ, FrameType::Srsp, vec![status]);
        } else if znp::ZDO_MGMT_NWK_UPDATE_REQ.is(&frame, FrameType::Sreq) {
            self.on_nwk_update(&payload, now);
        } else if znp::ZDO_EXT_ROUTE_DISC.is(&frame, FrameType::Sreq) {
            if let [lo, hi, ..] = payload.as_slice() {
                bump(&self.stats.route_discoveries);
                self.routed.insert(u16::from_le_bytes([*lo, *hi]));
            }
            self.send(znp::ZDO_EXT_ROUTE_DISC, FrameType::Srsp, vec![0]);
        } else if znp::UTIL_ASSOC_GET_WITH_ADDRESS.is(&frame, FrameType::Sreq) && z3x {
            // IEEE address (all zeros: look up by the network address).
            let found = match payload.as_slice() {
                [ieee @ .., lo, hi] if ieee.len() == 8 => {
                    let ieee = u64::from_le_bytes(ieee.try_into().expect("8 bytes"));
                    let nwk = u16::from_le_bytes([*lo, *hi]);
                    self.tags
                        .iter()
                        .find(|t| {
                            if ieee != 0 {
                                t.ieee == ieee
                            } else {
                                t.nwk == nwk
                            }
                        })
                        .and_then(|t| Some((t.nwk, self.addrmgr_find(t.ieee)?)))
                        .filter(|(_, (_, user))| user & nv::ADDRMGR_ASSOC != 0)
                }
                _ => None,
            };
            // associated_devices_t: short address, index, relation, then
            // fields nobody here reads.
            let mut device = match found {
                Some((nwk, (index, _))) => {
                    let mut d = nwk.to_le_bytes().to_vec();
                    d.extend((index as u16).to_le_bytes());
                    d.push(1); // CHILD_RFD
                    d
                }
                None => vec![0xFE, 0xFF, 0xFF, 0xFF, 0xFF],
            };
            device.resize(19, 0);
            self.send(znp::UTIL_ASSOC_GET_WITH_ADDRESS, FrameType::Srsp, device);
        } else if znp::UTIL_ASSOC_REMOVE.is(&frame, FrameType::Sreq) && z3x {
            let status = match <[u8; 8]>::try_from(payload.as_slice()) {
                Ok(ieee) => {
                    let ieee = u64::from_le_bytes(ieee);
                    let tag_nwk = self.tags.iter().find(|t| t.ieee == ieee).map(|t| t.nwk);
                    match (self.addrmgr_find(ieee), tag_nwk) {
                        (Some((_, user)), Some(nwk)) if user & nv::ADDRMGR_ASSOC != 0 => {
                            self.addrmgr_set(ieee, nwk, user & !nv::ADDRMGR_ASSOC);
                            bump(&self.stats.assoc_removals);
                            0
                        }
                        _ => 1,
                    }
                }
                Err(_) => 0x02,
            };
            self.send(znp::UTIL_ASSOC_REMOVE, FrameType::Srsp, vec![status]);
        } else if znp::UTIL_ASSOC_ADD.is(&frame, FrameType::Sreq) && z3x {
            // Network address, IEEE address, relation.
            let status = match payload.as_slice() {
                [lo, hi, rest @ ..] if rest.len() == 9 => {
                    let ieee = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
                    let user = self
                        .addrmgr_find(ieee)
                        .map_or(nv::ADDRMGR_SECURITY, |(_, user)| user);
                    self.addrmgr_set(
                        ieee,
                        u16::from_le_bytes([*lo, *hi]),
                        user | nv::ADDRMGR_ASSOC,
                    );
                    bump(&self.stats.assoc_adds);
                    0
                }
                _ => 0x02,
            };
            self.send(znp::UTIL_ASSOC_ADD, FrameType::Srsp, vec![status]);
        } else if znp::UTIL_GET_DEVICE_INFO.is(&frame, FrameType::Sreq) {
            let state = if self.running { znp::DEV_ZB_COORD } else { 0 };
            let mut info = vec![0];
            info.extend(FAKE_IEEE.to_le_bytes());
            info.extend([0x00, 0x00, 0x07, state, 0]);
            self.send(znp::UTIL_GET_DEVICE_INFO, FrameType::Srsp, info);
        } else if znp::ZDO_STARTUP_FROM_APP.is(&frame, FrameType::Sreq) {
            bump(&self.stats.startups);
            // With no network stored, the firmware forms one from whatever
            // its NV items say (1.2: status 1, new network).
            let status = if read_network(&self.nv).is_some() {
                0
            } else {
                self.form();
                if z12 {
                    1
                } else {
                    0
                }
            };
            self.send(znp::ZDO_STARTUP_FROM_APP, FrameType::Srsp, vec![status]);
            self.timers.add(now + STEP, Action::NetworkUp);
        } else if znp::AF_REGISTER.is(&frame, FrameType::Sreq) {
            let status = match (payload.first(), self.registered) {
                (Some(ep), Some(registered)) if *ep == registered => 0xB8,
                (Some(ep), _) => {
                    bump(&self.stats.registrations);
                    self.registered = Some(*ep);
                    0
                }
                (None, _) => 0x02,
            };
            self.send(znp::AF_REGISTER, FrameType::Srsp, vec![status]);
        } else if znp::AF_DATA_REQUEST.is(&frame, FrameType::Sreq) {
            self.on_data_request(&payload, now);
        } else {
            // Invalid command id, as Z-Stack answers unknown SREQs.
            let error = vec![2, frame.cmd0(), frame.cmd1()];
            self.send(znp::RPC_ERROR, FrameType::Srsp, error);
        }
    }

    /// `ZDO_MGMT_NWK_UPDATE_REQ`: destination, address mode, channel mask,
    /// scan duration, scan count, manager address. Scan duration 0xFE with
    /// one channel moves the network there after the broadcast delivery
    /// time (`STEP` here): the coordinator acts on a request to itself and
    /// on its own broadcast (Z-Stack hands its broadcasts to its own ZDO
    /// too, as herdsman's channel change relies on). A broadcast to every
    /// device (0xFFFF) reaches the sleepy tags through their parent at
    /// their next poll, but for those in `asleep_at_channel_change`; one
    /// to the routers only (0xFFFC, 0xFFFD) reaches no tag.
    fn on_nwk_update(&mut self, payload: &[u8], now: Instant) {
        let [dl, dh, _mode, m0, m1, m2, m3, duration, _, _, _] = payload else {
            self.send(znp::ZDO_MGMT_NWK_UPDATE_REQ, FrameType::Srsp, vec![0x02]);
            return;
        };
        self.send(znp::ZDO_MGMT_NWK_UPDATE_REQ, FrameType::Srsp, vec![0]);
        let channels = nv::mask_channels(u32::from_le_bytes([*m0, *m1, *m2, *m3]));
        let dst = u16::from_le_bytes([*dl, *dh]);
        let [channel] = channels[..] else {
            return;
        };
        if *duration != 0xFE || !self.running || !matches!(dst, 0x0000 | 0xFFFC..=0xFFFF) {
            return;
        }
        let missed = (0..self.tags.len())
            .filter(|&i| {
                dst != 0xFFFF || self.cfg.asleep_at_channel_change.contains(&self.tags[i].id)
            })
            .collect();
        self.timers
            .add(now + STEP, Action::MoveChannel { channel, missed });
    }

    /// The chip restarts: it hears nothing for `reboot_ms`, then says so.
    fn reboot(&mut self, now: Instant) {
        self.running = false;
        self.registered = None;
        let up = now + Duration::from_millis(self.cfg.reboot_ms);
        self.rebooting_until = Some(up);
        // Reason 0 (power-up), transport 2, product, release.
        let ind = znp::SYS_RESET_IND.frame(FrameType::Areq, vec![0, 2, 1, 2, 7, 1]);
        self.timers.add(up, Action::Send(ind.expect("fits")));
    }

    /// Bytes while in the bootloader: only the skip byte means anything.
    fn in_bootloader_read(&mut self, bytes: &[u8]) {
        if bytes.contains(&BOOTLOADER_SKIP_BYTE) {
            self.in_bootloader = false;
            bump(&self.stats.bootloader_exits);
            self.reboot(Instant::now());
        }
    }

    /// Forms a network from the NV items (as the firmware does), on the
    /// lowest channel of the BDB or NV channel mask.
    fn form(&mut self) {
        bump(&self.stats.formations);
        let get = |item| self.nv.get(&item).cloned().unwrap_or_default();
        let mask = match self.bdb_channels {
            0 => u32::from_le_bytes(get(nvid::CHANLIST).try_into().unwrap_or([0, 8, 0, 0])),
            mask => mask,
        };
        let channel = nv::mask_channels(mask).first().copied().unwrap_or(11);
        let mut pan_id = u16::from_le_bytes(get(nvid::PANID).try_into().unwrap_or([0xFF, 0xFF]));
        if pan_id == 0xFFFF {
            pan_id = self.rng.gen_range(1..0xFFF7);
        }
        let extended_pan_id =
            u64::from_le_bytes(get(nvid::EXTENDED_PAN_ID).try_into().unwrap_or([0xDD; 8]));
        let network_key = get(nvid::PRECFGKEY).try_into().unwrap_or([0x01; 16]);
        let network = FakeNetwork {
            channel,
            pan_id,
            extended_pan_id,
            network_key,
        };
        store_network(&mut self.nv, &mut self.ex_nv, &self.cfg, &network);
        self.join_configured_tags();
    }

    /// The network frame counter's bytes: the network's own entry (3.30+)
    /// or `NWKKEY`'s tail (1.2).
    fn frame_counter_mut(&mut self) -> Option<&mut [u8]> {
        let ext = read_network(&self.nv)?.extended_pan_id;
        match self.cfg.firmware {
            FakeFirmware::ZStack3x => self
                .ex_nv
                .iter_mut()
                .find(|((item, _), e)| {
                    *item == nvid::EX_NWK_SEC_MATERIAL_TABLE
                        && e.get(4..12) == Some(&ext.to_le_bytes()[..])
                })
                .map(|(_, e)| &mut e[..4]),
            FakeFirmware::ZStack12 => self
                .nv
                .get_mut(&nvid::NWKKEY)
                .and_then(|k| k.get_mut(17..21)),
            FakeFirmware::ZStack30 => self
                .nv
                .iter_mut()
                .find(|(item, e)| {
                    (nvid::LEGACY_NWK_SEC_MATERIAL_TABLE_START
                        ..=nvid::LEGACY_NWK_SEC_MATERIAL_TABLE_END)
                        .contains(*item)
                        && e.get(4..12) == Some(&ext.to_le_bytes()[..])
                })
                .map(|(_, e)| &mut e[..4]),
        }
    }

    fn frame_counter(&mut self) -> Option<u32> {
        let bytes = self.frame_counter_mut()?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    }

    fn on_data_request(&mut self, payload: &[u8], now: Instant) {
        bump(&self.stats.data_requests);
        // Every frame the coordinator sends counts.
        if let Some(counter) = self.frame_counter_mut() {
            let next = u32::from_le_bytes([counter[0], counter[1], counter[2], counter[3]]) + 1;
            counter.copy_from_slice(&next.to_le_bytes());
        }
        // dst(2) dst_ep src_ep cluster(2) trans options radius len data
        if payload.len() < 10 || payload.len() < 10 + usize::from(payload[9]) || !self.running {
            self.send(znp::AF_DATA_REQUEST, FrameType::Srsp, vec![0x02]);
            return;
        }
        self.send(znp::AF_DATA_REQUEST, FrameType::Srsp, vec![0]);
        if self.swallow > 0 {
            self.swallow -= 1;
            bump(&self.stats.data_requests_swallowed);
            return;
        }
        let nwk = u16::from_le_bytes([payload[0], payload[1]]);
        let src_ep = payload[3];
        let trans = payload[6];
        let data = &payload[10..10 + usize::from(payload[9])];
        let confirm = |status: u8| {
            znp::AF_DATA_CONFIRM
                .frame(FrameType::Areq, vec![status, src_ep, trans])
                .expect("fits")
        };
        let Some(tag) = self.tags.iter().position(|t| t.nwk == nwk) else {
            // No route to an address nobody has.
            self.timers.add(now + STEP, Action::Send(confirm(0xCD)));
            return;
        };
        if self.cfg.unrouted.contains(&self.tags[tag].id) && !self.routed.contains(&nwk) {
            self.timers.add(now + STEP, Action::Send(confirm(0xCD)));
            return;
        }
        match self.reachable(tag) {
            Ok(()) => {}
            Err(0xF0) => {
                // Held for a poll that never comes: the tag polls another
                // parent.
                bump(&self.stats.confirms_expired);
                let expire = now + Duration::from_millis(self.cfg.expire_ms);
                self.timers.add(expire, Action::Send(confirm(0xF0)));
                return;
            }
            Err(status) => {
                self.timers.add(now + STEP, Action::Send(confirm(status)));
                return;
            }
        }
        let awake = self.tags[tag].awake_until.is_some_and(|until| now <= until);
        if !awake {
            bump(&self.stats.confirms_expired);
            let expire = now + Duration::from_millis(self.cfg.expire_ms);
            self.timers.add(expire, Action::Send(confirm(0xF0)));
            return;
        }
        bump(&self.stats.confirms_ok);
        self.timers.add(now + STEP, Action::Send(confirm(0)));
        // A real tag would drop an offer it cannot read; so does this one
        // (the agent's result timeout then fires).
        let Ok(AppMessage::Offer(offer)) = app::decode(data) else {
            return;
        };
        let awake_ms = Duration::from_millis(self.cfg.awake_ms);
        let receiving = &mut self.tags[tag].receiving;
        if offer.segment == 0 {
            if receiving.is_none() {
                self.offers_at_once += 1;
                self.stats
                    .max_offers_at_once
                    .fetch_max(self.offers_at_once, Ordering::Relaxed);
            }
            *receiving = Some(Receiving {
                handle: offer.handle,
                task_id: offer.task_id.to_owned(),
                hash: offer.content_hash,
                next: 0,
                content: Vec::new(),
            });
        }
        let Some(r) = receiving
            .as_mut()
            .filter(|r| r.handle == offer.handle && r.next == offer.segment)
        else {
            // A segment out of order: the tag forgets the offer.
            if receiving.take().is_some() {
                self.offers_at_once = self.offers_at_once.saturating_sub(1);
            }
            return;
        };
        r.content.extend_from_slice(offer.content);
        r.next += 1;
        if r.next < offer.segments {
            // The tag keeps polling while an offer is incomplete.
            self.tags[tag].awake_until = Some(now + awake_ms);
            return;
        }
        let Some(done) = self.tags[tag].receiving.take() else {
            return;
        };
        bump(&self.stats.offers_received);
        let busy = self.rng.gen_bool(self.cfg.fail_rate.clamp(0.0, 1.0));
        let apply = Action::Apply {
            tag,
            handle: done.handle,
            task_id: done.task_id,
            hash: done.hash,
            busy,
        };
        self.timers
            .add(now + Duration::from_millis(self.cfg.apply_ms), apply);
    }

    fn on_action(&mut self, action: Action, now: Instant) {
        match action {
            Action::Send(frame) => self.write(&frame.encode()),
            Action::NetworkUp => {
                self.running = true;
                self.send(
                    znp::ZDO_STATE_CHANGE_IND,
                    FrameType::Areq,
                    vec![znp::DEV_ZB_COORD],
                );
            }
            Action::MoveChannel { channel, missed } => {
                let Some(mut nib) = self.nv.get(&nvid::NIB).and_then(|n| Nib::parse(n)) else {
                    return;
                };
                if nib.channel == channel {
                    return;
                }
                bump(&self.stats.channel_changes);
                nib.channel = channel;
                nib.channel_list = nv::channel_mask(&[channel]);
                nib.update_id = nib.update_id.wrapping_add(1);
                self.nv.insert(nvid::NIB, nib.encode(self.aligned()));
                for index in missed {
                    self.tags[index].lost_channel = true;
                }
            }
            Action::CheckIn(index) => {
                let interval = self.cfg.checkin_interval_ms.max(1);
                let jitter = interval / 5;
                let next = interval - jitter + self.rng.gen_range(0..=2 * jitter);
                self.timers
                    .add(now + Duration::from_millis(next), Action::CheckIn(index));
                if !self.running || self.registered.is_none() || self.pty.is_none() {
                    return;
                }
                if self.tags[index].lost_channel {
                    bump(&self.stats.checkins_lost);
                    return;
                }
                let tag = &mut self.tags[index];
                tag.awake_until = Some(now + Duration::from_millis(self.cfg.awake_ms));
                let message = AppMessage::CheckIn(CheckIn {
                    tag_id: &tag.id,
                    battery_mv: Some(tag.battery_mv),
                    rssi_dbm: Some(tag.rssi_dbm),
                    displayed: tag.displayed,
                });
                let nwk = tag.nwk;
                // Fake tag ids are short; the message fits.
                let data = message.encode().expect("check-in fits");
                bump(&self.stats.checkins_sent);
                self.send_incoming(nwk, &data);
            }
            Action::Apply {
                tag,
                handle,
                task_id,
                hash,
                busy,
            } => {
                self.offers_at_once = self.offers_at_once.saturating_sub(1);
                let status = if busy {
                    UpdateStatus::Busy
                } else {
                    self.display(tag, &task_id, hash);
                    UpdateStatus::Applied
                };
                let data = AppMessage::UpdateResult(UpdateResult { handle, status })
                    .encode()
                    .expect("a result fits");
                bump(&self.stats.results_sent);
                let nwk = self.tags[tag].nwk;
                self.send_incoming(nwk, &data);
            }
        }
    }

    fn display(&mut self, tag: usize, task_id: &str, hash: app::ContentHash) {
        self.tags[tag].displayed = Some(hash);
        if let Some(journal) = &mut self.journal {
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let line = serde_json::json!({
                "tag_id": self.tags[tag].id,
                "task_id": task_id,
                "content_hash": app::hash_to_hex(&hash),
                "at": at,
            });
            let _ = writeln!(journal, "{line}");
        }
    }

    /// An `AF_INCOMING_MSG` from tag `nwk` to our endpoint.
    fn send_incoming(&mut self, nwk: u16, data: &[u8]) {
        let Some(endpoint) = self.registered else {
            return;
        };
        let mut payload = vec![0, 0];
        payload.extend(ESL_CLUSTER.to_le_bytes());
        payload.extend(nwk.to_le_bytes());
        payload.extend([TAG_ENDPOINT, endpoint, 0, 200, 0]);
        payload.extend([0, 0, 0, 0, 0]); // timestamp, sequence number
        payload.push(data.len() as u8);
        payload.extend(data);
        // Z-Stack 3 appends the MAC source address and the radius.
        payload.extend(nwk.to_le_bytes());
        payload.push(0);
        self.send(znp::AF_INCOMING_MSG, FrameType::Areq, payload);
    }
}

/// Reads what the agent wrote; never resolves while unplugged.
async fn read_master(pty: Option<&Pty>, buf: &mut [u8]) -> io::Result<usize> {
    let Some(pty) = pty else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = pty.master.readable().await?;
        match guard.try_io(|file| file.get_ref().read(buf)) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// NV status of a missing item (`SYS_OSAL_NV_WRITE`), and of a created one
/// (`SYS_OSAL_NV_ITEM_INIT`).
const NV_ITEM_UNINIT: u8 = 0x09;
const NV_OPER_FAILED: u8 = 0x0A;

/// Items a "clear network state" start-up option removes.
const NETWORK_STATE_ITEMS: [u16; 7] = [
    nvid::ADDRMGR,
    nvid::NIB,
    nvid::NWKKEY,
    nvid::NWK_ACTIVE_KEY_INFO,
    nvid::BDBNODEISONANETWORK,
    nvid::HAS_CONFIGURED_ZSTACK3,
    nvid::HAS_CONFIGURED_ZSTACK1,
];
/// Items a "clear configuration" start-up option sets back to defaults.
const CONFIG_ITEMS: [u16; 12] = [
    nvid::PANID,
    nvid::CHANLIST,
    nvid::EXTENDED_PAN_ID,
    nvid::APS_USE_EXT_PANID,
    nvid::PRECFGKEY,
    nvid::PRECFGKEYS_ENABLE,
    nvid::NWK_CHILD_AGE_ENABLE,
    nvid::CONCENTRATOR_ENABLE,
    nvid::CONCENTRATOR_DISCOVERY,
    nvid::CONCENTRATOR_RC,
    nvid::SRC_RTG_EXPIRY_TIME,
    nvid::ZDO_DIRECT_CB,
];

/// A factory-fresh stick's NV memory: firmware defaults, no network.
fn default_nv() -> HashMap<u16, Vec<u8>> {
    HashMap::from([
        (nvid::EXTADDR, FAKE_IEEE.to_le_bytes().to_vec()),
        (nvid::STARTUP_OPTION, vec![0]),
        (nvid::LOGICAL_TYPE, vec![0]),
        (nvid::PANID, vec![0xFF, 0xFF]),
        // Channel 11.
        (nvid::CHANLIST, vec![0x00, 0x08, 0x00, 0x00]),
        (nvid::EXTENDED_PAN_ID, vec![0xDD; 8]),
        (nvid::APS_USE_EXT_PANID, vec![0; 8]),
        (
            nvid::PRECFGKEY,
            vec![
                0x01, 0x03, 0x05, 0x07, 0x09, 0x0B, 0x0D, 0x0F, 0x00, 0x02, 0x04, 0x06, 0x08, 0x0A,
                0x0C, 0x0D,
            ],
        ),
        (nvid::PRECFGKEYS_ENABLE, vec![1]),
        // Child aging on, no concentrator: the firmware defaults a host
        // must change for sleepy tags.
        (nvid::NWK_CHILD_AGE_ENABLE, vec![1]),
        (nvid::CONCENTRATOR_ENABLE, vec![0]),
        (nvid::CONCENTRATOR_DISCOVERY, vec![0]),
        (nvid::CONCENTRATOR_RC, vec![0]),
        (nvid::SRC_RTG_EXPIRY_TIME, vec![0]),
        (nvid::ZDO_DIRECT_CB, vec![0]),
    ])
}

/// Entries of the address manager and the TCLK table: room for every
/// configured tag and 16 that join later.
fn table_size(cfg: &FakeConfig) -> u16 {
    u16::try_from(cfg.tags.saturating_add(16))
        .unwrap_or(u16::MAX)
        .max(ADDRMGR_MIN)
}

/// Stores `network` as the firmware would after forming it.
fn store_network(
    nv: &mut HashMap<u16, Vec<u8>>,
    ex_nv: &mut HashMap<(u16, u16), Vec<u8>>,
    cfg: &FakeConfig,
    network: &FakeNetwork,
) {
    let firmware = cfg.firmware;
    let size = table_size(cfg);
    // The frame counter: Z-Stack 3.30+ keeps it in the security-material
    // table (a global entry, then the network's), 1.2 after the key in
    // NWKKEY.
    let entry = |counter: u32, ext: u64| {
        let mut e = counter.to_le_bytes().to_vec();
        e.extend(ext.to_le_bytes());
        e
    };
    match firmware {
        FakeFirmware::ZStack3x => {
            for sub in 0..size {
                let empty = [0xFF; nv::ADDRMGR_ENTRY_LEN].to_vec();
                ex_nv.insert((nvid::EX_ADDRMGR, sub), empty);
            }
            ex_nv.insert((nvid::EX_NWK_SEC_MATERIAL_TABLE, 0), entry(7, u64::MAX));
            ex_nv.insert(
                (nvid::EX_NWK_SEC_MATERIAL_TABLE, 1),
                entry(0, network.extended_pan_id),
            );
        }
        FakeFirmware::ZStack12 => {
            let mut item = vec![0];
            item.extend(network.network_key);
            item.extend(0u32.to_le_bytes());
            nv.insert(nvid::NWKKEY, item);
        }
        FakeFirmware::ZStack30 => {}
    }
    if firmware != FakeFirmware::ZStack12 {
        // The trust centre's link-key seed (a real stick draws it at
        // random).
        let seed: [u8; 16] =
            std::array::from_fn(|i| (network.extended_pan_id >> (8 * (i % 8))) as u8 ^ i as u8);
        nv.insert(nvid::TCLK_SEED, seed.to_vec());
    }
    if firmware == FakeFirmware::ZStack3x {
        for sub in 0..size {
            let empty = vec![0; nv::TCLK_ENTRY_LEN];
            ex_nv.insert((nvid::EX_TCLK_TABLE, sub), empty);
        }
    } else {
        // Empty packed entries: user type 0, no addresses.
        let mut empty = vec![0x00];
        empty.extend([0xFF; nv::ADDRMGR_ENTRY_LEN_PACKED - 1]);
        nv.insert(nvid::ADDRMGR, empty.repeat(usize::from(size)));
    }
    match firmware {
        FakeFirmware::ZStack3x | FakeFirmware::ZStack12 => {}
        FakeFirmware::ZStack30 => {
            let first = nvid::LEGACY_NWK_SEC_MATERIAL_TABLE_START;
            nv.insert(first, entry(7, u64::MAX));
            nv.insert(first + 1, entry(0, network.extended_pan_id));
        }
    }
    let nib = Nib {
        security_level: 5,
        channel: network.channel,
        pan_id: network.pan_id,
        channel_list: nv::channel_mask(&[network.channel]),
        extended_pan_id: network.extended_pan_id,
        key_loaded: true,
        update_id: 0,
    };
    // 32-bit CC26x2 aligns the NIB; 8-bit CC2531 packs it.
    nv.insert(nvid::NIB, nib.encode(firmware == FakeFirmware::ZStack3x));
    nv.insert(nvid::PRECFGKEY, network.network_key.to_vec());
    if firmware != FakeFirmware::ZStack12 {
        let mut key_info = vec![0];
        key_info.extend(network.network_key);
        nv.insert(nvid::NWK_ACTIVE_KEY_INFO, key_info);
        nv.insert(nvid::BDBNODEISONANETWORK, vec![1]);
    }
}

/// The network in the NV memory, read as the host reads it.
fn read_network(nv: &HashMap<u16, Vec<u8>>) -> Option<FakeNetwork> {
    let nib = Nib::parse(nv.get(&nvid::NIB)?)?;
    if !nib.is_formed() {
        return None;
    }
    let key = match nv.get(&nvid::NWK_ACTIVE_KEY_INFO) {
        Some(info) => info.get(1..17)?.try_into().ok()?,
        None => nv.get(&nvid::PRECFGKEY)?.get(..16)?.try_into().ok()?,
    };
    Some(FakeNetwork {
        channel: nib.channel,
        pan_id: nib.pan_id,
        extended_pan_id: nib.extended_pan_id,
        network_key: key,
    })
}
