//! Remote commands over MQTT (PROTOCOL §7): every method, every error code,
//! reply and noreply, and paging under the payload limit.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, sim_tag, task, AckStatus, Stack, AGENT_CLIENT_ID, QUIET, TAGS};

const REPLY: Duration = Duration::from_secs(10);
/// These tests send unsigned commands; state-changing methods then need an
/// explicit allowance (issue 14 item 4).
const UNSIGNED_MUTATING: &str =
    "[security]\nallow_unsigned_methods = [\"task.cancel\", \"tag.refresh\"]\n";

fn command(req_id: &str, method: &str, params: Value) -> Value {
    json!({"v": 1, "req_id": req_id, "method": method, "params": params,
           "reply": true, "reply_to": "GID_backend@@@be1"})
}

async fn call(stack: &mut Stack, req_id: &str, method: &str, params: Value) -> Value {
    let reply = stack.backend.call(req_id, method, params, REPLY).await;
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["v"], 1, "{reply}");
    reply
}

fn ok(reply: &Value) -> &Value {
    assert_eq!(reply["ok"], true, "expected success: {reply}");
    &reply["result"]
}

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["ok"], false, "expected an error: {reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    reply["error"]["code"].as_str().expect("error code")
}

/// Calls `method` and checks that the reply is the error `code`.
async fn expect_error(stack: &mut Stack, req_id: &str, method: &str, params: Value, code: &str) {
    let reply = call(stack, req_id, method, params).await;
    assert_eq!(error_code(&reply), code, "{method} {req_id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_answers_over_mqtt() {
    let offline = sim_tag(TAGS - 1);
    let mut stack = Stack::start("commands", |c| {
        c.offline = vec![sim_tag(TAGS - 1)];
        c.extra = UNSIGNED_MUTATING.into();
    })
    .await;
    let applied = task("t-cmd-applied", &sim_tag(1), 1);
    stack.backend.publish_task(&applied).await;
    let ack = stack
        .backend
        .expect_final_ack("t-cmd-applied", Duration::from_secs(10))
        .await;
    assert_eq!(ack.status(), AckStatus::Applied);
    let hash = ack
        .content_hash()
        .expect("applied acks carry the hash")
        .to_owned();
    stack
        .backend
        .publish_task(&task("t-cmd-pending", &offline, 1))
        .await;

    // agent.status
    let status = call(&mut stack, "r-status", "agent.status", json!({})).await;
    let status = ok(&status);
    assert_eq!(status["agent"], AGENT_CLIENT_ID);
    assert_eq!(status["mqtt"]["connected"], true);
    let pending = status["pending"].as_u64().unwrap();
    assert!(pending <= 1, "{status}");

    // tags.list, paged: 3 per page until `next` is null.
    let mut seen = Vec::new();
    let mut after = Value::Null;
    for page in 0.. {
        assert!(page < 10, "paging does not end");
        let reply = call(
            &mut stack,
            &format!("r-tags-{page}"),
            "tags.list",
            json!({"limit": 3, "after": after}),
        )
        .await;
        let result = ok(&reply);
        let tags = result["tags"].as_array().unwrap();
        assert!(tags.len() <= 3);
        seen.extend(
            tags.iter()
                .map(|t| t["tag_id"].as_str().unwrap().to_owned()),
        );
        after = result["next"].clone();
        if after.is_null() {
            break;
        }
    }
    let expected: Vec<String> = (0..TAGS).map(sim_tag).collect();
    assert_eq!(seen, expected, "every tag once, in order");

    // tag.get
    let reply = call(
        &mut stack,
        "r-tag",
        "tag.get",
        json!({"tag_id": sim_tag(1)}),
    )
    .await;
    let tag = ok(&reply);
    assert_eq!(tag["content_hash"], hash.as_str());
    assert_eq!(tag["online"], true);
    for key in ["battery_mv", "rssi", "last_seen"] {
        assert!(tag[key].is_number(), "{key} in {tag}");
    }
    expect_error(
        &mut stack,
        "r-tag-unknown",
        "tag.get",
        json!({"tag_id": "NOPE"}),
        "not_found",
    )
    .await;

    // tasks.list, filtered.
    let reply = eventually_pending(&mut stack).await;
    let tasks = ok(&reply)["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["task_id"], "t-cmd-pending");
    let reply = call(
        &mut stack,
        "r-tasks-tag",
        "tasks.list",
        json!({"tag_id": sim_tag(1)}),
    )
    .await;
    let tasks = ok(&reply)["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["status"], "applied");
    expect_error(
        &mut stack,
        "r-tasks-bad",
        "tasks.list",
        json!({"state": "weird"}),
        "bad_params",
    )
    .await;

    // tag.refresh: the tag shows its content again at the next check-in.
    let reply = call(
        &mut stack,
        "r-refresh",
        "tag.refresh",
        json!({"tag_id": sim_tag(1)}),
    )
    .await;
    assert_eq!(ok(&reply)["task_id"], "t-cmd-applied");
    let env = &stack.env;
    eventually(
        "the refresh in the journal",
        Duration::from_secs(10),
        || {
            env.journal()
                .contains("refresh:t-cmd-applied")
                .then_some(())
        },
    )
    .await;
    expect_error(
        &mut stack,
        "r-refresh-pending",
        "tag.refresh",
        json!({"tag_id": offline}),
        "invalid_state",
    )
    .await;
    let reply = call(
        &mut stack,
        "r-refresh-unknown",
        "tag.refresh",
        json!({"tag_id": sim_tag(2)}),
    )
    .await;
    assert_eq!(
        error_code(&reply),
        "not_found",
        "tag 2 never displayed anything"
    );

    // task.cancel: the pending task is acked failed/cancelled.
    let reply = call(
        &mut stack,
        "r-cancel",
        "task.cancel",
        json!({"task_id": "t-cmd-pending"}),
    )
    .await;
    ok(&reply);
    let ack = stack
        .backend
        .expect_final_ack("t-cmd-pending", Duration::from_secs(10))
        .await;
    assert_eq!(ack.status(), AckStatus::Failed);
    assert_eq!(ack.detail(), Some("cancelled"));
    expect_error(
        &mut stack,
        "r-cancel-again",
        "task.cancel",
        json!({"task_id": "t-cmd-pending"}),
        "invalid_state",
    )
    .await;
    expect_error(
        &mut stack,
        "r-cancel-unknown",
        "task.cancel",
        json!({"task_id": "nope"}),
        "not_found",
    )
    .await;
    expect_error(
        &mut stack,
        "r-cancel-params",
        "task.cancel",
        json!({}),
        "bad_params",
    )
    .await;

    // Unknown method and malformed request: error replies, never silence.
    expect_error(
        &mut stack,
        "r-unknown",
        "agent.reboot",
        json!({}),
        "unknown_method",
    )
    .await;
    let mut bad = command("r-bad", "agent.status", json!({}));
    bad["v"] = 2.into();
    stack.backend.publish_command(&bad).await;
    let reply = stack.backend.expect_reply("r-bad", REPLY).await;
    assert_eq!(error_code(&reply), "bad_request");

    stack.agent.assert_running();
}

/// The pending task is stored asynchronously: ask until it is listed.
async fn eventually_pending(stack: &mut Stack) -> Value {
    for i in 0..50 {
        let reply = call(
            stack,
            &format!("r-pending-{i}"),
            "tasks.list",
            json!({"state": "pending"}),
        )
        .await;
        if ok(&reply)["tasks"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
        {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the pending task never showed up in tasks.list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noreply_commands_run_without_answering() {
    let mut stack = Stack::start("noreply", |c| {
        c.offline = vec![sim_tag(0)];
        c.extra = UNSIGNED_MUTATING.into();
    })
    .await;
    stack
        .backend
        .publish_task(&task("t-noreply", &sim_tag(0), 1))
        .await;
    // Make sure the task is stored before cancelling it.
    let reply = eventually_pending(&mut stack).await;
    ok(&reply);
    let mut cancel = command("r-quiet", "task.cancel", json!({"task_id": "t-noreply"}));
    cancel["reply"] = false.into();
    stack.backend.publish_command(&cancel).await;
    let ack = stack
        .backend
        .expect_final_ack("t-noreply", Duration::from_secs(10))
        .await;
    assert_eq!(ack.detail(), Some("cancelled"), "the noreply command ran");
    stack
        .backend
        .expect_no_reply(QUIET, "reply: false asks for no reply")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_larger_than_the_payload_limit_are_paged() {
    let mut stack = Stack::start("paging", |c| {
        c.max_payload = 2048;
        c.tags = 100;
    })
    .await;
    let mut seen = Vec::new();
    let mut after = Value::Null;
    for page in 0.. {
        assert!(page < 100, "paging does not end");
        let req_id = format!("r-page-{page}");
        stack
            .backend
            .publish_command(&command(
                &req_id,
                "tags.list",
                json!({"limit": 500, "after": after}),
            ))
            .await;
        let reply = stack.backend.expect_reply(&req_id, REPLY).await;
        assert!(
            reply.to_string().len() <= 2048,
            "reply over the limit: {} bytes",
            reply.to_string().len()
        );
        let result = ok(&reply);
        let tags = result["tags"].as_array().unwrap();
        assert!(!tags.is_empty(), "a page makes progress");
        seen.extend(
            tags.iter()
                .map(|t| t["tag_id"].as_str().unwrap().to_owned()),
        );
        after = result["next"].clone();
        if after.is_null() {
            break;
        }
    }
    assert!(
        seen.len() == 100,
        "all 100 tags over several pages, got {}",
        seen.len()
    );
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique.len(), 100);
}

/// Issue 14 items 1 and 4 with the default config: a command without
/// `reply_to` is answered at `ack_to`; an unsigned `task.cancel` is
/// refused; a `reply_to` outside the group of `ack_to` gets no reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_command_security_and_replies_to_ack_to() {
    let mut stack = Stack::start("cmd-defaults", |_| {}).await;
    let mut no_reply_to = command("r-no-reply-to", "agent.status", json!({}));
    no_reply_to.as_object_mut().unwrap().remove("reply_to");
    stack.backend.publish_command(&no_reply_to).await;
    ok(&stack.backend.expect_reply("r-no-reply-to", REPLY).await);

    expect_error(
        &mut stack,
        "r-cancel-unsigned",
        "task.cancel",
        json!({"task_id": "t-any"}),
        "forbidden",
    )
    .await;

    let mut victim = command("r-victim", "tags.list", json!({}));
    victim["reply_to"] = "GID_victim@@@v1".into();
    stack.backend.publish_command(&victim).await;
    // Commands run in order: the next reply shows the refusal counted.
    let reply = call(&mut stack, "r-after", "agent.status", json!({})).await;
    assert_eq!(
        ok(&reply)["counters"]["commands_reply_to_refused"],
        1,
        "{reply}"
    );
    stack.agent.assert_running();
}
