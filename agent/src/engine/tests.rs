//! The engine's tests: `State` driven directly with a fixed clock, and
//! the `Engine` task's wiring through a real store.

use super::state::{EXPIRE_LIMIT, TAG_SAVE_INTERVAL_MS};
use super::*;
use crate::config::Config;
use crate::identity::Identity;
use crate::msg::TagView;
use crate::security::signing::{Purpose, Verifier};
use crate::store::TaskState;
use crate::wire::{self, Method};
use esl_hal::{CheckIn, DeliveryFailure, Outcome};
use serde_json::{json, Value};

const NOW: u64 = 1_764_230_400_000;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    state: State,
    /// Outbox entries already looked at.
    seen: Option<u64>,
}

fn settings() -> EngineSettings {
    EngineSettings {
        default_ttl_ms: 60_000,
        max_attempts: 2,
        delivery_timeout_ms: 5_000,
        keep_final_ms: 3_600_000,
        send_accepted: false,
        batch_max: 16,
        max_payload: 65536,
        offline_after_ms: 300_000,
        ack_to: "GID_backend@@@be1".into(),
        allowed_methods: Method::ALL.to_vec(),
        reply_to_allowed: vec!["GID_backend@@@*".into()],
        allow_unsigned_methods: Vec::new(),
    }
}

fn identity() -> Identity {
    let mut c = Config::default();
    c.mqtt.group_id = "GID_test".into();
    Identity::from_parts(&c, "dev1").unwrap()
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let state = State::load(settings(), identity(), store.clone(), Arc::default()).unwrap();
        Fixture {
            _dir: dir,
            store,
            state,
            seen: None,
        }
    }

    fn task(&mut self, v: Value, now: u64) {
        let mut c = Change::new();
        self.state
            .on_task(v.to_string().as_bytes(), now, &mut c)
            .unwrap();
        self.store.apply(c).unwrap();
    }

    fn radio(&mut self, e: RadioEvent, now: u64) -> Vec<Delivery> {
        let mut c = Change::new();
        let mut d = Vec::new();
        self.state.on_radio(e, now, &mut c, &mut d).unwrap();
        self.store.apply(c).unwrap();
        d
    }

    fn sweep(&mut self, now: u64) {
        let mut c = Change::new();
        self.state.sweep(now, &mut c).unwrap();
        self.store.apply(c).unwrap();
    }

    /// Acks queued since the last call, as JSON, with their topics.
    async fn acks(&mut self) -> Vec<(String, Value)> {
        self.store.flush().await.unwrap();
        let entries = self.store.outbox_after(self.seen, 1000).unwrap();
        if let Some((n, _)) = entries.last() {
            self.seen = Some(*n);
        }
        entries
            .into_iter()
            .map(|(_, e)| (e.topic, serde_json::from_slice(&e.payload).unwrap()))
            .collect()
    }

    async fn statuses(&mut self) -> Vec<(String, String)> {
        self.acks()
            .await
            .into_iter()
            .map(|(_, a)| {
                (
                    a["task_id"].as_str().unwrap_or("-").to_owned(),
                    a["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

fn task(id: &str, tag: &str, seq: u64) -> Value {
    json!({"v":1,"task_id":id,"tag_id":tag,"seq":seq,"issued_at":NOW,"content":{"price":format!("{seq}.00")}})
}

fn checkin(tag: &str, hash: Option<&str>) -> RadioEvent {
    RadioEvent::CheckIn(CheckIn {
        tag_id: tag.into(),
        battery_mv: Some(3000),
        rssi: Some(-50),
        content_hash: hash.map(str::to_owned),
    })
}

fn outcome(d: &Delivery, result: Result<(), DeliveryFailure>) -> RadioEvent {
    RadioEvent::Outcome(Outcome {
        tag_id: d.tag_id.clone(),
        task_id: d.task_id.clone(),
        result,
    })
}

fn retryable() -> Result<(), DeliveryFailure> {
    Err(DeliveryFailure {
        retryable: true,
        reason: "no ack".into(),
    })
}

#[tokio::test]
async fn a_task_is_delivered_at_check_in_and_acked_applied() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    assert!(f.acks().await.is_empty(), "no ack before the tag confirms");
    assert!(
        f.radio(checkin("B", None), NOW + 1).is_empty(),
        "another tag gets nothing"
    );
    let d = f.radio(checkin("A", None), NOW + 2);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].task_id, "t1");
    assert!(
        f.radio(checkin("A", None), NOW + 3).is_empty(),
        "one delivery in flight per tag"
    );
    f.radio(outcome(&d[0], Ok(())), NOW + 4);
    let acks = f.acks().await;
    assert_eq!(acks.len(), 1);
    let (topic, ack) = &acks[0];
    assert_eq!(topic, "esl_ack/p2p/GID_backend@@@be1");
    assert_eq!(ack["status"], "applied");
    assert_eq!(ack["attempts"], 1);
    assert_eq!(ack["agent"], "GID_test@@@dev1");
    assert_eq!(ack["content_hash"], d[0].content_hash);
    assert_eq!(ack["duplicate"], false);
    assert_eq!(f.state.pending_len(), 0);
}

#[tokio::test]
async fn reply_to_steers_the_ack() {
    let mut f = Fixture::new();
    let mut t = task("t1", "A", 1);
    t["reply_to"] = "GID_other@@@x".into();
    t["issued_at"] = 1.into();
    f.task(t, NOW);
    let acks = f.acks().await;
    assert_eq!(acks[0].0, "esl_ack/p2p/GID_other@@@x");
    assert_eq!(acks[0].1["status"], "expired");
}

#[tokio::test]
async fn rejected_tasks_are_acked_with_the_field() {
    let mut f = Fixture::new();
    let mut c = Change::new();
    f.state.on_task(b"{not json", NOW, &mut c).unwrap();
    f.store.apply(c).unwrap();
    let mut t = task("t1", "A", 1);
    t.as_object_mut().unwrap().remove("issued_at");
    f.task(t, NOW);
    let acks = f.acks().await;
    assert_eq!(acks[0].1["status"], "rejected");
    assert_eq!(acks[0].1["task_id"], Value::Null);
    assert_eq!(acks[1].1["task_id"], "t1");
    assert!(acks[1].1["detail"]
        .as_str()
        .unwrap()
        .starts_with("issued_at"));
    // A rejected message never became a task: a corrected resend is new.
    f.task(task("t1", "A", 1), NOW);
    assert_eq!(f.state.pending_len(), 1);
}

#[tokio::test]
async fn duplicates_are_never_applied_twice() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    f.task(task("t1", "A", 1), NOW + 1);
    assert!(
        f.acks().await.is_empty(),
        "duplicate of a pending task: silence"
    );
    let d = f.radio(checkin("A", None), NOW + 2);
    f.radio(outcome(&d[0], Ok(())), NOW + 3);
    let first = f.acks().await;
    f.task(task("t1", "A", 1), NOW + 10);
    let again = f.acks().await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1["duplicate"], true);
    assert_eq!(again[0].1["status"], "applied");
    assert_eq!(again[0].1["at"], first[0].1["at"], "the same ack, again");
    assert!(
        f.radio(checkin("A", None), NOW + 11).is_empty(),
        "nothing to deliver"
    );
}

#[tokio::test]
async fn expired_on_arrival() {
    let mut f = Fixture::new();
    let mut t = task("t1", "A", 1);
    t["ttl_ms"] = 1000.into();
    f.task(t, NOW + 1001);
    assert_eq!(f.statuses().await, vec![("t1".into(), "expired".into())]);
    assert_eq!(f.state.pending_len(), 0);
}

#[tokio::test]
async fn per_tag_order_and_supersede() {
    let mut f = Fixture::new();
    f.task(task("t5", "A", 5), NOW);
    f.task(task("t3", "A", 3), NOW);
    assert_eq!(
        f.statuses().await,
        vec![("t3".into(), "superseded".into())],
        "older seq: at once"
    );
    f.task(task("t7", "A", 7), NOW);
    assert_eq!(
        f.statuses().await,
        vec![("t5".into(), "superseded".into())],
        "newer replaces pending"
    );
    f.task(task("b1", "B", 1), NOW);
    assert!(f.acks().await.is_empty(), "order is per tag");
    let d = f.radio(checkin("A", None), NOW + 1);
    assert_eq!(d[0].task_id, "t7");
}

#[tokio::test]
async fn a_late_outcome_of_a_superseded_task_is_ignored() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    let d1 = f.radio(checkin("A", None), NOW + 1);
    f.task(task("t2", "A", 2), NOW + 2);
    assert_eq!(f.statuses().await, vec![("t1".into(), "superseded".into())]);
    f.radio(outcome(&d1[0], Ok(())), NOW + 3);
    assert!(f.acks().await.is_empty(), "t1 already has its final ack");
    // The tag shows t1's content now, so t2 goes out at the next check-in.
    let d2 = f.radio(checkin("A", Some(&d1[0].content_hash)), NOW + 4);
    assert_eq!(d2[0].task_id, "t2");
}

#[tokio::test]
async fn retries_until_max_attempts_then_failed() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    let d = f.radio(checkin("A", None), NOW + 1);
    f.radio(outcome(&d[0], retryable()), NOW + 2);
    assert!(f.acks().await.is_empty(), "one failure of two allowed");
    let d = f.radio(checkin("A", None), NOW + 3);
    assert_eq!(d.len(), 1, "retried at the next check-in");
    f.radio(outcome(&d[0], retryable()), NOW + 4);
    let acks = f.acks().await;
    assert_eq!(acks[0].1["status"], "failed");
    assert_eq!(acks[0].1["attempts"], 2);
    assert!(acks[0].1["detail"].as_str().unwrap().contains("no ack"));
}

#[tokio::test]
async fn a_non_retryable_failure_fails_at_once() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    let d = f.radio(checkin("A", None), NOW + 1);
    let failure = Err(DeliveryFailure {
        retryable: false,
        reason: "rejected by tag".into(),
    });
    f.radio(outcome(&d[0], failure), NOW + 2);
    assert_eq!(f.statuses().await, vec![("t1".into(), "failed".into())]);
}

#[tokio::test]
async fn a_delivery_without_outcome_times_out_and_is_retried() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    f.radio(checkin("A", None), NOW + 1);
    f.sweep(NOW + 1 + 4_999);
    assert!(
        f.radio(checkin("A", None), NOW + 5_000).is_empty(),
        "still in flight"
    );
    f.sweep(NOW + 1 + 5_000);
    assert!(f.acks().await.is_empty(), "attempt 1 of 2 failed");
    let d = f.radio(checkin("A", None), NOW + 6_000);
    assert_eq!(d.len(), 1);
    f.sweep(NOW + 12_000);
    assert_eq!(f.statuses().await, vec![("t1".into(), "failed".into())]);
}

#[tokio::test]
async fn a_tag_that_never_checks_in_expires_its_task() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    f.sweep(NOW + 60_000);
    assert!(
        f.acks().await.is_empty(),
        "expires strictly after issued_at + ttl"
    );
    f.sweep(NOW + 60_001);
    let acks = f.acks().await;
    assert_eq!(acks[0].1["status"], "expired");
    assert!(acks[0].1["detail"]
        .as_str()
        .unwrap()
        .contains("never checked in"));
}

#[tokio::test]
async fn a_mass_expiry_is_spread_over_passes_oldest_first() {
    let mut f = Fixture::new();
    let n = EXPIRE_LIMIT + 5;
    for i in 0..n {
        let mut t = task(&format!("t{i:05}"), &format!("tag{i:05}"), 1);
        // Later tasks expire earlier: the sweep must follow expiry, not ids.
        t["ttl_ms"] = json!(60_000 - i as u64);
        f.task(t, NOW);
    }
    assert_eq!(f.state.pending_len(), n);
    f.sweep(NOW + 60_001);
    let first = f.statuses().await;
    assert_eq!(
        first.len(),
        EXPIRE_LIMIT,
        "one pass expires at most the limit"
    );
    assert!(first.iter().all(|(_, s)| s == "expired"));
    assert_eq!(
        first[0].0,
        format!("t{:05}", n - 1),
        "earliest expiry first"
    );
    assert_eq!(f.state.pending_len(), 5);
    f.sweep(NOW + 60_002);
    assert_eq!(f.statuses().await.len(), 5, "the rest at the next pass");
    assert_eq!(f.state.pending_len(), 0);
    assert!(f.store.expiring_before(u64::MAX, 10).unwrap().is_empty());
}

#[tokio::test]
async fn tags_named_only_by_pending_tasks_are_listed_but_not_in_status() {
    let mut f = Fixture::new();
    f.state.add_known_tags(vec!["B".into(), "D".into()]);
    for (i, tag) in ["A", "C", "D"].iter().enumerate() {
        f.task(task(&format!("t{i}"), tag, 1), NOW);
    }
    let ids = |v: Vec<TagView>| v.into_iter().map(|t| t.tag_id).collect::<Vec<_>>();
    assert_eq!(ids(f.state.known_tag_views(NOW)), ["B", "D"]);
    assert_eq!(
        ids(f.state.tag_views_after(None, 3, NOW).unwrap()),
        ["A", "B", "C"]
    );
    assert_eq!(
        ids(f.state.tag_views_after(Some("C"), 3, NOW).unwrap()),
        ["D"]
    );
    let d = f.state.tag_view("D", NOW);
    assert_eq!(d.pending_task.as_deref(), Some("t2"));
}

/// A radio that knows tag "small" can show content of at most 10 bytes.
#[derive(Debug)]
struct SmallDisplay;
impl esl_hal::ContentCheck for SmallDisplay {
    fn check(&self, tag_id: &str, content: &[u8]) -> Result<(), String> {
        if tag_id == "small" && content.len() > 10 {
            return Err(format!(
                "content: {} bytes, the tag shows 10",
                content.len()
            ));
        }
        Ok(())
    }
}

#[tokio::test]
async fn content_the_radio_says_the_tag_cannot_show_is_rejected_naming_why() {
    let mut f = Fixture::new();
    f.state.set_content_check(Some(Arc::new(SmallDisplay)));
    f.task(task("t1", "small", 1), NOW);
    f.task(task("t2", "other", 1), NOW);
    let acks: Vec<Value> = f.acks().await.into_iter().map(|(_, a)| a).collect();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["status"], "rejected");
    assert_eq!(acks[0]["task_id"], "t1");
    assert_eq!(acks[0]["tag_id"], "small");
    assert!(
        acks[0]["detail"]
            .as_str()
            .unwrap()
            .contains("the tag shows 10"),
        "{acks:?}"
    );
    assert_eq!(f.state.pending_len(), 1, "the other tag's task is pending");
}

#[tokio::test]
async fn a_tag_the_radio_names_anew_is_listed_once_unless_it_checked_in_under_the_old_id() {
    let mut f = Fixture::new();
    let tag = |id: &str, replaces: Option<&str>| {
        RadioEvent::Tag(esl_hal::TagDetails {
            tag_id: id.into(),
            info: serde_json::Map::new(),
            replaces: replaces.map(str::to_owned),
        })
    };
    let listed = |f: &Fixture| -> Vec<String> {
        f.state
            .tag_views_after(None, 10, NOW)
            .unwrap()
            .into_iter()
            .map(|t| t.tag_id)
            .collect()
    };
    // Joined: listed by its IEEE id; its check-in names SHELF-7.
    f.radio(tag("00124b0001020304", None), NOW);
    f.radio(checkin("SHELF-7", None), NOW + 1);
    f.radio(tag("SHELF-7", Some("00124b0001020304")), NOW + 1);
    assert_eq!(listed(&f), ["SHELF-7"], "one entry for one tag");
    // A tag that did check in under the old id keeps that entry.
    f.radio(checkin("OLD-1", None), NOW + 2);
    f.radio(tag("NEW-1", Some("OLD-1")), NOW + 2);
    assert_eq!(listed(&f), ["NEW-1", "OLD-1", "SHELF-7"]);
}

#[tokio::test]
async fn a_tag_the_radio_describes_is_listed_with_its_details_before_it_checks_in() {
    let mut f = Fixture::new();
    let info = json!({"ieee": "00:12:4b:00:01:02:03:04"});
    let details = esl_hal::TagDetails {
        tag_id: "Z1".into(),
        info: info.as_object().unwrap().clone(),
        replaces: None,
    };
    assert!(f.radio(RadioEvent::Tag(details), NOW).is_empty());
    let listed = f.state.tag_views_after(None, 10, NOW).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tag_id, "Z1");
    assert_eq!(listed[0].last_seen, None, "not seen yet");
    let shown = serde_json::to_value(&listed[0]).unwrap();
    assert_eq!(shown["radio"], info, "tags.list shows the details");
    let status = f.state.known_tag_views(NOW);
    assert_eq!(status[0].tag_id, "Z1");
    assert!(
        serde_json::to_value(&status[0])
            .unwrap()
            .get("radio")
            .is_none(),
        "status reports stay small"
    );
}

#[tokio::test]
async fn check_in_reports_are_written_when_they_change_or_once_a_minute() {
    let mut f = Fixture::new();
    let saved = |f: &Fixture| {
        f.store
            .tags()
            .unwrap()
            .into_iter()
            .find(|(id, _)| id == "A")
            .and_then(|(_, t)| t.last_seen)
    };
    f.radio(checkin("A", None), NOW);
    assert_eq!(saved(&f), Some(NOW), "the first check-in is written");
    f.radio(checkin("A", None), NOW + 1_000);
    assert_eq!(saved(&f), Some(NOW), "an unchanged report waits");
    assert_eq!(
        f.state.tag_view("A", NOW + 1_000).last_seen,
        Some(NOW + 1_000),
        "status shows the live value"
    );
    f.radio(checkin("A", Some("beef")), NOW + 2_000);
    assert_eq!(
        saved(&f),
        Some(NOW + 2_000),
        "new content is written at once"
    );
    f.radio(
        checkin("A", Some("beef")),
        NOW + 2_000 + TAG_SAVE_INTERVAL_MS,
    );
    assert_eq!(saved(&f), Some(NOW + 2_000 + TAG_SAVE_INTERVAL_MS));
}

#[tokio::test]
async fn a_tag_already_showing_the_content_is_not_updated_again() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    let hash = wire::content_hash(br#"{"price":"1.00"}"#);
    assert!(f.radio(checkin("A", Some(&hash)), NOW + 1).is_empty());
    let acks = f.acks().await;
    assert_eq!(acks[0].1["status"], "applied");
    assert_eq!(acks[0].1["attempts"], 0);
}

#[tokio::test]
async fn pending_tasks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let mut state = State::load(settings(), identity(), store.clone(), Arc::default()).unwrap();
        for (id, tag) in [("t1", "A"), ("t2", "B")] {
            let mut c = Change::new();
            state
                .on_task(task(id, tag, 1).to_string().as_bytes(), NOW, &mut c)
                .unwrap();
            store.apply(c).unwrap();
        }
        store.flush().await.unwrap();
    }
    let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
    let mut state = State::load(settings(), identity(), store.clone(), Arc::default()).unwrap();
    assert_eq!(state.pending_len(), 2);
    let mut c = Change::new();
    let mut d = Vec::new();
    state
        .on_radio(checkin("B", None), NOW + 1, &mut c, &mut d)
        .unwrap();
    assert_eq!(d[0].task_id, "t2");
    assert_eq!(d[0].content, br#"{"price":"1.00"}"#);
}

#[tokio::test]
async fn cancel_fails_a_pending_task_only() {
    let mut f = Fixture::new();
    f.task(task("t1", "A", 1), NOW);
    let mut c = Change::new();
    assert!(f.state.cancel("t1", NOW + 1, &mut c).unwrap());
    f.store.apply(c).unwrap();
    let acks = f.acks().await;
    assert_eq!(acks[0].1["status"], "failed");
    assert_eq!(acks[0].1["detail"], "cancelled");
    let mut c = Change::new();
    assert!(!f.state.cancel("t1", NOW + 2, &mut c).unwrap());
    assert!(!f.state.cancel("nope", NOW + 2, &mut c).unwrap());
}

const SIGNING_KEY: &str = "engine-test-key-0123456789abcdef-0123";

/// `f` requires signed tasks, with key `k1` read from a private file.
fn require_signatures(f: &mut Fixture) {
    use std::os::unix::fs::PermissionsExt;
    let path = f._dir.path().join("k1.key");
    std::fs::write(&path, SIGNING_KEY).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let security = crate::config::SecurityConfig {
        require_signed_tasks: true,
        signing_keys: vec![crate::config::SigningKeyConfig {
            id: "k1".into(),
            secret_file: Some(path),
            secret_env: None,
        }],
        ..Default::default()
    };
    let v = Verifier::from_config(&security, "GID_test@@@dev1").unwrap();
    f.state.set_verifier(v);
}

fn sign(mut t: Value, key: &str) -> Value {
    let m = t.as_object_mut().unwrap();
    crate::security::signing::add_signature(m, key, Purpose::Task, "GID_test@@@dev1", "k1");
    t
}

#[tokio::test]
async fn signed_tasks_pass_and_bad_signatures_are_rejected_to_ack_to() {
    let mut f = Fixture::new();
    require_signatures(&mut f);
    let mut good = task("t1", "A", 1);
    good["reply_to"] = "GID_other@@@x".into();
    f.task(sign(good.clone(), SIGNING_KEY), NOW);
    assert_eq!(
        f.state.pending_len(),
        1,
        "a correctly signed task is pending"
    );
    assert!(f.acks().await.is_empty());

    // Forged (wrong key), changed after signing, and unsigned copies of
    // the pending task: each rejected, none touches t1.
    let forged = sign(task("t1", "A", 2), "attacker-key-0123456789abcdef-012345");
    let mut changed = sign(task("t1", "A", 2), SIGNING_KEY);
    changed["content"]["price"] = "0.01".into();
    let unsigned = task("t1", "A", 3);
    for t in [forged, changed, unsigned] {
        f.task(t, NOW + 1);
    }
    let acks = f.acks().await;
    assert_eq!(acks.len(), 3, "{acks:?}");
    for (topic, ack) in &acks {
        assert_eq!(
            topic, "esl_ack/p2p/GID_backend@@@be1",
            "to ack_to, never to an unverified reply_to"
        );
        assert_eq!(ack["status"], "rejected");
        assert_eq!(ack["detail"], "bad signature");
        assert_eq!(
            ack["task_id"],
            Value::Null,
            "a forgery never names a real task"
        );
        assert_eq!(ack["unverified_task_id"], "t1");
    }
    assert_eq!(Counters::get(&f.state.counters.tasks_bad_signature), 3);
    let d = f.radio(checkin("A", None), NOW + 2);
    assert_eq!(
        d[0].content, br#"{"price":"1.00"}"#,
        "the signed content is delivered"
    );
    f.radio(outcome(&d[0], Ok(())), NOW + 3);
    let acks = f.acks().await;
    assert_eq!(
        acks[0].0, "esl_ack/p2p/GID_other@@@x",
        "a signed reply_to is honoured"
    );
    assert_eq!(acks[0].1["status"], "applied");
}

#[tokio::test]
async fn a_signed_task_may_not_outlive_the_duplicate_memory() {
    let mut f = Fixture::new();
    require_signatures(&mut f);
    // keep_final_ms is one hour in these settings.
    let mut long = task("t1", "A", 1);
    long["ttl_ms"] = (2 * 3_600_000u64).into();
    f.task(sign(long, SIGNING_KEY), NOW);
    let acks = f.acks().await;
    assert_eq!(acks[0].1["status"], "rejected");
    assert_eq!(acks[0].1["task_id"], "t1");
    assert!(acks[0].1["detail"].as_str().unwrap().starts_with("ttl_ms:"));
    let mut ok = task("t2", "A", 2);
    ok["ttl_ms"] = 3_000_000u64.into();
    f.task(sign(ok, SIGNING_KEY), NOW);
    assert_eq!(f.state.pending_len(), 1);
}

#[tokio::test]
async fn accepted_progress_acks_when_enabled() {
    let mut f = Fixture::new();
    f.state.settings.send_accepted = true;
    f.task(task("t1", "A", 1), NOW);
    assert_eq!(f.statuses().await, vec![("t1".into(), "accepted".into())]);
}

/// Regression (issue 3): the store fails every operation after one
/// failed write (sled did; the SQLite store does so on purpose, since
/// SQLite may roll the transaction back), so the engine used to retry the flush forever and never
/// recovered once the disk had room again. Now it holds PUBACKs, reports
/// the fault, reopens the store and resumes. The pipeline's rules have
/// unit tests of their own (`pipeline::tests`); this one drives them
/// through `Engine::run` and a real store, in paused time (the store's
/// blocking threads hold the clock while they run).
#[tokio::test(start_paused = true)]
async fn a_store_fault_holds_pubacks_reports_and_recovers_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
    let counters = Arc::new(Counters::default());
    let state = State::load(settings(), identity(), store.clone(), counters.clone()).unwrap();
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (_radio_tx, radio_rx) = mpsc::channel(RADIO_EVENT_CAPACITY);
    let (query_tx, query_rx) = mpsc::channel(QUERY_CAPACITY);
    let (delivery_tx, _delivery_rx) = mpsc::channel(16);
    let (puback_tx, mut puback_rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let engine = Engine::new(
        state,
        store.clone(),
        counters.clone(),
        EngineChannels {
            inbound_rx,
            radio_rx,
            query_rx,
            delivery_tx,
            puback_tx,
            outbox_wake: Arc::new(Notify::new()),
        },
        shutdown.clone(),
    );
    let running = tokio::spawn(engine.run());
    let send = |id: &str, pkid: u16| Inbound {
        kind: InboundKind::Task,
        payload: {
            let mut t = task(id, id, 1);
            t["issued_at"] = now_ms().into();
            t.to_string().into_bytes().into()
        },
        token: AckToken { epoch: 1, pkid },
        oversized: None,
    };
    let fault_of = |query_tx: mpsc::Sender<Query>| async move {
        let (tx, rx) = oneshot::channel();
        query_tx.send(Query::Snapshot(tx)).await.unwrap();
        rx.await.unwrap().store_fault
    };
    let within = Duration::from_secs(10);

    inbound_tx.send(send("t1", 1)).await.unwrap();
    let token = tokio::time::timeout(within, puback_rx.recv())
        .await
        .unwrap();
    assert_eq!(token.map(|t| t.pkid), Some(1));

    // The disk fills: the write fails, and so do the next two reopens.
    store.inject_fault(2);
    inbound_tx.send(send("t2", 2)).await.unwrap();
    // The engine takes messages before it answers queries, so the
    // answer comes after t2's write has failed.
    let fault = fault_of(query_tx.clone())
        .await
        .expect("the fault is reported");
    let faulted_at = Instant::now();
    assert!(fault.contains("disk is full"), "{fault}");
    assert!(
        puback_rx.try_recv().is_err(),
        "no PUBACK for a message that is not on disk"
    );

    // Space returns (the third reopen works): t2 is stored, then PUBACKed.
    let token = tokio::time::timeout(within, puback_rx.recv())
        .await
        .unwrap();
    assert_eq!(token.map(|t| t.pkid), Some(2));
    assert!(
        faulted_at.elapsed() >= 2 * pipeline::REOPEN_INTERVAL,
        "two failed reopens, a reopen interval apart: {:?}",
        faulted_at.elapsed()
    );
    assert_eq!(fault_of(query_tx.clone()).await, None, "fault cleared");
    assert_eq!(store.task("t2").unwrap().unwrap().state, TaskState::Pending);
    assert!(Counters::get(&counters.store_errors) >= 3);

    // Intake goes on after the recovery.
    inbound_tx.send(send("t3", 3)).await.unwrap();
    let token = tokio::time::timeout(within, puback_rx.recv())
        .await
        .unwrap();
    assert_eq!(token.map(|t| t.pkid), Some(3));
    shutdown.cancel();
    running.await.unwrap().unwrap();
}
