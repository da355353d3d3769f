//! Task handling through the whole stack (PROTOCOL §4, §5, §8): the happy
//! path, every rejection rule (also a message far over the size limit on a
//! persistent session), duplicates, expiry, per-tag ordering, offline
//! tags, a failing radio and `reply_to`. The agent keeps running throughout;
//! restarts are in `resilience.rs`. Every scenario that reaches the radio
//! runs on both radios (`on_every_radio!`: `NAME::sim`, `NAME::zigbee`);
//! rejections never reach it and run on the simulator only.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    assert_content_hash_consistent, assert_journal_matches, assert_latest_per_tag_applied, now_ms,
    sim_tag, task, task_ids, AckStatus, Backend, Stack, TestRadio, QUIET, TAGS,
};
use crate::on_every_radio;

async fn happy_path_fifty_tasks_over_eight_tags(radio: TestRadio) {
    let mut stack = Stack::start_on(radio, "happy", |_| {}).await;
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
    stack.backend.publish_tasks(&tasks).await;
    let ids = task_ids(&tasks);

    let mut acks = stack
        .backend
        .collect_final_acks(&ids, Duration::from_secs(30))
        .await;
    acks.extend(stack.backend.acks_within(QUIET).await);

    acks.assert_exactly_one_final_each(&ids);
    assert_latest_per_tag_applied(&tasks, &acks);
    assert_content_hash_consistent(&tasks, &acks);
    let journal = stack.env.journal();
    for id in &ids {
        let ack = acks.final_ack(id);
        assert_eq!(
            ack.topic,
            format!("esl_ack/p2p/{}", stack.backend.client_id)
        );
        // Applied without an attempt is right only when the tag already
        // showed that very content (an earlier task with equal content).
        if ack.status() == AckStatus::Applied && ack.attempts() == 0 {
            let shown_before = journal.entries.iter().any(|e| {
                Some(e.tag_id.as_str()) == ack.tag_id()
                    && Some(e.content_hash.as_str()) == ack.content_hash()
                    && e.task_id != *id
            });
            assert!(
                shown_before,
                "applied without an attempt, and the tag never showed that content: {}",
                ack.json
            );
        }
    }
    assert_journal_matches(&tasks, &acks, &journal);
    stack.agent.assert_running();
}

/// How the ack of a bad message must name the task.
enum AckTaskId {
    /// No `task_id` can be read: `"task_id": null`.
    Null,
    /// The message has a valid `task_id`: the ack carries it.
    Echo(String),
    /// The message could not be read as an object (too large, bad UTF-8), or
    /// its `task_id` is longer than 256 characters: echoing it or `null` are
    /// both fine.
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

impl BadInput {
    /// A message that is no task object at all.
    fn raw(what: &'static str, payload: &[u8]) -> BadInput {
        BadInput {
            what,
            payload: payload.to_vec(),
            task_id: AckTaskId::Null,
            mentions: &[],
        }
    }

    /// A valid task with field `key` set to `value`, or removed for `None`.
    fn field(
        what: &'static str,
        key: &str,
        value: Option<Value>,
        mentions: &'static [&'static str],
    ) -> BadInput {
        let own_id = format!("t-rej-{}", what.replace(' ', "-"));
        let task_id = match (key, &value) {
            // PROTOCOL §4 rule 2: a string of at most 256 characters is
            // echoed even when it breaks the id rule (issue 14 item 2).
            ("task_id", Some(Value::String(bad))) if bad.chars().count() <= 256 => {
                AckTaskId::Echo(bad.clone())
            }
            ("task_id", Some(Value::String(bad))) => AckTaskId::NullOr(bad.clone()),
            ("task_id", _) => AckTaskId::Null,
            _ => AckTaskId::Echo(own_id.clone()),
        };
        let mut t = task(&own_id, "SIM000001", 1);
        let fields = t.as_object_mut().expect("task() builds an object");
        match value {
            Some(value) => fields.insert(key.to_owned(), value),
            None => fields.remove(key),
        };
        BadInput {
            what,
            payload: serde_json::to_vec(&t).expect("a JSON value serializes"),
            task_id,
            mentions,
        }
    }

    /// The same input with a different expectation for the ack's `task_id`.
    fn task_id_may_be_null(mut self) -> BadInput {
        if let AckTaskId::Echo(id) = self.task_id {
            self.task_id = AckTaskId::NullOr(id);
        }
        self
    }
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
    // A valid task whose content name is then replaced by invalid UTF-8.
    let name = json!({"name": "Milk"});
    let mut invalid_utf8 =
        BadInput::field("invalid UTF-8", "content", Some(name), &[]).task_id_may_be_null();
    let at = invalid_utf8
        .payload
        .windows(4)
        .position(|w| w == b"Milk")
        .expect("the task has a name");
    invalid_utf8
        .payload
        .splice(at..at + 4, [0xff, 0xfe, 0xc3, 0x28]);

    let oversized = json!({"name": "x".repeat(max_payload + 100)});
    vec![
        BadInput::raw("not JSON", b"definitely not json {"),
        BadInput::raw("JSON but not an object", b"[1,2,3]"),
        invalid_utf8,
        BadInput::field("wrong v", "v", Some(json!(2)), &["v", "version"]),
        BadInput::field("missing v", "v", None, &["v", "version"]),
        BadInput::field("missing task_id", "task_id", None, &["task_id"]),
        BadInput::field(
            "task_id not a string",
            "task_id",
            Some(json!(42)),
            &["task_id"],
        ),
        BadInput::field(
            "task_id of 65 chars",
            "task_id",
            Some(json!("t".repeat(65))),
            &["task_id"],
        ),
        BadInput::field(
            "task_id bad chars",
            "task_id",
            Some(json!("t rej/1")),
            &["task_id"],
        ),
        BadInput::field("missing issued_at", "issued_at", None, &["issued_at"]),
        BadInput::field(
            "issued_at not a number",
            "issued_at",
            Some(json!("yesterday")),
            &["issued_at"],
        ),
        BadInput::field("seq not a number", "seq", Some(json!("first")), &["seq"]),
        BadInput::field(
            "ttl_ms not a number",
            "ttl_ms",
            Some(json!("soon")),
            &["ttl_ms"],
        ),
        BadInput::field(
            "content not an object",
            "content",
            Some(json!("Milk 9.90")),
            &["content"],
        ),
        BadInput::field("missing content", "content", None, &["content"]),
        BadInput::field(
            "tag_id bad chars",
            "tag_id",
            Some(json!("SIM 01/x")),
            &["tag_id"],
        ),
        BadInput::field(
            "tag_id of 33 chars",
            "tag_id",
            Some(json!("S".repeat(33))),
            &["tag_id"],
        ),
        BadInput::field(
            "payload over max_payload",
            "content",
            Some(oversized),
            &["payload"],
        )
        .task_id_may_be_null(),
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
                assert_eq!(
                    ack.task_id(),
                    Some(id.as_str()),
                    "{}: {}",
                    bad.what,
                    ack.json
                )
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
        .collect_final_acks(
            &task_ids(std::slice::from_ref(&good)),
            Duration::from_secs(15),
        )
        .await;
    acks.assert_status("t-rej-good", AckStatus::Applied);
    let journal = stack.env.journal();
    assert!(
        journal.entries.iter().all(|e| e.task_id == "t-rej-good"),
        "a rejected task was displayed: {:?}",
        journal.entries
    );
    assert_eq!(journal.count("t-rej-good"), 1);
}

async fn duplicate_task_id_while_pending_and_after_completion(radio: TestRadio) {
    // Slow check-ins keep the task pending while its copy arrives.
    let mut stack = Stack::start_on(radio, "duplicate", |c| c.checkin_interval_ms = 1500).await;
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

async fn expired_on_arrival(radio: TestRadio) {
    let mut stack = Stack::start_on(radio, "expired", |_| {}).await;
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
    stack.backend.publish_tasks(&tasks).await;
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(&tasks), Duration::from_secs(15))
        .await;
    acks.assert_status("t-exp-ttl", AckStatus::Expired);
    acks.assert_status("t-exp-default", AckStatus::Expired);
    acks.assert_status("t-exp-control", AckStatus::Applied);
    let journal = stack.env.journal();
    assert!(!journal.contains("t-exp-ttl") && !journal.contains("t-exp-default"));
}

async fn newer_seq_supersedes_pending_and_older_seq_is_superseded_at_once(radio: TestRadio) {
    // Slow check-ins: seq 1 is still pending when seq 2 arrives.
    let mut stack = Stack::start_on(radio, "supersede", |c| c.checkin_interval_ms = 2000).await;
    let tag = "SIM000004";
    let tasks = [task("t-sup-1", tag, 1), task("t-sup-2", tag, 2)];
    stack.backend.publish_tasks(&tasks).await;
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(&tasks), Duration::from_secs(15))
        .await;
    acks.assert_status("t-sup-1", AckStatus::Superseded);
    acks.assert_status("t-sup-2", AckStatus::Applied);

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

async fn task_for_offline_tag_expires(radio: TestRadio) {
    const TTL_MS: u64 = 1500;
    let offline = "SIM000003";
    let mut stack =
        Stack::start_on(radio, "offline", |c| c.offline = vec![offline.to_owned()]).await;
    let mut never = task("t-off-1", offline, 1);
    never["ttl_ms"] = json!(TTL_MS);
    let issued_at = never["issued_at"].as_u64().expect("task() sets issued_at");
    let control = task("t-off-control", "SIM000005", 1);
    let tasks = [never, control];
    stack.backend.publish_tasks(&tasks).await;
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
    acks.assert_status("t-off-control", AckStatus::Applied);
    let journal = stack.env.journal();
    assert!(
        journal.entries.iter().all(|e| e.tag_id != offline),
        "the offline tag displayed something"
    );
}

async fn failing_radio_gives_up_after_max_attempts(radio: TestRadio) {
    let mut stack = Stack::start_on(radio, "failing", |c| {
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

async fn ack_goes_to_reply_to_instead_of_ack_to(radio: TestRadio) {
    let mut stack = Stack::start_on(radio, "reply-to", |_| {}).await;
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

on_every_radio!(
    happy_path_fifty_tasks_over_eight_tags,
    duplicate_task_id_while_pending_and_after_completion,
    expired_on_arrival,
    newer_seq_supersedes_pending_and_older_seq_is_superseded_at_once,
    task_for_offline_tag_expires,
    failing_radio_gives_up_after_max_attempts,
    ack_goes_to_reply_to_instead_of_ack_to,
);

/// Issue 14 item 3: one 3 MiB message with a persistent session made
/// rumqttc drop the connection, and Mosquitto brought it back at every
/// reconnect (28 reconnects in 21 s, a later valid task never acked). Now
/// it is read and discarded on the same connection, PUBACKed, acked
/// `rejected` (size and limit in the detail), counted, and the next task
/// is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_rejected_on_the_same_persistent_connection() {
    const SIZE: usize = 3 << 20;
    let mut stack = Stack::start("oversized", |c| c.clean_session = false).await;
    stack.backend.publish_raw(vec![b'x'; SIZE]).await;
    let ack = stack
        .backend
        .expect_final_ack("the oversized message", Duration::from_secs(20))
        .await;
    assert_eq!(ack.status(), AckStatus::Rejected, "{}", ack.json);
    assert_eq!(ack.task_id(), None, "{}", ack.json);
    let detail = ack.detail().unwrap_or_default();
    assert!(
        detail.contains(&SIZE.to_string()) && detail.contains("65536"),
        "the detail names the size and the limit: {}",
        ack.json
    );

    let good = task("t-after-oversized", "SIM000001", 1);
    stack.backend.publish_task(&good).await;
    let acks = stack
        .backend
        .collect_final_acks(
            &task_ids(std::slice::from_ref(&good)),
            Duration::from_secs(15),
        )
        .await;
    acks.assert_all(&task_ids(std::slice::from_ref(&good)), AckStatus::Applied);

    // One connection all along, and the message counted once.
    let reply = stack
        .backend
        .call(
            "r-counters",
            "agent.status",
            json!({}),
            Duration::from_secs(10),
        )
        .await;
    let counters = &reply["result"]["counters"];
    assert_eq!(counters["mqtt_connects"], 1, "{reply}");
    assert_eq!(counters["messages_oversized"], 1, "{reply}");
    stack.agent.assert_running();
}
