//! [`Load`]: the back end of every reliability run. One spawned task owns
//! the harness [`Backend`]: it publishes a steady stream of valid tasks
//! (round robin over the tags, `seq` rising per tag, unique content), drains
//! acks and status reports every few milliseconds and stamps them with
//! their arrival time, and, when told to, publishes a task again that has no
//! final ack after a timeout, as a real back end must when the agent runs
//! with `clean_session = true` (PROTOCOL §5).
//!
//! The test side changes faults while this runs, then calls
//! [`Load::finish`], which stops publishing, waits for every task's final
//! ack and returns a [`LoadReport`]: the invariants of issue 3 are checked
//! there ([`LoadReport::assert_invariants`]) and the figures printed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    assert_journal_matches, assert_latest_per_tag_applied, publish_task_with, sim_tag, task,
    AckLog, Backend, TestEnv,
};

/// How often the driver takes what the back end received: the resolution
/// of every arrival time measured here.
const DRAIN_EVERY: Duration = Duration::from_millis(5);
/// How often tasks without a final ack are looked at for a retry.
const RETRY_CHECK: Duration = Duration::from_millis(250);
/// After the last expected ack, how long to keep listening for acks that
/// must not exist (a different second final status).
const QUIET: Duration = Duration::from_secs(1);

/// A test's knowledge a real back end does not have: `true` for a task the
/// back end must not publish again (see [`LoadSpec::no_retry`]).
pub type TaskFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What a run's back end does.
#[derive(Clone)]
pub struct LoadSpec {
    /// Task ids are `{prefix}-{n:06}`.
    pub prefix: &'static str,
    pub tasks_per_s: u32,
    /// Tasks go round robin to `SIM000000`…; must match the agent's tags.
    pub tags: usize,
    /// Publish a task again when it has had no final ack for this long.
    /// `None`: never, so the broker and the agent alone must bring every
    /// task to its end.
    pub retry_after: Option<Duration>,
    /// Tasks never published again even without a final ack: a power-cut
    /// run passes the tasks the agent PUBACKed, which must reach their end
    /// from the agent's store alone (a retry would hide their loss).
    pub no_retry: Option<TaskFilter>,
}

/// What the driver task and the test share.
#[derive(Default)]
struct Ledger {
    publishing: bool,
    /// Every distinct task published, in order.
    tasks: Vec<Value>,
    first_sent: HashMap<String, Instant>,
    last_sent: HashMap<String, Instant>,
    first_final: HashMap<String, Instant>,
    acks: AckLog,
    /// Arrival of every `hello` status report (one per agent connection).
    hellos: Vec<Instant>,
    /// The latest status report of any kind.
    last_status: Option<Value>,
    retries: usize,
}

/// A running back end; see the module doc.
pub struct Load {
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
    driver: JoinHandle<Backend>,
    started: Instant,
}

impl Load {
    /// Starts publishing at once.
    pub fn start(backend: Backend, spec: LoadSpec) -> Load {
        let ledger = Arc::new(Mutex::new(Ledger {
            publishing: true,
            ..Ledger::default()
        }));
        let stop = CancellationToken::new();
        let driver = tokio::spawn(drive(backend, spec, ledger.clone(), stop.clone()));
        Load {
            ledger,
            stop,
            driver,
            started: Instant::now(),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // A panic in the driver poisons the lock; the panic itself is
        // reported by `finish`, so the data is still worth reading.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops or resumes publishing new tasks (retries go on).
    pub fn set_publishing(&self, on: bool) {
        self.ledger().publishing = on;
    }

    pub fn published(&self) -> usize {
        self.ledger().tasks.len()
    }

    pub fn final_acks(&self) -> usize {
        self.ledger().first_final.len()
    }

    /// The first `hello` report that arrived at or after `since`.
    pub fn hello_since(&self, since: Instant) -> Option<Instant> {
        self.ledger().hellos.iter().copied().find(|&at| at >= since)
    }

    /// The first final ack (of any task) that arrived at or after `since`.
    pub fn final_ack_since(&self, since: Instant) -> Option<Instant> {
        self.ledger()
            .first_final
            .values()
            .copied()
            .filter(|&at| at >= since)
            .min()
    }

    /// The latest status report, if any arrived.
    pub fn last_status(&self) -> Option<Value> {
        self.ledger().last_status.clone()
    }

    /// Waits until `probe` holds for the ledger, or panics after `timeout`.
    pub async fn wait_for(&self, what: &str, timeout: Duration, probe: impl Fn(&Load) -> bool) {
        let deadline = Instant::now() + timeout;
        while !probe(self) {
            self.assert_driver_alive();
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(DRAIN_EVERY).await;
        }
    }

    fn assert_driver_alive(&self) {
        assert!(
            !self.driver.is_finished(),
            "the back end's driver task ended early (a protocol violation panics it; see above)"
        );
    }

    /// The published tasks that have no final ack yet.
    pub fn without_final(&self) -> Vec<String> {
        let l = self.ledger();
        l.tasks
            .iter()
            .map(|t| t["task_id"].as_str().expect("we built it").to_owned())
            .filter(|id| !l.first_final.contains_key(id))
            .collect()
    }

    /// Stops publishing and waits until every published task has a final
    /// ack, or no task got its first one for `idle`, or `timeout` passed;
    /// returns the tasks still without one. For runs that count losses
    /// instead of failing at the first ([`Load::finish`] then checks the
    /// rest).
    pub async fn settle(&self, idle: Duration, timeout: Duration) -> Vec<String> {
        self.set_publishing(false);
        let deadline = Instant::now() + timeout;
        let (mut finals, mut progress_at) = (self.final_acks(), Instant::now());
        loop {
            let missing = self.without_final();
            let now = Instant::now();
            if self.final_acks() != finals {
                (finals, progress_at) = (self.final_acks(), now);
            }
            if missing.is_empty() || now >= deadline || now - progress_at >= idle {
                return missing;
            }
            self.assert_driver_alive();
            tokio::time::sleep(DRAIN_EVERY * 4).await;
        }
    }

    /// Stops publishing, waits until every published task has a final ack
    /// (retries go on meanwhile), listens [`QUIET`] longer, and returns what
    /// the back end saw. Panics after `timeout` naming what is missing.
    pub async fn finish(self, timeout: Duration) -> LoadReport {
        self.set_publishing(false);
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.without_final();
            if missing.is_empty() {
                break;
            }
            self.assert_driver_alive();
            if Instant::now() >= deadline {
                let summary = self.ledger().acks.summary();
                panic!(
                    "after {timeout:?}, {} tasks have no final ack (first: {:?}); received {summary}",
                    missing.len(),
                    &missing[..missing.len().min(20)]
                );
            }
            tokio::time::sleep(DRAIN_EVERY * 4).await;
        }
        tokio::time::sleep(QUIET).await;
        self.stop.cancel();
        let backend = match self.driver.await {
            Ok(b) => b,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let ledger = std::mem::take(&mut *self.ledger.lock().unwrap_or_else(|e| e.into_inner()));
        LoadReport {
            ledger,
            backend,
            duration: self.started.elapsed(),
        }
    }
}

/// The driver task: publish, drain, retry, until stopped. Returns the back
/// end so the test can go on using it.
async fn drive(
    mut backend: Backend,
    spec: LoadSpec,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) -> Backend {
    let client = backend.client();
    let mut publish = tokio::time::interval(Duration::from_secs(1) / spec.tasks_per_s.max(1));
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    let mut retry = tokio::time::interval(RETRY_CHECK);
    let lock = || ledger.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return backend,
            _ = drain.tick() => {
                let acks = backend.acks_within(Duration::ZERO).await;
                let statuses = backend.statuses_within(Duration::ZERO).await;
                let now = Instant::now();
                let mut l = lock();
                for ack in acks {
                    if ack.status().is_final() {
                        if let Some(id) = ack.task_id() {
                            l.first_final.entry(id.to_owned()).or_insert(now);
                        }
                    }
                    l.acks.push(ack);
                }
                for status in statuses {
                    if status["kind"] == "hello" {
                        l.hellos.push(now);
                    }
                    l.last_status = Some(status);
                }
            }
            _ = publish.tick() => {
                let next = {
                    let mut l = lock();
                    if !l.publishing {
                        continue;
                    }
                    let n = l.tasks.len();
                    let t = task(&format!("{}-{n:06}", spec.prefix), &sim_tag(n % spec.tags), 1_000 + n as u64);
                    let id = t["task_id"].as_str().expect("we built it").to_owned();
                    let now = Instant::now();
                    l.first_sent.insert(id.clone(), now);
                    l.last_sent.insert(id, now);
                    l.tasks.push(t.clone());
                    t
                };
                publish_task_with(&client, &next).await;
            }
            _ = retry.tick(), if spec.retry_after.is_some() => {
                let after = spec.retry_after.expect("guarded by the branch condition");
                let now = Instant::now();
                let due: Vec<Value> = {
                    let mut l = lock();
                    let due: Vec<Value> = l
                        .tasks
                        .iter()
                        .filter(|t| {
                            let id = t["task_id"].as_str().expect("we built it");
                            !l.first_final.contains_key(id)
                                && !spec.no_retry.as_ref().is_some_and(|skip| skip(id))
                                && l.last_sent.get(id).is_some_and(|&at| now.duration_since(at) >= after)
                        })
                        .cloned()
                        .collect();
                    for t in &due {
                        let id = t["task_id"].as_str().expect("we built it").to_owned();
                        l.last_sent.insert(id, now);
                    }
                    l.retries += due.len();
                    due
                };
                // The same message again: same task_id, seq and issued_at.
                for t in &due {
                    publish_task_with(&client, t).await;
                }
            }
        }
    }
}

/// What a finished run saw, with the checks and figures of issue 3.
pub struct LoadReport {
    ledger: Ledger,
    pub backend: Backend,
    pub duration: Duration,
}

/// The counts a run prints.
#[derive(Debug)]
pub struct Figures {
    pub tasks: usize,
    /// Final acks received, copies included.
    pub final_acks: usize,
    /// Final acks beyond the first of their task (the same ack again).
    pub duplicates: usize,
    /// Of those, how many the agent marked `"duplicate": true` (an answer
    /// to a task published again).
    pub marked_duplicate: usize,
    pub retries: usize,
    pub by_status: BTreeMap<String, usize>,
    /// First publish of a task to its first final ack.
    pub latency_p50: Duration,
    pub latency_p99: Duration,
    pub latency_max: Duration,
}

impl LoadReport {
    pub fn tasks(&self) -> &[Value] {
        &self.ledger.tasks
    }

    pub fn acks(&self) -> &AckLog {
        &self.ledger.acks
    }

    /// Issue 3's invariants for the valid tasks of the run: every task has
    /// exactly one final status (every copy of its final ack agrees), each
    /// tag's newest task is applied and every other one applied or
    /// superseded, and the tags' journal shows no task displayed twice and
    /// nothing that was not acked.
    pub fn assert_invariants(&self, env: &TestEnv) {
        let tasks = self.tasks();
        for t in tasks {
            self.acks()
                .final_ack(t["task_id"].as_str().expect("we built it"));
        }
        assert_latest_per_tag_applied(tasks, self.acks());
        assert_journal_matches(tasks, self.acks(), &env.journal());
    }

    pub fn figures(&self) -> Figures {
        let mut per_task: HashMap<String, usize> = HashMap::new();
        let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
        let mut final_acks = 0;
        let mut marked_duplicate = 0;
        for ack in self.acks().clone() {
            // Only the run's own tasks: a hostile run adds acks of others.
            let Some(id) = ack
                .task_id()
                .filter(|id| self.ledger.first_sent.contains_key(*id))
            else {
                continue;
            };
            if !ack.status().is_final() {
                continue;
            }
            final_acks += 1;
            if ack.duplicate() {
                marked_duplicate += 1;
            }
            let n = per_task.entry(id.to_owned()).or_default();
            if *n == 0 {
                *by_status
                    .entry(format!("{:?}", ack.status()).to_lowercase())
                    .or_default() += 1;
            }
            *n += 1;
        }
        let mut latencies: Vec<Duration> = self
            .ledger
            .first_final
            .iter()
            .filter_map(|(id, at)| Some(at.duration_since(*self.ledger.first_sent.get(id)?)))
            .collect();
        latencies.sort();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Figures {
            tasks: self.ledger.tasks.len(),
            final_acks,
            duplicates: per_task.values().map(|n| n.saturating_sub(1)).sum(),
            marked_duplicate,
            retries: self.ledger.retries,
            by_status,
            latency_p50: pick(0.5),
            latency_p99: pick(0.99),
            latency_max: latencies.last().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tasks={} final_acks={} duplicates={} (marked duplicate: {}) back-end retries={} \
             by_status={:?} latency p50={:?} p99={:?} max={:?}",
            self.tasks,
            self.final_acks,
            self.duplicates,
            self.marked_duplicate,
            self.retries,
            self.by_status,
            self.latency_p50,
            self.latency_p99,
            self.latency_max
        )
    }
}

/// A random-number generator for a run's fault schedule, seeded from
/// `ESL_RELIABILITY_SEED` when set, else from the clock; the seed is printed
/// so a failing schedule can be run again.
pub fn schedule_rng(run: &str) -> rand::rngs::SmallRng {
    let seed = std::env::var("ESL_RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(crate::harness::now_ms);
    emit(&format!(
        "[{run}] schedule seed {seed} (ESL_RELIABILITY_SEED={seed} repeats it)"
    ));
    // Runs started in the same millisecond still get different schedules.
    let salt = run
        .bytes()
        .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    rand::rngs::SmallRng::seed_from_u64(seed ^ salt)
}

/// A uniformly random duration in `range` (milliseconds).
pub fn random_ms(rng: &mut impl Rng, range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.gen_range(range))
}

/// Summary of a list of durations: count, median, max.
pub fn summarize(mut ds: Vec<Duration>) -> String {
    if ds.is_empty() {
        return "none".into();
    }
    ds.sort();
    format!(
        "n={} median={:?} max={:?}",
        ds.len(),
        ds[ds.len() / 2],
        ds[ds.len() - 1]
    )
}

/// Used by the status check of several runs.
pub fn status_store_fault(status: &Value) -> Option<String> {
    status["store"]["fault"].as_str().map(str::to_owned)
}

/// Prints a figures line past libtest's output capture (which only catches
/// `print!`/`eprint!`), so the figures show in CI's plain `cargo test` too.
pub fn emit(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}
