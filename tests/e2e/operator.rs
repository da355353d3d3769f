//! The operator's CLI (`esl-agent status|tags|tasks`) against a running
//! agent over its control socket, what it says when no agent runs, and
//! that the agent never replaces a file at `control.socket` that is not a
//! socket.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{run_cli, sim_tag, task, AckStatus, Stack, AGENT_CLIENT_ID, TAGS};

/// Runs `esl-agent <args> --config <env>/agent.toml` off the async runtime.
async fn cli(stack: &Stack, args: &[&str]) -> Output {
    run_cli(&stack.env.path().join("agent.toml"), args).await
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

/// Issue 14 item 7: at start the agent deleted whatever file was at
/// `control.socket` when nothing listened there. Now only a stale socket is
/// replaced; a regular file stops the agent with a config error (exit code
/// 2) that names the key, and the file is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_at_the_control_socket_path_is_a_config_error_and_is_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "keep me").expect("write the file");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = 1\ngroup_id = \"GID_test\"\ndevice_id = \"dev1\"\n\
             [store]\npath = {:?}\n[control]\nsocket = {:?}\n",
            dir.path().join("store").display().to_string(),
            notes.display().to_string()
        ),
    )
    .expect("write the config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_esl-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the esl-agent binary");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the agent") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent started with a regular file at control.socket");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("control.socket"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&notes).expect("the file is kept"),
        "keep me"
    );
}
