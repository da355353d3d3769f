//! [`AgentConfig`] (renders `agent.toml`, PROTOCOL §9) and [`Agent`] (one
//! `esl-agent run` process of the binary under test, output appended to
//! `agent.log`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::time::Instant;

use super::process::{append_log, kill_and_reap, send_signal, wait_exit};
use super::{Broker, TestEnv, BACKEND_ID, POLL_INTERVAL, SHUTDOWN_DEADLINE, TAGS, TASK_TOPIC};

/// Which radio the agent under test drives. Both serve the same tags
/// (`SIM000000`…) with the same `tags`, `checkin_interval_ms`, `fail_rate`,
/// `offline`, `seed` and `journal` settings below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestRadio {
    /// `radio.kind = "sim"`: the agent simulates the tags itself.
    Sim,
    /// `radio.kind = "zigbee"`: the agent opens a PTY on which the test's
    /// fake ZNP coordinator simulates the tags (`Stack::zigbee`).
    Zigbee,
}

/// `[radio.zigbee]` timeouts for the tests: short, so a lost confirm or a
/// lost adapter shows within a second, yet far above what a PTY round trip
/// takes on a loaded machine.
pub const ZIGBEE_CONFIRM_TIMEOUT_MS: u64 = 800;

/// The agent's config file (PROTOCOL §9), with the values the tests use.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub host: String,
    pub radio: TestRadio,
    /// Where the fake coordinator's PTY link is (set by `Stack`).
    pub zigbee_port: PathBuf,
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
    /// Extra `key = value` lines for the `[mqtt]` table (TLS, login).
    pub mqtt_extra: Vec<String>,
    /// Extra tables appended to the file (`[security]`).
    pub extra: String,
    /// Environment of the agent process besides `RUST_LOG` (`secret_env`).
    pub env: Vec<(String, String)>,
    /// `RUST_LOG` of the agent process.
    pub log_filter: String,
    /// Replaces the whole `[radio]` section (the simulated tags above) when
    /// set, e.g. with BLE fake tags.
    pub radio_toml: Option<String>,
}

impl AgentConfig {
    pub fn new(env: &TestEnv, broker: &Broker) -> AgentConfig {
        AgentConfig {
            host: "127.0.0.1".to_owned(),
            radio: TestRadio::Sim,
            zigbee_port: env.path().join("ttyZB0"),
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
            mqtt_extra: Vec::new(),
            extra: String::new(),
            env: Vec::new(),
            log_filter: "esl_agent=debug,info".to_owned(),
            radio_toml: None,
        }
    }

    pub fn to_toml(&self) -> String {
        let (s, p) = (toml_str, toml_path);
        format!(
            "[mqtt]\n\
             host = {host}\n\
             port = {port}\n\
             group_id = \"GID_test\"\n\
             device_id = \"dev1\"\n\
             clean_session = {clean_session}\n\
             ack_to = {ack_to}\n\
             p2p_subscribe = true\n\
             keepalive_s = {keepalive_s}\n\
             reconnect_min_ms = {reconnect_min_ms}\n\
             reconnect_max_ms = {reconnect_max_ms}\n\
             {mqtt_extra}\
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
             {radio}\
             {extra}",
            host = s(&self.host),
            mqtt_extra = self
                .mqtt_extra
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            extra = self.extra,
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
            radio = self.radio_toml.clone().unwrap_or_else(|| self.sim_toml()),
        )
    }

    /// The `[radio]` section for the simulated tags.
    /// The `[radio]` section for [`TestRadio`]: both backends' tables, so
    /// switching `kind` is all a scenario changes.
    fn sim_toml(&self) -> String {
        format!(
            "[radio]\n\
             kind = {radio_kind}\n\
             \n\
             [radio.zigbee]\n\
             port = {zigbee_port}\n\
             sreq_timeout_ms = 1000\n\
             confirm_timeout_ms = {confirm_timeout_ms}\n\
             result_timeout_ms = 2000\n\
             ping_interval_ms = 500\n\
             reconnect_min_ms = 100\n\
             reconnect_max_ms = 500\n\
             \n\
             [radio.sim]\n\
             tags = {tags}\n\
             checkin_interval_ms = {checkin_interval_ms}\n\
             fail_rate = {fail_rate:?}\n\
             offline = {offline}\n\
             seed = {seed}\n\
             journal = {journal}\n",
            radio_kind = toml_str(match self.radio {
                TestRadio::Sim => "sim",
                TestRadio::Zigbee => "zigbee",
            }),
            zigbee_port = toml_path(&self.zigbee_port),
            confirm_timeout_ms = ZIGBEE_CONFIRM_TIMEOUT_MS,
            tags = self.tags,
            checkin_interval_ms = self.checkin_interval_ms,
            fail_rate = self.fail_rate,
            offline = Value::from(self.offline.clone()),
            seed = self.seed,
            journal = toml_path(&self.journal),
        )
    }
}

/// Runs another `esl-agent` binary than the one cargo built for this test,
/// e.g. the aarch64 cross build or the one a .deb installed (a relative
/// path is taken from the workspace root).
pub const AGENT_BIN_VAR: &str = "ESL_E2E_AGENT_BIN";
/// A program to run the binary with, e.g. `qemu-aarch64`.
pub const AGENT_RUNNER_VAR: &str = "ESL_E2E_AGENT_RUNNER";

/// The command that starts the agent under test: the binary cargo built
/// for this test unless [`AGENT_BIN_VAR`] names another, run through
/// [`AGENT_RUNNER_VAR`] when set.
fn agent_command() -> Command {
    // cargo runs tests in `agent/`: a relative path means the workspace root.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var_os(AGENT_BIN_VAR)
        .map(|p| workspace.join(p))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_esl-agent")));
    assert!(
        bin.is_file(),
        "{AGENT_BIN_VAR}: no agent binary at {}",
        bin.display()
    );
    match std::env::var_os(AGENT_RUNNER_VAR).filter(|r| !r.is_empty()) {
        Some(runner) => {
            let mut c = Command::new(runner);
            c.arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// A TOML basic string (a JSON string is one).
pub fn toml_str(v: &str) -> String {
    Value::from(v).to_string()
}

/// A path as a TOML basic string.
pub fn toml_path(v: &Path) -> String {
    toml_str(&v.display().to_string())
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
        let child = agent_command()
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", &config.log_filter)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
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

    /// Whether [`Agent::terminate`] has ended this run.
    pub fn has_exited(&self) -> bool {
        self.child.is_none()
    }

    /// How the agent process ended, if it has (without reaping a live one).
    #[allow(dead_code)] // used by tests/reliability, not by every harness user
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("try_wait on our agent")
    }

    /// Panics if the agent process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("the agent was started");
        if let Some(status) = child.try_wait().expect("try_wait on our agent") {
            panic!("the agent exited unexpectedly with {status}");
        }
    }

    /// SIGKILL, as in a crash or a power cut of the process (not of the
    /// machine: the page cache survives). Returns once the process is reaped.
    #[allow(dead_code)] // used by tests/reliability, not by every harness user
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("kill() on a running agent");
        kill_and_reap(&mut child);
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
