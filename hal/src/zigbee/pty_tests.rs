//! The ZigBee backend end to end inside this crate: [`ZigbeeRadio`] opens a
//! real pseudo-terminal through tokio-serial, and the [`FakeCoordinator`]
//! on the other end speaks ZNP with simulated tags. Real time, not paused
//! time: the bytes go through the kernel's PTY, which paused time cannot
//! wait for. Every wait has a deadline and names what it waited for.

use std::path::Path;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::backup::NetworkBackup;
use super::fake::{FakeConfig, FakeCoordinator, FakeFirmware, FakeNetwork, FakeStats};
use super::nv::id as nvid;
use super::{NetworkMismatch, ZigbeeConfig, ZigbeeRadio};
use crate::{Delivery, Outcome, Radio, RadioEvent, RadioState};

/// Longest wait for anything in these tests; far above what each step
/// needs (tens of ms) so a loaded CI machine does not fail them.
const PATIENCE: Duration = Duration::from_secs(20);

/// The radio's settings for a fake at `port`; the network is saved next to
/// it.
fn radio_config(port: &Path) -> ZigbeeConfig {
    ZigbeeConfig {
        port: port.to_owned(),
        network_file: port.with_file_name("zigbee-network.json"),
        sreq_timeout: Duration::from_millis(500),
        reset_timeout: Duration::from_millis(2000),
        startup_timeout: Duration::from_millis(2000),
        confirm_timeout: Duration::from_millis(600),
        result_timeout: Duration::from_millis(600),
        ping_interval: Duration::from_millis(300),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        ..ZigbeeConfig::default()
    }
}

struct Rig {
    radio: ZigbeeRadio,
    fake: FakeCoordinator,
    _dir: tempfile::TempDir,
}

fn rig(tweak: impl FnOnce(&mut FakeConfig)) -> Rig {
    rig_with(tweak, |_| {})
}

fn rig_with(
    tweak: impl FnOnce(&mut FakeConfig),
    tweak_radio: impl FnOnce(&mut ZigbeeConfig),
) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = FakeConfig::new(dir.path().join("ttyZB0"));
    cfg.journal = Some(dir.path().join("journal.jsonl"));
    tweak(&mut cfg);
    let fake = FakeCoordinator::start(cfg).expect("fake coordinator");
    let mut radio_cfg = radio_config(fake.port());
    tweak_radio(&mut radio_cfg);
    let radio = ZigbeeRadio::start(radio_cfg).expect("radio");
    Rig {
        radio,
        fake,
        _dir: dir,
    }
}

/// Events until one satisfies `wanted`, which is returned.
async fn wait_for(
    radio: &mut ZigbeeRadio,
    what: &str,
    mut wanted: impl FnMut(&RadioEvent) -> bool,
) -> RadioEvent {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let event = timeout_at(deadline, radio.next_event())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
            .expect("radio open");
        if wanted(&event) {
            return event;
        }
    }
}

async fn wait_up(radio: &mut ZigbeeRadio) {
    wait_for(radio, "radio up", |e| {
        *e == RadioEvent::State(RadioState::Up)
    })
    .await;
}

async fn wait_down(radio: &mut ZigbeeRadio) -> String {
    match wait_for(radio, "radio down", |e| {
        matches!(e, RadioEvent::State(RadioState::Down { .. }))
    })
    .await
    {
        RadioEvent::State(RadioState::Down { reason }) => reason,
        _ => unreachable!("matched Down above"),
    }
}

async fn wait_checkin(radio: &mut ZigbeeRadio, tag: &str) -> RadioEvent {
    wait_for(
        radio,
        &format!("check-in of {tag}"),
        |e| matches!(e, RadioEvent::CheckIn(c) if c.tag_id == tag),
    )
    .await
}

async fn wait_outcome(radio: &mut ZigbeeRadio, task: &str) -> Outcome {
    match wait_for(
        radio,
        &format!("outcome of {task}"),
        |e| matches!(e, RadioEvent::Outcome(o) if o.task_id == task),
    )
    .await
    {
        RadioEvent::Outcome(outcome) => outcome,
        _ => unreachable!("matched Outcome above"),
    }
}

fn delivery(tag: &str, task: &str, hash: &str) -> Delivery {
    Delivery {
        tag_id: tag.to_owned(),
        task_id: task.to_owned(),
        content: br#"{"name":"Milk","price":"9.90"}"#.to_vec(),
        content_hash: hash.to_owned(),
    }
}

/// Check-in, then deliver at once (the tag listens for a short while).
async fn deliver_at_checkin(radio: &mut ZigbeeRadio, d: Delivery) -> Outcome {
    wait_checkin(radio, &d.tag_id).await;
    let task = d.task_id.clone();
    radio.deliver(d).await.expect("deliver");
    wait_outcome(radio, &task).await
}

#[tokio::test]
async fn start_up_check_in_and_delivery() {
    let mut rig = rig(|_| {});
    wait_up(&mut rig.radio).await;
    let stats = rig.fake.stats();
    // The start-up's reset, and the one that clears a blank stick before
    // it forms the agent's network.
    assert_eq!(FakeStats::get(&stats.resets), 2, "two soft resets");
    assert_eq!(FakeStats::get(&stats.formations), 1, "network formed");
    assert_eq!(
        FakeStats::get(&stats.registrations),
        1,
        "endpoint registered"
    );

    let first = wait_checkin(&mut rig.radio, "SIM000003").await;
    let RadioEvent::CheckIn(first) = first else {
        unreachable!("matched a check-in")
    };
    assert!(first
        .battery_mv
        .is_some_and(|mv| (2900..3100).contains(&mv)));
    assert!(first.rssi.is_some_and(|dbm| (-90..-40).contains(&dbm)));
    assert_eq!(first.content_hash, None);

    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000003", "t-1", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    assert_eq!(outcome.tag_id, "SIM000003");

    // The tag now reports the content it shows.
    let RadioEvent::CheckIn(after) = wait_checkin(&mut rig.radio, "SIM000003").await else {
        unreachable!("matched a check-in")
    };
    assert_eq!(after.content_hash.as_deref(), Some("0011223344556677"));
    assert_eq!(FakeStats::get(&stats.bad_host_frames), 0);
}

#[tokio::test]
async fn garbled_bytes_are_counted_and_the_radio_carries_on() {
    let mut rig = rig(|_| {});
    wait_up(&mut rig.radio).await;
    // Noise, a frame with a bad FCS, an impossible length, a truncated
    // header: each counted, none fatal.
    rig.fake.inject(vec![0x00, 0x13, 0x37]).await;
    rig.fake.inject(vec![0xFE, 0x00, 0x45, 0xC0, 0x00]).await;
    rig.fake.inject(vec![0xFE, 0xFF, 0x44]).await;
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000001", "t-g", "aaaaaaaaaaaaaaaa"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    let counters = rig.radio.zigbee_counters();
    assert!(counters.get("garbage_bytes").unwrap_or(0) >= 3);
    assert_eq!(counters.get("bad_fcs_frames"), Some(1));
    assert_eq!(counters.get("oversized_frames"), Some(1));
    assert_eq!(counters.get("adapter_losses"), Some(0), "noise is no loss");
}

#[tokio::test]
async fn dropped_confirm_times_out_retryably_and_the_retry_succeeds() {
    let mut rig = rig(|_| {});
    wait_up(&mut rig.radio).await;
    rig.fake.swallow_requests(1).await;
    let started = Instant::now();
    let lost = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000002", "t-d1", "bbbbbbbbbbbbbbbb"),
    )
    .await;
    let failure = lost.result.expect_err("no confirm");
    assert!(failure.retryable, "{failure:?}");
    assert!(failure.reason.contains("AF_DATA_CONFIRM"), "{failure:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "waited the confirm timeout"
    );
    assert_eq!(rig.radio.zigbee_counters().get("confirm_timeouts"), Some(1));

    let retry = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000002", "t-d2", "bbbbbbbbbbbbbbbb"),
    )
    .await;
    assert_eq!(retry.result, Ok(()), "{retry:?}");
}

#[tokio::test]
async fn offer_to_a_sleeping_tag_expires_retryably() {
    // Tags that fall asleep right after their check-in: the coordinator
    // holds the offer until it expires (MAC_TRANSACTION_EXPIRED).
    let mut rig = rig(|c| c.awake_ms = 0);
    wait_up(&mut rig.radio).await;
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000004", "t-s", "cccccccccccccccc"),
    )
    .await;
    let failure = outcome.result.expect_err("tag asleep");
    assert!(failure.retryable, "{failure:?}");
    assert!(failure.reason.contains("0xf0"), "{failure:?}");
    assert!(failure.reason.contains("asleep"), "{failure:?}");
    assert_eq!(FakeStats::get(&rig.fake.stats().confirms_expired), 1);
}

#[tokio::test]
async fn busy_tag_fails_retryably_and_unknown_tag_too() {
    let mut rig = rig(|c| c.fail_rate = 1.0);
    wait_up(&mut rig.radio).await;
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000005", "t-b", "dddddddddddddddd"),
    )
    .await;
    let failure = outcome.result.expect_err("busy");
    assert!(
        failure.retryable && failure.reason.contains("busy"),
        "{failure:?}"
    );

    // Never heard: no address to send to.
    rig.radio
        .deliver(delivery("NOPE", "t-n", "dddddddddddddddd"))
        .await
        .expect("deliver");
    let failure = wait_outcome(&mut rig.radio, "t-n")
        .await
        .result
        .expect_err("unknown tag");
    assert!(failure.retryable, "{failure:?}");
}

#[tokio::test]
async fn bad_hash_and_oversized_content_fail_for_good() {
    let mut rig = rig(|_| {});
    wait_up(&mut rig.radio).await;
    wait_checkin(&mut rig.radio, "SIM000006").await;
    rig.radio
        .deliver(delivery("SIM000006", "t-h", "not-hex"))
        .await
        .expect("deliver");
    let failure = wait_outcome(&mut rig.radio, "t-h")
        .await
        .result
        .expect_err("bad hash");
    assert!(!failure.retryable, "{failure:?}");

    let mut big = delivery("SIM000006", "t-big", "eeeeeeeeeeeeeeee");
    big.content = vec![b'x'; 64 * 1024];
    rig.radio.deliver(big).await.expect("deliver");
    let failure = wait_outcome(&mut rig.radio, "t-big")
        .await
        .result
        .expect_err("too large");
    assert!(!failure.retryable, "{failure:?}");
    assert!(failure.reason.contains("too large"), "{failure:?}");
}

#[tokio::test]
async fn large_content_goes_in_segments() {
    let mut rig = rig(|_| {});
    wait_up(&mut rig.radio).await;
    let mut big = delivery("SIM000006", "t-20261127-000123", "0123456789abcdef");
    big.content = format!(r#"{{"name":"{}","price":"9.90"}}"#, "x".repeat(600)).into_bytes();
    let outcome = deliver_at_checkin(&mut rig.radio, big).await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    let stats = rig.fake.stats();
    // 626 bytes at 60-odd per segment.
    let requests = FakeStats::get(&stats.data_requests);
    assert!((10..=12).contains(&requests), "{requests} segments");
    assert_eq!(FakeStats::get(&stats.offers_received), 1);
    let RadioEvent::CheckIn(after) = wait_checkin(&mut rig.radio, "SIM000006").await else {
        unreachable!("matched a check-in")
    };
    assert_eq!(after.content_hash.as_deref(), Some("0123456789abcdef"));
}

#[tokio::test]
async fn unplug_reports_down_fails_in_flight_and_replug_recovers() {
    let mut rig = rig(|c| c.apply_ms = 2000);
    wait_up(&mut rig.radio).await;
    wait_checkin(&mut rig.radio, "SIM000000").await;
    // The tag takes 2 s to render: the delivery is in flight when the
    // stick is pulled.
    rig.radio
        .deliver(delivery("SIM000000", "t-u1", "ffffffffffffffff"))
        .await
        .expect("deliver");
    let stats = rig.fake.stats();
    let deadline = Instant::now() + PATIENCE;
    while FakeStats::get(&stats.confirms_ok) == 0 {
        assert!(Instant::now() < deadline, "the offer never reached the tag");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rig.fake.unplug().await;
    let reason = wait_down(&mut rig.radio).await;
    assert!(reason.contains("lost"), "{reason}");
    let failure = wait_outcome(&mut rig.radio, "t-u1")
        .await
        .result
        .expect_err("lost with the adapter");
    assert!(failure.retryable, "{failure:?}");

    // While it is away, deliveries fail at once, retryably.
    rig.radio
        .deliver(delivery("SIM000000", "t-u2", "ffffffffffffffff"))
        .await
        .expect("deliver");
    let failure = wait_outcome(&mut rig.radio, "t-u2")
        .await
        .result
        .expect_err("adapter away");
    assert!(failure.retryable, "{failure:?}");

    rig.fake.replug().await.expect("replug");
    wait_up(&mut rig.radio).await;
    assert_eq!(FakeStats::get(&stats.resets), 3, "start-up ran again");
    assert_eq!(
        FakeStats::get(&stats.formations),
        1,
        "and resumed the network"
    );
    let counters = rig.radio.zigbee_counters();
    assert_eq!(counters.get("adapter_losses"), Some(1));
    assert_eq!(counters.get("adapter_starts"), Some(2));
}

#[tokio::test]
async fn silent_adapter_is_detected_by_ping_and_recovers() {
    let mut rig = rig(|_| {});
    wait_up(&mut rig.radio).await;
    rig.fake.set_silent(true).await;
    let reason = wait_down(&mut rig.radio).await;
    assert!(reason.contains("stopped answering"), "{reason}");
    rig.fake.set_silent(false).await;
    wait_up(&mut rig.radio).await;
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000007", "t-q", "1234567812345678"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
}

#[tokio::test]
async fn missing_device_is_down_until_it_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = dir.path().join("ttyZB0");
    let mut radio =
        ZigbeeRadio::start(radio_config(&port)).expect("radio starts without its device");
    let reason = wait_for(&mut radio, "down: cannot open", |e| {
        matches!(e, RadioEvent::State(RadioState::Down { reason }) if reason.contains("cannot open"))
    })
    .await;
    assert!(matches!(reason, RadioEvent::State(RadioState::Down { .. })));
    let _fake = FakeCoordinator::start(FakeConfig::new(&port)).expect("fake");
    wait_up(&mut radio).await;
}

/// The fake's network as the agent saved it.
fn saved_network(radio_cfg: &ZigbeeConfig) -> FakeNetwork {
    let backup = NetworkBackup::load(&radio_cfg.network_file)
        .expect("readable")
        .expect("saved");
    let net = backup.to_network().expect("valid");
    FakeNetwork {
        channel: net.channel,
        pan_id: net.pan_id,
        extended_pan_id: net.extended_pan_id,
        network_key: net.network_key,
    }
}

fn foreign_network() -> FakeNetwork {
    FakeNetwork {
        channel: 25,
        pan_id: 0x0BAD,
        extended_pan_id: 0x0123_4567_89AB_CDEF,
        network_key: [0x42; 16],
    }
}

#[tokio::test]
async fn blank_stick_gets_the_configured_network_saved_privately_and_a_restart_resumes_it() {
    use std::os::unix::fs::PermissionsExt;
    let tweak_radio = |c: &mut ZigbeeConfig| {
        c.channels = vec![20, 25];
        c.pan_id = Some(0x1A62);
    };
    let mut rig = rig_with(|_| {}, tweak_radio);
    wait_up(&mut rig.radio).await;
    let mut cfg = radio_config(rig.fake.port());
    tweak_radio(&mut cfg);
    let on_stick = rig.fake.network().await.expect("formed");
    assert_eq!(
        on_stick,
        saved_network(&cfg),
        "the file is the stick's network"
    );
    assert_eq!((on_stick.channel, on_stick.pan_id), (20, 0x1A62));
    assert_ne!(
        on_stick.network_key,
        [
            0x01, 0x03, 0x05, 0x07, 0x09, 0x0B, 0x0D, 0x0F, 0x00, 0x02, 0x04, 0x06, 0x08, 0x0A,
            0x0C, 0x0D
        ],
        "not the firmware's default key"
    );
    let mode = std::fs::metadata(&cfg.network_file)
        .expect("saved")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the network key is a secret");
    // What sleepy tags need.
    assert_eq!(
        rig.fake.nv_item(nvid::NWK_CHILD_AGE_ENABLE).await,
        Some(vec![0])
    );
    assert_eq!(
        rig.fake.nv_item(nvid::CONCENTRATOR_ENABLE).await,
        Some(vec![1])
    );
    assert_eq!(rig.fake.nv_item(nvid::ZDO_DIRECT_CB).await, Some(vec![1]));
    assert_eq!(
        rig.fake.nv_item(nvid::HAS_CONFIGURED_ZSTACK3).await,
        Some(vec![0x55])
    );

    // The agent restarts: same network, not formed again.
    drop(rig.radio);
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    wait_up(&mut radio).await;
    assert_eq!(FakeStats::get(&rig.fake.stats().formations), 1);
    assert_eq!(rig.fake.network().await, Some(on_stick));
}

#[tokio::test]
async fn stick_formed_by_someone_else_is_down_with_the_remedy_until_adopted() {
    let mut rig = rig(|c| c.network = Some(foreign_network()));
    let reason = wait_down_matching(&mut rig.radio, "did not form").await;
    assert!(
        reason.contains("on_network_mismatch = \"adopt\""),
        "{reason}"
    );
    assert!(reason.contains("0x0bad"), "{reason}");
    assert!(!reason.contains("4242"), "no key in the reason: {reason}");
    assert_eq!(
        FakeStats::get(&rig.fake.stats().formations),
        0,
        "not re-formed"
    );
    assert_eq!(rig.fake.network().await, Some(foreign_network()));
    drop(rig.radio);

    let mut cfg = radio_config(rig.fake.port());
    cfg.on_network_mismatch = NetworkMismatch::Adopt;
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    wait_up(&mut radio).await;
    assert_eq!(saved_network(&cfg), foreign_network());
    assert_eq!(FakeStats::get(&rig.fake.stats().formations), 0);
}

#[tokio::test]
async fn replaced_stick_is_down_until_the_saved_network_is_restored_to_it() {
    // The agent forms its network on a first stick…
    let first = rig(|_| {});
    let mut first_radio = first.radio;
    wait_up(&mut first_radio).await;
    let cfg = radio_config(first.fake.port());
    let ours = saved_network(&cfg);
    drop(first_radio);
    drop(first.fake);
    // The old fake's task removes its link as it ends; wait for that, or
    // it could remove the new one's.
    old_fake_gone(&cfg.port).await;

    // …which is replaced by a blank one (a 1.2 CC2531, to cover its
    // start-up answers too).
    let mut fake_cfg = FakeConfig::new(&cfg.port);
    fake_cfg.firmware = FakeFirmware::ZStack12;
    let fake = FakeCoordinator::start(fake_cfg).expect("fake");
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    let reason = wait_down_matching(&mut radio, "no network").await;
    assert!(reason.contains("\"restore\""), "{reason}");
    assert_eq!(fake.network().await, None, "left blank");
    drop(radio);

    let mut restoring = cfg.clone();
    restoring.on_network_mismatch = NetworkMismatch::Restore;
    let mut radio = ZigbeeRadio::start(restoring).expect("radio");
    wait_up(&mut radio).await;
    assert_eq!(
        fake.network().await,
        Some(ours.clone()),
        "our network on the new stick"
    );
    assert_eq!(
        fake.frame_counter().await,
        Some(super::commission::FRAME_COUNTER_MARGIN),
        "the 1.2 counter (in NWKKEY) above the saved one"
    );
    assert_eq!(saved_network(&cfg), ours, "the saved network unchanged");
    assert_eq!(
        radio.zigbee_counters().get("rpc_errors"),
        Some(0),
        "no BDB on 1.2"
    );
}

#[tokio::test]
async fn stick_in_its_bootloader_is_woken_and_its_power_up_indication_is_not_the_reset_answer() {
    // The stick leaves its bootloader on the skip byte and says hello with
    // a SYS_RESET_IND while the agent still probes; the agent's own reset
    // must wait for the next one, or its next request reaches a rebooting
    // chip.
    let mut rig = rig(|c| {
        c.in_bootloader = true;
        c.reboot_ms = 300;
    });
    wait_up(&mut rig.radio).await;
    let stats = rig.fake.stats();
    assert_eq!(FakeStats::get(&stats.bootloader_exits), 1);
    // At most the probe's ping right after the skip byte is lost.
    assert!(FakeStats::get(&stats.frames_while_rebooting) <= 1);
    assert_eq!(
        FakeStats::get(&stats.resets),
        2,
        "started at the first attempt"
    );
    assert_eq!(rig.radio.zigbee_counters().get("adapter_starts"), Some(1));
}

async fn wait_down_matching(radio: &mut ZigbeeRadio, text: &str) -> String {
    match wait_for(
        radio,
        &format!("down: {text}"),
        |e| matches!(e, RadioEvent::State(RadioState::Down { reason }) if reason.contains(text)),
    )
    .await
    {
        RadioEvent::State(RadioState::Down { reason }) => reason,
        _ => unreachable!("matched Down above"),
    }
}

#[tokio::test]
async fn backup_of_one_stick_restored_to_a_blank_one_is_resumed_by_the_agent() {
    use super::commission::{backup_stick, restore_stick};
    let dir = tempfile::tempdir().expect("tempdir");
    let port = dir.path().join("ttyZB0");
    let cfg = radio_config(&port);
    // A stick someone else formed (Zigbee2MQTT, say): back it up.
    let mut old = FakeConfig::new(&port);
    old.network = Some(foreign_network());
    let old = FakeCoordinator::start(old).expect("fake");
    let mut backup = backup_stick(&cfg)
        .await
        .expect("backup")
        .expect("a network");
    let json = serde_json::to_value(&backup).expect("json");
    assert_eq!(json["metadata"]["format"], "zigpy/open-coordinator-backup");
    assert_eq!(json["pan_id"], "0bad");
    assert_eq!(json["extended_pan_id"], "0123456789abcdef");
    assert_eq!(json["channel"], 25);
    assert_eq!(json["network_key"]["key"], "42".repeat(16));
    // The network's own counter, not the stick's global entry (7).
    assert_eq!(json["network_key"]["frame_counter"], 0);
    drop(old);
    // As if it came from another stick that sent 5000 frames.
    backup.coordinator_ieee = "00124b00aabbccdd".to_owned();
    backup.network_key.frame_counter = 5_000;
    old_fake_gone(&port).await;

    // A blank stick gets it; the agent then resumes it as its own.
    let blank = FakeCoordinator::start(FakeConfig::new(&port)).expect("fake");
    assert_eq!(backup_stick(&cfg).await.expect("read"), None, "blank");
    restore_stick(&cfg, &backup).await.expect("restored");
    assert_eq!(blank.network().await, Some(foreign_network()));
    assert_eq!(
        blank.nv_item(nvid::EXTADDR).await,
        Some(0x00124B00_AABBCCDDu64.to_le_bytes().to_vec()),
        "the coordinator address from the backup"
    );
    assert_eq!(
        blank.frame_counter().await,
        Some(5_000 + super::commission::FRAME_COUNTER_MARGIN),
        "frames go out above the old stick's counter"
    );
    let formations = FakeStats::get(&blank.stats().formations);
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    wait_up(&mut radio).await;
    assert_eq!(
        FakeStats::get(&blank.stats().formations),
        formations,
        "resumed, not formed"
    );
    assert_eq!(saved_network(&cfg), foreign_network());
}

#[tokio::test]
async fn deliveries_in_flight_are_capped() {
    // Tags that stay awake and take a while to render: without a cap every
    // offer would be at the adapter at once.
    let mut rig = rig_with(
        |c| {
            c.awake_ms = 20_000;
            c.apply_ms = 150;
        },
        |r| {
            r.max_in_flight = Some(2);
            r.result_timeout = Duration::from_secs(5);
        },
    );
    wait_up(&mut rig.radio).await;
    let tags: Vec<String> = (0..6).map(|i| format!("SIM{i:06}")).collect();
    for tag in &tags {
        wait_checkin(&mut rig.radio, tag).await;
    }
    for (i, tag) in tags.iter().enumerate() {
        rig.radio
            .deliver(delivery(tag, &format!("t-cap{i}"), "0011223344556677"))
            .await
            .expect("deliver");
    }
    for i in 0..tags.len() {
        let outcome = wait_outcome(&mut rig.radio, &format!("t-cap{i}")).await;
        assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    }
    let at_once = FakeStats::get(&rig.fake.stats().max_offers_at_once);
    assert_eq!(at_once, 2, "two offers at a time");
}

#[tokio::test]
async fn no_route_is_answered_with_a_route_discovery_and_the_offer_goes_again() {
    let mut rig = rig(|c| {
        c.unrouted = vec!["SIM000003".to_owned()];
        c.awake_ms = 2_000;
    });
    wait_up(&mut rig.radio).await;
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000003", "t-route", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    assert_eq!(FakeStats::get(&rig.fake.stats().route_discoveries), 1);
    assert_eq!(
        rig.radio.zigbee_counters().get("route_discoveries"),
        Some(1)
    );
}

#[tokio::test]
async fn joining_is_closed_at_start_and_opened_on_request() {
    let mut rig = rig(|_| {});
    wait_up(&mut rig.radio).await;
    let stats = rig.fake.stats();
    assert_eq!(
        FakeStats::get(&stats.last_permit_join_s),
        0,
        "closed at start"
    );
    rig.radio.permit_join(120).await.expect("opened");
    assert_eq!(FakeStats::get(&stats.last_permit_join_s), 120);
    let error = rig.radio.permit_join(255).await.expect_err("too long");
    assert!(
        matches!(error, super::ZigbeeError::InvalidRequest(_)),
        "{error:?}"
    );
    assert!(error.to_string().contains("254"), "{error}");
    // Deliveries still work after it.
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000001", "t-pj", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");

    rig.fake.unplug().await;
    wait_down(&mut rig.radio).await;
    let error = rig.radio.permit_join(60).await.expect_err("no adapter");
    assert!(
        matches!(error, super::ZigbeeError::Unavailable(_)),
        "{error:?}"
    );
    assert!(error.to_string().contains("not connected"), "{error}");
    assert_eq!(FakeStats::get(&stats.permit_join_requests), 2);
}

#[tokio::test]
async fn scheduled_backups_keep_the_frame_counter_current() {
    let mut rig = rig_with(|_| {}, |r| r.backup_interval = Duration::from_millis(100));
    wait_up(&mut rig.radio).await;
    let cfg = radio_config(rig.fake.port());
    let file_counter = || {
        NetworkBackup::load(&cfg.network_file)
            .expect("readable")
            .expect("saved")
            .network_key
            .frame_counter
    };
    assert_eq!(file_counter(), 0, "just formed");
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000002", "t-bk", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    let sent = rig.fake.frame_counter().await.expect("a counter");
    assert!(sent > 0);
    let deadline = Instant::now() + PATIENCE;
    while file_counter() < sent {
        assert!(Instant::now() < deadline, "no backup with counter {sent}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until a dropped fake's task has removed its link at `port`, or
/// it could remove the next fake's.
async fn old_fake_gone(port: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while port.symlink_metadata().is_ok() {
        assert!(Instant::now() < deadline, "the old fake never ended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A backup of the stick at `cfg.port` as soon as a dropped radio's
/// driver has let go of the port.
async fn backup_once_released(cfg: &ZigbeeConfig) -> NetworkBackup {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match super::commission::backup_stick(cfg).await {
            Ok(backup) => return backup.expect("a network"),
            Err(error) => assert!(Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next `RadioEvent::Tag` for `tag_id`.
async fn wait_tag(radio: &mut ZigbeeRadio, tag_id: &str) -> crate::TagDetails {
    match wait_for(
        radio,
        &format!("details of {tag_id}"),
        |e| matches!(e, RadioEvent::Tag(d) if d.tag_id == tag_id),
    )
    .await
    {
        RadioEvent::Tag(details) => details,
        _ => unreachable!("matched Tag above"),
    }
}

/// Issue 15: a tag that joins is reported (`RadioEvent::Tag`, under its
/// IEEE address) before it ever checks in; a tag whose check-in names
/// another id is reported under that id at every later announce, and
/// after a restart of the radio, from the saved network.
#[tokio::test]
async fn joining_tags_are_reported_at_once_and_keep_their_bound_ids() {
    let mut rig = rig(|c| c.tags = 2);
    wait_up(&mut rig.radio).await;
    let closed = rig.fake.join_tag(false).await;
    assert!(closed.is_err(), "joining is closed at start: {closed:?}");
    rig.radio.permit_join(60).await.expect("opened");
    let joined = rig.fake.join_tag(false).await.expect("joins while open");
    // SIM000001's first check-in (which binds it, below) may come before
    // or after the join's report: take both in whatever order they come.
    let mut first: std::collections::HashMap<String, crate::TagDetails> =
        std::collections::HashMap::new();
    while !(first.contains_key(&joined.tag_id) && first.contains_key("SIM000001")) {
        let d = wait_for(
            &mut rig.radio,
            "details of the joined tag and SIM000001",
            |e| matches!(e, RadioEvent::Tag(_)),
        )
        .await;
        if let RadioEvent::Tag(d) = d {
            first.entry(d.tag_id.clone()).or_insert(d);
        }
    }
    let details = first.remove(&joined.tag_id).expect("checked above");
    assert_eq!(joined.tag_id, format!("{:016x}", joined.ieee));
    assert_eq!(details.info["ieee"], joined.tag_id.as_str());
    assert_eq!(details.info["nwk"], format!("{:#06x}", joined.nwk).as_str());
    assert_eq!(details.info["parent"], "0x0000");
    assert!(details.info["announced_at"].as_u64() > Some(0));

    // SIM000001 is in the stick's address manager: its first check-in
    // binds its id to its IEEE address, and it is reported under it, at
    // its new address after a rejoin.
    let ieee_id = format!("{:016x}", super::fake::FIRST_TAG_IEEE + 1);
    let bound = first.remove("SIM000001").expect("checked above");
    assert_eq!(bound.info["ieee"], ieee_id.as_str());
    assert_eq!(bound.replaces, None, "never listed under another id");
    let nwk = rig.fake.rejoin("SIM000001").await.expect("a tag");
    let again = wait_tag(&mut rig.radio, "SIM000001").await;
    assert_eq!(again.info["nwk"], format!("{nwk:#06x}").as_str());
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000001", "t-moved", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");

    // A restarted radio lists both from the saved network before anything
    // else happens.
    let cfg = radio_config(rig.fake.port());
    drop(std::mem::replace(
        &mut rig.radio,
        ZigbeeRadio::start(cfg).expect("radio"),
    ));
    let mut listed = Vec::new();
    while let RadioEvent::Tag(d) = wait_for(&mut rig.radio, "the saved tags", |e| {
        matches!(e, RadioEvent::Tag(_) | RadioEvent::State(RadioState::Up))
    })
    .await
    {
        listed.push(d.tag_id);
    }
    for tag in [&joined.tag_id, "SIM000001"] {
        assert!(listed.iter().any(|t| t == tag), "{tag} in {listed:?}");
    }
}

/// Issue 15, stale children: a tag that moved to another parent while the
/// coordinator still holds it as its child (child aging off) lets offers
/// expire (0xF0). The first expiry is retried plainly at the next
/// check-in; the second drops the stale entry (`UTIL_ASSOC_REMOVE`) and
/// the offer is routed to the tag's new parent, as zigbee-herdsman and
/// zigpy-znp do.
#[tokio::test]
async fn a_tag_that_moved_parent_is_dropped_as_a_stale_child_and_then_reached() {
    let mut rig = rig(|c| {
        c.moved = vec!["SIM000002".to_owned()];
        c.awake_ms = 2_000;
    });
    wait_up(&mut rig.radio).await;
    let first = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000002", "t-moved-1", "0011223344556677"),
    )
    .await;
    let failure = first.result.expect_err("held for polls that never come");
    assert!(
        failure.retryable && failure.reason.contains("0xf0"),
        "{failure:?}"
    );
    let stats = rig.fake.stats();
    assert_eq!(FakeStats::get(&stats.assoc_removals), 0, "not on the first");
    let second = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000002", "t-moved-2", "0011223344556677"),
    )
    .await;
    assert_eq!(second.result, Ok(()), "{second:?}");
    assert_eq!(FakeStats::get(&stats.assoc_removals), 1);
    assert_eq!(
        FakeStats::get(&stats.assoc_adds),
        0,
        "it worked: not put back"
    );
    let counters = rig.radio.zigbee_counters();
    assert_eq!(counters.get("stale_children_dropped"), Some(1));
    let third = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000002", "t-moved-3", "8899aabbccddeeff"),
    )
    .await;
    assert_eq!(third.result, Ok(()), "{third:?}");
    assert_eq!(FakeStats::get(&stats.assoc_removals), 1, "dropped once");
}

/// The same for a tag that is the coordinator's child and simply asleep:
/// dropping its entry does not help, so it is put back
/// (`UTIL_ASSOC_ADD`) and the offer fails retryably.
#[tokio::test]
async fn a_sleeping_child_keeps_its_entry_after_two_expired_offers() {
    let mut rig = rig(|c| c.awake_ms = 0);
    wait_up(&mut rig.radio).await;
    for task in ["t-asleep-1", "t-asleep-2"] {
        let outcome = deliver_at_checkin(
            &mut rig.radio,
            delivery("SIM000004", task, "cccccccccccccccc"),
        )
        .await;
        let failure = outcome.result.expect_err("asleep");
        assert!(failure.retryable, "{failure:?}");
    }
    let stats = rig.fake.stats();
    assert_eq!(FakeStats::get(&stats.assoc_removals), 1);
    assert_eq!(FakeStats::get(&stats.assoc_adds), 1, "put back");
    assert_eq!(
        rig.radio.zigbee_counters().get("stale_children_restored"),
        Some(1)
    );
}

/// Issue 15, backup completeness: the devices in stick A's address manager
/// (with their hashed link keys, and the tag ids the agent bound to them)
/// go into the backup; restored to a new stick B that knows none of them,
/// they are written back, so B reaches the tags (without them: no route,
/// 0xCD), has their link keys, and the agent lists them from the start.
#[tokio::test]
async fn devices_backed_up_from_one_stick_are_reached_through_the_new_one() {
    use super::commission::{backup_stick, restore_stick};
    let mut rig = rig(|c| c.tags = 4);
    wait_up(&mut rig.radio).await;
    wait_tag(&mut rig.radio, "SIM000001").await;
    let cfg = radio_config(rig.fake.port());
    let port = cfg.port.clone();
    let Rig { radio, fake, _dir } = rig;
    drop(radio);
    // The driver lets go of the port once it sees its handle dropped.
    let backup = backup_once_released(&cfg).await;
    let devices = serde_json::to_value(&backup.devices).expect("json");
    let devices = devices.as_array().expect("devices");
    assert_eq!(devices.len(), 4, "{devices:?}");
    let sim1 = devices
        .iter()
        .find(|d| d["esl_tag_id"] == "SIM000001")
        .expect("the bound tag id kept");
    assert_eq!(
        sim1["ieee_address"],
        format!("{:016x}", super::fake::FIRST_TAG_IEEE + 1).as_str()
    );
    assert_eq!(sim1["nwk_address"], "1001");
    assert_eq!(sim1["is_child"], true);
    // Its hashed link key, derived from the TCLK seed the backup keeps.
    assert_eq!(sim1["link_key"]["tx_counter"], 101);
    assert_eq!(sim1["link_key"]["rx_counter"], 201);
    let old_key = sim1["link_key"]["key"].clone();
    drop(fake);
    old_fake_gone(&port).await;

    let mut new_stick = FakeConfig::new(&port);
    new_stick.tags = 4;
    new_stick.tags_joined = false;
    new_stick.awake_ms = 2_000;
    let _new = FakeCoordinator::start(new_stick).expect("fake");
    restore_stick(&cfg, &backup).await.expect("restored");
    // The new stick has the key, its transmit counter above the old one's.
    let again = backup_stick(&cfg).await.expect("read").expect("a network");
    let again = serde_json::to_value(&again.devices).expect("json");
    let sim1 = again
        .as_array()
        .and_then(|d| d.iter().find(|d| d["esl_tag_id"] == "SIM000001"))
        .expect("still there");
    assert_eq!(sim1["link_key"]["key"], old_key);
    assert_eq!(
        sim1["link_key"]["tx_counter"],
        101 + super::nv::LINK_COUNTER_MARGIN
    );
    let mut radio = ZigbeeRadio::start(cfg).expect("radio");
    let listed = wait_tag(&mut radio, "SIM000001").await;
    assert_eq!(listed.info["nwk"], "0x1001");
    wait_up(&mut radio).await;
    let outcome = deliver_at_checkin(
        &mut radio,
        delivery("SIM000003", "t-new-stick", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
}

/// Z-Stack 3.0.x (CC2531) keeps the network frame counter in the legacy
/// security-material items (0x0075…) and its address manager in one
/// packed OSAL item (0x0023): the agent forms its network there, a backup
/// reads the counter the stick has reached and its devices, and a restore
/// to a blank 3.0.x stick that knows no tag starts above the counter and
/// reaches the tags.
#[tokio::test]
async fn a_zstack_30_stick_is_backed_up_and_restored_with_its_counter_and_devices() {
    use super::commission::restore_stick;
    let mut rig = rig(|c| c.firmware = FakeFirmware::ZStack30);
    wait_up(&mut rig.radio).await;
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000001", "t-30", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    let sent = rig.fake.frame_counter().await.expect("a counter");
    assert!(sent > 0);
    let cfg = radio_config(rig.fake.port());
    let ours = saved_network(&cfg);
    let Rig { radio, fake, _dir } = rig;
    drop(radio);
    let backup = backup_once_released(&cfg).await;
    assert_eq!(backup.network_key.frame_counter, sent, "read from 0x0075…");
    assert_eq!(backup.devices.len(), 8, "read from 0x0023");
    let keys = backup
        .devices
        .iter()
        .filter(|d| d["link_key"]["tx_counter"].is_u64())
        .count();
    assert_eq!(keys, 8, "link keys from 0x0111…");
    drop(fake);
    old_fake_gone(&cfg.port).await;
    let mut blank = FakeConfig::new(&cfg.port);
    blank.firmware = FakeFirmware::ZStack30;
    blank.tags_joined = false;
    blank.awake_ms = 2_000;
    let blank = FakeCoordinator::start(blank).expect("fake");
    restore_stick(&cfg, &backup).await.expect("restored");
    assert_eq!(blank.network().await, Some(ours));
    assert_eq!(
        blank.frame_counter().await,
        Some(sent + super::commission::FRAME_COUNTER_MARGIN)
    );
    let tclk = blank
        .nv_item(nvid::LEGACY_TCLK_TABLE_START)
        .await
        .expect("a link key written");
    assert_eq!(tclk.len(), super::nv::TCLK_ENTRY_LEN_PACKED, "packed");
    let mut radio = ZigbeeRadio::start(cfg).expect("radio");
    wait_up(&mut radio).await;
    let outcome = deliver_at_checkin(
        &mut radio,
        delivery("SIM000003", "t-30-restored", "8899aabbccddeeff"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
}

/// The fake's address manager has room for every configured tag (a fake
/// with many tags must not turn into "no route" for the last ones).
#[tokio::test]
async fn every_configured_tag_is_the_fake_sticks_child() {
    let mut rig = rig(|c| {
        c.tags = 60;
        c.checkin_interval_ms = 50;
    });
    wait_up(&mut rig.radio).await;
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000059", "t-last", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
}

/// The link key tags are provisioned with, in tests.
const OUR_LINK_KEY: [u8; 16] = [0x5C; 16];

#[tokio::test]
async fn a_configured_tc_link_key_is_formed_saved_compared_and_restored() {
    use super::commission::restore_stick;
    use super::TcLinkKey;
    let keyed = |c: &mut ZigbeeConfig| c.tc_link_key = TcLinkKey::new(OUR_LINK_KEY);
    // Z-Stack 1.2 keeps the global link key in NV: formed with ours.
    let mut rig = rig_with(|c| c.firmware = FakeFirmware::ZStack12, keyed);
    wait_up(&mut rig.radio).await;
    let entry = |key: &[u8; 16]| Some(super::nv::global_tc_link_key_entry(key));
    assert_eq!(
        rig.fake.nv_item(nvid::TCLK_TABLE_START_12).await,
        entry(&OUR_LINK_KEY)
    );
    let mut cfg = radio_config(rig.fake.port());
    keyed(&mut cfg);
    let saved = || {
        NetworkBackup::load(&cfg.network_file)
            .expect("readable")
            .expect("saved")
            .to_network()
            .expect("valid")
            .tc_link_key
    };
    assert_eq!(saved(), OUR_LINK_KEY, "saved with the network");
    drop(rig.radio);

    // The key file is gone (the well-known default now): the network is
    // not the configured one any more.
    let mut radio = ZigbeeRadio::start(radio_config(&cfg.port)).expect("radio");
    let reason = wait_down_matching(&mut radio, "trust-centre link key").await;
    assert!(reason.contains("tc_link_key_file"), "{reason}");
    assert!(reason.contains("\"form\""), "{reason}");
    assert!(!reason.contains("5c5c"), "no key in the reason: {reason}");
    drop(radio);
    // With it, resumed.
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    wait_up(&mut radio).await;
    assert_eq!(FakeStats::get(&rig.fake.stats().formations), 1);
    drop(radio);

    // Another tool put the well-known key back on the stick: not the
    // saved network any more…
    let default_entry = entry(TcLinkKey::DEFAULT.bytes()).expect("an entry");
    rig.fake
        .set_nv_item(nvid::TCLK_TABLE_START_12, default_entry)
        .await;
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    let reason = wait_down_matching(&mut radio, "trust-centre link key differs").await;
    assert!(reason.contains("\"restore\""), "{reason}");
    drop(radio);
    // …until the saved network is restored to it.
    let mut restoring = cfg.clone();
    restoring.on_network_mismatch = NetworkMismatch::Restore;
    let mut radio = ZigbeeRadio::start(restoring).expect("radio");
    wait_up(&mut radio).await;
    assert_eq!(
        rig.fake.nv_item(nvid::TCLK_TABLE_START_12).await,
        entry(&OUR_LINK_KEY)
    );
    drop(radio);

    // Backed up with it, restored to a blank 1.2 stick with it.
    let backup = backup_once_released(&cfg).await;
    assert_eq!(
        backup.to_network().expect("valid").tc_link_key,
        OUR_LINK_KEY
    );
    drop(rig.fake);
    old_fake_gone(&cfg.port).await;
    let mut blank = FakeConfig::new(&cfg.port);
    blank.firmware = FakeFirmware::ZStack12;
    let blank = FakeCoordinator::start(blank).expect("fake");
    // Not under another configured key.
    let error = restore_stick(&radio_config(&cfg.port), &backup)
        .await
        .expect_err("the config names the default key");
    assert!(error.contains("trust-centre link key"), "{error}");
    restore_stick(&cfg, &backup).await.expect("restored");
    assert_eq!(
        blank.nv_item(nvid::TCLK_TABLE_START_12).await,
        entry(&OUR_LINK_KEY)
    );
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    wait_up(&mut radio).await;
}

#[tokio::test]
async fn a_zstack_3_stick_is_not_formed_with_a_key_it_cannot_hold() {
    let mut rig = rig_with(
        |_| {},
        |c| c.tc_link_key = super::TcLinkKey::new(OUR_LINK_KEY),
    );
    let reason = wait_down_matching(&mut rig.radio, "built in").await;
    assert!(reason.contains("tc_link_key_file"), "{reason}");
    assert_eq!(FakeStats::get(&rig.fake.stats().formations), 0);
    assert_eq!(rig.fake.network().await, None, "left blank");
    assert_eq!(FakeStats::get(&rig.fake.stats().nv_writes), 0, "untouched");
}

#[tokio::test]
async fn the_network_moves_to_another_channel_and_a_tag_that_missed_it_rejoins() {
    let mut rig = rig(|c| c.asleep_at_channel_change = vec!["SIM000003".into()]);
    wait_up(&mut rig.radio).await;
    let cfg = radio_config(rig.fake.port());
    assert_eq!(rig.fake.network().await.expect("formed").channel, 11);
    wait_checkin(&mut rig.radio, "SIM000003").await;
    let error = rig
        .radio
        .change_channel(27)
        .await
        .expect_err("no channel 27");
    assert!(
        matches!(error, super::ZigbeeError::InvalidRequest(_)),
        "{error:?}"
    );

    rig.radio.change_channel(20).await.expect("moved");
    let stats = rig.fake.stats();
    assert_eq!(FakeStats::get(&stats.channel_changes), 1);
    assert_eq!(rig.fake.network().await.expect("formed").channel, 20);
    let nib = rig.fake.nv_item(nvid::NIB).await.expect("a NIB");
    assert_eq!(super::nv::Nib::parse(&nib).expect("NIB").update_id, 1);
    let saved = NetworkBackup::load(&cfg.network_file)
        .expect("readable")
        .expect("saved");
    assert_eq!(
        (
            saved.channel,
            saved.channel_mask.clone(),
            saved.nwk_update_id
        ),
        (20, vec![20], 1),
        "the saved network follows at once"
    );
    // The tags that heard the broadcast (through their parent, at their
    // next poll) are reached on the new channel.
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000001", "t-ch1", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");
    // The one that slept through it is heard no more until it rejoins.
    let deadline = Instant::now() + PATIENCE;
    while FakeStats::get(&stats.checkins_lost) == 0 {
        assert!(Instant::now() < deadline, "SIM000003 never checked in");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.fake.rejoin("SIM000003").await.expect("a tag");
    let outcome = deliver_at_checkin(
        &mut rig.radio,
        delivery("SIM000003", "t-ch3", "0011223344556677"),
    )
    .await;
    assert_eq!(outcome.result, Ok(()), "{outcome:?}");

    // The next start resumes the moved network: no mismatch.
    drop(rig.radio);
    let mut radio = ZigbeeRadio::start(cfg.clone()).expect("radio");
    wait_up(&mut radio).await;
    assert_eq!(FakeStats::get(&stats.formations), 1, "not formed again");
    // Without an adapter the request is refused at once.
    rig.fake.unplug().await;
    wait_down(&mut radio).await;
    let error = radio.change_channel(15).await.expect_err("no adapter");
    assert!(
        matches!(error, super::ZigbeeError::Unavailable(_)),
        "{error:?}"
    );
}
