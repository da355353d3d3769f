//! The end-to-end harness: a real Mosquitto broker, the real `esl-agent`
//! binary and a back end built on rumqttc, each owned by one struct that
//! cleans up after itself on `Drop`.
//!
//! Layout (one owner per resource, as in the agent; this file holds the
//! shared constants, task builders, wait helper and [`Stack`]):
//! - `env.rs`: [`TestEnv`] owns the temp dir. On a failing test it keeps the
//!   dir and prints the tail of the agent and broker logs.
//! - `broker.rs`: [`Broker`] owns the `mosquitto` process (config, log,
//!   persistence dir) and reads its log.
//! - `agent.rs`: [`AgentConfig`] renders `agent.toml`; [`Agent`] owns one
//!   `esl-agent run` process; restarts append to one log.
//! - `backend.rs`: [`Backend`] owns a rumqttc client; a spawned task polls
//!   its event loop and forwards received publishes through a channel.
//! - `acks.rs`, `journal.rs`: what the assertions read; `checks.rs`: the
//!   checks several scenarios share, so each rule is written once.
//! - `process.rs`: signals and bounded waits for child processes.
//! - `secure.rs`: test PKI, broker logins/ACL/TLS listener, a TLS
//!   WebSocket front and the task-signing script, for `security.rs`.
//! - ZigBee: with [`TestRadio::Zigbee`] the stack also owns a fake ZNP
//!   coordinator (`esl_hal::zigbee::fake`) on a PTY that the agent opens as
//!   its serial port; it simulates the same tags as the simulator would.
//!   [`on_every_radio!`] runs a scenario once per radio.
//!
//! Waiting is always "until a condition or a deadline", never a bare sleep:
//! a test must fail when the agent misbehaves, not when the machine is slow.
//! The broker's debug log (`log_type all`) is a second, agent-independent
//! witness: it shows when the agent subscribed and how many tasks it PUBACKed.

mod acks;
mod agent;
mod backend;
mod broker;
mod checks;
mod env;
mod journal;
mod process;
mod secure;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use esl_hal::zigbee::fake::{FakeConfig, FakeCoordinator};
use serde_json::{json, Value};
use tokio::time::Instant;

pub use acks::{AckLog, AckStatus};
pub use agent::{toml_path, Agent, AgentConfig, TestRadio};
pub use backend::{publish_task_with, Backend};
pub use broker::{Broker, BrokerOptions};
pub use checks::{
    assert_content_hash_consistent, assert_journal_matches, assert_latest_per_tag_applied,
};
pub use env::TestEnv;
pub use secure::{
    agent_acl, sign_with_script, write_private, BrokerSecurity, CertFiles, LegacyTlsServer, Pki,
    ServerCert, TlsListener, WssFront, BACKEND_PASSWORD, BACKEND_USER, INTRUDER_PASSWORD,
    INTRUDER_USER,
};

/// Where Debian installs the broker. The tests fail (never skip) without it.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// `{group_id}@@@{device_id}` of the agent under test.
pub const AGENT_CLIENT_ID: &str = "GID_test@@@dev1";
/// The back end the agent acks to when a task names no `reply_to`.
pub const BACKEND_ID: &str = "GID_backend@@@be1";
pub const TASK_TOPIC: &str = "esl_task/p2p/GID_test@@@dev1";
pub const STATUS_TOPIC: &str = "esl_status/GID_test@@@dev1";
pub const CMD_TOPIC: &str = "esl_cmd/p2p/GID_test@@@dev1";
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

/// A fake ZNP coordinator with the simulated tags `config` describes, its
/// PTY linked at `config.zigbee_port` and its journal at `config.journal`
/// (the journal of the first run; the fake keeps it across agent runs).
fn start_fake_coordinator(config: &AgentConfig) -> FakeCoordinator {
    let mut fake = FakeConfig::new(&config.zigbee_port);
    fake.tags = config.tags as u32;
    fake.checkin_interval_ms = config.checkin_interval_ms;
    fake.fail_rate = config.fail_rate;
    fake.offline = config.offline.clone();
    fake.seed = config.seed;
    fake.journal = Some(config.journal.clone());
    // Tags listen long enough after a check-in that a loaded test machine
    // still gets its offer to them in time; sleeping tags are the unit
    // tests' subject (hal/src/zigbee/tests.rs).
    fake.awake_ms = 500;
    FakeCoordinator::start(fake).expect("start the fake ZigBee coordinator on a PTY")
}

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

pub(crate) fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("test bug: `{key}` is not a string in {v}"))
}

/// Runs `esl-agent ARGS --config CONFIG` (the operator's CLI) off the async
/// runtime and returns what it printed.
pub async fn run_cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_esl-agent"))
            .args(&args)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run the esl-agent binary")
    })
    .await
    .expect("CLI thread")
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

/// Broker, back end `GID_backend@@@be1` and a ready agent in a fresh temp
/// dir: what every scenario starts from. Fields drop in declaration order,
/// so the processes are gone before `env` prints their logs.
pub struct Stack {
    pub agent: Agent,
    pub backend: Backend,
    pub broker: Broker,
    /// The fake ZigBee coordinator, when the agent drives
    /// [`TestRadio::Zigbee`]. It outlives agent restarts, as a stick does.
    pub zigbee: Option<FakeCoordinator>,
    /// The config of the current agent run.
    pub config: AgentConfig,
    pub env: TestEnv,
    /// Agent runs so far; each run writes its own journal file.
    runs: usize,
}

/// What differs between scenarios besides the agent's config.
#[derive(Debug, Clone, Copy)]
pub struct StackOptions {
    pub broker: BrokerOptions,
    /// `false` gives the back end a session that outlives its connection.
    pub backend_clean_session: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            broker: BrokerOptions::default(),
            backend_clean_session: true,
        }
    }
}

impl Stack {
    /// [`Stack::start_with`] with default options.
    pub async fn start(name: &str, tweak: impl FnOnce(&mut AgentConfig)) -> Stack {
        Stack::start_with(name, StackOptions::default(), tweak).await
    }

    /// Starts everything with the default agent config changed by `tweak`;
    /// the back end listens before the agent starts, so it sees the hello.
    pub async fn start_with(
        name: &str,
        options: StackOptions,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> Stack {
        let env = TestEnv::new(name);
        let broker = Broker::start(&env, options.broker).await;
        let backend = Backend::connect(&broker, BACKEND_ID, options.backend_clean_session).await;
        let mut config = AgentConfig::new(&env, &broker);
        tweak(&mut config);
        let zigbee = (config.radio == TestRadio::Zigbee).then(|| start_fake_coordinator(&config));
        let agent = Agent::start_ready(&env, &broker, &config).await;
        Stack {
            agent,
            backend,
            broker,
            zigbee,
            config,
            env,
            runs: 1,
        }
    }

    /// [`Stack::start`] on `radio`.
    pub async fn start_on(
        radio: TestRadio,
        name: &str,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> Stack {
        let name = format!("{name}-{radio:?}").to_lowercase();
        Stack::start(&name, |c| {
            c.radio = radio;
            tweak(c);
        })
        .await
    }

    /// The fake coordinator; panics on a simulated-radio stack.
    pub fn fake(&self) -> &FakeCoordinator {
        self.zigbee
            .as_ref()
            .expect("test bug: this stack runs the simulated radio")
    }

    /// Publishes `tasks`, waits up to `timeout` for their final acks, keeps
    /// listening for [`QUIET`], and checks that each task has exactly one
    /// final ack. Returns every ack received.
    pub async fn settle(&mut self, tasks: &[Value], timeout: Duration) -> AckLog {
        self.backend.publish_tasks(tasks).await;
        let ids = task_ids(tasks);
        let mut acks = self.backend.collect_final_acks(&ids, timeout).await;
        acks.extend(self.backend.acks_within(QUIET).await);
        acks.assert_exactly_one_final_each(&ids);
        acks
    }

    /// Starts the next agent run on the same store after
    /// [`Agent::terminate`], with the config changed by `tweak` and a journal
    /// file of its own. Does not wait for the agent to subscribe.
    pub fn start_next_agent(&mut self, tweak: impl FnOnce(&mut AgentConfig)) {
        assert!(self.agent.has_exited(), "terminate the running agent first");
        self.runs += 1;
        self.config.journal = self.env.journal_path(self.runs);
        tweak(&mut self.config);
        self.agent = Agent::start(&self.env, &self.config);
    }
}

/// Runs each scenario `async fn NAME(radio: TestRadio)` once per radio, as
/// the tests `NAME::sim` and `NAME::zigbee`: the ZigBee path must pass the
/// same end-to-end scenarios as the simulator.
#[macro_export]
macro_rules! on_every_radio {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use $crate::harness::TestRadio;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sim() {
                    super::$name(TestRadio::Sim).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn zigbee() {
                    super::$name(TestRadio::Zigbee).await
                }
            }
        )*
    };
}
