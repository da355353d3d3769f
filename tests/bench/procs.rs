//! The processes a benchmark run owns: one Mosquitto with raised queue
//! limits and quiet logging, and `esl-agent run` child processes. Also the
//! readings taken from outside the agent: its control socket (counters),
//! `/proc` (peak RSS, CPU time) and the store's size on disk.
//!
//! Not the e2e harness's `Broker`/`Agent`: those log every packet
//! (`log_type all`) and detect readiness from that log, which at 100 000
//! messages would make the broker's logging the thing measured.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::Instant;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// How often waits look again; small next to the figures measured (seconds).
pub const POLL: Duration = Duration::from_millis(20);
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which Linux fixes at
/// 100 for user space on every architecture.
const USER_HZ: f64 = 100.0;

/// Kills and reaps a child; used on drop so a failed run leaves nothing.
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub struct Broker {
    child: Child,
    pub port: u16,
}

impl Broker {
    /// Starts Mosquitto on a free loopback port. `inflight` is its
    /// `max_inflight_messages` (QoS 1 messages out to one client without
    /// PUBACK); the queue limit is raised so no QoS 1 message is dropped.
    pub async fn start(dir: &Path, inflight: u32) -> anyhow::Result<Broker> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let running_as_root = fs::metadata("/proc/self").map(|m| m.uid() == 0)?;
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 max_queued_messages 0\n\
                 max_queued_bytes 0\n\
                 max_inflight_messages {inflight}\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n",
                user = if running_as_root { "user root\n" } else { "" },
            ),
        )?;
        let log = fs::File::create(dir.join("mosquitto.log"))?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {MOSQUITTO} (apt-get install mosquitto)"))?;
        let mut broker = Broker { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = broker.child.try_wait()? {
                bail!(
                    "mosquitto exited with {status}; see {}",
                    dir.join("mosquitto.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("mosquitto not listening on {port} after 10 s");
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// What one agent run is configured with.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub dir: PathBuf,
    pub port: u16,
    pub client_id_device: String,
    pub ack_to: String,
    pub clean_session: bool,
    pub tags: usize,
    pub checkin_interval_ms: u64,
    pub apply_ms: u64,
    pub outbox_window: u32,
    pub cache_mb: u64,
}

impl AgentSpec {
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn to_toml(&self) -> String {
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ngroup_id = \"GID_bench\"\n\
             device_id = \"{device}\"\nclean_session = {clean}\nack_to = \"{ack_to}\"\n\
             keepalive_s = 30\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n\
             outbox_window = {window}\n\n\
             [store]\npath = \"{store}\"\ncache_mb = {cache_mb}\n\n\
             [tasks]\ndefault_ttl_ms = 3600000\n\n\
             [status]\ninterval_s = 3600\n\n\
             [log]\nlevel = \"warn\"\n\n\
             [control]\nsocket = \"{socket}\"\n\n\
             [radio]\nkind = \"sim\"\n\n\
             [radio.sim]\ntags = {tags}\ncheckin_interval_ms = {checkin}\napply_ms = {apply}\nseed = 7\n",
            port = self.port,
            device = self.client_id_device,
            clean = self.clean_session,
            ack_to = self.ack_to,
            store = self.store().display(),
            socket = self.socket().display(),
            tags = self.tags,
            checkin = self.checkin_interval_ms,
            apply = self.apply_ms,
            window = self.outbox_window,
            cache_mb = self.cache_mb,
        )
    }
}

/// One `esl-agent run` process.
pub struct AgentProc {
    child: Option<Child>,
    socket: PathBuf,
    pub spawned_at: Instant,
    /// Bytes written over the process's whole life (write_bytes minus
    /// cancelled_write_bytes, from `wait4`'s `ru_oublock`), once stopped:
    /// includes what it wrote while stopping (SQLite's final checkpoint).
    pub written_at_exit: Option<u64>,
}

impl AgentProc {
    pub fn start(bin: &Path, spec: &AgentSpec) -> anyhow::Result<AgentProc> {
        fs::create_dir_all(&spec.dir)?;
        let conf = spec.dir.join("agent.toml");
        fs::write(&conf, spec.to_toml())?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join("agent.log"))?;
        let spawned_at = Instant::now();
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        Ok(AgentProc {
            child: Some(child),
            socket: spec.socket(),
            spawned_at,
            written_at_exit: None,
        })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.child.as_ref().context("agent already stopped")?.id())
    }

    /// `agent.status` over the control socket (counters, pending, outbox).
    pub async fn status(&mut self) -> anyhow::Result<Value> {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            bail!("the agent exited with {status} (see agent.log)");
        }
        let mut stream = UnixStream::connect(&self.socket).await?;
        stream
            .write_all(
                b"{\"v\":1,\"req_id\":\"bench\",\"method\":\"agent.status\",\"params\":{}}\n",
            )
            .await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        let reply: Value = serde_json::from_str(&line)?;
        Ok(reply["result"].clone())
    }

    /// A counter from `agent.status`.
    pub async fn counter(&mut self, name: &str) -> anyhow::Result<u64> {
        let s = self.status().await?;
        s["counters"][name]
            .as_u64()
            .with_context(|| format!("agent.status has no counter {name}: {s}"))
    }

    /// Waits until the control socket answers (the engine runs).
    pub async fn wait_control(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.status().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("control socket after {timeout:?}")))
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        self.proc_status_kib("VmHWM:")
    }

    /// Current resident set size (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.proc_status_kib("VmRSS:")
    }

    fn proc_status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/<pid>/status"))
    }

    /// Bytes the agent has caused to be written to the block layer so far
    /// (`write_bytes` of `/proc/<pid>/io`: counted when a page cache page is
    /// dirtied, so a write that is never fsync'd counts as well), and the
    /// part of it cancelled by truncating dirty pages
    /// (`cancelled_write_bytes`).
    pub fn write_bytes(&self) -> anyhow::Result<(u64, u64)> {
        let io = fs::read_to_string(format!("/proc/{}/io", self.pid()?))?;
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no {name} in /proc/<pid>/io"))
        };
        Ok((field("write_bytes:")?, field("cancelled_write_bytes:")?))
    }

    /// Waits until the agent has written nothing for `quiet` (its deferred
    /// writes are done, as far as they happen without a stop), within
    /// `within`. Returns how long that took, or `None` (the caller reports
    /// the figure as unsettled; no timing makes a run fail).
    pub async fn settle_writes(
        &self,
        quiet: Duration,
        within: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        let started = Instant::now();
        let mut last = self.write_bytes()?;
        let mut last_change = started;
        while started.elapsed() < within {
            tokio::time::sleep(POLL * 5).await;
            let now = self.write_bytes()?;
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() >= quiet {
                return Ok(Some(started.elapsed()));
            }
        }
        Ok(None)
    }

    /// User + system CPU seconds used so far.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()?))?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(") ").context("bad /proc/<pid>/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i)
                .context("short /proc/<pid>/stat")?
                .parse::<f64>()?)
        };
        Ok((ticks(11)? + ticks(12)?) / USER_HZ)
    }

    /// SIGTERM, then waits for the exit (PROTOCOL §9: within 5 s). Returns
    /// how long it took.
    pub async fn terminate(&mut self) -> anyhow::Result<Duration> {
        let mut child = self.child.take().context("agent already stopped")?;
        let started = Instant::now();
        let pid = child.id() as i32;
        kill(Pid::from_raw(pid), Signal::SIGTERM)?;
        loop {
            if let Some((status, usage)) = wait4_nohang(pid)? {
                if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                    bail!("the agent exited with wait status {status:#x} after SIGTERM");
                }
                // Linux: ru_oublock = (write_bytes - cancelled_write_bytes) / 512.
                self.written_at_exit = Some(usage.ru_oublock as u64 * 512);
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(10) {
                kill_child(&mut child);
                bail!("the agent did not stop within 10 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_child(child);
        }
    }
}

/// Reaps `pid` if it has exited, with its resource usage (which
/// `Child::try_wait` does not give).
fn wait4_nohang(pid: i32) -> anyhow::Result<Option<(i32, libc::rusage)>> {
    let mut status = 0;
    // SAFETY: rusage is plain data for which all-zero bytes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; `pid` is our own child.
    match unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) } {
        0 => Ok(None),
        r if r == pid => Ok(Some((status, usage))),
        _ => Err(std::io::Error::last_os_error()).context("wait4 on the agent"),
    }
}

/// Bytes the files under `dir` take: (apparent length, allocated blocks).
pub fn dir_size(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (a, b) = dir_size(&entry.path())?;
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    Ok(total)
}

/// The SQLite store's database file and its write-ahead log.
const DB_FILE: &str = "store.sqlite3";
const WAL_FILE: &str = "store.sqlite3-wal";

/// (database, WAL) apparent sizes of a SQLite store; zeros for a store
/// without those files (the sled store of older builds).
pub fn db_and_wal(store: &Path) -> (u64, u64) {
    let len = |name| fs::metadata(store.join(name)).map(|m| m.len()).unwrap_or(0);
    (len(DB_FILE), len(WAL_FILE))
}
