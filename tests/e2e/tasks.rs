//! Task handling through the whole stack (PROTOCOL §4, §5, §8): the happy
//! path, every rejection rule, duplicates, expiry, per-tag ordering, offline
//! tags, a failing radio and `reply_to`. The agent keeps running throughout;
//! restarts are in `resilience.rs`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    assert_content_hash_consistent, assert_journal_matches, assert_latest_per_tag_applied, now_ms,
    sim_tag, task, task_ids, AckStatus, Backend, Stack, QUIET, TAGS,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_fifty_tasks_over_eight_tags() {
    let mut stack = Stack::start("happy", |_| {}).await;
    // Five distinct contents, so equal contents must share a hash.
    let tasks: Vec<Value> = (0..50)
        .map(|i| {
            let mut t = task(
                &format!("t-happy-{i:03}"),
                &sim_tag(i % TAGS),
                1_000 + i as u64,
            );
            t["content"] =
                json!({"name": format!("Item {}", i % 5), "price": format!("{}.90", i % 5)});
            t
        })
        .collect();
    for t in &tasks {
        stack.backend.publish_task(t).await;
    }
    let ids = task_ids(&tasks);

    let mut acks = stack
        .backend
        .collect_final_acks(&ids, Duration::from_secs(30))
        .await;
    acks.extend(stack.backend.acks_within(QUIET).await);

    acks.assert_exactly_one_final_each(&ids);
    assert_latest_per_tag_applied(&tasks, &acks);
    assert_content_hash_consistent(&tasks, &acks);
    for id in &ids {
        let ack = acks.final_ack(id);
        assert_eq!(
            ack.topic,
            format!("esl_ack/p2p/{}", stack.backend.client_id)
        );
        if ack.status() == AckStatus::Applied {
            assert!(
                ack.attempts() >= 1,
                "applied without an attempt: {}",
                ack.json
            );
        }
    }
    assert_journal_matches(&tasks, &acks, &stack.env.journal());
    stack.agent.assert_running();
}

/// How the ack of a bad message must name the task.
enum AckTaskId {
    /// No `task_id` can be read: `"task_id": null`.
    Null,
    /// The message has a valid `task_id`: the ack carries it.
    Echo(&'static str),
    /// The `task_id` itself is invalid: echoing it or `null` are both fine.
    NullOr(String),
}

struct BadInput {
    what: &'static str,
    payload: Vec<u8>,
    task_id: AckTaskId,
    /// The `detail` must mention one of these (PROTOCOL §4.2: it names the
    /// field); empty for messages that have no fields at all.
    mentions: &'static [&'static str],
}

/// A valid task to break: one field changed by `edit`.
fn broken(
    task_id: &'static str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Vec<u8> {
    let mut t = task(task_id, "SIM000001", 1);
    edit(t.as_object_mut().expect("task() builds an object"));
    serde_json::to_vec(&t).expect("a JSON value serializes")
}

/// Whether `detail` names `word`: single letters (the field `v`) must stand
/// alone; longer words may be part of a longer name (`max_payload`).
fn mentions(detail: &str, word: &str) -> bool {
    let detail = detail.to_lowercase();
    if word.len() <= 2 {
        detail
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|token| token == word)
    } else {
        detail.contains(word)
    }
}

fn bad_inputs(max_payload: usize) -> Vec<BadInput> {
    let long_task_id = "t".repeat(65);
    let mut invalid_utf8 = broken("t-rej-utf8", |_| {});
    let name_at = invalid_utf8
        .windows(4)
        .position(|w| w == b"Milk")
        .expect("the task has a name");
    invalid_utf8.splice(name_at..name_at + 4, [0xff, 0xfe, 0xc3, 0x28]);
    let oversized = broken("t-rej-big", |t| {
        t.insert(
            "content".into(),
            json!({"name": "x".repeat(max_payload + 100)}),
        );
    });
    vec![
        BadInput {
            what: "not JSON",
            payload: b"definitely not json {".to_vec(),
            task_id: AckTaskId::Null,
            mentions: &[],
        },
        BadInput {
            what: "JSON but not an object",
            payload: b"[1,2,3]".to_vec(),
            task_id: AckTaskId::Null,
            mentions: &[],
        },
        BadInput {
            what: "invalid UTF-8",
            payload: invalid_utf8,
            task_id: AckTaskId::NullOr("t-rej-utf8".into()),
            mentions: &[],
        },
        BadInput {
            what: "wrong v",
            payload: broken("t-rej-v2", |t| {
                t.insert("v".into(), json!(2));
            }),
            task_id: AckTaskId::Echo("t-rej-v2"),
            mentions: &["v", "version"],
        },
        BadInput {
            what: "missing v",
            payload: broken("t-rej-nov", |t| {
                t.remove("v");
            }),
            task_id: AckTaskId::Echo("t-rej-nov"),
            mentions: &["v", "version"],
        },
        BadInput {
            what: "missing task_id",
            payload: broken("unused", |t| {
                t.remove("task_id");
            }),
            task_id: AckTaskId::Null,
            mentions: &["task_id"],
        },
        BadInput {
            what: "task_id not a string",
            payload: broken("unused", |t| {
                t.insert("task_id".into(), json!(42));
            }),
            task_id: AckTaskId::Null,
            mentions: &["task_id"],
        },
        BadInput {
            what: "task_id of 65 characters",
            payload: broken("unused", |t| {
                t.insert("task_id".into(), json!(long_task_id));
            }),
            task_id: AckTaskId::NullOr(long_task_id.clone()),
            mentions: &["task_id"],
        },
        BadInput {
            what: "task_id with a bad character",
            payload: broken("unused", |t| {
                t.insert("task_id".into(), json!("t rej/1"));
            }),
            task_id: AckTaskId::NullOr("t rej/1".into()),
            mentions: &["task_id"],
        },
        BadInput {
            what: "missing issued_at",
            payload: broken("t-rej-noissued", |t| {
                t.remove("issued_at");
            }),
            task_id: AckTaskId::Echo("t-rej-noissued"),
            mentions: &["issued_at"],
        },
        BadInput {
            what: "issued_at not a number",
            payload: broken("t-rej-issued", |t| {
                t.insert("issued_at".into(), json!("yesterday"));
            }),
            task_id: AckTaskId::Echo("t-rej-issued"),
            mentions: &["issued_at"],
        },
        BadInput {
            what: "seq not a number",
            payload: broken("t-rej-seq", |t| {
                t.insert("seq".into(), json!("first"));
            }),
            task_id: AckTaskId::Echo("t-rej-seq"),
            mentions: &["seq"],
        },
        BadInput {
            what: "ttl_ms not a number",
            payload: broken("t-rej-ttl", |t| {
                t.insert("ttl_ms".into(), json!("soon"));
            }),
            task_id: AckTaskId::Echo("t-rej-ttl"),
            mentions: &["ttl_ms"],
        },
        BadInput {
            what: "content not an object",
            payload: broken("t-rej-content", |t| {
                t.insert("content".into(), json!("Milk 9.90"));
            }),
            task_id: AckTaskId::Echo("t-rej-content"),
            mentions: &["content"],
        },
        BadInput {
            what: "missing content",
            payload: broken("t-rej-nocontent", |t| {
                t.remove("content");
            }),
            task_id: AckTaskId::Echo("t-rej-nocontent"),
            mentions: &["content"],
        },
        BadInput {
            what: "tag_id with bad characters",
            payload: broken("t-rej-tag", |t| {
                t.insert("tag_id".into(), json!("SIM 01/x"));
            }),
            task_id: AckTaskId::Echo("t-rej-tag"),
            mentions: &["tag_id"],
        },
        BadInput {
            what: "tag_id of 33 characters",
            payload: broken("t-rej-longtag", |t| {
                t.insert("tag_id".into(), json!("S".repeat(33)));
            }),
            task_id: AckTaskId::Echo("t-rej-longtag"),
            mentions: &["tag_id"],
        },
        BadInput {
            what: "payload over limits.max_payload",
            payload: oversized,
            task_id: AckTaskId::NullOr("t-rej-big".into()),
            mentions: &["payload"],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_kind_is_acked_and_the_agent_keeps_going() {
    const MAX_PAYLOAD: usize = 2048;
    let mut stack = Stack::start("reject", |c| c.max_payload = MAX_PAYLOAD).await;

    // One at a time: an ack with `"task_id": null` can only be matched by order.
    for bad in bad_inputs(MAX_PAYLOAD) {
        stack.backend.publish_raw(bad.payload).await;
        let ack = stack
            .backend
            .expect_final_ack(
                &format!("bad input \"{}\"", bad.what),
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(
            ack.status(),
            AckStatus::Rejected,
            "{}: {}",
            bad.what,
            ack.json
        );
        assert!(!ack.duplicate(), "{}: {}", bad.what, ack.json);
        match &bad.task_id {
            AckTaskId::Null => assert_eq!(ack.task_id(), None, "{}: {}", bad.what, ack.json),
            AckTaskId::Echo(id) => {
                assert_eq!(ack.task_id(), Some(*id), "{}: {}", bad.what, ack.json)
            }
            AckTaskId::NullOr(id) => assert!(
                ack.task_id().is_none() || ack.task_id() == Some(id.as_str()),
                "{}: {}",
                bad.what,
                ack.json
            ),
        }
        let detail = ack.detail().unwrap_or_default();
        assert!(
            !detail.trim().is_empty(),
            "{}: a rejection needs a detail: {}",
            bad.what,
            ack.json
        );
        assert!(
            bad.mentions.is_empty() || bad.mentions.iter().any(|w| mentions(detail, w)),
            "{}: detail should name the field ({:?}): {}",
            bad.what,
            bad.mentions,
            ack.json
        );
    }

    // The daemon neither exited nor stalled: a good task still goes through.
    stack.agent.assert_running();
    let good = task("t-rej-good", "SIM000001", 2);
    stack.backend.publish_task(&good).await;
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(&[good.clone()]), Duration::from_secs(15))
        .await;
    assert_eq!(acks.status("t-rej-good"), AckStatus::Applied);
    let journal = stack.env.journal();
    assert!(
        journal.entries.iter().all(|e| e.task_id == "t-rej-good"),
        "a rejected task was displayed: {:?}",
        journal.entries
    );
    assert_eq!(journal.count("t-rej-good"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_task_id_while_pending_and_after_completion() {
    // Slow check-ins keep the task pending while its copy arrives.
    let mut stack = Stack::start("duplicate", |c| c.checkin_interval_ms = 1500).await;
    let t = task("t-dup-1", "SIM000002", 1);
    stack.backend.publish_task(&t).await;
    stack.backend.publish_task(&t).await;

    let first = stack
        .backend
        .expect_final_ack("t-dup-1", Duration::from_secs(15))
        .await;
    assert_eq!(first.task_id(), Some("t-dup-1"));
    assert_eq!(first.status(), AckStatus::Applied, "{}", first.json);
    assert!(!first.duplicate(), "{}", first.json);
    stack
        .backend
        .expect_no_final_ack(
            QUIET,
            "a copy that arrives while the task is pending gets no ack of its own",
        )
        .await;

    // After completion the same final ack comes again, marked duplicate.
    stack.backend.publish_task(&t).await;
    let again = stack
        .backend
        .expect_final_ack("t-dup-1 sent after completion", Duration::from_secs(5))
        .await;
    assert!(
        again.duplicate(),
        "re-sent ack must say duplicate: {}",
        again.json
    );
    for key in [
        "v",
        "type",
        "task_id",
        "tag_id",
        "status",
        "agent",
        "attempts",
        "content_hash",
        "detail",
    ] {
        assert_eq!(
            again.json[key], first.json[key],
            "the re-sent ack differs in `{key}`:\n  {}\n  {}",
            first.json, again.json
        );
    }
    stack
        .backend
        .expect_no_final_ack(QUIET, "one duplicate, one ack")
        .await;
    assert_eq!(
        stack.env.journal().count("t-dup-1"),
        1,
        "a duplicate task was applied twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_on_arrival() {
    let mut stack = Stack::start("expired", |_| {}).await;
    let two_hours_ago = now_ms() - 2 * 3_600_000;
    let mut short_ttl = task("t-exp-ttl", "SIM000001", 1);
    short_ttl["issued_at"] = json!(two_hours_ago);
    short_ttl["ttl_ms"] = json!(60_000);
    // Without ttl_ms, tasks.default_ttl_ms (one hour) applies.
    let mut default_ttl = task("t-exp-default", "SIM000002", 1);
    default_ttl["issued_at"] = json!(two_hours_ago);
    default_ttl
        .as_object_mut()
        .expect("an object")
        .remove("ttl_ms");
    // Control: ten minutes old is well within the default TTL.
    let mut fresh_enough = task("t-exp-control", "SIM000003", 1);
    fresh_enough["issued_at"] = json!(now_ms() - 600_000);
    fresh_enough
        .as_object_mut()
        .expect("an object")
        .remove("ttl_ms");

    let tasks = [short_ttl, default_ttl, fresh_enough];
    for t in &tasks {
        stack.backend.publish_task(t).await;
    }
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(&tasks), Duration::from_secs(15))
        .await;
    assert_eq!(
        acks.status("t-exp-ttl"),
        AckStatus::Expired,
        "{}",
        acks.final_ack("t-exp-ttl").json
    );
    assert_eq!(
        acks.status("t-exp-default"),
        AckStatus::Expired,
        "{}",
        acks.final_ack("t-exp-default").json
    );
    assert_eq!(
        acks.status("t-exp-control"),
        AckStatus::Applied,
        "{}",
        acks.final_ack("t-exp-control").json
    );
    let journal = stack.env.journal();
    assert!(!journal.contains("t-exp-ttl") && !journal.contains("t-exp-default"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_seq_supersedes_pending_and_older_seq_is_superseded_at_once() {
    // Slow check-ins: seq 1 is still pending when seq 2 arrives.
    let mut stack = Stack::start("supersede", |c| c.checkin_interval_ms = 2000).await;
    let tag = "SIM000004";
    let tasks = [task("t-sup-1", tag, 1), task("t-sup-2", tag, 2)];
    for t in &tasks {
        stack.backend.publish_task(t).await;
    }
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(&tasks), Duration::from_secs(15))
        .await;
    assert_eq!(
        acks.status("t-sup-1"),
        AckStatus::Superseded,
        "{}",
        acks.final_ack("t-sup-1").json
    );
    assert_eq!(
        acks.status("t-sup-2"),
        AckStatus::Applied,
        "{}",
        acks.final_ack("t-sup-2").json
    );

    // Lower than the highest accepted seq: superseded without waiting for
    // the tag (a check-in is up to 2 s away, the ack must come sooner).
    stack.backend.publish_task(&task("t-sup-0", tag, 0)).await;
    let late = stack
        .backend
        .expect_final_ack(
            "t-sup-0 (seq below the tag's highest)",
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(late.task_id(), Some("t-sup-0"), "{}", late.json);
    assert_eq!(late.status(), AckStatus::Superseded, "{}", late.json);

    let journal = stack.env.journal();
    assert_eq!(journal.count("t-sup-2"), 1);
    assert!(
        !journal.contains("t-sup-0"),
        "an outdated task was displayed"
    );
    assert!(
        !journal.contains("t-sup-1"),
        "the superseded task was displayed"
    );
    assert_eq!(
        journal.last_for_tag(tag).map(|e| e.task_id.as_str()),
        Some("t-sup-2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_for_offline_tag_expires() {
    const TTL_MS: u64 = 1500;
    let offline = "SIM000003";
    let mut stack = Stack::start("offline", |c| c.offline = vec![offline.to_owned()]).await;
    let mut never = task("t-off-1", offline, 1);
    never["ttl_ms"] = json!(TTL_MS);
    let issued_at = never["issued_at"].as_u64().expect("task() sets issued_at");
    let control = task("t-off-control", "SIM000005", 1);
    let tasks = [never, control];
    for t in &tasks {
        stack.backend.publish_task(t).await;
    }
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(&tasks), Duration::from_secs(TTL_MS / 1000 + 10))
        .await;
    let expired = acks.final_ack("t-off-1");
    assert_eq!(expired.status(), AckStatus::Expired, "{}", expired.json);
    assert!(
        expired.at() >= issued_at + TTL_MS,
        "expired before issued_at + ttl_ms ({}): {}",
        issued_at + TTL_MS,
        expired.json
    );
    assert_eq!(acks.status("t-off-control"), AckStatus::Applied);
    let journal = stack.env.journal();
    assert!(
        journal.entries.iter().all(|e| e.tag_id != offline),
        "the offline tag displayed something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_radio_gives_up_after_max_attempts() {
    let mut stack = Stack::start("failing", |c| {
        c.fail_rate = 1.0;
        c.max_attempts = 2;
    })
    .await;
    let t = task("t-fail-1", "SIM000006", 1);
    stack.backend.publish_task(&t).await;
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(&[t]), Duration::from_secs(15))
        .await;
    let failed = acks.final_ack("t-fail-1");
    assert_eq!(failed.status(), AckStatus::Failed, "{}", failed.json);
    assert_eq!(failed.attempts(), 2, "max_attempts = 2: {}", failed.json);
    assert!(
        !stack.env.journal().contains("t-fail-1"),
        "a failed delivery shows in the journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_goes_to_reply_to_instead_of_ack_to() {
    let mut stack = Stack::start("reply-to", |_| {}).await;
    let mut other = Backend::connect(&stack.broker, "GID_backend@@@be2", true).await;
    let mut t = task("t-rt-1", "SIM000007", 1);
    t["reply_to"] = json!(other.client_id);
    stack.backend.publish_task(&t).await;

    let acks = other
        .collect_final_acks(&task_ids(&[t]), Duration::from_secs(15))
        .await;
    let ack = acks.final_ack("t-rt-1");
    assert_eq!(ack.topic, "esl_ack/p2p/GID_backend@@@be2");
    assert_eq!(ack.status(), AckStatus::Applied, "{}", ack.json);
    stack
        .backend
        .expect_no_final_ack(QUIET, "the ack belongs to reply_to, not ack_to")
        .await;
}
