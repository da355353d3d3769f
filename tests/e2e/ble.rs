//! The BLE radio end to end: the real agent binary with `radio.kind = "ble"`
//! on fake ESL tags (`[radio.ble.fake]`), real Mosquitto, the back end on
//! rumqttc. Every task goes through the ESL Service sessions (vendor
//! content transfer, Display Image, Update Complete) against the fake tags,
//! which journal what they display, so `applied` is checked against what a
//! tag shows and not only against what the agent says.
//!
//! No Bluetooth controller is involved (there is none on these machines);
//! docs/BLE.md lists what this does and does not cover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use esl_hal::ble::fake_esl::fake_address as ble_tag;
use serde_json::Value;
use tokio::time::Instant;

use crate::harness::{
    assert_content_hash_consistent, assert_latest_per_tag_applied, task, task_ids, toml_path,
    AckStatus, Stack,
};

const FAKE_TAGS: u32 = 4;

/// The `[radio]` section: BLE on fake tags advertising every 100 ms.
fn ble_radio(journal: &Path, corrupt: &[String]) -> String {
    format!(
        "[radio]\n\
         kind = \"ble\"\n\
         \n\
         [radio.ble]\n\
         checkin_interval_ms = 100\n\
         retry_backoff_ms = 100\n\
         \n\
         [radio.ble.fake]\n\
         tags = {FAKE_TAGS}\n\
         adv_interval_ms = 100\n\
         corrupt = {corrupt}\n\
         journal = {journal}\n",
        corrupt = Value::from(corrupt.to_vec()),
        journal = toml_path(journal),
    )
}

fn journal_path(stack_store: &Path) -> PathBuf {
    stack_store.with_file_name("ble-journal.jsonl")
}

/// What the fake tags displayed, in order: (tag, content hash).
fn displayed(journal: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("fake BLE journal line is not JSON ({e}): {line}"));
            let field = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("no {k}: {line}"))
                    .to_owned()
            };
            (field("tag_id"), field("content_hash"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ble_fake_tags_apply_tasks_end_to_end() {
    let mut stack = Stack::start("ble-applied", |c| {
        c.status_interval_s = 1;
        c.radio_toml = Some(ble_radio(&journal_path(&c.store), &[]));
    })
    .await;
    let journal = journal_path(&stack.config.store);
    let tags: Vec<String> = (0..FAKE_TAGS).map(ble_tag).collect();
    // The fake tags are known before they check in.
    let records = stack
        .backend
        .expect_hello_tags(&tags, Duration::from_secs(10))
        .await;
    assert_eq!(records.len(), tags.len());

    // Three tasks per tag, newest last.
    let tasks: Vec<Value> = (0..12u32)
        .map(|i| {
            task(
                &format!("t-ble-{i:02}"),
                &ble_tag(i % FAKE_TAGS),
                100 + u64::from(i),
            )
        })
        .collect();
    let acks = stack.settle(&tasks, Duration::from_secs(60)).await;
    let ids = task_ids(&tasks);
    assert_latest_per_tag_applied(&tasks, &acks);
    assert_content_hash_consistent(&tasks, &acks);

    // Each applied ack matches what its tag displayed, and each tag shows
    // its newest task's content now.
    let shown = displayed(&journal);
    for id in &ids {
        let ack = acks.final_ack(id);
        if ack.status() == AckStatus::Applied {
            let entry = (
                ack.tag_id().expect("tag").to_owned(),
                ack.content_hash().expect("hash").to_owned(),
            );
            assert!(
                shown.contains(&entry),
                "{id} applied but never displayed: {shown:?}"
            );
        }
    }
    let last: BTreeMap<&str, &str> = shown
        .iter()
        .map(|(t, h)| (t.as_str(), h.as_str()))
        .collect();
    for t in tasks.iter().skip(8) {
        let id = t["task_id"].as_str().unwrap();
        let tag = t["tag_id"].as_str().unwrap();
        assert_eq!(
            last.get(tag).copied(),
            acks.final_ack(id).content_hash(),
            "{tag} shows its newest content"
        );
    }

    // Status: every tag with its signal (advertisements) and battery
    // (read in the delivery session, reported with the next check-in).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let report = stack
            .backend
            .expect_status("periodic", deadline - Instant::now())
            .await;
        let records = report["tags"].as_array().cloned().unwrap_or_default();
        let complete = tags.iter().all(|tag| {
            records.iter().any(|r| {
                r["tag_id"] == tag.as_str()
                    && r["rssi"].is_number()
                    && r["battery_mv"].is_number()
                    && r["last_seen"].is_number()
                    && r["online"] == true
            })
        });
        if complete {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no periodic report with rssi and battery for every tag: {report}"
        );
    }
    stack.agent.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ble_tag_that_garbles_content_gets_failed_with_the_reason() {
    let bad = ble_tag(0);
    let mut stack = Stack::start("ble-failed", |c| {
        c.max_attempts = 2;
        c.radio_toml = Some(ble_radio(
            &journal_path(&c.store),
            std::slice::from_ref(&bad),
        ));
    })
    .await;
    let journal = journal_path(&stack.config.store);
    let tasks = vec![
        task("t-ble-bad", &bad, 1),
        task("t-ble-good", &ble_tag(1), 1),
    ];
    let acks = stack.settle(&tasks, Duration::from_secs(30)).await;

    let failed = acks.final_ack("t-ble-bad");
    assert_eq!(failed.status(), AckStatus::Failed, "{}", failed.json);
    assert_eq!(failed.attempts(), 2, "{}", failed.json);
    let detail = failed.detail().expect("a failed ack says why");
    assert!(detail.contains("content check failed"), "{detail}");
    assert_eq!(acks.status("t-ble-good"), AckStatus::Applied);

    let shown = displayed(&journal);
    assert!(
        shown.iter().all(|(tag, _)| *tag != bad),
        "{bad} displayed garbled content: {shown:?}"
    );
    assert_eq!(shown.len(), 1, "{shown:?}");
    stack.agent.assert_running();
}
