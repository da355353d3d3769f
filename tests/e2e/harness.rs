//! The end-to-end harness: a real Mosquitto broker, the real `esl-agent`
//! binary and a back end built on rumqttc, each owned by one struct that
//! cleans up after itself on `Drop`.
//!
//! Layout (one owner per resource, as in the agent):
//! - [`TestEnv`] owns the temp dir. On a failing test it keeps the dir and
//!   prints the tail of the agent and broker logs.
//! - [`Broker`] owns the `mosquitto` process (config, log, persistence dir).
//! - [`AgentConfig`] renders `agent.toml`; tests change fields before a start.
//! - [`Agent`] owns one `esl-agent run` process; restarts append to one log.
//! - [`Backend`] owns a rumqttc client. A spawned task polls its event loop and
//!   forwards every received publish through an unbounded channel; the
//!   test side sorts them into acks, replies and status reports.
//! - [`AckLog`] and [`Journal`] are what the assertions read; the checks the
//!   scenarios share live here so each rule is written once.
//!
//! Waiting is always "until a condition or a deadline", never a bare sleep:
//! a test must fail when the agent misbehaves, not when the machine is slow.
//! The broker's debug log (`log_type all`) is a second, agent-independent
//! witness: it shows when the agent subscribed and how many tasks it PUBACKed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where Debian installs the broker. The tests fail (never skip) without it.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// `{group_id}@@@{device_id}` of the agent under test.
pub const AGENT_CLIENT_ID: &str = "GID_test@@@dev1";
/// The back end the agent acks to when a task names no `reply_to`.
pub const BACKEND_ID: &str = "GID_backend@@@be1";
pub const TASK_TOPIC: &str = "esl_task/p2p/GID_test@@@dev1";
pub const STATUS_TOPIC: &str = "esl_status/GID_test@@@dev1";
/// Number of simulated tags in the default config (`SIM000000`…`SIM000007`).
pub const TAGS: usize = 8;
/// How long to keep listening after the expected acks arrived, to catch
/// acks that must not exist (a second final ack, an ack to the wrong target).
pub const QUIET: Duration = Duration::from_millis(700);
/// SIGTERM to exit (PROTOCOL §9).
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 150;
/// How often the polling waits look again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Milliseconds since the Unix epoch, as in `issued_at`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

/// Id of simulated tag `i` with the default `id_prefix` (PROTOCOL §8).
pub fn sim_tag(i: usize) -> String {
    format!("SIM{i:06}")
}

/// A valid task (PROTOCOL §4) issued now, valid for an hour. Its content
/// names the task, so no two tasks share content: an agent may ack a task
/// whose content the tag already shows without displaying it again, and
/// unique content keeps "displayed exactly once" checkable. Tests change
/// fields of the returned JSON to make the variants they need.
pub fn task(task_id: &str, tag_id: &str, seq: u64) -> Value {
    json!({
        "v": 1,
        "task_id": task_id,
        "tag_id": tag_id,
        "seq": seq,
        "issued_at": now_ms(),
        "ttl_ms": 3_600_000u64,
        "content": {"name": "Milk", "price": "9.90", "ref": task_id},
    })
}

/// The `task_id`s of `tasks`, in order.
pub fn task_ids(tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .map(|t| str_field(t, "task_id").to_owned())
        .collect()
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("test bug: `{key}` is not a string in {v}"))
}

/// Polls `probe` until it returns `Some` or `timeout` passes; panics with
/// `what` on timeout.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn send_signal(child: &Child, signal: Signal) {
    // The pid fits: Linux pids are below 2^22.
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
}

/// Waits for `child` to exit, up to `timeout`, without blocking the runtime.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child we own") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn append_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Temp dir and failure report
// ---------------------------------------------------------------------------

/// One test's private directory: configs, logs, store, journal, broker data.
///
/// Declare it first in a test (or use [`Stack`]) so it is dropped last: its
/// `Drop` prints the log tails after the processes are gone.
pub struct TestEnv {
    dir: Option<tempfile::TempDir>,
    name: String,
}

impl TestEnv {
    pub fn new(name: &str) -> TestEnv {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "the end-to-end tests need the Mosquitto broker at {MOSQUITTO} \
             (Debian/Ubuntu: `apt-get install mosquitto`); it is missing, so test `{name}` cannot run"
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("esl-e2e-{name}-"))
            .tempdir()
            .expect("create a temp dir");
        TestEnv {
            dir: Some(dir),
            name: name.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("the dir lives until drop").path()
    }

    pub fn agent_log(&self) -> PathBuf {
        self.path().join("agent.log")
    }

    pub fn broker_log(&self) -> PathBuf {
        self.path().join("mosquitto.log")
    }

    /// Journal file of agent run `run` (1-based). Each run writes its own
    /// file, so the tests do not depend on whether the simulator appends to
    /// or truncates an existing journal; [`TestEnv::journal`] reads them all.
    pub fn journal_path(&self, run: usize) -> PathBuf {
        self.path().join(format!("journal-{run}.jsonl"))
    }

    /// Everything the simulated tags displayed so far, over all runs.
    pub fn journal(&self) -> Journal {
        Journal::read_dir(self.path())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            eprintln!(
                "\n===== {}: last {LOG_TAIL_LINES} lines of the agent log =====\n{}",
                self.name,
                tail(&self.agent_log(), LOG_TAIL_LINES)
            );
            eprintln!(
                "===== {}: last {LOG_TAIL_LINES} lines of the broker log =====\n{}",
                self.name,
                tail(&self.broker_log(), LOG_TAIL_LINES)
            );
        }
        if failed || std::env::var_os("ESL_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "===== {}: files kept in {} =====",
                    self.name,
                    dir.keep().display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The usual set-up
// ---------------------------------------------------------------------------

/// Broker, back end `GID_backend@@@be1` and a ready agent in a fresh temp
/// dir: what most scenarios start from. Fields drop in declaration order, so
/// the processes are gone before `env` prints their logs.
pub struct Stack {
    pub agent: Agent,
    pub backend: Backend,
    pub broker: Broker,
    pub env: TestEnv,
}

impl Stack {
    /// Starts everything with the default config changed by `tweak`; the
    /// back end listens before the agent starts, so it sees the hello.
    pub async fn start(name: &str, tweak: impl FnOnce(&mut AgentConfig)) -> Stack {
        let env = TestEnv::new(name);
        let broker = Broker::start(&env, BrokerOptions::default()).await;
        let backend = Backend::connect(&broker, BACKEND_ID, true).await;
        let mut config = AgentConfig::new(&env, &broker);
        tweak(&mut config);
        let agent = Agent::start_ready(&env, &broker, &config).await;
        Stack {
            agent,
            backend,
            broker,
            env,
        }
    }
}

// ---------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerOptions {
    /// Keep sessions and queued messages across a broker restart
    /// (`persistence true`, saved when the broker gets SIGTERM).
    pub persistence: bool,
}

/// A Mosquitto process on a free loopback port, killed on drop.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    conf_path: PathBuf,
    log_path: PathBuf,
}

impl Broker {
    /// Starts a broker and waits until it accepts connections. A port taken
    /// between choosing and binding it is retried with another port.
    pub async fn start(env: &TestEnv, options: BrokerOptions) -> Broker {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let mut broker = Broker {
                child: None,
                port,
                conf_path: env.path().join("mosquitto.conf"),
                log_path: env.broker_log(),
            };
            fs::write(&broker.conf_path, broker_config(env.path(), port, options))
                .expect("write mosquitto.conf");
            match broker.spawn_and_wait().await {
                Ok(()) => return broker,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("mosquitto did not start on port {port}:\n{log}"),
            }
        }
        panic!("mosquitto could not bind a free port in {ATTEMPTS} attempts");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the broker with SIGTERM (it saves its persistence file then).
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("stop() on a running broker");
        send_signal(&child, Signal::SIGTERM);
        if wait_exit(&mut child, Duration::from_secs(5))
            .await
            .is_none()
        {
            kill_and_reap(&mut child);
            panic!("mosquitto ignored SIGTERM for 5 s");
        }
    }

    /// Starts the stopped broker again on the same port with the same config.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs a stopped broker");
        if let Err(log) = self.spawn_and_wait().await {
            panic!("mosquitto did not restart on port {}:\n{log}", self.port);
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let since = self.log_len();
        let log = append_log(&self.log_path);
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let child = self.child.as_mut().expect("set above");
            if let Some(status) = child.try_wait().expect("try_wait on our broker") {
                self.child = None;
                return Err(format!(
                    "mosquitto exited with {status}; log:\n{}",
                    self.log_since(since)
                ));
            }
            // "mosquitto version 2.0.11 running" comes after the listener is open.
            if self.log_since(since).contains(" running")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not accepting after 10 s; log:\n{}",
                    self.log_since(since)
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Current length of the broker log, to look only at what follows.
    pub fn log_len(&self) -> usize {
        fs::metadata(&self.log_path)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// The broker log from byte `since` on.
    pub fn log_since(&self, since: usize) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(since..).unwrap_or_default()).into_owned()
    }

    /// How many task (or command) messages the agent has PUBACKed, counted
    /// from the broker's log. A PUBACK means "stored" (PROTOCOL §4.1).
    pub fn pubacks_from_agent(&self) -> usize {
        let needle = format!("Received PUBACK from {AGENT_CLIENT_ID} (");
        self.log_since(0).matches(&needle).count()
    }

    /// Waits until the agent has PUBACKed at least `n` messages in total.
    pub async fn wait_pubacks_from_agent(&self, n: usize, timeout: Duration) {
        let what = format!("the agent to PUBACK {n} messages (broker log)");
        eventually(&what, timeout, || {
            (self.pubacks_from_agent() >= n).then_some(())
        })
        .await;
    }

    /// Whether the agent's subscription to its task topic with QoS 1 was
    /// confirmed after byte `since` of the log.
    pub fn agent_subscribed_since(&self, since: usize) -> bool {
        let log = self.log_since(since);
        let topic_line = format!("\t{TASK_TOPIC} (QoS 1)");
        let suback = format!("Sending SUBACK to {AGENT_CLIENT_ID}");
        match log.find(&topic_line) {
            Some(at) => log[at..].contains(&suback),
            None => false,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

fn broker_config(dir: &Path, port: u16, options: BrokerOptions) -> String {
    let data = dir.join("mosquitto-data");
    fs::create_dir_all(&data).expect("create the broker data dir");
    // Run as root, Mosquitto drops to user `mosquitto`, which cannot write
    // into our 0700 temp dir; `user root` keeps it as it is.
    let running_as_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let user = if running_as_root { "user root\n" } else { "" };
    format!(
        "# Written by the esl-agent end-to-end harness.\n\
         {user}\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         max_queued_messages 100000\n\
         max_inflight_messages 20\n\
         persistence {persistence}\n\
         persistence_location {data}/\n\
         autosave_interval 1\n\
         log_dest stderr\n\
         log_type all\n\
         log_timestamp_format %H:%M:%S\n",
        persistence = options.persistence,
        data = data.display(),
    )
}

// ---------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------

/// The agent's config file (PROTOCOL §9), with the values the tests use.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub port: u16,
    pub clean_session: bool,
    pub ack_to: String,
    pub keepalive_s: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub store: PathBuf,
    pub default_ttl_ms: u64,
    pub max_attempts: u32,
    pub status_interval_s: u64,
    pub max_payload: usize,
    pub tags: usize,
    pub checkin_interval_ms: u64,
    pub fail_rate: f64,
    pub offline: Vec<String>,
    pub seed: u64,
    pub journal: PathBuf,
}

impl AgentConfig {
    pub fn new(env: &TestEnv, broker: &Broker) -> AgentConfig {
        AgentConfig {
            port: broker.port(),
            clean_session: true,
            ack_to: BACKEND_ID.to_owned(),
            keepalive_s: 5,
            reconnect_min_ms: 100,
            reconnect_max_ms: 1000,
            store: env.path().join("store"),
            default_ttl_ms: 3_600_000,
            max_attempts: 3,
            status_interval_s: 60,
            max_payload: 65_536,
            tags: TAGS,
            checkin_interval_ms: 100,
            fail_rate: 0.0,
            offline: Vec::new(),
            seed: 1,
            journal: env.journal_path(1),
        }
    }

    pub fn to_toml(&self) -> String {
        // JSON strings and arrays of strings are valid TOML basic strings/arrays.
        let s = |v: &str| Value::from(v).to_string();
        let p = |v: &Path| s(&v.display().to_string());
        format!(
            "[mqtt]\n\
             host = \"127.0.0.1\"\n\
             port = {port}\n\
             group_id = \"GID_test\"\n\
             device_id = \"dev1\"\n\
             clean_session = {clean_session}\n\
             ack_to = {ack_to}\n\
             p2p_subscribe = true\n\
             keepalive_s = {keepalive_s}\n\
             reconnect_min_ms = {reconnect_min_ms}\n\
             reconnect_max_ms = {reconnect_max_ms}\n\
             \n\
             [store]\n\
             path = {store}\n\
             \n\
             [tasks]\n\
             default_ttl_ms = {default_ttl_ms}\n\
             max_attempts = {max_attempts}\n\
             \n\
             [status]\n\
             interval_s = {status_interval_s}\n\
             \n\
             [limits]\n\
             max_payload = {max_payload}\n\
             \n\
             [radio]\n\
             kind = \"sim\"\n\
             \n\
             [radio.sim]\n\
             tags = {tags}\n\
             checkin_interval_ms = {checkin_interval_ms}\n\
             fail_rate = {fail_rate:?}\n\
             offline = {offline}\n\
             seed = {seed}\n\
             journal = {journal}\n",
            port = self.port,
            clean_session = self.clean_session,
            ack_to = s(&self.ack_to),
            keepalive_s = self.keepalive_s,
            reconnect_min_ms = self.reconnect_min_ms,
            reconnect_max_ms = self.reconnect_max_ms,
            store = p(&self.store),
            default_ttl_ms = self.default_ttl_ms,
            max_attempts = self.max_attempts,
            status_interval_s = self.status_interval_s,
            max_payload = self.max_payload,
            tags = self.tags,
            checkin_interval_ms = self.checkin_interval_ms,
            fail_rate = self.fail_rate,
            offline = Value::from(self.offline.clone()),
            seed = self.seed,
            journal = p(&self.journal),
        )
    }
}

/// One `esl-agent run` process. Killed (SIGKILL) on drop if still running.
pub struct Agent {
    child: Option<Child>,
}

impl Agent {
    /// Writes `agent.toml` from `config` and starts the binary; output of
    /// all runs goes to the env's `agent.log`. Does not wait for anything.
    pub fn start(env: &TestEnv, config: &AgentConfig) -> Agent {
        let config_path = env.path().join("agent.toml");
        fs::write(&config_path, config.to_toml()).expect("write agent.toml");
        let mut log = append_log(&env.agent_log());
        let _ = writeln!(
            log,
            "===== e2e harness: starting esl-agent (config below) =====\n{}",
            config.to_toml()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_esl-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "esl_agent=debug,info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start the esl-agent binary");
        Agent { child: Some(child) }
    }

    /// Starts the agent and waits until the broker confirmed its QoS 1
    /// subscription to the task topic, so tasks published now reach it.
    pub async fn start_ready(env: &TestEnv, broker: &Broker, config: &AgentConfig) -> Agent {
        let since = broker.log_len();
        let mut agent = Agent::start(env, config);
        agent
            .wait_subscribed(broker, since, Duration::from_secs(15))
            .await;
        agent
    }

    /// Waits until the broker log after byte `since` shows the agent's
    /// confirmed subscription to `esl_task/p2p/GID_test@@@dev1` with QoS 1.
    pub async fn wait_subscribed(&mut self, broker: &Broker, since: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if broker.agent_subscribed_since(since) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not subscribe to {TASK_TOPIC} with QoS 1 within {timeout:?} (broker log)"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Panics if the agent process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("the agent was started");
        if let Some(status) = child.try_wait().expect("try_wait on our agent") {
            panic!("the agent exited unexpectedly with {status}");
        }
    }

    /// Sends SIGTERM and requires a clean exit (status 0) within
    /// [`SHUTDOWN_DEADLINE`] (PROTOCOL §9).
    pub async fn terminate(&mut self) {
        let mut child = self.child.take().expect("terminate() on a running agent");
        send_signal(&child, Signal::SIGTERM);
        match wait_exit(&mut child, SHUTDOWN_DEADLINE).await {
            Some(status) => assert!(
                status.success(),
                "the agent exited with {status} after SIGTERM, expected 0"
            ),
            None => {
                kill_and_reap(&mut child);
                panic!("the agent did not exit within {SHUTDOWN_DEADLINE:?} of SIGTERM");
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                if std::thread::panicking() {
                    eprintln!("(the agent had exited with {status})");
                }
            }
            kill_and_reap(child);
        }
    }
}

// ---------------------------------------------------------------------------
// Acks
// ---------------------------------------------------------------------------

/// `status` of an ack (PROTOCOL §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AckStatus {
    Accepted,
    Applied,
    Failed,
    Expired,
    Superseded,
    Rejected,
}

impl AckStatus {
    fn parse(s: &str) -> Option<AckStatus> {
        Some(match s {
            "accepted" => AckStatus::Accepted,
            "applied" => AckStatus::Applied,
            "failed" => AckStatus::Failed,
            "expired" => AckStatus::Expired,
            "superseded" => AckStatus::Superseded,
            "rejected" => AckStatus::Rejected,
            _ => return None,
        })
    }

    /// Every status but the optional `accepted` progress report is final.
    pub fn is_final(self) -> bool {
        self != AckStatus::Accepted
    }
}

/// One ack as received, checked against PROTOCOL §5 when parsed.
#[derive(Debug, Clone)]
pub struct Ack {
    pub topic: String,
    pub json: Value,
}

fn protocol_violation(rule: &str, what: &impl std::fmt::Display) -> ! {
    panic!("PROTOCOL §5 violated ({rule}): {what}")
}

impl Ack {
    fn parse(message: Received) -> Ack {
        let json: Value = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
            protocol_violation(
                "an ack is JSON",
                &format!(
                    "{e} in {:?} on {}",
                    String::from_utf8_lossy(&message.payload),
                    message.topic
                ),
            )
        });
        if json["v"] != json!(1) {
            protocol_violation("\"v\":1", &json);
        }
        if json["type"] != "ack" {
            protocol_violation("\"type\":\"ack\"", &json);
        }
        if json["agent"] != AGENT_CLIENT_ID {
            protocol_violation("\"agent\" is the agent's client id", &json);
        }
        if json["status"].as_str().and_then(AckStatus::parse).is_none() {
            protocol_violation("status is one of the listed values", &json);
        }
        // Milliseconds, not seconds: anything before 2020 is a unit error.
        if !json["at"].as_u64().is_some_and(|at| at > 1_577_836_800_000) {
            protocol_violation("\"at\" is ms since the epoch", &json);
        }
        if json["attempts"].as_u64().is_none() {
            protocol_violation("\"attempts\" is a count", &json);
        }
        if !json["duplicate"].is_boolean() {
            protocol_violation("\"duplicate\" is a boolean", &json);
        }
        for key in ["task_id", "tag_id", "content_hash", "detail"] {
            match json.get(key) {
                Some(Value::Null) | Some(Value::String(_)) => {}
                _ => protocol_violation(&format!("\"{key}\" is present, a string or null"), &json),
            }
        }
        Ack {
            topic: message.topic,
            json,
        }
    }

    pub fn task_id(&self) -> Option<&str> {
        self.json["task_id"].as_str()
    }

    pub fn tag_id(&self) -> Option<&str> {
        self.json["tag_id"].as_str()
    }

    pub fn status(&self) -> AckStatus {
        // Checked in `parse`.
        AckStatus::parse(self.json["status"].as_str().unwrap_or_default())
            .expect("validated in parse")
    }

    pub fn attempts(&self) -> u64 {
        self.json["attempts"].as_u64().expect("validated in parse")
    }

    pub fn at(&self) -> u64 {
        self.json["at"].as_u64().expect("validated in parse")
    }

    pub fn content_hash(&self) -> Option<&str> {
        self.json["content_hash"].as_str()
    }

    pub fn detail(&self) -> Option<&str> {
        self.json["detail"].as_str()
    }

    pub fn duplicate(&self) -> bool {
        self.json["duplicate"]
            .as_bool()
            .expect("validated in parse")
    }
}

/// All acks a back end collected, with the questions the scenarios ask.
#[derive(Debug, Default, Clone)]
pub struct AckLog {
    acks: Vec<Ack>,
}

impl IntoIterator for AckLog {
    type Item = Ack;
    type IntoIter = std::vec::IntoIter<Ack>;

    fn into_iter(self) -> Self::IntoIter {
        self.acks.into_iter()
    }
}

impl AckLog {
    pub fn extend(&mut self, acks: impl IntoIterator<Item = Ack>) {
        self.acks.extend(acks);
    }

    /// Final acks for `task_id`, in arrival order.
    pub fn finals(&self, task_id: &str) -> Vec<&Ack> {
        self.acks
            .iter()
            .filter(|a| a.status().is_final() && a.task_id() == Some(task_id))
            .collect()
    }

    pub fn has_final(&self, task_id: &str) -> bool {
        !self.finals(task_id).is_empty()
    }

    /// The final ack of `task_id`. A task has exactly one final status; an
    /// ack may be published more than once (PROTOCOL §5), so every copy must
    /// say the same thing.
    pub fn final_ack(&self, task_id: &str) -> &Ack {
        let finals = self.finals(task_id);
        let first = *finals
            .first()
            .unwrap_or_else(|| panic!("no final ack for {task_id}; got: {}", self.summary()));
        for other in &finals[1..] {
            let same = other.status() == first.status()
                && other.tag_id() == first.tag_id()
                && other.content_hash() == first.content_hash()
                && other.attempts() == first.attempts();
            assert!(
                same,
                "task {task_id} got two different final acks:\n  {}\n  {}",
                first.json, other.json
            );
        }
        first
    }

    pub fn status(&self, task_id: &str) -> AckStatus {
        self.final_ack(task_id).status()
    }

    /// Stricter than PROTOCOL §5 ("at least once"), for runs without
    /// reconnects or restarts: every task got exactly one final ack.
    pub fn assert_exactly_one_final_each(&self, task_ids: &[String]) {
        for id in task_ids {
            let finals = self.finals(id);
            assert_eq!(
                finals.len(),
                1,
                "task {id} should have exactly one final ack, got: {:#?}",
                finals.iter().map(|a| &a.json).collect::<Vec<_>>()
            );
            assert!(
                !finals[0].duplicate(),
                "first ack of {id} says duplicate: {}",
                finals[0].json
            );
        }
    }

    /// Count of final acks per status, for failure messages.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<AckStatus, usize> = BTreeMap::new();
        for ack in &self.acks {
            *counts.entry(ack.status()).or_default() += 1;
        }
        format!("{} acks, by status {counts:?}", self.acks.len())
    }
}

// ---------------------------------------------------------------------------
// Back end
// ---------------------------------------------------------------------------

/// One message the back end received.
#[derive(Debug)]
struct Received {
    topic: String,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ack,
    Reply,
    Status,
    Other,
}

impl Received {
    fn kind(&self) -> Kind {
        if self.topic.starts_with("esl_status/") {
            Kind::Status
        } else if self.topic.starts_with("esl_ack/") {
            // Acks and command replies share the reply topic (PROTOCOL §3).
            let is_reply =
                serde_json::from_slice::<Value>(&self.payload).is_ok_and(|v| v["type"] == "reply");
            if is_reply {
                Kind::Reply
            } else {
                Kind::Ack
            }
        } else {
            Kind::Other
        }
    }
}

/// Messages received but not yet asked for, by kind.
#[derive(Default)]
struct Inbox {
    acks: VecDeque<Received>,
    replies: VecDeque<Received>,
    statuses: VecDeque<Received>,
    other: VecDeque<Received>,
}

impl Inbox {
    fn queue(&mut self, kind: Kind) -> &mut VecDeque<Received> {
        match kind {
            Kind::Ack => &mut self.acks,
            Kind::Reply => &mut self.replies,
            Kind::Status => &mut self.statuses,
            Kind::Other => &mut self.other,
        }
    }
}

/// The store back end: publishes tasks, receives acks and status reports.
///
/// Subscribes QoS 1 to `esl_ack/p2p/{client_id}` and `esl_status/#` after
/// every CONNACK, so it keeps listening across broker restarts whether or
/// not the broker kept its session.
pub struct Backend {
    pub client_id: String,
    client: AsyncClient,
    received_rx: mpsc::UnboundedReceiver<Received>,
    inbox: Inbox,
    subacks_rx: watch::Receiver<usize>,
    poller: JoinHandle<()>,
}

/// Requests the back end may queue before `publish` waits: more than the
/// largest burst a scenario sends, so bursts are not paced by the channel.
const BACKEND_REQUEST_CAPACITY: usize = 1024;

impl Backend {
    /// Connects and waits until the broker confirmed the subscriptions.
    pub async fn connect(broker: &Broker, client_id: &str, clean_session: bool) -> Backend {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(clean_session)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(options, BACKEND_REQUEST_CAPACITY);
        let (received_tx, received_rx) = mpsc::unbounded_channel();
        let (subacks_tx, subacks_rx) = watch::channel(0);
        let subscriptions = vec![
            SubscribeFilter::new(format!("esl_ack/p2p/{client_id}"), QoS::AtLeastOnce),
            SubscribeFilter::new("esl_status/#".to_owned(), QoS::AtLeastOnce),
        ];
        let poller = tokio::spawn(poll_events(
            eventloop,
            client.clone(),
            subscriptions,
            received_tx,
            subacks_tx,
        ));
        let backend = Backend {
            client_id: client_id.to_owned(),
            client,
            received_rx,
            inbox: Inbox::default(),
            subacks_rx,
            poller,
        };
        backend.wait_subscribed(1, Duration::from_secs(10)).await;
        backend
    }

    /// Number of SUBACKs so far: one per (re)connection.
    pub fn subscriptions_confirmed(&self) -> usize {
        *self.subacks_rx.borrow()
    }

    /// Waits until `n` subscriptions were confirmed in total, i.e. the back
    /// end is (re)connected and listening.
    pub async fn wait_subscribed(&self, n: usize, timeout: Duration) {
        let mut rx = self.subacks_rx.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "back end {} not subscribed ({n} SUBACKs) within {timeout:?}",
            self.client_id
        );
    }

    /// A handle for publishing from another task (bursts paced in parallel).
    pub fn client(&self) -> AsyncClient {
        self.client.clone()
    }

    pub async fn publish_task(&self, task: &Value) {
        publish_task_with(&self.client, task).await;
    }

    /// Publishes arbitrary bytes on the agent's task topic, QoS 1.
    pub async fn publish_raw(&self, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(TASK_TOPIC, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue a publish on the back end");
    }

    async fn next_of(&mut self, kind: Kind, deadline: Instant) -> Option<Received> {
        loop {
            if let Some(message) = self.inbox.queue(kind).pop_front() {
                return Some(message);
            }
            match tokio::time::timeout_at(deadline, self.received_rx.recv()).await {
                Ok(Some(message)) => self.inbox.queue(message.kind()).push_back(message),
                Ok(None) => panic!("the back end's MQTT event loop task ended"),
                Err(_) => return None,
            }
        }
    }

    /// The next final ack; panics naming `what` if none comes in `timeout`.
    pub async fn expect_final_ack(&mut self, what: &str, timeout: Duration) -> Ack {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(message) = self.next_of(Kind::Ack, deadline).await else {
                panic!("no final ack for {what} within {timeout:?}");
            };
            let ack = Ack::parse(message);
            if ack.status().is_final() {
                return ack;
            }
        }
    }

    /// Every ack that arrives within `window`.
    pub async fn acks_within(&mut self, window: Duration) -> Vec<Ack> {
        let deadline = Instant::now() + window;
        let mut acks = Vec::new();
        while let Some(message) = self.next_of(Kind::Ack, deadline).await {
            acks.push(Ack::parse(message));
        }
        acks
    }

    /// Panics if a final ack arrives within `window`.
    pub async fn expect_no_final_ack(&mut self, window: Duration, why: &str) {
        let unexpected: Vec<Value> = self
            .acks_within(window)
            .await
            .into_iter()
            .filter(|a| a.status().is_final())
            .map(|a| a.json)
            .collect();
        assert!(unexpected.is_empty(), "{why}, but got: {unexpected:#?}");
    }

    /// Collects acks until every task in `task_ids` has a final ack; panics
    /// after `timeout` listing what is missing. Returns everything collected.
    pub async fn collect_final_acks(&mut self, task_ids: &[String], timeout: Duration) -> AckLog {
        let deadline = Instant::now() + timeout;
        let mut log = AckLog::default();
        let mut missing: BTreeSet<&str> = task_ids.iter().map(String::as_str).collect();
        while !missing.is_empty() {
            let Some(message) = self.next_of(Kind::Ack, deadline).await else {
                let shown: Vec<&&str> = missing.iter().take(20).collect();
                panic!(
                    "after {timeout:?}, {} of {} tasks have no final ack (first: {shown:?}); received {}",
                    missing.len(),
                    task_ids.len(),
                    log.summary()
                );
            };
            let ack = Ack::parse(message);
            if ack.status().is_final() {
                if let Some(id) = ack.task_id() {
                    missing.remove(id);
                }
            }
            log.acks.push(ack);
        }
        log
    }

    /// The next status report from the agent (PROTOCOL §6), checked to be
    /// JSON with `"type":"status"` on the agent's status topic.
    async fn next_status(&mut self, deadline: Instant) -> Option<Value> {
        let message = self.next_of(Kind::Status, deadline).await?;
        assert_eq!(
            message.topic, STATUS_TOPIC,
            "status report on an unexpected topic"
        );
        let status: Value = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
            panic!(
                "status report is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&message.payload)
            )
        });
        assert_eq!(
            status["type"], "status",
            "status report without \"type\":\"status\": {status}"
        );
        Some(status)
    }

    /// The next status report of `kind` (`hello`, `periodic`); panics
    /// after `timeout`.
    pub async fn expect_status(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(status) = self.next_status(deadline).await else {
                panic!("no \"{kind}\" status report on {STATUS_TOPIC} within {timeout:?}");
            };
            if status["kind"] == kind {
                return status;
            }
        }
    }

    /// Collects `hello` reports (which may come in chunks) until every tag
    /// in `tags` has a record; returns the records by tag id. The panic
    /// message shows the hello reports that did arrive.
    pub async fn expect_hello_tags(
        &mut self,
        tags: &[String],
        timeout: Duration,
    ) -> BTreeMap<String, Value> {
        let deadline = Instant::now() + timeout;
        let mut records = BTreeMap::new();
        let mut hellos = Vec::new();
        while !tags.iter().all(|t| records.contains_key(t)) {
            let Some(status) = self.next_status(deadline).await else {
                panic!(
                    "within {timeout:?} the hello reports listed only tags {:?}, expected {tags:?}; \
                     hello reports received: {hellos:#?}",
                    records.keys()
                );
            };
            if status["kind"] != "hello" {
                continue;
            }
            let list = status["tags"]
                .as_array()
                .unwrap_or_else(|| panic!("hello report without a \"tags\" array: {status}"));
            for record in list {
                let id = record["tag_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("tag record without a string tag_id: {record}"));
                records.insert(id.to_owned(), record.clone());
            }
            hellos.push(status);
        }
        records
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// Publishes `task` as JSON on the agent's task topic, QoS 1.
pub async fn publish_task_with(client: &AsyncClient, task: &Value) {
    let payload = serde_json::to_vec(task).expect("a JSON value serializes");
    client
        .publish(TASK_TOPIC, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue a publish on the back end");
}

/// The back end's event loop. Never awaits a client request (that could
/// deadlock on a full request channel): subscribes with `try_subscribe_many`.
async fn poll_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<SubscribeFilter>,
    received_tx: mpsc::UnboundedSender<Received>,
    subacks_tx: watch::Sender<usize>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Subscriptions are not restored by rumqttc; ask after every
                // CONNACK (harmless when the broker kept the session).
                let _ = client.try_subscribe_many(subscriptions.clone());
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => subacks_tx.send_modify(|n| *n += 1),
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let message = Received {
                    topic: publish.topic,
                    payload: publish.payload.to_vec(),
                };
                if received_tx.send(message).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            // The next poll reconnects at once; pace the retries while the
            // broker is down.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------------------
// Journal
// ---------------------------------------------------------------------------

/// One line of the simulator's journal (PROTOCOL §8).
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub tag_id: String,
    pub task_id: String,
    pub content_hash: String,
}

/// What the simulated tags displayed, in order, over all agent runs.
#[derive(Debug, Default)]
pub struct Journal {
    pub entries: Vec<JournalEntry>,
}

impl Journal {
    /// Reads `journal-*.jsonl` in `dir` in run order. A last line without a
    /// newline may still be being written and is skipped.
    fn read_dir(dir: &Path) -> Journal {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .expect("read the test dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                name.starts_with("journal-") && name.ends_with(".jsonl")
            })
            .collect();
        files.sort();
        let mut entries = Vec::new();
        for file in files {
            let text = fs::read_to_string(&file).expect("the journal is UTF-8");
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            for line in complete.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("journal line is not JSON ({e}): {line}"));
                let field = |key: &str| {
                    v[key]
                        .as_str()
                        .unwrap_or_else(|| panic!("journal line without string \"{key}\": {line}"))
                        .to_owned()
                };
                entries.push(JournalEntry {
                    tag_id: field("tag_id"),
                    task_id: field("task_id"),
                    content_hash: field("content_hash"),
                });
            }
        }
        Journal { entries }
    }

    pub fn count(&self, task_id: &str) -> usize {
        self.entries.iter().filter(|e| e.task_id == task_id).count()
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.count(task_id) > 0
    }

    /// What `tag_id` displays now, as far as the journal knows.
    pub fn last_for_tag(&self, tag_id: &str) -> Option<&JournalEntry> {
        self.entries.iter().rev().find(|e| e.tag_id == tag_id)
    }

    pub fn assert_no_task_twice(&self) {
        let mut seen = BTreeMap::<&str, usize>::new();
        for entry in &self.entries {
            *seen.entry(&entry.task_id).or_default() += 1;
        }
        let twice: Vec<_> = seen.into_iter().filter(|(_, n)| *n > 1).collect();
        assert!(
            twice.is_empty(),
            "tasks displayed more than once (task, times): {twice:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Checks shared by several scenarios
// ---------------------------------------------------------------------------

/// Per-tag ordering (PROTOCOL §4.5): for each tag, the task with the highest
/// `seq` is `applied`; every other task is `applied` or `superseded`. Every
/// final ack names the task's tag.
pub fn assert_latest_per_tag_applied(tasks: &[Value], acks: &AckLog) {
    let mut latest: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
    for t in tasks {
        let (id, tag) = (str_field(t, "task_id"), str_field(t, "tag_id"));
        let seq = t["seq"].as_u64().expect("test tasks carry a seq");
        let ack = acks.final_ack(id);
        assert_eq!(
            ack.tag_id(),
            Some(tag),
            "ack names the wrong tag: {}",
            ack.json
        );
        assert!(
            matches!(ack.status(), AckStatus::Applied | AckStatus::Superseded),
            "task {id} should be applied or superseded: {}",
            ack.json
        );
        let entry = latest.entry(tag).or_insert((seq, id));
        if seq > entry.0 {
            *entry = (seq, id);
        }
    }
    for (tag, (_, id)) in latest {
        assert_eq!(
            acks.status(id),
            AckStatus::Applied,
            "the newest task {id} for {tag} must be applied: {}",
            acks.final_ack(id).json
        );
    }
}

/// The journal agrees with the acks: no task displayed twice, nothing
/// foreign; every `applied` task displayed once, on its tag, with the ack's
/// content hash — or not at all when its tag already showed that content
/// (the agent may skip a redundant delivery); each tag ends up showing the
/// content of its newest task.
pub fn assert_journal_matches(tasks: &[Value], acks: &AckLog, journal: &Journal) {
    journal.assert_no_task_twice();
    let ids: BTreeSet<&str> = tasks.iter().map(|t| str_field(t, "task_id")).collect();
    for entry in &journal.entries {
        assert!(
            ids.contains(entry.task_id.as_str()),
            "journal shows an unknown task: {entry:?}"
        );
    }
    let mut newest: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
    for t in tasks {
        let (id, tag) = (str_field(t, "task_id"), str_field(t, "tag_id"));
        let ack = acks.final_ack(id);
        if ack.status() == AckStatus::Applied {
            let hash = ack.content_hash();
            match journal.entries.iter().find(|e| e.task_id == id) {
                Some(shown) => {
                    assert_eq!(shown.tag_id, tag, "task {id} displayed on the wrong tag");
                    assert_eq!(
                        Some(shown.content_hash.as_str()),
                        hash,
                        "journal and ack disagree on the content hash of {id}"
                    );
                }
                None => assert!(
                    journal
                        .entries
                        .iter()
                        .any(|e| e.tag_id == tag && Some(e.content_hash.as_str()) == hash),
                    "task {id} was acked applied, but {tag} never displayed it \
                     (nor any other task with content hash {hash:?})"
                ),
            }
        }
        let seq = t["seq"].as_u64().expect("test tasks carry a seq");
        let entry = newest.entry(tag).or_insert((seq, id));
        if seq > entry.0 {
            *entry = (seq, id);
        }
    }
    for (tag, (_, id)) in newest {
        let shown = journal.last_for_tag(tag).map(|e| e.content_hash.as_str());
        assert_eq!(
            shown,
            acks.final_ack(id).content_hash(),
            "{tag} should end up showing the content of its newest task {id}"
        );
    }
}

/// `content_hash` depends on the content only (PROTOCOL §5): equal content,
/// equal hash; different content, different hash.
pub fn assert_content_hash_consistent(tasks: &[Value], acks: &AckLog) {
    let mut by_content: BTreeMap<String, &str> = BTreeMap::new();
    let mut by_hash: BTreeMap<&str, String> = BTreeMap::new();
    for t in tasks {
        let ack = acks.final_ack(str_field(t, "task_id"));
        let Some(hash) = ack.content_hash() else {
            assert_ne!(
                ack.status(),
                AckStatus::Applied,
                "applied ack without content_hash: {}",
                ack.json
            );
            continue;
        };
        // serde_json's default map is sorted, so this string is canonical.
        let content = t["content"].to_string();
        let known = *by_content.entry(content.clone()).or_insert(hash);
        assert_eq!(known, hash, "equal content {content} got different hashes");
        let known = by_hash.entry(hash).or_insert(content.clone());
        assert_eq!(*known, content, "different contents share the hash {hash}");
    }
}
