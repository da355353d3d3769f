//! What the demo shows on the terminal: the live progress line and the
//! summary's text.
//!
//! Only printing lives here; the numbers come from the ledger. Progress
//! goes to stdout, redrawn in place (`\r`) when stdout is a terminal, one
//! line a second when it is a file or a pipe, so logs and CI output stay
//! readable.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

use super::{DemoSummary, MAX_ATTEMPTS};

/// The progress line is redrawn this often on a terminal…
pub(crate) const PROGRESS_TICK: Duration = Duration::from_millis(250);
/// …and printed this often when stdout is a file or a pipe.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(1);

/// The live progress line: redrawn in place on a terminal, one line a
/// second otherwise, nothing when quiet.
pub(crate) struct Progress {
    mode: ProgressMode,
    printed_at: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ProgressMode {
    Quiet,
    Terminal,
    Lines,
}

impl Progress {
    pub(crate) fn new(quiet: bool) -> Progress {
        let mode = match () {
            _ if quiet => ProgressMode::Quiet,
            _ if std::io::stdout().is_terminal() => ProgressMode::Terminal,
            _ => ProgressMode::Lines,
        };
        Progress {
            mode,
            printed_at: None,
        }
    }

    pub(crate) fn show(&mut self, line: &str) {
        match self.mode {
            ProgressMode::Quiet => {}
            // `\x1b[K` clears what a longer previous line left behind.
            ProgressMode::Terminal => {
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "\r{line}\x1b[K");
                let _ = out.flush();
            }
            ProgressMode::Lines => {
                if self
                    .printed_at
                    .is_none_or(|at| at.elapsed() >= PROGRESS_LINE_EVERY)
                {
                    self.printed_at = Some(Instant::now());
                    println!("{line}");
                }
            }
        }
    }

    pub(crate) fn finish(&mut self, line: &str) {
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Terminal => println!("\r{line}\x1b[K"),
            ProgressMode::Lines => println!("{line}"),
        }
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.outcomes;
        writeln!(f, "\nsummary after {:.1} s", self.elapsed.as_secs_f64())?;
        let sent = format!(
            "messages: {} price changes, {} malformed on purpose",
            self.sent - self.malformed,
            self.malformed
        );
        let failed = format!("the radio gave up after {MAX_ATTEMPTS} attempts");
        let duplicate = match self.duplicate_resent {
            true => "a task resent with its task_id: its first ack came again",
            false => "no task was resent",
        };
        let lost = match self.lost {
            0 => "sent but never answered",
            _ => "sent but never answered: a bug in the agent",
        };
        // (name, count, meaning, shown when 0); a table reads best aligned.
        #[rustfmt::skip]
        let rows: [(&str, usize, &str, bool); 12] = [
            ("sent",            self.sent,                &sent,                                        true),
            ("applied",         o.applied,                "the tag confirmed the new price",            true),
            ("failed",          o.failed,                 &failed,                                      true),
            ("expired",         o.expired,                "ttl ran out first (offline tags, backlog)",  true),
            ("superseded",      o.superseded,             "a newer price for the same tag came first",  true),
            ("rejected",        o.rejected,               "malformed; the ack names field and rule",    true),
            ("duplicates seen", self.duplicates_seen,     duplicate,                                    true),
            ("repeated acks",   self.repeated_acks,       "a final ack again (at least once)",          false),
            ("CONFLICTING",     self.conflicting_acks,    "two different final acks: a bug",            false),
            ("unexpected",      self.unexpected_messages, "acks nobody asked for",                      false),
            ("unfinished",      self.unfinished,          "no final ack yet when stopped",              false),
            ("lost",            self.lost,                lost,                                         true),
        ];
        for (name, n, meaning, always) in rows {
            if always || n > 0 {
                writeln!(f, "  {name:<16}{n:>6}  {meaning}")?;
            }
        }
        if let Some(l) = self.latency {
            writeln!(
                f,
                "  {:<16}p50 {} ms · p99 {} ms · max {} ms (publish → applied ack)",
                "latency",
                l.p50.as_millis(),
                l.p99.as_millis(),
                l.max.as_millis()
            )?;
        }
        if !self.tags.is_empty() {
            writeln!(f, "tags, as the agent reports them:")?;
        }
        for t in &self.tags {
            write!(f, "  {}", t.tag.tag_id)?;
            if t.tag.last_seen.is_none() {
                writeln!(
                    f,
                    "  never checked in (offline): its tasks expire unapplied"
                )?;
                continue;
            }
            let battery = t.tag.battery_mv.map_or("?".into(), |b| b.to_string());
            let rssi = t.tag.rssi.map_or("?".into(), |r| r.to_string());
            let hash = t.tag.content_hash.as_deref().unwrap_or("nothing yet");
            write!(f, "  battery {battery} mV  rssi {rssi} dBm  shows {hash}")?;
            match &t.last_applied {
                Some((h, label)) if h == hash => {
                    writeln!(f, " = {label}, the newest price applied")?
                }
                Some((h, label)) => writeln!(f, " (newest applied: {label}, {h})")?,
                None => writeln!(f)?,
            }
        }
        if let Some(ack) = &self.example_ack {
            writeln!(f, "example ack:       {ack}")?;
        }
        if let Some(detail) = &self.example_rejection {
            writeln!(f, "example rejection: {detail}")?;
        }
        Ok(())
    }
}
