//! Assertions several scenarios share, so each rule is written once:
//! per-tag ordering, journal against acks, content-hash consistency.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::acks::{AckLog, AckStatus};
use super::journal::Journal;
use super::str_field;

/// Per-tag ordering (PROTOCOL §4.5): for each tag, the task with the highest
/// `seq` is `applied`; every other task is `applied` or `superseded`. Every
/// final ack names the task's tag.
pub fn assert_latest_per_tag_applied(tasks: &[Value], acks: &AckLog) {
    let mut latest: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
    for t in tasks {
        let (id, tag) = (str_field(t, "task_id"), str_field(t, "tag_id"));
        let seq = t["seq"].as_u64().expect("test tasks carry a seq");
        let ack = acks.final_ack(id);
        assert_eq!(
            ack.tag_id(),
            Some(tag),
            "ack names the wrong tag: {}",
            ack.json
        );
        assert!(
            matches!(ack.status(), AckStatus::Applied | AckStatus::Superseded),
            "task {id} should be applied or superseded: {}",
            ack.json
        );
        let entry = latest.entry(tag).or_insert((seq, id));
        if seq > entry.0 {
            *entry = (seq, id);
        }
    }
    for (tag, (_, id)) in latest {
        assert_eq!(
            acks.status(id),
            AckStatus::Applied,
            "the newest task {id} for {tag} must be applied: {}",
            acks.final_ack(id).json
        );
    }
}

/// The journal agrees with the acks: no task displayed twice, nothing
/// foreign; every `applied` task displayed once, on its tag, with the ack's
/// content hash — or not at all when its tag already showed that content
/// (the agent may skip a redundant delivery); each tag ends up showing the
/// content of its newest task.
pub fn assert_journal_matches(tasks: &[Value], acks: &AckLog, journal: &Journal) {
    journal.assert_no_task_twice();
    let ids: BTreeSet<&str> = tasks.iter().map(|t| str_field(t, "task_id")).collect();
    for entry in &journal.entries {
        assert!(
            ids.contains(entry.task_id.as_str()),
            "journal shows an unknown task: {entry:?}"
        );
    }
    let mut newest: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
    for t in tasks {
        let (id, tag) = (str_field(t, "task_id"), str_field(t, "tag_id"));
        let ack = acks.final_ack(id);
        if ack.status() == AckStatus::Applied {
            let hash = ack.content_hash();
            match journal.entries.iter().find(|e| e.task_id == id) {
                Some(shown) => {
                    assert_eq!(shown.tag_id, tag, "task {id} displayed on the wrong tag");
                    assert_eq!(
                        Some(shown.content_hash.as_str()),
                        hash,
                        "journal and ack disagree on the content hash of {id}"
                    );
                }
                None => assert!(
                    journal
                        .entries
                        .iter()
                        .any(|e| e.tag_id == tag && Some(e.content_hash.as_str()) == hash),
                    "task {id} was acked applied, but {tag} never displayed it \
                     (nor any other task with content hash {hash:?})"
                ),
            }
        }
        let seq = t["seq"].as_u64().expect("test tasks carry a seq");
        let entry = newest.entry(tag).or_insert((seq, id));
        if seq > entry.0 {
            *entry = (seq, id);
        }
    }
    for (tag, (_, id)) in newest {
        let shown = journal.last_for_tag(tag).map(|e| e.content_hash.as_str());
        assert_eq!(
            shown,
            acks.final_ack(id).content_hash(),
            "{tag} should end up showing the content of its newest task {id}"
        );
    }
}

/// `content_hash` depends on the content only (PROTOCOL §5): equal content,
/// equal hash; different content, different hash.
pub fn assert_content_hash_consistent(tasks: &[Value], acks: &AckLog) {
    let mut by_content: BTreeMap<String, &str> = BTreeMap::new();
    let mut by_hash: BTreeMap<&str, String> = BTreeMap::new();
    for t in tasks {
        let ack = acks.final_ack(str_field(t, "task_id"));
        let Some(hash) = ack.content_hash() else {
            assert_ne!(
                ack.status(),
                AckStatus::Applied,
                "applied ack without content_hash: {}",
                ack.json
            );
            continue;
        };
        // serde_json's default map is sorted, so this string is canonical.
        let content = t["content"].to_string();
        let known = *by_content.entry(content.clone()).or_insert(hash);
        assert_eq!(known, hash, "equal content {content} got different hashes");
        let known = by_hash.entry(hash).or_insert(content.clone());
        assert_eq!(*known, content, "different contents share the hash {hash}");
    }
}
