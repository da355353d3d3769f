//! Crash loop (issue 3): the real agent under a steady stream of tasks,
//! killed with SIGKILL at random moments and started again on the same
//! store, in both session modes:
//!
//! - `clean_session = false`: the broker keeps what the agent did not
//!   PUBACK; the back end never retries, so every task must reach its end
//!   through the broker and the agent's store alone.
//! - `clean_session = true` (the default): the broker forgets unacked
//!   messages when the agent dies; the back end publishes a task again when
//!   it has had no final ack for [`RETRY_AFTER`], as PROTOCOL §5 expects.
//!
//! Kill moments are drawn from the run's seeded schedule, measured from the
//! agent's start, so some kills land while it is still opening its store or
//! connecting; every other kill then also waits for the next display on a
//! tag and strikes right after it, when the tag shows content whose outcome
//! the agent has most likely not stored yet. The tags journal every display to one file kept across runs
//! (a real e-paper tag keeps showing its content while the agent restarts),
//! so "no task displayed twice" is checked over the whole run.

use std::time::Duration;

use tokio::time::Instant;

use crate::harness::{
    Agent, AgentConfig, Backend, Broker, BrokerOptions, TestEnv, BACKEND_ID, TAGS,
};
use crate::load::{random_ms, schedule_rng, summarize, Load, LoadSpec};

/// The back end's patience in the clean-session mode: well above the
/// agent's normal latency (a check-in every 100 ms), well below the run.
const RETRY_AFTER: Duration = Duration::from_secs(3);
const TASKS_PER_S: u32 = 25;

struct CrashLoop {
    name: &'static str,
    clean_session: bool,
    kills: usize,
    /// How long each agent run lives before its SIGKILL, from its start.
    uptime_ms: std::ops::Range<u64>,
    /// How long the agent stays dead.
    downtime_ms: std::ops::Range<u64>,
}

/// One agent run of the loop: when it started, when it was killed.
struct Run {
    started: Instant,
    killed: Option<Instant>,
}

impl CrashLoop {
    async fn run(self) {
        let mut rng = schedule_rng(self.name);
        let env = TestEnv::new(self.name);
        let broker = Broker::start(&env, BrokerOptions::default()).await;
        let backend = Backend::connect(&broker, BACKEND_ID, true).await;
        let mut config = AgentConfig::new(&env, &broker);
        config.clean_session = self.clean_session;
        // `AgentConfig::new` already names journal-1.jsonl; every run keeps it.
        let mut agent = Agent::start_ready(&env, &broker, &config).await;
        let load = Load::start(
            backend,
            LoadSpec {
                prefix: "t-crash",
                tasks_per_s: TASKS_PER_S,
                tags: TAGS,
                retry_after: self.clean_session.then_some(RETRY_AFTER),
            },
        );
        let mut runs = vec![Run {
            started: Instant::now(),
            killed: None,
        }];
        let mut just_after_display = 0;
        for k in 0..self.kills {
            let started = runs.last().expect("one run at least").started;
            tokio::time::sleep_until(started + random_ms(&mut rng, self.uptime_ms.clone())).await;
            // Every other kill waits for a tag to display something and
            // strikes at once: the tag shows the content, but the agent has
            // most likely not yet stored that it was applied. Random moments
            // alone rarely hit that window of a few milliseconds.
            if k % 2 == 1 && display_then(&config.journal, Duration::from_secs(2)).await {
                just_after_display += 1;
            }
            agent.kill();
            runs.last_mut().expect("one run at least").killed = Some(Instant::now());
            tokio::time::sleep(random_ms(&mut rng, self.downtime_ms.clone())).await;
            agent = Agent::start(&env, &config);
            runs.push(Run {
                started: Instant::now(),
                killed: None,
            });
        }
        let last_start = runs.last().expect("one run at least").started;
        load.wait_for(
            "the last agent run to say hello",
            Duration::from_secs(30),
            |l| l.hello_since(last_start).is_some(),
        )
        .await;

        // Recovery: from a restart to the agent's hello (connected and
        // subscribed: the hello follows the SUBSCRIBE on the same
        // connection), and to the first final ack after the restart.
        let mut to_hello = Vec::new();
        let mut to_ack = Vec::new();
        let mut killed_before_hello = 0;
        for run in &runs[1..] {
            let end = run.killed.unwrap_or_else(Instant::now);
            match load.hello_since(run.started).filter(|&at| at <= end) {
                Some(at) => to_hello.push(at - run.started),
                None => killed_before_hello += 1,
            }
            if let Some(at) = load.final_ack_since(run.started).filter(|&at| at <= end) {
                to_ack.push(at - run.started);
            }
        }
        let max_hello = to_hello.iter().max().copied().unwrap_or_default();

        let report = load.finish(Duration::from_secs(120)).await;
        agent.assert_running();
        report.assert_invariants(&env);
        let figures = report.figures();
        crate::load::emit(&format!(
            "[{}] clean_session={} kills={} (just after a display: {just_after_display}) killed_before_hello={} run_time={:?}\n\
             [{}] {figures}\n\
             [{}] recovery restart->hello: {} ; restart->first final ack: {}",
            self.name,
            self.clean_session,
            self.kills,
            killed_before_hello,
            report.duration,
            self.name,
            self.name,
            summarize(to_hello),
            summarize(to_ack),
        ));
        assert!(
            figures.tasks > self.kills,
            "too little load to prove anything"
        );
        // Recovery is measured, not timed; this bound only catches an agent
        // that hangs at start (a stuck store open, a lost CONNACK).
        assert!(
            max_hello < Duration::from_secs(15),
            "an agent run took {max_hello:?} from start to hello"
        );
    }
}

/// Waits until the tags' journal grows, i.e. a tag displayed new content;
/// `false` if none did within `timeout`. Spins (yielding) rather than
/// sleeping: the window it aims at lasts about a millisecond, less than
/// one timer tick. It spins until the next display, a fraction of a second.
async fn display_then(journal: &std::path::Path, timeout: Duration) -> bool {
    let len = || std::fs::metadata(journal).map_or(0, |m| m.len());
    let before = len();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if len() > before {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

impl CrashLoop {
    /// The CI version: 10 kills, about 15 s.
    fn short(name: &'static str, clean_session: bool) -> CrashLoop {
        CrashLoop {
            name,
            clean_session,
            kills: 10,
            uptime_ms: 50..1500,
            downtime_ms: 0..300,
        }
    }

    /// The proof: 60 kills, about 2 minutes.
    fn long(name: &'static str, clean_session: bool) -> CrashLoop {
        CrashLoop {
            name,
            clean_session,
            kills: 60,
            uptime_ms: 50..3000,
            downtime_ms: 0..500,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_persistent_session_ci() {
    CrashLoop::short("crash-persistent-ci", false).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_clean_session_ci() {
    CrashLoop::short("crash-clean-ci", true).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long run (about 2 minutes): tests/reliability/prove.sh"]
async fn crash_loop_persistent_session_long() {
    CrashLoop::long("crash-persistent-long", false).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long run (about 2 minutes): tests/reliability/prove.sh"]
async fn crash_loop_clean_session_long() {
    CrashLoop::long("crash-clean-long", true).run().await;
}
