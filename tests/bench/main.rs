//! The benchmark harness (issue 7; figures and how to read them in
//! docs/BENCHMARKS.md). One run starts a real Mosquitto with raised queue
//! limits, the real `esl-agent` binary with simulated tags, and a back end on
//! rumqttc, then prints a human table and one JSON line.
//!
//! Phases, in order, all against the same broker:
//! 1. **ceiling** — a bare QoS 1 subscriber receives the burst; the disk's
//!    fdatasync rate is measured next to the store.
//! 2. **ingest** — the agent (10 000 simulated tags that check in rarely)
//!    receives the burst; ingest = its PUBACK counter (`mqtt_pubacks`, read
//!    over the control socket) over wall time. A second burst fills the store
//!    to `--pending` tasks, each for its own tag id (PROTOCOL §4 rule 5 allows
//!    one pending task per tag, so 100 000 pending tasks need 100 000 tag
//!    ids; the radio reaches 10 000 of them). Footprint is read then.
//! 3. **recovery** — SIGTERM, a probe task queued in the agent's persistent
//!    session, restart: time from spawn to the probe's ack (which leaves in
//!    the flush that releases its PUBACK).
//! 4. **end to end** — a fresh agent whose tags check in every 10 ms and
//!    apply at once: a fixed offered rate, then a burst at saturation;
//!    publish→`applied` latency per task.
//! 5. **disk writes** — `/proc/<pid>/io` `write_bytes` per task of a fresh
//!    agent (2 000 tags that check in once a day): a burst with sequential
//!    task ids, one with random UUID-like ids (another fresh agent), then a
//!    trickle of 10 tasks/s; each read after the store's deferred writes
//!    (the WAL checkpoint) are done.
//! 6. **flood** — the store's size before and after a flood of
//!    `agent.status` commands that ask for replies, once the store has had
//!    time to give space back.
//! 7. **idle** — RSS of an agent with 2 000 tags checking in every second
//!    and no tasks.
//!
//! `ESL_BENCH_AGENT_BIN=path` runs every phase against another agent binary
//! (an older build: before/after figures from the same harness).
//!
//! `cargo test --workspace` runs it at a CI size (seconds; no timing
//! assertions, but every task must get its PUBACK and final ack or the run
//! fails). The full size: `cargo test --release -p esl-agent --test bench --
//! --full` (options: see [`Size::parse`]).

mod footprint;
mod load;
mod procs;
mod report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::Instant;

use footprint::Footprint;
use load::{parse_ack, Listener, Publisher};
use procs::{AgentProc, AgentSpec, Broker, POLL};
use report::{Report, Stats};

const BACKEND_ID: &str = "GID_bench@@@backend";
const ACK_TOPIC: &str = "esl_ack/p2p/GID_bench@@@backend";
const CEILING_TOPIC: &str = "bench/ceiling";
/// Names another `esl-agent` binary to measure (docs/BENCHMARKS.md).
const AGENT_BIN_ENV: &str = "ESL_BENCH_AGENT_BIN";

/// How big a run is.
#[derive(Debug, Clone)]
struct Size {
    /// Burst for the ingest and ceiling figures.
    burst: usize,
    /// Pending tasks in the store for footprint and recovery (≥ burst).
    pending: usize,
    /// Simulated tags of the ingest/footprint agent.
    radio_tags: usize,
    /// Offered rate (tasks/s) and how long, for the end-to-end latency.
    rate: u64,
    rate_secs: u64,
    /// Tags of the end-to-end agent, their check-in interval.
    e2e_tags: usize,
    checkin_ms: u64,
    /// Burst at saturation in the end-to-end phase.
    saturation: usize,
    /// Broker's `max_inflight_messages` towards each client.
    inflight: u32,
    /// The agent's `mqtt.outbox_window` (unacked acks in flight).
    outbox_window: u32,
    /// The agent's `store.cache_mb` (SQLite's page cache).
    cache_mb: u64,
    /// Disk-write phase: simulated tags, burst size, trickle length (s).
    disk_tags: usize,
    disk_burst: usize,
    trickle_secs: u64,
    /// Commands in the flood phase.
    flood: usize,
    /// Idle phase: tags checking in every second, seconds before reading.
    idle_tags: usize,
    idle_secs: u64,
    /// Longest wait for the store's deferred writes (checkpoint, space
    /// given back) before a disk or size figure is read; 0 = read at once.
    settle_s: u64,
    json: Option<PathBuf>,
    keep: bool,
}

impl Size {
    fn ci() -> Size {
        Size {
            burst: 2_000,
            pending: 3_000,
            radio_tags: 300,
            rate: 500,
            rate_secs: 1,
            e2e_tags: 50,
            checkin_ms: 10,
            saturation: 3_000,
            inflight: 1000,
            outbox_window: 32,
            cache_mb: 2,
            disk_tags: 2_000,
            disk_burst: 300,
            trickle_secs: 1,
            flood: 2_000,
            idle_tags: 2_000,
            idle_secs: 1,
            // Not waiting keeps the CI size fast; its disk figures leave
            // out the checkpoint (marked in the JSON by a NaN settle time).
            settle_s: 0,
            json: None,
            keep: false,
        }
    }

    fn full() -> Size {
        Size {
            burst: 50_000,
            pending: 100_000,
            radio_tags: 10_000,
            rate: 1_000,
            rate_secs: 10,
            // 50 tags checking in every 10 ms: 5 000 check-ins/s. 200 such
            // tags (20 000/s) make check-in handling the agent's bottleneck
            // (docs/BENCHMARKS.md).
            e2e_tags: 50,
            saturation: 20_000,
            disk_burst: 10_000,
            trickle_secs: 30,
            flood: 50_000,
            idle_secs: 5,
            settle_s: 60,
            ..Size::ci()
        }
    }

    /// `--full`, then overrides: `--tasks N --pending N --tags N --rate N
    /// --rate-secs N --e2e-tags N --checkin-ms N --saturation N --inflight N
    /// --outbox-window N --cache-mb N --disk-tags N --disk-burst N
    /// --trickle-secs N --flood N --idle-tags N --idle-secs N --settle-s N
    /// --json FILE --keep`. A bare word is a test-name filter (as `cargo
    /// test NAME` passes it): `Ok(None)` when it does not match "bench".
    fn parse(args: &[String]) -> Result<Option<Size>, String> {
        let mut size = if args.iter().any(|a| a == "--full") {
            Size::full()
        } else {
            Size::ci()
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> Result<u64, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{name} needs a number"))
            };
            match a.as_str() {
                "--full" => {}
                "--keep" => size.keep = true,
                "--tasks" => size.burst = value(a)? as usize,
                "--pending" => size.pending = value(a)? as usize,
                "--tags" => size.radio_tags = value(a)? as usize,
                "--rate" => size.rate = value(a)?,
                "--rate-secs" => size.rate_secs = value(a)?,
                "--e2e-tags" => size.e2e_tags = value(a)? as usize,
                "--checkin-ms" => size.checkin_ms = value(a)?,
                "--saturation" => size.saturation = value(a)? as usize,
                "--inflight" => size.inflight = value(a)? as u32,
                "--outbox-window" => size.outbox_window = value(a)? as u32,
                "--cache-mb" => size.cache_mb = value(a)?,
                "--disk-tags" => size.disk_tags = value(a)?.max(1) as usize,
                "--disk-burst" => size.disk_burst = value(a)? as usize,
                "--trickle-secs" => size.trickle_secs = value(a)?,
                "--flood" => size.flood = value(a)? as usize,
                "--idle-tags" => size.idle_tags = value(a)? as usize,
                "--idle-secs" => size.idle_secs = value(a)?,
                "--settle-s" => size.settle_s = value(a)?,
                "--json" => size.json = Some(it.next().ok_or("--json needs a file")?.into()),
                // libtest flags cargo may pass (`--nocapture`, `--quiet`…).
                flag if flag.starts_with("--") => {}
                filter if !"bench".contains(filter) => return Ok(None),
                _ => {}
            }
        }
        size.pending = size.pending.max(size.burst);
        Ok(Some(size))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = match Size::parse(&args) {
        Ok(Some(s)) => s,
        Ok(None) => return ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("bench: {msg}");
            return ExitCode::from(2);
        }
    };
    // Two workers, like the agent: the load generator shares this 2-core
    // machine with the broker and the agent, and the table says so.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let tmp = tempfile::Builder::new()
        .prefix("esl-bench-")
        .tempdir()
        .expect("temp dir");
    eprintln!("bench: {size:?} in {}", tmp.path().display());
    let keep = size.keep;
    match runtime.block_on(run(size, tmp.path())) {
        Ok(()) => {
            if keep {
                eprintln!("bench: kept {}", tmp.keep().display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The logs (agent.log, mosquitto.log) say why.
            eprintln!("bench FAILED: {e:#}\nbench: kept {}", tmp.keep().display());
            ExitCode::FAILURE
        }
    }
}

async fn run(size: Size, dir: &std::path::Path) -> anyhow::Result<()> {
    let bin = agent_bin();
    let dir = dir.to_owned();
    let external = std::env::var_os(AGENT_BIN_ENV).is_some();
    let mut report = Report::new(&size_json(&size), &bin, external)?;

    let broker = Broker::start(&dir, size.inflight).await?;
    let publisher = Publisher::connect(broker.port, "GID_bench@@@loader").await?;
    let mut acks = Listener::subscribe(broker.port, BACKEND_ID, ACK_TOPIC).await?;

    // 1. Ceilings: the bare subscriber, and the disk.
    let mut bare = Listener::subscribe(broker.port, "GID_bench@@@bare", CEILING_TOPIC).await?;
    let started = Instant::now();
    for i in 0..size.burst {
        publisher
            .publish(CEILING_TOPIC, load::task(&format!("c-{i}"), i, 1))
            .await?;
    }
    let deadline = Instant::now() + deadline_for(size.burst);
    let mut last = started;
    for _ in 0..size.burst {
        last = bare
            .next_until(deadline)
            .await
            .context("bare subscriber")?
            .at;
    }
    report.set("ceiling_subscriber_per_s", rate(size.burst, last - started));
    drop(bare);
    report.set(
        "ceiling_fsync_per_s",
        tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || load::fsync_rate(&dir, Duration::from_secs(2))
        })
        .await??,
    );

    // 2. Ingest and footprint.
    let spec = AgentSpec {
        dir: dir.join("ingest"),
        port: broker.port,
        client_id_device: "ap1".into(),
        ack_to: BACKEND_ID.into(),
        clean_session: false,
        tags: size.radio_tags,
        // Rare check-ins: the tasks stay pending, as at opening time when
        // the burst arrives faster than tags wake up.
        checkin_interval_ms: 600_000,
        apply_ms: 0,
        outbox_window: size.outbox_window,
        cache_mb: size.cache_mb,
    };
    let topic = "esl_task/p2p/GID_bench@@@ap1";
    let mut agent = AgentProc::start(&bin, &spec)?;
    agent.wait_control(Duration::from_secs(30)).await?;
    wait_probe(&publisher, &mut acks, topic, "probe-ready").await?;
    let cpu0 = agent.cpu_secs()?;
    let flushes0 = agent.counter("store_flushes").await?;
    let mut offset = 0;
    for (name, n) in [
        ("ingest", size.burst),
        ("ingest_fill", size.pending - size.burst),
    ] {
        if n == 0 {
            continue;
        }
        let pubacks0 = agent.counter("mqtt_pubacks").await?;
        let started = Instant::now();
        for i in offset..offset + n {
            publisher
                .publish(topic, load::task(&format!("t-{i}"), i, 1))
                .await?;
        }
        let deadline = Instant::now() + deadline_for(n);
        loop {
            let done = agent.counter("mqtt_pubacks").await? - pubacks0;
            if done >= n as u64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name}: only {done} of {n} tasks PUBACKed");
            }
            tokio::time::sleep(POLL).await;
        }
        report.set(&format!("{name}_per_s"), rate(n, started.elapsed()));
        offset += n;
    }
    let ingest_cpu = agent.cpu_secs()? - cpu0;
    let flushes = agent.counter("store_flushes").await? - flushes0;
    let status = agent.status().await?;
    let pending = status["pending"].as_u64().context("pending")?;
    if pending + size.radio_tags as u64 <= size.pending as u64 {
        bail!(
            "only {pending} tasks pending after {} were sent",
            size.pending
        );
    }
    report.set(
        "tasks_per_flush",
        size.pending as f64 / flushes.max(1) as f64,
    );
    report.set(
        "cpu_s_per_1000_ingested",
        ingest_cpu * 1000.0 / size.pending as f64,
    );
    report.set("pending_tasks", pending as f64);
    report.set("peak_rss_mib_ingest", agent.peak_rss_kib()? as f64 / 1024.0);
    let shutdown = agent.terminate().await?;
    report.set("shutdown_s", shutdown.as_secs_f64());
    let (apparent, allocated) = procs::dir_size(&spec.store())?;
    report.set("store_mib", apparent as f64 / 1048576.0);
    report.set("store_bytes_per_pending", apparent as f64 / pending as f64);
    report.set(
        "store_alloc_bytes_per_pending",
        allocated as f64 / pending as f64,
    );

    // 3. Recovery: the probe waits in the agent's session at the broker.
    publisher
        .publish(topic, load::probe("probe-recovery"))
        .await?;
    let mut agent = AgentProc::start(&bin, &spec)?;
    let spawned = agent.spawned_at;
    let seen = wait_ack(&mut acks, "probe-recovery", deadline_for(size.pending)).await?;
    report.set("recovery_s", (seen - spawned).as_secs_f64());
    let restored = agent.status().await?["pending"]
        .as_u64()
        .context("pending")?;
    // Tags in radio range may check in and apply theirs meanwhile.
    if restored + (size.radio_tags as u64) < pending {
        bail!("recovery: {restored} tasks pending after the restart, {pending} before");
    }
    report.set(
        "peak_rss_mib_recovered",
        agent.peak_rss_kib()? as f64 / 1024.0,
    );
    agent.terminate().await?;

    // 4. End to end with instant tags.
    let spec = AgentSpec {
        dir: dir.join("e2e"),
        client_id_device: "ap2".into(),
        clean_session: true,
        tags: size.e2e_tags,
        checkin_interval_ms: size.checkin_ms,
        ..spec
    };
    let topic = "esl_task/p2p/GID_bench@@@ap2";
    let mut agent = AgentProc::start(&bin, &spec)?;
    agent.wait_control(Duration::from_secs(30)).await?;
    wait_probe(&publisher, &mut acks, topic, "probe-e2e").await?;
    let mut seq = 0u64;
    let fixed = (size.rate * size.rate_secs) as usize;
    let cpu0 = agent.cpu_secs()?;
    let phase = EndToEnd {
        topic,
        tags: size.e2e_tags,
    };
    let stats = phase
        .run(
            &publisher,
            &mut acks,
            &mut agent,
            "rate",
            fixed,
            Some(size.rate),
            &mut seq,
        )
        .await?;
    report.end_to_end("e2e_fixed", &stats);
    let stats = phase
        .run(
            &publisher,
            &mut acks,
            &mut agent,
            "sat",
            size.saturation,
            None,
            &mut seq,
        )
        .await?;
    report.end_to_end("e2e_saturation", &stats);
    let e2e_cpu = agent.cpu_secs()? - cpu0;
    report.set(
        "cpu_s_per_1000_end_to_end",
        e2e_cpu * 1000.0 / (fixed + size.saturation) as f64,
    );
    report.set("peak_rss_mib_e2e", agent.peak_rss_kib()? as f64 / 1024.0);
    agent.terminate().await?;

    // 5–7. The store's footprint: disk writes, size after a flood, idle RSS.
    let mut footprint = Footprint {
        bin: &bin,
        dir: &dir,
        size: &size,
        base: &spec,
        publisher: &publisher,
        acks: &mut acks,
    };
    footprint.disk(&mut report).await?;
    footprint.flood(&mut report).await?;
    footprint.idle(&mut report).await?;
    // Clients first, so they do not report the broker going away.
    drop((publisher, acks));
    drop(broker);

    report.print(size.json.as_deref())
}

/// The agent under test: this build's, or `ESL_BENCH_AGENT_BIN` (an older
/// build, to measure before and after with the same harness).
fn agent_bin() -> PathBuf {
    std::env::var_os(AGENT_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_esl-agent")))
}

/// Generous per-phase deadline: a run that stalls fails instead of hanging.
fn deadline_for(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(n as u64 * 5)
}

fn rate(n: usize, span: Duration) -> f64 {
    n as f64 / span.as_secs_f64().max(1e-9)
}

fn size_json(s: &Size) -> serde_json::Value {
    serde_json::json!({
        "burst": s.burst, "pending": s.pending, "radio_tags": s.radio_tags,
        "rate": s.rate, "rate_secs": s.rate_secs, "e2e_tags": s.e2e_tags,
        "checkin_ms": s.checkin_ms, "saturation": s.saturation, "broker_inflight": s.inflight,
        "outbox_window": s.outbox_window, "cache_mb": s.cache_mb,
        "disk_tags": s.disk_tags, "disk_burst": s.disk_burst, "trickle_secs": s.trickle_secs,
        "flood": s.flood, "idle_tags": s.idle_tags, "idle_secs": s.idle_secs,
        "settle_s": s.settle_s,
    })
}

/// Publishes a probe every 200 ms until its ack arrives: the agent is
/// connected and subscribed (a clean session loses what came before).
async fn wait_probe(
    publisher: &Publisher,
    acks: &mut Listener,
    topic: &str,
    id: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        publisher.publish(topic, load::probe(id)).await?;
        if wait_ack(acks, id, Duration::from_millis(200)).await.is_ok() {
            // Later copies of the probe come back as duplicates; let them
            // arrive and drop them so they do not count in the next phase.
            while wait_ack(acks, id, Duration::from_millis(300)).await.is_ok() {}
            return Ok(());
        }
    }
    bail!("the agent did not ack a probe task within 30 s (see agent.log)")
}

/// Waits for the ack of `task_id`; returns when it arrived.
async fn wait_ack(acks: &mut Listener, task_id: &str, within: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let r = acks.next_until(deadline).await?;
        if let Some(a) = parse_ack(&r) {
            if a.task_id == task_id {
                return Ok(a.at);
            }
        }
    }
}

/// The end-to-end phase: tasks spread round-robin over the tags.
struct EndToEnd<'a> {
    topic: &'a str,
    tags: usize,
}

impl EndToEnd<'_> {
    /// Sends `n` tasks (at `rate` per second, or as fast as possible) and
    /// waits until every one has its final ack.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        publisher: &Publisher,
        acks: &mut Listener,
        agent: &mut AgentProc,
        prefix: &str,
        n: usize,
        rate: Option<u64>,
        seq: &mut u64,
    ) -> anyhow::Result<Stats> {
        let mut sent: HashMap<String, Instant> = HashMap::with_capacity(n);
        let mut finals: HashMap<String, (String, Instant)> = HashMap::with_capacity(n);
        let mut max_outbox = 0u64;
        let started = Instant::now();
        let mut last_status = started;
        let drain = |acks: &mut Listener, finals: &mut HashMap<String, (String, Instant)>| {
            while let Ok(r) = acks.rx.try_recv() {
                if let Some(a) = parse_ack(&r) {
                    if a.status != "accepted" {
                        finals.entry(a.task_id).or_insert((a.status, a.at));
                    }
                }
            }
        };
        for i in 0..n {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
            *seq += 1;
            let id = format!("{prefix}-{i}");
            publisher
                .publish(self.topic, load::task(&id, i % self.tags, *seq))
                .await?;
            sent.insert(id, Instant::now());
            if i % 256 == 0 {
                drain(acks, &mut finals);
            }
        }
        let deadline = Instant::now() + deadline_for(n);
        while sent.keys().any(|id| !finals.contains_key(id)) {
            if last_status.elapsed() > Duration::from_millis(100) {
                let s = agent.status().await?;
                max_outbox = max_outbox.max(s["outbox"].as_u64().unwrap_or(0));
                last_status = Instant::now();
            }
            match tokio::time::timeout(Duration::from_millis(50), acks.rx.recv()).await {
                Ok(Some(r)) => {
                    if let Some(a) = parse_ack(&r) {
                        if a.status != "accepted" {
                            finals.entry(a.task_id).or_insert((a.status, a.at));
                        }
                    }
                }
                Ok(None) => bail!("the ack listener's connection ended"),
                Err(_) => {}
            }
            drain(acks, &mut finals);
            if Instant::now() > deadline {
                let missing = sent.keys().filter(|id| !finals.contains_key(*id)).count();
                bail!("{prefix}: {missing} of {n} tasks without a final ack");
            }
        }
        let mut stats = Stats::new(n, started, max_outbox, rate);
        for (id, at) in &sent {
            let (status, acked) = &finals[id];
            stats.add(status, *at, *acked);
        }
        Ok(stats)
    }
}
