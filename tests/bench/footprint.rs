//! The store's footprint phases (issue 13): disk bytes written per task,
//! the store's size after a command flood, and the RSS of an idle agent.
//! Each phase starts a fresh agent against the run's broker and reads it
//! from outside (`/proc/<pid>/io`, `/proc/<pid>/status`, the store's files,
//! the control socket); the agent is the same binary the other phases run
//! (or `ESL_BENCH_AGENT_BIN`).
//!
//! Deferred writes count: SQLite's checkpoint thread copies the WAL into the
//! database when it passes 4 MiB or after 5 s of quiet, so every disk figure
//! is read only once the agent has written nothing for [`QUIET`]
//! ([`AgentProc::settle_writes`], within `--settle-s`), and again with what
//! the agent writes while it stops (`wait4`'s count: the final checkpoint).
//! The CI size does not wait for quiet (its settle times are NaN).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::load::{self, parse_ack, Listener, Publisher};
use crate::procs::{self, AgentProc, AgentSpec, POLL};
use crate::report::Report;
use crate::{deadline_for, wait_probe, Size, BACKEND_ID};

/// No write for this long counts as settled: longer than the checkpoint
/// thread's 5 s of quiet, the agent's 10 s `incremental_vacuum` period (a
/// reclaim after a burst is a deferred write too), its idle commit (1 s)
/// and sled's flusher (0.5 s).
const QUIET: Duration = Duration::from_secs(12);
/// The store's size counts as given back once it has not changed for this
/// long (the same reclaim period).
const SIZE_STABLE: Duration = QUIET;
/// Tags that check in once a day: practically never during a phase, so
/// what is written is the tasks' doing, not tag reports.
const RARE_CHECKIN_MS: u64 = 86_400_000;

/// What the phases share: the run's broker clients and agent settings.
pub struct Footprint<'a> {
    pub bin: &'a Path,
    pub dir: &'a Path,
    pub size: &'a Size,
    pub base: &'a AgentSpec,
    pub publisher: &'a Publisher,
    pub acks: &'a mut Listener,
}

/// How task ids look in a burst.
#[derive(Clone, Copy)]
enum Ids {
    /// `s-0`, `s-1`, …: each id sorts after the previous one.
    Sequential,
    /// UUID-like (version 4 layout) from a seeded generator: ids land
    /// anywhere in the task-id index.
    Random,
}

impl Footprint<'_> {
    fn spec(&self, name: &str, tags: usize, checkin_interval_ms: u64) -> AgentSpec {
        AgentSpec {
            dir: self.dir.join(name),
            client_id_device: name.into(),
            clean_session: false,
            tags,
            checkin_interval_ms,
            apply_ms: 0,
            ..self.base.clone()
        }
    }

    async fn start(&mut self, spec: &AgentSpec) -> anyhow::Result<(AgentProc, String)> {
        let topic = format!("esl_task/p2p/GID_bench@@@{}", spec.client_id_device);
        let mut agent = AgentProc::start(self.bin, spec)?;
        agent.wait_control(Duration::from_secs(30)).await?;
        wait_probe(self.publisher, self.acks, &topic, "probe-footprint").await?;
        Ok((agent, topic))
    }

    fn settle_within(&self) -> Duration {
        Duration::from_secs(self.size.settle_s)
    }

    /// Waits for the store's deferred writes (if this size waits at all)
    /// and records how long that took under `{key}_settle_s` (NaN: not
    /// settled within `--settle-s`, or not waited for), and the WAL's size
    /// then (`{key}_wal_kib`: log not yet copied into the database).
    async fn settle(
        &self,
        agent: &AgentProc,
        spec: &AgentSpec,
        key: &str,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let waited = if self.size.settle_s == 0 {
            None
        } else {
            agent.settle_writes(QUIET, self.settle_within()).await?
        };
        report.set(
            &format!("{key}_settle_s"),
            waited.map_or(f64::NAN, |d| d.as_secs_f64()),
        );
        let (_, wal) = procs::db_and_wal(&spec.store());
        report.set(&format!("{key}_wal_kib"), wal as f64 / 1024.0);
        Ok(())
    }

    /// Disk bytes written per task, each on a fresh agent: a burst with
    /// sequential ids, a burst with random ids, a trickle of 10 tasks/s.
    /// Two figures each: once the agent is quiet, and including what it
    /// writes while stopping (SQLite checkpoints the rest of its WAL then;
    /// an agent that runs on does that when the WAL reaches 4 MiB).
    pub async fn disk(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let tags = self.size.disk_tags;
        let n = self.size.disk_burst;
        let k = (10 * self.size.trickle_secs) as usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for (key, kind, count, rate) in [
            ("disk_burst_seq", Ids::Sequential, n, None),
            ("disk_burst_uuid", Ids::Random, n, None),
            ("disk_trickle", Ids::Random, k, Some(10)),
        ] {
            let spec = self.spec(&key.replace('_', "-"), tags, RARE_CHECKIN_MS);
            let (mut agent, topic) = self.start(&spec).await?;
            let ids: Vec<String> = (0..count)
                .map(|i| match kind {
                    Ids::Sequential => format!("s-{i}"),
                    Ids::Random => uuid_like(&mut rng),
                })
                .collect();
            let (written0, cancelled0) = agent.write_bytes()?;
            let mut seq = 0;
            self.send(&mut agent, &topic, &ids, rate, &mut seq).await?;
            self.settle(&agent, &spec, key, report).await?;
            let per_task = |bytes: u64| bytes as f64 / count.max(1) as f64;
            let written = agent.write_bytes()?.0 - written0;
            report.set(&format!("{key}_bytes_per_task"), per_task(written));
            agent.terminate().await?;
            let at_exit = agent.written_at_exit.context("no write count at exit")?;
            report.set(
                &format!("{key}_bytes_per_task_with_stop"),
                per_task(at_exit.saturating_sub(written0 - cancelled0)),
            );
        }
        report.set("disk_burst_tasks", n as f64);
        report.set("disk_trickle_tasks", k as f64);
        report.set("disk_tags", tags as f64);
        Ok(())
    }

    /// Sends `ids` as tasks round-robin over the disk tags (at `rate` per
    /// second, or as fast as possible) with a rising `seq`, then waits until
    /// every one is PUBACKed and each task that a later one superseded has
    /// its final ack: a lost ack fails the run.
    async fn send(
        &mut self,
        agent: &mut AgentProc,
        topic: &str,
        ids: &[String],
        rate: Option<u64>,
        seq: &mut u64,
    ) -> anyhow::Result<()> {
        let tags = self.size.disk_tags;
        let pubacks0 = agent.counter("mqtt_pubacks").await?;
        let pending0 = agent.status().await?["pending"].as_u64().unwrap_or(0);
        let started = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
            *seq += 1;
            self.publisher
                .publish(topic, load::task(id, i % tags, *seq))
                .await?;
        }
        // Every task supersedes the one its tag had pending, if any: after
        // the last one, `pending` tasks are pending and all others final.
        let sent: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut finals: HashSet<String> = HashSet::new();
        let deadline = Instant::now() + deadline_for(ids.len());
        loop {
            while let Ok(r) = self.acks.rx.try_recv() {
                if let Some(a) = parse_ack(&r) {
                    if a.status != "accepted" && sent.contains(a.task_id.as_str()) {
                        finals.insert(a.task_id);
                    }
                }
            }
            let status = agent.status().await?;
            let pubacks = status["counters"]["mqtt_pubacks"].as_u64().unwrap_or(0) - pubacks0;
            let pending = status["pending"].as_u64().context("pending")?;
            // Tasks of this batch still pending: what `pending` grew by, plus
            // the earlier tasks this batch superseded (acked, not ours).
            let superseded_earlier = pending0.min(ids.len() as u64);
            let ours_pending = (pending + superseded_earlier).saturating_sub(pending0);
            if pubacks >= ids.len() as u64 && finals.len() as u64 + ours_pending >= ids.len() as u64
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{topic}: {pubacks} of {} tasks PUBACKed, {} final acks, {pending} pending",
                    ids.len(),
                    finals.len()
                );
            }
            tokio::time::sleep(POLL * 5).await;
        }
    }

    /// The store's size before and after a flood of `agent.status`
    /// commands, each asking for a reply (through the outbox).
    pub async fn flood(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let spec = self.spec("flood", self.size.disk_tags, RARE_CHECKIN_MS);
        let (mut agent, _) = self.start(&spec).await?;
        self.settle(&agent, &spec, "flood_before", report).await?;
        let store = spec.store();
        let before = procs::dir_size(&store)?.0;
        let received0 = agent.counter("commands_received").await?;
        let topic = format!("esl_cmd/p2p/GID_bench@@@{}", spec.client_id_device);
        let n = self.size.flood;
        let started = Instant::now();
        for i in 0..n {
            let command = serde_json::json!({
                "v": 1, "req_id": format!("r-{i}"), "method": "agent.status",
                "params": {}, "reply": true, "reply_to": BACKEND_ID,
            });
            self.publisher
                .publish(&topic, command.to_string().into_bytes())
                .await?;
        }
        // Processed = counted by the agent, and every reply it kept has left
        // the outbox (a reply rate limit may drop some: not counted here).
        let deadline = Instant::now() + deadline_for(n);
        let mut peak = before;
        loop {
            peak = peak.max(procs::dir_size(&store)?.0);
            let status = agent.status().await?;
            let received = status["counters"]["commands_received"]
                .as_u64()
                .unwrap_or(0)
                - received0;
            let outbox = status["outbox"].as_u64().unwrap_or(u64::MAX);
            if received >= n as u64 && outbox == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "flood: {received} of {n} commands processed, {outbox} replies in the outbox"
                );
            }
            tokio::time::sleep(POLL * 5).await;
        }
        report.set("flood_commands", n as f64);
        report.set("flood_processed_s", started.elapsed().as_secs_f64());
        let at_processed = procs::dir_size(&store)?.0;
        // Space back: the size has stopped changing for longer than the
        // reclaim period and the WAL is checkpointed.
        let mut after = at_processed;
        if self.size.settle_s > 0 {
            let started = Instant::now();
            let mut stable_since = started;
            let mut settled = None;
            while started.elapsed() < self.settle_within() + SIZE_STABLE {
                tokio::time::sleep(POLL * 10).await;
                let now = procs::dir_size(&store)?.0;
                peak = peak.max(now);
                if now != after {
                    after = now;
                    stable_since = Instant::now();
                } else if stable_since.elapsed() >= SIZE_STABLE {
                    settled = Some(started.elapsed());
                    break;
                }
            }
            report.set(
                "flood_space_back_s",
                settled.map_or(f64::NAN, |d| d.as_secs_f64()),
            );
        }
        let (db, wal) = procs::db_and_wal(&store);
        agent.terminate().await?;
        let restarted = procs::dir_size(&store)?.0;
        let kib = |b: u64| b as f64 / 1024.0;
        report.set("flood_store_before_kib", kib(before));
        report.set("flood_store_peak_kib", kib(peak));
        report.set("flood_store_processed_kib", kib(at_processed));
        report.set("flood_store_after_kib", kib(after));
        report.set("flood_store_after_db_kib", kib(db));
        report.set("flood_store_after_wal_kib", kib(wal));
        report.set("flood_store_stopped_kib", kib(restarted));
        report.set("flood_store_ratio", after as f64 / before.max(1) as f64);
        Ok(())
    }

    /// RSS of an agent with `idle_tags` tags that check in every second and
    /// no tasks, `idle_secs` after it answered its control socket.
    pub async fn idle(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let spec = self.spec("idle", self.size.idle_tags, 1000);
        let mut agent = AgentProc::start(self.bin, &spec)?;
        agent.wait_control(Duration::from_secs(30)).await?;
        let checkins0 = agent.counter("checkins").await?;
        tokio::time::sleep(Duration::from_secs(self.size.idle_secs)).await;
        let checkins = agent.counter("checkins").await? - checkins0;
        report.set("idle_tags", spec.tags as f64);
        report.set(
            "idle_checkins_per_s",
            checkins as f64 / self.size.idle_secs as f64,
        );
        report.set("idle_rss_mib", agent.rss_kib()? as f64 / 1024.0);
        report.set("idle_peak_rss_mib", agent.peak_rss_kib()? as f64 / 1024.0);
        agent.terminate().await?;
        Ok(())
    }
}

/// A random id in the UUID version 4 layout (`xxxxxxxx-xxxx-4xxx-yxxx-…`).
fn uuid_like(rng: &mut impl Rng) -> String {
    let v: u128 = rng.gen();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
        (v >> 96) as u32,
        (v >> 80) as u16,
        (v >> 68) as u16 & 0xfff,
        8 + ((v >> 66) as u8 & 3),
        (v >> 48) as u16 & 0xfff,
        v as u64 & 0xffff_ffff_ffff
    )
}
