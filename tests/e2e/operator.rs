//! The operator's CLI (`esl-agent status|tags|tasks`) against a running
//! agent over its control socket, and what it says when no agent runs.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{sim_tag, task, AckStatus, Stack, AGENT_CLIENT_ID, TAGS};

/// Runs `esl-agent <args> --config <env>/agent.toml` off the async runtime.
async fn cli(stack: &Stack, args: &[&str]) -> Output {
    let config = stack.env.path().join("agent.toml");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_esl-agent"))
            .args(&args)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run the esl-agent binary")
    })
    .await
    .expect("CLI thread")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "CLI failed: {:?}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_shows_status_tags_and_tasks() {
    let mut stack = Stack::start("operator", |_| {}).await;
    stack
        .backend
        .publish_task(&task("t-op-1", &sim_tag(2), 1))
        .await;
    let ack = stack
        .backend
        .expect_final_ack("t-op-1", Duration::from_secs(10))
        .await;
    assert_eq!(ack.status(), AckStatus::Applied);
    let hash = ack.content_hash().unwrap().to_owned();

    let status = stdout(&cli(&stack, &["status"]).await);
    assert!(status.contains(AGENT_CLIENT_ID), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("mqtt") && l.ends_with("connected")),
        "{status}"
    );
    assert!(status.contains("tasks_applied"), "{status}");

    let tags = stdout(&cli(&stack, &["tags"]).await);
    let lines: Vec<&str> = tags.lines().collect();
    assert!(lines[0].starts_with("TAG"), "{tags}");
    assert_eq!(
        lines.len(),
        TAGS + 1,
        "header plus one line per tag:\n{tags}"
    );
    let line = lines
        .iter()
        .find(|l| l.starts_with(&sim_tag(2)))
        .expect("tag 2 listed");
    assert!(
        line.contains(&hash) && line.contains(" mV") && line.contains(" dBm"),
        "{line}"
    );

    let tasks = stdout(&cli(&stack, &["tasks", "--json"]).await);
    let tasks: Value = serde_json::from_str(&tasks).expect("--json prints JSON");
    let tasks = tasks.as_array().expect("a JSON array");
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["task_id"], "t-op-1");
    assert_eq!(tasks[0]["status"], "applied");

    let pending = stdout(&cli(&stack, &["tasks", "--state", "pending"]).await);
    assert_eq!(pending.lines().count(), 1, "only the header: {pending}");

    let tags_json: Value =
        serde_json::from_str(&stdout(&cli(&stack, &["tags", "--json"]).await)).unwrap();
    assert_eq!(tags_json.as_array().unwrap().len(), TAGS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_says_when_the_agent_is_not_running() {
    let mut stack = Stack::start("operator-down", |_| {}).await;
    stack.agent.terminate().await;
    let out = cli(&stack, &["status"]).await;
    assert_eq!(out.status.code(), Some(3), "exit code 3 means not running");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not running"), "{err}");
    assert!(out.stdout.is_empty());
}
