//! `esl-agent demo`: the whole flow on one machine with no set-up
//! (PROTOCOL §9). An embedded broker, the real agent with simulated tags,
//! and a simulated back end that sends price changes; a live progress line;
//! a summary that checks every message got its final ack.
//!
//! # Layout
//!
//! - `demo/broker.rs` — rumqttd in this process, on a free loopback port.
//! - `demo/backend.rs` — the back end's MQTT client `GID_backend@@@pricing`.
//! - `demo/plan.rs` — what it sends: seeded price changes, a few malformed.
//! - `demo/ledger.rs` — what was sent, what came back; makes the [`DemoSummary`].
//! - `demo/report.rs` — the progress line and the summary's text.
//! - this file — options, wiring, and the back end's send-and-collect loop.
//!
//! The agent runs in-process through [`crate::start`], the same entry
//! point as `esl-agent run`, with a config built here and its store and tag
//! journal in a temp dir that is removed at the end.
//!
//! # Flow
//!
//! broker → back end subscribed → agent started → its `hello` status →
//! send at `--rate` while reading acks → stop when every message has its
//! final ack (or at the deadline, reporting what is missing as *lost*, which
//! is a bug; or on Ctrl-C) → `tags.list` for the tags' final state → agent
//! shut down → summary.

mod backend;
mod broker;
mod ledger;
mod plan;
mod report;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::clock::now_ms;
use crate::config::{
    Config, LimitsConfig, MqttConfig, RadioConfig, RadioKind, StatusConfig, StoreConfig,
    TasksConfig, TopicsConfig,
};
use crate::wire::AckStatus;
use backend::{Backend, BACKEND_ID};
use broker::EmbeddedBroker;
pub use ledger::TagRecord;
use ledger::{Ledger, Received};
use plan::Planned;
use report::{Progress, PROGRESS_TICK};

/// Delivery attempts per task before the agent acks `failed`.
const MAX_ATTEMPTS: u32 = 3;
/// The send loop wakes this often and catches up with `--rate`.
const SEND_TICK: Duration = Duration::from_millis(10);
/// After the last send, the longest wait for final acks beyond `--ttl-ms`.
const DEADLINE_GRACE: Duration = Duration::from_secs(10);
/// How long the agent may take to connect and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the `tags.list` reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// MQTT header and topic on top of the largest payload.
const PACKET_HEADROOM: usize = 1024;
/// Fresh broker ports tried if one is taken before rumqttd binds it.
const BROKER_ATTEMPTS: usize = 3;
const TAGS_REQ_ID: &str = "demo-tags";

#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {
    /// Messages the back end sends; every 50th is malformed on purpose.
    #[arg(long, default_value_t = 300)]
    pub tasks: usize,
    /// Simulated tags.
    #[arg(long, default_value_t = 50)]
    pub tags: u32,
    /// Messages per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Probability that one delivery attempt to a tag fails (3 attempts per task).
    #[arg(long, default_value_t = 0.05)]
    pub fail_rate: f64,
    /// Mean time between two check-ins of a tag, in ms.
    #[arg(long, default_value_t = 500)]
    pub checkin_ms: u64,
    /// The last N tags never check in, so their tasks expire.
    #[arg(long, default_value_t = 2)]
    pub offline: u32,
    /// Lifetime of every task, in ms.
    #[arg(long, default_value_t = 4000)]
    pub ttl_ms: u64,
    /// Seed of the plan and of the simulated tags, so runs repeat.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Show the agent's and the broker's logs.
    #[arg(long)]
    pub verbose: bool,
}

impl DemoOptions {
    fn check(&self) -> anyhow::Result<()> {
        ensure!(self.tasks >= 1, "--tasks: must be at least 1");
        ensure!(
            (1..=1_000_000).contains(&self.tags),
            "--tags: must be between 1 and 1000000"
        );
        ensure!(
            self.offline < self.tags,
            "--offline: must leave at least one of the {} tags online",
            self.tags
        );
        ensure!(
            self.rate.is_finite() && self.rate > 0.0,
            "--rate: must be a positive number"
        );
        ensure!(
            (0.0..=1.0).contains(&self.fail_rate),
            "--fail-rate: must be between 0 and 1"
        );
        ensure!(self.checkin_ms >= 1, "--checkin-ms: must be at least 1");
        ensure!(self.ttl_ms >= 1, "--ttl-ms: must be at least 1");
        Ok(())
    }
}

/// Final acks by status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcomes {
    pub applied: usize,
    pub failed: usize,
    pub expired: usize,
    pub superseded: usize,
    pub rejected: usize,
}

impl Outcomes {
    pub fn total(&self) -> usize {
        self.applied + self.failed + self.expired + self.superseded + self.rejected
    }

    fn count(&mut self, status: AckStatus) {
        match status {
            AckStatus::Applied => self.applied += 1,
            AckStatus::Failed => self.failed += 1,
            AckStatus::Expired => self.expired += 1,
            AckStatus::Superseded => self.superseded += 1,
            AckStatus::Rejected => self.rejected += 1,
            AckStatus::Accepted => {}
        }
    }
}

/// Publish → final ack, of applied tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// A tag's final state as the agent reported it, next to the newest price
/// the back end saw applied to it (content hash and label).
#[derive(Debug, Clone)]
pub struct TagLine {
    pub tag: TagRecord,
    pub last_applied: Option<(String, String)>,
}

/// What a demo run did, as the back end saw it.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// Messages published, the duplicate resend not included.
    pub sent: usize,
    /// Of those, broken on purpose.
    pub malformed: usize,
    pub outcomes: Outcomes,
    pub duplicate_resent: bool,
    /// Acks marked `"duplicate": true`.
    pub duplicates_seen: usize,
    /// Messages that never got their final ack. Must be 0.
    pub lost: usize,
    /// Messages still waiting when Ctrl-C stopped the run.
    pub unfinished: usize,
    /// The same final ack received again (allowed: at least once).
    pub repeated_acks: usize,
    /// A second, different final ack for one task. Must be 0.
    pub conflicting_acks: usize,
    /// Acks for unknown tasks and unreadable messages. Should be 0.
    pub unexpected_messages: usize,
    pub latency: Option<Latency>,
    pub elapsed: Duration,
    pub tags: Vec<TagLine>,
    pub example_ack: Option<String>,
    pub example_rejection: Option<String>,
}

/// `esl-agent demo`: runs the demo, prints the summary, fails if a message
/// was lost.
pub async fn run(o: DemoOptions) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    // The demo is a program of its own: its Ctrl-C (stop early, still
    // summarise) lives next to the run it stops; main.rs keeps the daemon's.
    let ctrl_c = tokio::spawn(stop_on_ctrl_c(stop.clone()));
    let summary = run_demo(&o, false, stop).await;
    ctrl_c.abort();
    let summary = summary?;
    println!("{summary}");
    if summary.lost > 0 || summary.conflicting_acks > 0 {
        bail!(
            "{} message(s) lost, {} conflicting ack(s): the agent broke PROTOCOL §5",
            summary.lost,
            summary.conflicting_acks
        );
    }
    Ok(())
}

async fn stop_on_ctrl_c(stop: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_ok() {
        eprintln!("\nCtrl-C: stopping early (press again to quit at once)");
        stop.cancel();
    }
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}

/// The demo without the terminal: `quiet` prints nothing, `stop` ends it
/// early (the summary still comes back).
pub async fn run_demo(
    o: &DemoOptions,
    quiet: bool,
    stop: CancellationToken,
) -> anyhow::Result<DemoSummary> {
    o.check()?;
    let dir = tempfile::Builder::new()
        .prefix("esl-agent-demo-")
        .tempdir()
        .context("cannot create a temp dir for the demo's store")?;
    let max_packet = LimitsConfig::default().max_payload + PACKET_HEADROOM;
    let (broker, backend) = start_broker_and_backend(max_packet).await?;

    let prefix = esl_hal::sim::SimConfig::default().id_prefix;
    let tag_ids: Vec<String> = (0..o.tags).map(|i| format!("{prefix}{i:06}")).collect();
    let offline = &tag_ids[(o.tags - o.offline) as usize..];
    let config = agent_config(o, broker.port, dir.path(), offline);
    config.validate().context("demo agent config")?;
    let shutdown = CancellationToken::new();
    let agent = crate::start(config, shutdown.clone())
        .await
        .context("cannot start the agent")?;
    let id = &agent.identity;
    if !quiet {
        println!(
            "esl-agent demo: embedded broker 127.0.0.1:{} · agent {} with {} simulated tags ({} offline) · back end {BACKEND_ID}",
            broker.port, id.client_id, o.tags, o.offline
        );
        println!(
            "sending {} messages at {}/s to {} (every {}th malformed on purpose); Ctrl-C stops early",
            o.tasks, o.rate, id.task_topic, plan::MALFORMED_EVERY
        );
    }

    let mut backend_run = BackendRun {
        o,
        plan: plan::make(o.tasks, &tag_ids, o.seed),
        task_topic: id.task_topic.clone(),
        cmd_topic: id.cmd_topic.clone(),
        backend,
        ledger: Ledger::new(),
        progress: Progress::new(quiet),
    };
    let started = Instant::now();
    let end = backend_run.run(&stop).await;
    let elapsed = started.elapsed();
    backend_run
        .progress
        .finish(&backend_run.ledger.progress_line(backend_run.plan.len()));

    shutdown.cancel();
    if let Err(e) = agent.wait().await {
        warn!("agent shutdown: {}", crate::report::chain(e.as_ref()));
    }
    backend_run.backend.disconnect().await;
    // The broker thread has no stop; it ends with the process.
    let end = end?;
    if end == End::BackendGone {
        warn!("the back end's connection ended before every ack came back");
    }
    Ok(backend_run.ledger.summary(elapsed, end == End::Stopped))
}

/// A broker and the back end connected to it. A broker that could not
/// listen (its port was taken after we picked it) is replaced.
async fn start_broker_and_backend(max_packet: usize) -> anyhow::Result<(EmbeddedBroker, Backend)> {
    let topics = TopicsConfig::default();
    let subscriptions = [
        format!("{}/p2p/{BACKEND_ID}", topics.reply_parent),
        format!("{}/#", topics.status_parent),
    ];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let broker = EmbeddedBroker::start(max_packet)?;
        match Backend::connect(&broker, &subscriptions, max_packet).await {
            Ok(backend) => return Ok((broker, backend)),
            Err(e) if broker.failed() && attempt < BROKER_ATTEMPTS => {
                warn!("{}; trying another port", crate::report::chain(e.as_ref()))
            }
            Err(e) => return Err(e),
        }
    }
}

fn agent_config(o: &DemoOptions, port: u16, dir: &Path, offline: &[String]) -> Config {
    Config {
        mqtt: MqttConfig {
            host: "127.0.0.1".into(),
            port,
            group_id: "GID_demo".into(),
            device_id: Some("ap-demo".into()),
            ack_to: BACKEND_ID.into(),
            keepalive_s: 30,
            reconnect_min_ms: 100,
            ..MqttConfig::default()
        },
        store: StoreConfig {
            path: dir.join("store"),
            ..StoreConfig::default()
        },
        tasks: TasksConfig {
            max_attempts: MAX_ATTEMPTS,
            ..TasksConfig::default()
        },
        status: StatusConfig {
            interval_s: 5,
            ..StatusConfig::default()
        },
        radio: RadioConfig {
            kind: RadioKind::Sim,
            sim: esl_hal::sim::SimConfig {
                tags: o.tags,
                checkin_interval_ms: o.checkin_ms,
                fail_rate: o.fail_rate,
                offline: offline.to_vec(),
                seed: o.seed,
                journal: Some(dir.join("tag-journal.jsonl")),
                ..esl_hal::sim::SimConfig::default()
            },
            ..RadioConfig::default()
        },
        ..Config::default()
    }
}

/// Why the back end stopped waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every message has its final ack.
    Settled,
    /// The deadline passed with acks missing.
    Deadline,
    /// Ctrl-C.
    Stopped,
    /// The back end's poller stopped.
    BackendGone,
}

/// The back end's side of one run: what it sends and where, its
/// connection, its backend_run and the progress line.
struct BackendRun<'a> {
    o: &'a DemoOptions,
    plan: Vec<Planned>,
    task_topic: String,
    cmd_topic: String,
    backend: Backend,
    ledger: Ledger,
    progress: Progress,
}

impl BackendRun<'_> {
    async fn run(&mut self, stop: &CancellationToken) -> anyhow::Result<End> {
        self.wait_for_hello(stop).await?;
        let end = self.send_and_collect(stop).await;
        self.fetch_tags().await;
        Ok(end)
    }

    /// Tasks sent before the agent subscribed would be dropped by the
    /// broker (clean session), so sending starts at its `hello`, which it
    /// publishes after queueing its SUBSCRIBE.
    async fn wait_for_hello(&mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        let deadline = Instant::now() + HELLO_TIMEOUT;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => bail!("the agent sent no hello status within {HELLO_TIMEOUT:?}"),
                msg = self.backend.recv() => match msg {
                    Some(m) if self.ledger.on_message(&m) == Received::Hello => return Ok(()),
                    Some(_) => {}
                    None => bail!("the back end's connection ended before the agent said hello"),
                },
            }
        }
    }

    /// Sends the plan at `--rate` and reads acks until every message has
    /// its final ack, the deadline passes, or `stop`.
    async fn send_and_collect(&mut self, stop: &CancellationToken) -> End {
        let started = Instant::now();
        let mut next = 0;
        let mut deadline = None;
        let mut send_tick = tokio::time::interval(SEND_TICK);
        let mut progress_tick = tokio::time::interval(PROGRESS_TICK);
        loop {
            if next == self.plan.len() && self.ledger.unresolved() == 0 {
                return End::Settled;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return End::Stopped,
                msg = self.backend.recv() => match msg {
                    Some(m) => {
                        self.ledger.on_message(&m);
                    }
                    None => return End::BackendGone,
                },
                _ = send_tick.tick() => {
                    let due = (started.elapsed().as_secs_f64() * self.o.rate) as usize + 1;
                    next = self.send_until(next, due.min(self.plan.len()));
                    if next == self.plan.len() && deadline.is_none() {
                        deadline = Some(Instant::now() + Duration::from_millis(self.o.ttl_ms) + DEADLINE_GRACE);
                    }
                }
                _ = progress_tick.tick() => self.progress.show(&self.ledger.progress_line(self.plan.len())),
                _ = sleep_until_some(deadline) => return End::Deadline,
            }
        }
    }

    /// Publishes plan messages `next..due` (fewer when rumqttc's queue is
    /// full: the next tick goes on) and the duplicate once it is due.
    /// Returns the new `next`.
    fn send_until(&mut self, mut next: usize, due: usize) -> usize {
        while next < due {
            let payload = self.plan[next].payload(now_ms(), self.o.ttl_ms);
            if !self.backend.try_publish(&self.task_topic, payload.clone()) {
                break;
            }
            self.ledger
                .record_sent(&self.plan[next], payload, std::time::Instant::now());
            next += 1;
        }
        if let Some(payload) = self.ledger.duplicate_to_send() {
            if self.backend.try_publish(&self.task_topic, payload) {
                self.ledger.duplicate_sent();
            }
        }
        next
    }

    /// Asks the agent for its tags (a `tags.list` command), so the summary
    /// shows their state after the last ack rather than at the last
    /// periodic report. Without a reply, the last status report stands.
    async fn fetch_tags(&mut self) {
        let request = serde_json::json!({
            "v": 1, "req_id": TAGS_REQ_ID, "method": "tags.list",
            "params": {"limit": 500}, "reply": true, "reply_to": BACKEND_ID,
        });
        if !self
            .backend
            .try_publish(&self.cmd_topic, request.to_string().into_bytes())
        {
            return;
        }
        let _ = tokio::time::timeout(REPLY_TIMEOUT, async {
            while let Some(m) = self.backend.recv().await {
                if let Received::Reply { req_id: Some(id) } = self.ledger.on_message(&m) {
                    if id == TAGS_REQ_ID {
                        return;
                    }
                }
            }
        })
        .await;
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 messages (2 malformed) to 8 fast tags, one of them offline.
    fn small() -> DemoOptions {
        DemoOptions {
            tasks: 100,
            tags: 8,
            rate: 500.0,
            fail_rate: 0.2,
            checkin_ms: 100,
            offline: 1,
            ttl_ms: 1500,
            seed: 3,
            verbose: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_demo_gives_every_message_one_final_ack() {
        let o = small();
        let s = run_demo(&o, true, CancellationToken::new()).await.unwrap();
        assert_eq!(s.sent, 100, "{s}");
        assert_eq!(s.lost, 0, "{s}");
        assert_eq!(s.unfinished, 0, "{s}");
        assert_eq!(
            s.outcomes.total(),
            s.sent,
            "every message has exactly one final ack: {s}"
        );
        assert_eq!((s.conflicting_acks, s.unexpected_messages), (0, 0), "{s}");
        assert_eq!(s.malformed, 2, "{s}");
        assert_eq!(s.outcomes.rejected, s.malformed, "{s}");
        assert!(s.outcomes.applied > 0, "{s}");
        assert!(
            s.outcomes.expired > 0,
            "tasks for the offline tag expire: {s}"
        );
        assert!(s.duplicate_resent && s.duplicates_seen == 1, "{s}");
        assert!(s.latency.is_some() && !s.tags.is_empty(), "{s}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_early_still_summarises_without_calling_anything_lost() {
        let o = DemoOptions {
            tasks: 1000,
            rate: 200.0,
            tags: 8,
            offline: 0,
            ..small()
        };
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            stopper.cancel();
        });
        let s = run_demo(&o, true, stop).await.unwrap();
        assert!(s.sent > 0 && s.sent < o.tasks, "{s}");
        assert_eq!(s.lost, 0, "{s}");
        // The duplicate resend may be the one message beyond `sent`.
        let answered_or_waiting = s.outcomes.total() + s.unfinished;
        assert!((s.sent..=s.sent + 1).contains(&answered_or_waiting), "{s}");
    }

    #[test]
    fn latency_uses_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let l = Latency::of(&(1..=100).rev().collect::<Vec<_>>()).unwrap();
        assert_eq!((l.p50, l.p99, l.max), (ms(50), ms(99), ms(100)));
        assert_eq!(Latency::of(&[]), None);
    }
}
