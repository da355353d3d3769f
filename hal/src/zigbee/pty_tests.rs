//! The ZigBee backend end to end inside this crate: [`ZigbeeRadio`] opens a
//! real pseudo-terminal through tokio-serial, and the [`FakeCoordinator`]
//! on the other end speaks ZNP with simulated tags. Real time, not paused
//! time: the bytes go through the kernel's PTY, which paused time cannot
//! wait for. Every wait has a deadline and names what it waited for.

use std::path::Path;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::fake::{FakeConfig, FakeCoordinator, FakeStats};
use super::{ZigbeeConfig, ZigbeeRadio};
use crate::{Delivery, Outcome, Radio, RadioEvent, RadioState};

/// Longest wait for anything in these tests; far above what each step
/// needs (tens of ms) so a loaded CI machine does not fail them.
const PATIENCE: Duration = Duration::from_secs(20);

fn radio_config(port: &Path) -> ZigbeeConfig {
    ZigbeeConfig {
        port: port.to_owned(),
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
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = FakeConfig::new(dir.path().join("ttyZB0"));
    cfg.journal = Some(dir.path().join("journal.jsonl"));
    tweak(&mut cfg);
    let fake = FakeCoordinator::start(cfg).expect("fake coordinator");
    let radio = ZigbeeRadio::start(radio_config(fake.port())).expect("radio");
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
    assert_eq!(FakeStats::get(&stats.resets), 1, "one soft reset");
    assert_eq!(FakeStats::get(&stats.startups), 1, "coordinator started");
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
    assert_eq!(FakeStats::get(&stats.resets), 2, "start-up ran again");
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
