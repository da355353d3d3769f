//! The BLE radio end to end: the real agent binary with `radio.kind = "ble"`
//! on fake ESL tags (`[radio.ble.fake]`), real Mosquitto, the back end on
//! rumqttc. Every task goes through the ESL Service sessions (vendor
//! content transfer or an OTS image, Display Image, Update Complete)
//! against the fake tags, which journal what they display, so `applied` is
//! checked against what a tag shows and not only against what the agent
//! says. The tags' Information reaches `tag.get` and `tags.list`, and an
//! image that cannot fit is `rejected` at intake.
//!
//! No Bluetooth controller is involved (there is none on these machines);
//! docs/BLE.md lists what this does and does not cover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use esl_hal::ble::fake_esl::fake_address as ble_tag;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::harness::{
    assert_content_hash_consistent, assert_latest_per_tag_applied, task, task_ids, toml_path,
    AckStatus, Stack,
};

const FAKE_TAGS: u32 = 4;

/// The `[radio]` section: BLE on fake tags advertising every 100 ms.
fn ble_radio(journal: &Path, corrupt: &[String]) -> String {
    ble_radio_with(journal, corrupt, &[], "")
}

/// [`ble_radio`] with stock (OTS-only) tags and more `[radio.ble]` lines.
fn ble_radio_with(journal: &Path, corrupt: &[String], ots_only: &[String], ble: &str) -> String {
    format!(
        "[radio]\n\
         kind = \"ble\"\n\
         \n\
         [radio.ble]\n\
         checkin_interval_ms = 100\n\
         retry_backoff_ms = 100\n\
         {ble}\n\
         \n\
         [radio.ble.fake]\n\
         tags = {FAKE_TAGS}\n\
         adv_interval_ms = 100\n\
         corrupt = {corrupt}\n\
         ots_only = {ots_only}\n\
         journal = {journal}\n",
        corrupt = Value::from(corrupt.to_vec()),
        ots_only = Value::from(ots_only.to_vec()),
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

/// Calls `method` (PROTOCOL §7) and returns the result of its successful
/// reply.
async fn call(stack: &mut Stack, req_id: &str, method: &str, params: Value) -> Value {
    let reply = stack
        .backend
        .call(req_id, method, params, Duration::from_secs(10))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    reply["result"].clone()
}

/// The tag's details once the radio has configured it (its first
/// advertisement brings a battery poll, which configures it); panics after
/// `timeout`. Until its first check-in the agent does not know the tag.
async fn configured_details(stack: &mut Stack, tag: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    for attempt in 0.. {
        let request = format!("r-get-{attempt}");
        let reply = stack
            .backend
            .call(
                &request,
                "tag.get",
                json!({ "tag_id": tag }),
                Duration::from_secs(10),
            )
            .await;
        if reply["ok"] != true {
            assert_eq!(reply["error"]["code"], "not_found", "{reply}");
        } else if reply["result"]["radio"]["configured"] == true {
            return reply["result"]["radio"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "{tag} not configured within {timeout:?}: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!("the loop returns or panics")
}

/// A task whose content is a `ble_image` of `len` bytes for display 0,
/// image slot 1.
fn image_task(task_id: &str, tag: &str, len: usize) -> Value {
    use base64::Engine as _;
    let mut t = task(task_id, tag, 1);
    t["content"] = json!({"ble_image": {"display": 0, "image": 1,
        "bitmap": base64::engine::general_purpose::STANDARD.encode(vec![0x0Fu8; len])}});
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ble_tag_information_is_shown_and_a_misfit_image_is_rejected_naming_the_size() {
    let mut stack = Stack::start("ble-info", |c| {
        c.status_interval_s = 1;
        c.radio_toml = Some(ble_radio(&journal_path(&c.store), &[]));
    })
    .await;
    let tag = ble_tag(0);

    // tag.get: what the radio read while configuring the tag.
    let details = configured_details(&mut stack, &tag, Duration::from_secs(20)).await;
    assert_eq!(
        details["displays"],
        json!([{"index": 0, "width": 296, "height": 128, "type": "black_white",
                "image_bytes": 4736}]),
        "{details}"
    );
    assert_eq!(details["image_slots"], 2, "{details}");
    assert_eq!(details["bonded"], true, "{details}");
    assert_eq!(
        details["content_paths"],
        json!(["ots", "vendor"]),
        "{details}"
    );
    assert!(details["esl_address"]["esl_id"].is_number(), "{details}");
    assert_eq!(details["sensors"][0]["mesh_property"], 0x0059, "{details}");

    // tags.list carries the same details; status reports do not.
    let reply = call(&mut stack, "r-list", "tags.list", json!({})).await;
    let listed = reply["tags"].as_array().cloned().unwrap_or_default();
    let record = listed
        .iter()
        .find(|r| r["tag_id"] == tag.as_str())
        .unwrap_or_else(|| panic!("{tag} not in tags.list: {reply}"));
    assert_eq!(record["radio"]["displays"], details["displays"], "{record}");
    let report = stack
        .backend
        .expect_status("periodic", Duration::from_secs(10))
        .await;
    let tags = report["tags"].as_array().cloned().unwrap_or_default();
    assert!(!tags.is_empty(), "{report}");
    assert!(tags.iter().all(|r| r.get("radio").is_none()), "{report}");

    // An image of the wrong size is rejected at once, naming the size the
    // display takes; one of the right size is applied over OTS.
    let tasks = vec![
        image_task("t-img-small", &tag, 10),
        image_task("t-img-fits", &tag, 4736),
    ];
    let acks = stack.settle(&tasks, Duration::from_secs(30)).await;
    let rejected = acks.final_ack("t-img-small");
    assert_eq!(rejected.status(), AckStatus::Rejected, "{}", rejected.json);
    assert_eq!(
        rejected.detail(),
        Some(
            "content.ble_image.bitmap is 10 bytes; display 0 (296x128, BlackWhite) takes \
             4736 bytes"
        ),
        "{}",
        rejected.json
    );
    assert_eq!(acks.status("t-img-fits"), AckStatus::Applied);
    stack.agent.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_tags_content_paths_survive_a_restart_and_other_content_is_rejected() {
    let tag = ble_tag(0);
    let stock = [tag.clone()];
    let mut stack = Stack::start("ble-paths", |c| {
        c.radio_toml = Some(ble_radio_with(&journal_path(&c.store), &[], &stock, ""));
    })
    .await;
    // The first run's battery poll configures the tag and finds its paths.
    let details = configured_details(&mut stack, &tag, Duration::from_secs(20)).await;
    assert_eq!(details["content_paths"], json!(["ots"]), "{details}");
    stack.agent.terminate().await;

    // The next run never connects before a delivery (no battery polls),
    // yet knows the paths from the store.
    let since = stack.broker.log_len();
    stack.start_next_agent(|c| {
        c.radio_toml = Some(ble_radio_with(
            &journal_path(&c.store),
            &[],
            &stock,
            "battery_poll_interval_s = 0",
        ));
    });
    stack
        .agent
        .wait_subscribed(&stack.broker, since, Duration::from_secs(15))
        .await;
    let result = call(&mut stack, "r-get", "tag.get", json!({ "tag_id": &tag })).await;
    assert_eq!(result["radio"]["content_paths"], json!(["ots"]), "{result}");
    assert_eq!(result["radio"]["configured"], false, "{result}");

    // Without the stored paths this would go to the tag and fail there.
    let acks = stack
        .settle(&[task("t-text", &tag, 1)], Duration::from_secs(30))
        .await;
    let rejected = acks.final_ack("t-text");
    assert_eq!(rejected.status(), AckStatus::Rejected, "{}", rejected.json);
    let detail = rejected.detail().unwrap_or_default();
    assert!(
        detail.starts_with("content: the tag shows only images"),
        "{}",
        rejected.json
    );
    let acks = stack
        .settle(
            &[image_task("t-image", &tag, 4736)],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(acks.status("t-image"), AckStatus::Applied);
    stack.agent.assert_running();
}
