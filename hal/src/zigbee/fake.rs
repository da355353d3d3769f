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
//! What it speaks: `SYS_PING`, `SYS_RESET_REQ` → `SYS_RESET_IND`,
//! `UTIL_GET_DEVICE_INFO`, `ZDO_STARTUP_FROM_APP` → `ZDO_STATE_CHANGE_IND`,
//! `AF_REGISTER`, `AF_DATA_REQUEST` → `AF_DATA_CONFIRM`, and
//! `AF_INCOMING_MSG` for the tags' check-ins and results; any other SREQ gets
//! an RPC error. Tags check in only while the coordinator runs with the ESL
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

use super::app::{self, AppMessage, CheckIn, UpdateResult, UpdateStatus, ESL_CLUSTER};
use super::frame::{Frame, FrameDecoder, FrameType};
use super::znp::{self, Command};

/// Control requests waiting for the fake, at most: tests send a handful.
const CONTROL_CAPACITY: usize = 16;
/// The first tag's network address; tag `i` has `FIRST_NWK + i`.
const FIRST_NWK: u16 = 0x1000;
/// Endpoint of the ESL application on every tag.
const TAG_ENDPOINT: u8 = 1;
/// Time the fake takes for an SRSP-less step (reset, network start, confirm
/// of an awake tag).
const STEP: Duration = Duration::from_millis(5);

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
                    nwk: FIRST_NWK + i as u16,
                    awake_until: None,
                    receiving: None,
                    displayed: None,
                    battery_mv: rng.gen_range(2900..3100),
                    rssi_dbm: rng.gen_range(-90..-40),
                }
            })
            .collect();
        let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let stats = Arc::new(FakeStats::default());
        let link = cfg.link.clone();
        let task = FakeTask {
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
    nwk: u16,
    awake_until: Option<Instant>,
    /// The offer being received, segment by segment.
    receiving: Option<Receiving>,
    displayed: Option<app::ContentHash>,
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
            Control::Silent(silent) => self.silent = silent,
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
        if znp::SYS_RESET_REQ.is(&frame, FrameType::Areq) {
            bump(&self.stats.resets);
            self.running = false;
            self.registered = None;
            // Reason 0 (power-up), transport 2, product 1, Z-Stack 2.7.1.
            let ind = znp::SYS_RESET_IND.frame(FrameType::Areq, vec![0, 2, 1, 2, 7, 1]);
            self.timers
                .add(now + STEP, Action::Send(ind.expect("fits")));
            return;
        }
        if frame.kind() != Some(FrameType::Sreq) {
            return;
        }
        if znp::SYS_PING.is(&frame, FrameType::Sreq) {
            bump(&self.stats.pings);
            self.send(znp::SYS_PING, FrameType::Srsp, vec![0x59, 0x06]);
        } else if znp::UTIL_GET_DEVICE_INFO.is(&frame, FrameType::Sreq) {
            let state = if self.running { znp::DEV_ZB_COORD } else { 0 };
            let mut info = vec![0];
            info.extend(0x00124B00_11223344u64.to_le_bytes());
            info.extend([0x00, 0x00, 0x07, state, 0]);
            self.send(znp::UTIL_GET_DEVICE_INFO, FrameType::Srsp, info);
        } else if znp::ZDO_STARTUP_FROM_APP.is(&frame, FrameType::Sreq) {
            bump(&self.stats.startups);
            self.send(znp::ZDO_STARTUP_FROM_APP, FrameType::Srsp, vec![0]);
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

    fn on_data_request(&mut self, payload: &[u8], now: Instant) {
        bump(&self.stats.data_requests);
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
            *receiving = None;
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
            Action::CheckIn(index) => {
                let interval = self.cfg.checkin_interval_ms.max(1);
                let jitter = interval / 5;
                let next = interval - jitter + self.rng.gen_range(0..=2 * jitter);
                self.timers
                    .add(now + Duration::from_millis(next), Action::CheckIn(index));
                if !self.running || self.registered.is_none() || self.pty.is_none() {
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
