//! Nothing is lost when processes go away (PROTOCOL §4.1, §5, §9): the
//! agent restarted with pending tasks, the broker restarted while acks wait
//! in the outbox, and SIGTERM in the middle of a burst of tasks.
//!
//! Each scenario runs on both radios (`NAME::sim`, `NAME::zigbee`); with
//! ZigBee the fake coordinator outlives the agent's restarts, as a stick
//! plugged into the AP does.
//!
//! Acks may legitimately arrive more than once here (at-least-once delivery
//! across reconnects), so these tests check that every copy agrees, not
//! that there is exactly one.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    assert_journal_matches, assert_latest_per_tag_applied, eventually, publish_task_with, sim_tag,
    task, task_ids, AckLog, AckStatus, BrokerOptions, Stack, StackOptions, TestRadio, QUIET, TAGS,
};
use crate::on_every_radio;

/// One task per simulated tag.
fn one_task_per_tag(prefix: &str, seq: u64) -> Vec<Value> {
    (0..TAGS)
        .map(|i| task(&format!("{prefix}-{i}"), &sim_tag(i), seq))
        .collect()
}

async fn restart_with_pending_tasks_applies_them(radio: TestRadio) {
    // Ten minutes between check-ins: nothing is delivered in the first run.
    let mut stack = Stack::start_on(radio, "restart-pending", |c| {
        c.checkin_interval_ms = 600_000
    })
    .await;
    let tasks = one_task_per_tag("t-rp", 1);
    stack.backend.publish_tasks(&tasks).await;
    // PUBACKed means stored (durable first): now a restart must keep them.
    stack
        .broker
        .wait_pubacks_from_agent(tasks.len(), Duration::from_secs(10))
        .await;
    // Whatever finished anyway (it should be nothing) counts too.
    let mut acks = AckLog::default();
    acks.extend(stack.backend.acks_within(Duration::ZERO).await);
    stack.agent.terminate().await;

    // Same store, fast check-ins. The agent's session is clean, so the
    // broker does not redeliver: the tasks can only come from the store.
    stack.start_next_agent(|c| c.checkin_interval_ms = 100);
    if let Some(fake) = &stack.zigbee {
        // The stick and its tags outlive the agent: speed them up directly.
        fake.set_checkin_interval(100).await;
    }
    let ids = task_ids(&tasks);
    let missing = acks.without_final(&ids);
    acks.extend(
        stack
            .backend
            .collect_final_acks(&missing, Duration::from_secs(20))
            .await,
    );
    acks.assert_all(&ids, AckStatus::Applied);
    assert_journal_matches(&tasks, &acks, &stack.env.journal());
}

async fn broker_restart_outbox_drains_and_nothing_is_lost(radio: TestRadio) {
    // A persisted broker and a persistent back-end session, so acks
    // published while the back end is away wait for it in the broker.
    let options = StackOptions {
        broker: BrokerOptions { persistence: true },
        backend_clean_session: false,
    };
    let name = format!("broker-restart-{radio:?}").to_lowercase();
    let mut stack = Stack::start_with(&name, options, |c| {
        c.radio = radio;
        c.checkin_interval_ms = 1000;
    })
    .await;
    let first = one_task_per_tag("t-br-a", 1);
    stack.backend.publish_tasks(&first).await;
    stack
        .broker
        .wait_pubacks_from_agent(first.len(), Duration::from_secs(10))
        .await;
    stack.broker.stop().await;

    // The radio keeps working without the broker; the acks must wait in the
    // outbox. Restart only once every tag displays its task.
    let first_ids = task_ids(&first);
    eventually(
        "all tasks displayed while the broker is down",
        Duration::from_secs(15),
        || {
            let journal = stack.env.journal();
            first_ids
                .iter()
                .all(|id| journal.contains(id))
                .then_some(())
        },
    )
    .await;
    stack.agent.assert_running();
    let backend_subscribed = stack.backend.subscriptions_confirmed();
    let since = stack.broker.log_len();
    stack.broker.restart().await;

    let mut acks = stack
        .backend
        .collect_final_acks(&first_ids, Duration::from_secs(30))
        .await;
    acks.assert_all(&first_ids, AckStatus::Applied);

    // The agent subscribed again after reconnecting: new tasks still arrive.
    stack
        .agent
        .wait_subscribed(&stack.broker, since, Duration::from_secs(15))
        .await;
    stack
        .backend
        .wait_subscribed(backend_subscribed + 1, Duration::from_secs(15))
        .await;
    let second = one_task_per_tag("t-br-b", 2);
    stack.backend.publish_tasks(&second).await;
    acks.extend(
        stack
            .backend
            .collect_final_acks(&task_ids(&second), Duration::from_secs(20))
            .await,
    );
    let all: Vec<Value> = first.iter().chain(&second).cloned().collect();
    acks.assert_all(&task_ids(&all), AckStatus::Applied);
    assert_latest_per_tag_applied(&all, &acks);
    assert_journal_matches(&all, &acks, &stack.env.journal());
}

async fn sigterm_mid_burst_loses_nothing_and_applies_nothing_twice(radio: TestRadio) {
    const BURST: usize = 300;
    /// Tasks per publishing step; the pause between steps keeps the burst
    /// flowing long enough to be interrupted.
    const STEP: usize = 20;
    const SIGTERM_AFTER_PUBACKS: usize = 60;

    // A persistent agent session: what the agent did not PUBACK before it
    // stopped, and what arrived while it was down, the broker delivers later.
    let mut stack = Stack::start_on(radio, "sigterm-burst", |c| c.clean_session = false).await;
    let tasks: Vec<Value> = (0..BURST)
        .map(|i| {
            task(
                &format!("t-burst-{i:03}"),
                &sim_tag(i % TAGS),
                10_000 + i as u64,
            )
        })
        .collect();
    let publisher = {
        let client = stack.backend.client();
        let tasks = tasks.clone();
        tokio::spawn(async move {
            for step in tasks.chunks(STEP) {
                for t in step {
                    publish_task_with(&client, t).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    stack
        .broker
        .wait_pubacks_from_agent(SIGTERM_AFTER_PUBACKS, Duration::from_secs(15))
        .await;
    stack.agent.terminate().await;
    if stack.broker.pubacks_from_agent() >= BURST {
        eprintln!("note: the agent stored the whole burst before SIGTERM took effect");
    }
    publisher.await.expect("the publishing task finished");

    stack.start_next_agent(|_| {});
    let mut acks = stack
        .backend
        .collect_final_acks(&task_ids(&tasks), Duration::from_secs(45))
        .await;
    acks.extend(stack.backend.acks_within(QUIET).await);
    // `final_ack` also checks that repeated acks of one task agree.
    assert_latest_per_tag_applied(&tasks, &acks);
    assert_journal_matches(&tasks, &acks, &stack.env.journal());
}

on_every_radio!(
    restart_with_pending_tasks_applies_them,
    broker_restart_outbox_drains_and_nothing_is_lost,
    sigterm_mid_burst_loses_nothing_and_applies_nothing_twice,
);
