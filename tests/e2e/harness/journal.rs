//! [`Journal`]: what the simulated tags actually displayed (PROTOCOL §8),
//! read from the `journal-*.jsonl` files of all agent runs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One line of the simulator's journal (PROTOCOL §8).
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub tag_id: String,
    pub task_id: String,
    pub content_hash: String,
}

/// What the simulated tags displayed, in order, over all agent runs.
#[derive(Debug, Default)]
pub struct Journal {
    pub entries: Vec<JournalEntry>,
}

impl Journal {
    /// Reads `journal-*.jsonl` in `dir` in run order. A last line without a
    /// newline may still be being written and is skipped. So is a line cut
    /// short by a kill mid-write (the simulator ends it with a newline at its
    /// next start and skips it too: that display never reported an outcome,
    /// and counts as not shown). Anything else that is not JSON fails.
    pub(super) fn read_dir(dir: &Path) -> Journal {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .expect("read the test dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                name.starts_with("journal-") && name.ends_with(".jsonl")
            })
            .collect();
        files.sort();
        let mut entries = Vec::new();
        for file in files {
            let text = fs::read_to_string(&file).expect("the journal is UTF-8");
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            for line in complete.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = match serde_json::from_str(line) {
                    Ok(v) => v,
                    Err(e) if e.is_eof() => continue,
                    Err(e) => panic!("journal line is not JSON ({e}): {line}"),
                };
                let field = |key: &str| {
                    v[key]
                        .as_str()
                        .unwrap_or_else(|| panic!("journal line without string \"{key}\": {line}"))
                        .to_owned()
                };
                entries.push(JournalEntry {
                    tag_id: field("tag_id"),
                    task_id: field("task_id"),
                    content_hash: field("content_hash"),
                });
            }
        }
        Journal { entries }
    }

    pub fn count(&self, task_id: &str) -> usize {
        self.entries.iter().filter(|e| e.task_id == task_id).count()
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.count(task_id) > 0
    }

    /// What `tag_id` displays now, as far as the journal knows.
    pub fn last_for_tag(&self, tag_id: &str) -> Option<&JournalEntry> {
        self.entries.iter().rev().find(|e| e.tag_id == tag_id)
    }

    pub fn assert_no_task_twice(&self) {
        let mut seen = BTreeMap::<&str, usize>::new();
        for entry in &self.entries {
            *seen.entry(&entry.task_id).or_default() += 1;
        }
        let twice: Vec<_> = seen.into_iter().filter(|(_, n)| *n > 1).collect();
        assert!(
            twice.is_empty(),
            "tasks displayed more than once (task, times): {twice:?}"
        );
    }
}
