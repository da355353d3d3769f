//! [`TestEnv`]: one test's temp dir and the failure report. On a failing test
//! it prints the tail of the agent and broker logs and keeps the dir.

use std::path::{Path, PathBuf};

use super::journal::Journal;
use super::process::tail;
use super::{LOG_TAIL_LINES, MOSQUITTO};

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

    /// Everything the agent logged so far (all runs).
    pub fn agent_log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.agent_log()).unwrap_or_default()).into_owned()
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
