//! Status reports (PROTOCOL §6) as the back end receives them on
//! `esl_status/GID_test@@@dev1`: the hello at connect and the periodic report.

use std::time::Duration;

use crate::harness::{sim_tag, Stack, TAGS};

/// Keys every per-tag record carries (PROTOCOL §6); values may be null
/// before a tag has checked in.
const TAG_RECORD_KEYS: [&str; 6] = [
    "tag_id",
    "battery_mv",
    "rssi",
    "content_hash",
    "last_seen",
    "online",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_status_after_connect_lists_every_tag() {
    // The back end subscribes to esl_status/# before the agent starts.
    let mut stack = Stack::start("hello", |_| {}).await;
    let tags: Vec<String> = (0..TAGS).map(sim_tag).collect();
    let records = stack
        .backend
        .expect_hello_tags(&tags, Duration::from_secs(10))
        .await;
    assert_eq!(
        records.keys().cloned().collect::<Vec<_>>(),
        tags,
        "the hello lists exactly the simulated tags"
    );
    for (id, record) in &records {
        for key in TAG_RECORD_KEYS {
            assert!(
                record.get(key).is_some(),
                "tag record of {id} lacks `{key}`: {record}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_status_follows_the_interval() {
    const INTERVAL_S: u64 = 2;
    let mut stack = Stack::start("periodic", |c| c.status_interval_s = INTERVAL_S).await;
    let report = stack
        .backend
        .expect_status("periodic", Duration::from_secs(3 * INTERVAL_S + 2))
        .await;
    let listed = report["tags"].as_array().map_or(0, Vec::len);
    assert!(
        listed > 0,
        "a periodic report carries tag records: {report}"
    );
}
