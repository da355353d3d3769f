//! What a benchmark run prints: figures collected by name, then a human
//! table (stdout) and one JSON line (stdout, and `--json FILE`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};
use tokio::time::Instant;

/// Final acks of one end-to-end phase.
pub struct Stats {
    n: usize,
    started: Instant,
    max_outbox: u64,
    offered: Option<u64>,
    by_status: BTreeMap<String, usize>,
    /// Publish → `applied` ack, in ms.
    latencies: Vec<f64>,
    last_applied: Option<Instant>,
    last_final: Option<Instant>,
}

impl Stats {
    pub fn new(n: usize, started: Instant, max_outbox: u64, offered: Option<u64>) -> Stats {
        Stats {
            n,
            started,
            max_outbox,
            offered,
            by_status: BTreeMap::new(),
            latencies: Vec::with_capacity(n),
            last_applied: None,
            last_final: None,
        }
    }

    pub fn add(&mut self, status: &str, sent: Instant, acked: Instant) {
        *self.by_status.entry(status.to_owned()).or_default() += 1;
        self.last_final = self.last_final.max(Some(acked));
        if status == "applied" {
            self.latencies
                .push(acked.saturating_duration_since(sent).as_secs_f64() * 1000.0);
            self.last_applied = self.last_applied.max(Some(acked));
        }
    }
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub struct Report {
    figures: Map<String, Value>,
}

impl Report {
    pub fn new(size: &Value, bin: &Path, external: bool) -> anyhow::Result<Report> {
        let mut figures = Map::new();
        figures.insert("size".into(), size.clone());
        figures.insert(
            "profile".into(),
            if cfg!(debug_assertions) {
                "dev"
            } else {
                "release"
            }
            .into(),
        );
        figures.insert("agent_bin".into(), bin.display().to_string().into());
        // With ESL_BENCH_AGENT_BIN the agent is not this build: its profile
        // is whatever it was built with.
        figures.insert("agent_bin_external".into(), external.into());
        figures.insert(
            "agent_bin_mib".into(),
            (std::fs::metadata(bin)?.len() as f64 / 1048576.0).into(),
        );
        Ok(Report { figures })
    }

    pub fn set(&mut self, key: &str, value: f64) {
        self.figures.insert(key.to_owned(), json!(value));
    }

    fn get(&self, key: &str) -> f64 {
        self.figures
            .get(key)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }

    pub fn end_to_end(&mut self, p: &str, s: &Stats) {
        let mut lat = s.latencies.clone();
        lat.sort_by(f64::total_cmp);
        let span = |end: Option<Instant>| {
            end.map(|e| e.saturating_duration_since(s.started).as_secs_f64())
                .unwrap_or(f64::NAN)
        };
        let applied = lat.len();
        self.set(&format!("{p}_tasks"), s.n as f64);
        if let Some(rate) = s.offered {
            self.set(&format!("{p}_offered_per_s"), rate as f64);
        }
        self.set(
            &format!("{p}_applied_per_s"),
            applied as f64 / span(s.last_applied),
        );
        self.set(
            &format!("{p}_final_acks_per_s"),
            s.n as f64 / span(s.last_final),
        );
        self.set(&format!("{p}_latency_ms_p50"), quantile(&lat, 0.50));
        self.set(&format!("{p}_latency_ms_p99"), quantile(&lat, 0.99));
        self.set(&format!("{p}_latency_ms_max"), quantile(&lat, 1.0));
        self.set(&format!("{p}_max_outbox"), s.max_outbox as f64);
        self.figures
            .insert(format!("{p}_statuses"), json!(s.by_status));
    }

    pub fn print(&mut self, json_file: Option<&Path>) -> anyhow::Result<()> {
        let ingest = self.get("ingest_per_s");
        self.set(
            "ingest_vs_subscriber",
            ingest / self.get("ceiling_subscriber_per_s"),
        );
        self.set("ingest_vs_fsync", ingest / self.get("ceiling_fsync_per_s"));
        let f = |k: &str| self.get(k);
        let disk = |k: &str| {
            format!(
                "{:.0} B; {:.0} B with the stop (quiet after {:.1} s, WAL {:.0} KiB)",
                f(&format!("{k}_bytes_per_task")),
                f(&format!("{k}_bytes_per_task_with_stop")),
                f(&format!("{k}_settle_s")),
                f(&format!("{k}_wal_kib"))
            )
        };
        let rows: Vec<(String, String)> = vec![
            (
                "ceiling: bare QoS 1 subscriber".into(),
                format!("{:.0} msg/s", f("ceiling_subscriber_per_s")),
            ),
            (
                "ceiling: fdatasync (4 KiB appends)".into(),
                format!("{:.0} /s", f("ceiling_fsync_per_s")),
            ),
            (
                "ingest: stored + PUBACKed".into(),
                format!("{:.0} tasks/s", ingest),
            ),
            (
                "  ratio to bare subscriber".into(),
                format!("{:.2}", f("ingest_vs_subscriber")),
            ),
            (
                "  ratio to fsync rate".into(),
                format!("{:.1}x", f("ingest_vs_fsync")),
            ),
            (
                "  tasks per store flush".into(),
                format!("{:.1}", f("tasks_per_flush")),
            ),
            (
                "ingest (fill to pending)".into(),
                format!("{:.0} tasks/s", f("ingest_fill_per_s")),
            ),
            (
                "fixed rate: offered".into(),
                format!("{:.0} tasks/s", f("e2e_fixed_offered_per_s")),
            ),
            (
                "  applied acks".into(),
                format!("{:.0} /s", f("e2e_fixed_applied_per_s")),
            ),
            (
                "  publish->applied p50/p99/max".into(),
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    f("e2e_fixed_latency_ms_p50"),
                    f("e2e_fixed_latency_ms_p99"),
                    f("e2e_fixed_latency_ms_max")
                ),
            ),
            (
                "  outbox backlog (max seen)".into(),
                format!("{:.0}", f("e2e_fixed_max_outbox")),
            ),
            (
                "saturation: applied acks".into(),
                format!("{:.0} /s", f("e2e_saturation_applied_per_s")),
            ),
            (
                "  all final acks".into(),
                format!("{:.0} /s", f("e2e_saturation_final_acks_per_s")),
            ),
            (
                "  publish->applied p50/p99/max".into(),
                format!(
                    "{:.0} / {:.0} / {:.0} ms",
                    f("e2e_saturation_latency_ms_p50"),
                    f("e2e_saturation_latency_ms_p99"),
                    f("e2e_saturation_latency_ms_max")
                ),
            ),
            (
                "  outbox backlog (max seen)".into(),
                format!("{:.0}", f("e2e_saturation_max_outbox")),
            ),
            (
                "footprint: pending tasks".into(),
                format!("{:.0}", f("pending_tasks")),
            ),
            (
                "  peak RSS after ingest".into(),
                format!("{:.1} MiB", f("peak_rss_mib_ingest")),
            ),
            (
                "  peak RSS after recovery".into(),
                format!("{:.1} MiB", f("peak_rss_mib_recovered")),
            ),
            (
                "  peak RSS end to end".into(),
                format!("{:.1} MiB", f("peak_rss_mib_e2e")),
            ),
            (
                "  CPU per 1000 tasks ingested".into(),
                format!("{:.3} s", f("cpu_s_per_1000_ingested")),
            ),
            (
                "  CPU per 1000 tasks end to end".into(),
                format!("{:.3} s", f("cpu_s_per_1000_end_to_end")),
            ),
            (
                "  store on disk".into(),
                format!("{:.1} MiB", f("store_mib")),
            ),
            (
                "  store per pending task".into(),
                format!(
                    "{:.0} B (allocated {:.0} B)",
                    f("store_bytes_per_pending"),
                    f("store_alloc_bytes_per_pending")
                ),
            ),
            (
                "disk: bytes written per task".into(),
                format!(
                    "{:.0} tasks over {:.0} tags",
                    f("disk_burst_tasks"),
                    f("disk_tags")
                ),
            ),
            ("  burst, sequential ids".into(), disk("disk_burst_seq")),
            ("  burst, random (UUID) ids".into(), disk("disk_burst_uuid")),
            (
                format!(
                    "  trickle, 10 tasks/s ({:.0} tasks)",
                    f("disk_trickle_tasks")
                ),
                disk("disk_trickle"),
            ),
            (
                "flood: commands processed".into(),
                format!(
                    "{:.0} in {:.1} s",
                    f("flood_commands"),
                    f("flood_processed_s")
                ),
            ),
            (
                "  store before / peak / after".into(),
                format!(
                    "{:.0} / {:.0} / {:.0} KiB ({:.1}x)",
                    f("flood_store_before_kib"),
                    f("flood_store_peak_kib"),
                    f("flood_store_after_kib"),
                    f("flood_store_ratio")
                ),
            ),
            (
                "  after: database + WAL; stopped".into(),
                format!(
                    "{:.0} + {:.0} KiB; {:.0} KiB",
                    f("flood_store_after_db_kib"),
                    f("flood_store_after_wal_kib"),
                    f("flood_store_stopped_kib")
                ),
            ),
            (
                "idle: RSS / peak RSS".into(),
                format!(
                    "{:.1} / {:.1} MiB ({:.0} tags, {:.0} check-ins/s)",
                    f("idle_rss_mib"),
                    f("idle_peak_rss_mib"),
                    f("idle_tags"),
                    f("idle_checkins_per_s")
                ),
            ),
            (
                "recovery: start to first PUBACK".into(),
                format!("{:.2} s", f("recovery_s")),
            ),
            (
                "shutdown after SIGTERM".into(),
                format!("{:.2} s", f("shutdown_s")),
            ),
            (
                "binary".into(),
                format!(
                    "{:.2} MiB ({})",
                    f("agent_bin_mib"),
                    if self.figures["agent_bin_external"] == true {
                        "ESL_BENCH_AGENT_BIN"
                    } else {
                        self.figures["profile"].as_str().unwrap_or("?")
                    }
                ),
            ),
        ];
        println!("\nesl-agent benchmark ({})", self.figures["size"]);
        for (name, value) in rows {
            println!("  {name:<36} {value}");
        }
        let line = Value::Object(self.figures.clone()).to_string();
        println!("{line}");
        if let Some(path) = json_file {
            std::fs::write(path, format!("{line}\n"))?;
        }
        Ok(())
    }
}
