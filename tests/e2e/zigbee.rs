//! The ZigBee path's own faults, end to end: the agent binary drives the
//! fake ZNP coordinator (`esl_hal::zigbee::fake`) on a PTY, the back end
//! talks to it through real Mosquitto. The scenarios both radios share are
//! in `tasks.rs` and `resilience.rs` (`NAME::zigbee`).
//!
//! - content larger than one ZigBee frame (PROTOCOL §4's example task) is
//!   offered in segments and applied;
//! - garbled bytes on the serial line are counted (status `counters`) and
//!   tasks still reach `applied`;
//! - a data request whose confirm never comes times out and the task is
//!   applied on the next attempt;
//! - the adapter unplugged: the status says the radio is down, the MQTT link
//!   and the store carry on (a task sent meanwhile is stored and waits), and
//!   after the replug the radio is up again and the task is applied. The
//!   agent never exits because of the adapter;
//! - `network.permit_join` over MQTT and `esl-agent zigbee permit-join`
//!   on the control socket open (and close) the coordinator's network;
//! - a tag that joins is listed by `tags.list` (with its IEEE and network
//!   address) before its first check-in;
//! - `esl-agent zigbee change-channel` moves the network, the saved network
//!   follows, and the next run resumes it (unsigned over MQTT: refused).

use std::time::Duration;

use serde_json::{json, Value};

use esl_hal::zigbee::fake::FakeStats;

use crate::harness::{
    assert_journal_matches, eventually, run_cli, sim_tag, task, task_ids, AckStatus, Stack,
    TestRadio,
};

/// Status reports every second, so state changes show quickly.
const STATUS_INTERVAL_S: u64 = 1;

async fn zigbee_stack(name: &str) -> Stack {
    Stack::start_on(TestRadio::Zigbee, name, |c| {
        c.status_interval_s = STATUS_INTERVAL_S;
    })
    .await
}

/// Publishes `tasks` and requires every one `applied` and displayed once.
async fn publish_and_expect_applied(stack: &mut Stack, tasks: &[Value]) {
    stack.backend.publish_tasks(tasks).await;
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(tasks), Duration::from_secs(20))
        .await;
    acks.assert_all(&task_ids(tasks), AckStatus::Applied);
    assert_journal_matches(tasks, &acks, &stack.env.journal());
}

/// `out` ended well; else its stderr.
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status counters lack {name}: {}", status["counters"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_serial_bytes_are_counted_and_tasks_still_apply() {
    let mut stack = zigbee_stack("zb-garbled").await;
    let fake = stack.fake();
    // Line noise, a frame with a bad checksum, an impossible length.
    fake.inject(vec![0x00, 0x13, 0x37, 0x42]).await;
    fake.inject(vec![0xFE, 0x00, 0x45, 0xC0, 0x00]).await;
    fake.inject(vec![0xFE, 0xFF, 0x44, 0x81]).await;

    let tasks: Vec<Value> = (0..4)
        .map(|i| task(&format!("t-zg-{i}"), &format!("SIM00000{i}"), 1))
        .collect();
    publish_and_expect_applied(&mut stack, &tasks).await;

    let status = stack
        .backend
        // Not the hello: it may leave while the adapter is still starting
        // (radio down) yet already count the noise.
        .expect_status_where(
            "the bad frames counted, after the tasks",
            Duration::from_secs(10),
            |s| {
                s["counters"]["zigbee_bad_fcs_frames"].as_u64() >= Some(1)
                    && s["counters"]["tasks_applied"].as_u64() >= Some(4)
            },
        )
        .await;
    assert_eq!(counter(&status, "zigbee_oversized_frames"), 1, "{status}");
    assert!(counter(&status, "zigbee_garbage_bytes") >= 4, "{status}");
    assert_eq!(
        counter(&status, "zigbee_adapter_losses"),
        0,
        "noise is no loss"
    );
    assert_eq!(status["radio"]["state"], "up", "{status}");
    stack.agent.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_confirm_times_out_and_the_retry_applies() {
    let mut stack = zigbee_stack("zb-dropped-confirm").await;
    stack.fake().swallow_requests(1).await;
    let t = task("t-zd-1", "SIM000002", 1);
    stack.backend.publish_task(&t).await;
    let acks = stack
        .backend
        .collect_final_acks(&task_ids(std::slice::from_ref(&t)), Duration::from_secs(20))
        .await;
    let ack = acks.final_ack("t-zd-1");
    assert_eq!(ack.status(), AckStatus::Applied, "{}", ack.json);
    assert_eq!(
        ack.attempts(),
        2,
        "the first attempt was lost: {}",
        ack.json
    );
    assert_eq!(stack.env.journal().count("t-zd-1"), 1);
    let status = stack
        .backend
        .expect_status_where(
            "the confirm timeout counted",
            Duration::from_secs(10),
            |s| s["counters"]["zigbee_confirm_timeouts"].as_u64() >= Some(1),
        )
        .await;
    assert_eq!(counter(&status, "zigbee_confirm_timeouts"), 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_unplug_and_replug_keeps_the_agent_and_its_tasks() {
    let mut stack = zigbee_stack("zb-unplug").await;
    let before = task("t-zu-before", "SIM000001", 1);
    stack.backend.publish_task(&before).await;
    stack
        .backend
        .collect_final_acks(
            &task_ids(std::slice::from_ref(&before)),
            Duration::from_secs(20),
        )
        .await
        .assert_status("t-zu-before", AckStatus::Applied);

    stack.fake().unplug().await;
    let down = stack
        .backend
        .expect_status_where("radio down", Duration::from_secs(10), |s| {
            s["radio"]["state"] == "down"
        })
        .await;
    let reason = down["radio"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ZigBee"),
        "the reason names the adapter: {down}"
    );

    // The MQTT side carries on: a task sent now is stored (PUBACKed) and
    // waits for the radio.
    let during = task("t-zu-during", "SIM000003", 1);
    stack.backend.publish_task(&during).await;
    stack
        .broker
        .wait_pubacks_from_agent(2, Duration::from_secs(10))
        .await;
    stack
        .backend
        .expect_no_final_ack(Duration::from_millis(1500), "no radio, no outcome yet")
        .await;
    stack.agent.assert_running();

    stack.fake().replug().await.expect("replug");
    stack
        .backend
        .expect_status_where("radio up again", Duration::from_secs(15), |s| {
            s["radio"]["state"] == "up"
        })
        .await;
    let acks = stack
        .backend
        .collect_final_acks(
            &task_ids(std::slice::from_ref(&during)),
            Duration::from_secs(20),
        )
        .await;
    acks.assert_status("t-zu-during", AckStatus::Applied);
    let status = stack
        .backend
        .expect_status("periodic", Duration::from_secs(5))
        .await;
    assert_eq!(counter(&status, "zigbee_adapter_losses"), 1, "{status}");
    assert_eq!(counter(&status, "zigbee_adapter_starts"), 2, "{status}");
    assert_eq!(
        counter(&status, "mqtt_connects"),
        1,
        "the MQTT link never dropped: {status}"
    );
    stack.agent.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_larger_than_a_frame_is_applied_in_segments() {
    let mut stack = zigbee_stack("zb-segments").await;
    // PROTOCOL §4's example, and a long one.
    let mut example = task("t-20261127-000123", "SIM000004", 1);
    example["content"] = json!({"name": "Milk 1L", "price": "9.90", "currency": "CNY"});
    let mut long = task("t-zs-long", "SIM000005", 1);
    long["content"] = json!({"name": "Organic whole milk 1L ".repeat(20), "price": "19.90"});
    let tasks = [example, long];
    publish_and_expect_applied(&mut stack, &tasks).await;
    // Two offers, and more requests than offers: they went in segments.
    let stats = stack.fake().stats();
    assert_eq!(FakeStats::get(&stats.offers_received), 2);
    assert!(FakeStats::get(&stats.data_requests) > 8, "{stats:?}");
}

/// Issue 15: the status reports name the stick's firmware; joining is
/// opened by a (signed, or explicitly allowed)
/// `network.permit_join` command and by the local CLI, and reaches the
/// coordinator as a permit-join request for that many seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_is_reported_and_permit_join_reaches_the_coordinator() {
    let mut stack = Stack::start_on(TestRadio::Zigbee, "zb-permit-join", |c| {
        c.status_interval_s = STATUS_INTERVAL_S;
        c.extra = "[security]\nallow_unsigned_methods = [\"network.permit_join\"]\n".into();
    })
    .await;
    fn last(stack: &Stack) -> u64 {
        FakeStats::get(&stack.fake().stats().last_permit_join_s)
    }
    fn requests(stack: &Stack) -> u64 {
        FakeStats::get(&stack.fake().stats().permit_join_requests)
    }
    // Issue 15: the stick's firmware shows in the status reports.
    let status = stack
        .backend
        .expect_status_where("the radio's firmware", Duration::from_secs(10), |s| {
            s["radio"]["firmware"]
                .as_str()
                .is_some_and(|f| f.starts_with("Z-Stack"))
        })
        .await;
    assert_eq!(status["radio"]["state"], "up", "{status}");
    eventually(
        "the agent to close joining at start",
        Duration::from_secs(10),
        || (last(&stack) == 0).then_some(()),
    )
    .await;
    let reply = stack
        .backend
        .call(
            "pj-1",
            "network.permit_join",
            json!({"seconds": 120}),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    eventually(
        "the coordinator to be asked for 120 s of joining",
        Duration::from_secs(10),
        || (last(&stack) == 120).then_some(()),
    )
    .await;
    // The operator closes it again on the AP.
    let config = stack.env.path().join("agent.toml");
    succeeded(&run_cli(&config, &["zigbee", "permit-join", "0"]).await);
    eventually(
        "the coordinator to be asked to close joining",
        Duration::from_secs(10),
        || (last(&stack) == 0).then_some(()),
    )
    .await;
    assert!(requests(&stack) >= 3, "close at start, open, close");
}

/// Issue 15: `esl-agent zigbee backup FILE` reads the network of a stick
/// someone else formed, with its devices, into an Open Coordinator Backup
/// (0600: it holds the key), and `esl-agent zigbee restore FILE` writes it to a blank stick,
/// which then has that network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_commands_move_a_network_to_a_blank_stick() {
    use esl_hal::zigbee::fake::{FakeConfig, FakeCoordinator, FakeNetwork};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = dir.path().join("ttyZB0");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = 1\ngroup_id = \"GID_esl\"\ndevice_id = \"ap-1\"\n\
             [store]\npath = {:?}\n[radio]\nkind = \"zigbee\"\n[radio.zigbee]\nport = {:?}\n",
            dir.path().join("store").display().to_string(),
            port.display().to_string(),
        ),
    )
    .expect("write config");
    let network = FakeNetwork {
        channel: 25,
        pan_id: 0x0BAD,
        extended_pan_id: 0x0123_4567_89AB_CDEF,
        network_key: [0x42; 16],
    };
    let mut formed = FakeConfig::new(&port);
    formed.network = Some(network.clone());
    let old = FakeCoordinator::start(formed).expect("fake");
    let file = dir.path().join("backup.json");
    let backup_file = file.display().to_string();
    succeeded(&run_cli(&config, &["zigbee", "backup", &backup_file]).await);
    let backup: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("backup written")).expect("JSON");
    assert_eq!(
        backup["metadata"]["format"],
        "zigpy/open-coordinator-backup"
    );
    assert_eq!(backup["pan_id"], "0bad");
    assert_eq!(backup["channel"], 25);
    // The stick's address manager: its eight tags, by IEEE address.
    let devices = backup["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 8, "{devices:?}");
    assert!(devices.iter().all(|d| d["is_child"] == true), "{devices:?}");
    let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the backup holds the network key");
    drop(old);
    eventually("the old fake to end", Duration::from_secs(10), || {
        port.symlink_metadata().is_err().then_some(())
    })
    .await;

    let blank = FakeCoordinator::start(FakeConfig::new(&port)).expect("fake");
    succeeded(&run_cli(&config, &["zigbee", "restore", &backup_file]).await);
    assert_eq!(blank.network().await, Some(network));
    // A blank stick has nothing to back up: said, and exit 1.
    drop(blank);
    eventually("the fake to end", Duration::from_secs(10), || {
        port.symlink_metadata().is_err().then_some(())
    })
    .await;
    let _blank = FakeCoordinator::start(FakeConfig::new(&port)).expect("fake");
    let second = dir.path().join("b2.json").display().to_string();
    let out = run_cli(&config, &["zigbee", "backup", &second]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no network"));
}

/// Issue 15, the installer's view: joining opened on the AP, a new tag
/// joins, and `tags.list` shows it at once — with its IEEE and network
/// address — although it has not checked in (it never does here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_that_joins_is_listed_before_its_first_check_in() {
    let mut stack = zigbee_stack("zb-join-listed").await;
    stack
        .backend
        .expect_status_where("radio up", Duration::from_secs(10), |s| {
            s["radio"]["state"] == "up"
        })
        .await;
    let config = stack.env.path().join("agent.toml");
    succeeded(&run_cli(&config, &["zigbee", "permit-join", "60"]).await);
    // The CLI answers once the request is handed on; the coordinator opens
    // joining when it gets it.
    eventually(
        "the coordinator to be asked for 60 s of joining",
        Duration::from_secs(10),
        || (FakeStats::get(&stack.fake().stats().last_permit_join_s) == 60).then_some(()),
    )
    .await;
    let joined = stack.fake().join_tag(false).await.expect("joining is open");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    let listed = loop {
        attempt += 1;
        let req_id = format!("tl-{attempt}");
        let reply = stack
            .backend
            .call(
                &req_id,
                "tags.list",
                json!({"limit": 100}),
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(reply["ok"], true, "{reply}");
        if let Some(tag) = reply["result"]["tags"]
            .as_array()
            .and_then(|tags| tags.iter().find(|t| t["tag_id"] == joined.tag_id.as_str()))
        {
            break tag.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} not listed: {reply}",
            joined.tag_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(listed["radio"]["ieee"], joined.tag_id.as_str(), "{listed}");
    assert_eq!(
        listed["radio"]["nwk"],
        format!("{:#06x}", joined.nwk).as_str(),
        "{listed}"
    );
    // The fake's new tag never checks in: listed from its join alone.
    assert!(listed["last_seen"].is_null(), "never checked in: {listed}");
    let status = stack
        .backend
        .expect_status("periodic", Duration::from_secs(5))
        .await;
    assert!(counter(&status, "zigbee_device_announces") >= 1, "{status}");
}

/// Issue 15: `esl-agent zigbee change-channel 20` on the AP moves the
/// running network (the fake coordinator and its tags follow the
/// broadcast), the saved network follows, tasks still apply, and the next
/// agent run resumes the moved network instead of reporting a mismatch.
/// Over MQTT the method changes state: refused unsigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_moves_the_network_to_another_channel_and_a_restart_resumes_it() {
    let mut stack = zigbee_stack("zb-change-channel").await;
    stack
        .backend
        .expect_status_where("radio up", Duration::from_secs(10), |s| {
            s["radio"]["state"] == "up"
        })
        .await;
    let network_file = stack.env.path().join("zigbee-network.json");
    let saved_channel = || -> Option<u64> {
        let text = std::fs::read(&network_file).ok()?;
        serde_json::from_slice::<Value>(&text).ok()?["channel"].as_u64()
    };
    assert_eq!(stack.fake().network().await.expect("formed").channel, 11);
    assert_eq!(saved_channel(), Some(11));

    let reply = stack
        .backend
        .call(
            "cc-1",
            "network.change_channel",
            json!({"channel": 20}),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");

    let config = stack.env.path().join("agent.toml");
    let out = run_cli(&config, &["zigbee", "change-channel", "27"]).await;
    assert!(!out.status.success(), "channel 27 does not exist");
    succeeded(&run_cli(&config, &["zigbee", "change-channel", "20"]).await);
    eventually(
        "the saved network to follow the channel",
        Duration::from_secs(20),
        || (saved_channel() == Some(20)).then_some(()),
    )
    .await;
    assert_eq!(stack.fake().network().await.expect("formed").channel, 20);
    assert_eq!(
        FakeStats::get(&stack.fake().stats().channel_changes),
        1,
        "moved once"
    );
    publish_and_expect_applied(&mut stack, &[task("t-cc-1", &sim_tag(1), 1)]).await;

    stack.agent.terminate().await;
    stack.start_next_agent(|_| {});
    // The fake's journal holds the first run's task too: acks only.
    let after = [task("t-cc-2", &sim_tag(2), 1)];
    stack.backend.publish_tasks(&after).await;
    stack
        .backend
        .collect_final_acks(&task_ids(&after), Duration::from_secs(20))
        .await
        .assert_all(&task_ids(&after), AckStatus::Applied);
    assert_eq!(
        FakeStats::get(&stack.fake().stats().formations),
        1,
        "resumed, not formed again"
    );
    assert_eq!(saved_channel(), Some(20));
}
