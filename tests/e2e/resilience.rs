//! Nothing is lost when processes go away (PROTOCOL §4.1, §5, §9): the
//! agent restarted with pending tasks, the broker restarted while acks wait
//! in the outbox, and SIGTERM in the middle of a burst of tasks.
//!
//! Acks may legitimately arrive more than once here (at-least-once delivery
//! across reconnects), so these tests check that every copy agrees, not
//! that there is exactly one.

use std::time::Duration;

use crate::harness::{
    assert_journal_matches, assert_latest_per_tag_applied, eventually, publish_task_with, sim_tag,
    task, task_ids, AckLog, AckStatus, Agent, AgentConfig, Backend, Broker, BrokerOptions, TestEnv,
    BACKEND_ID, QUIET, TAGS,
};

/// One task per simulated tag.
fn one_task_per_tag(prefix: &str, seq: u64) -> Vec<serde_json::Value> {
    (0..TAGS)
        .map(|i| task(&format!("{prefix}-{i}"), &sim_tag(i), seq))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_pending_tasks_applies_them() {
    let env = TestEnv::new("restart-pending");
    let broker = Broker::start(&env, BrokerOptions::default()).await;
    let mut backend = Backend::connect(&broker, BACKEND_ID, true).await;
    let mut config = AgentConfig::new(&env, &broker);
    // Ten minutes between check-ins: nothing is delivered in the first run.
    config.checkin_interval_ms = 600_000;
    let mut agent = Agent::start_ready(&env, &broker, &config).await;

    let tasks = one_task_per_tag("t-rp", 1);
    for t in &tasks {
        backend.publish_task(t).await;
    }
    // PUBACKed means stored (durable first): now a restart must keep them.
    broker
        .wait_pubacks_from_agent(tasks.len(), Duration::from_secs(10))
        .await;
    // Whatever finished anyway (it should be nothing) counts too.
    let mut acks = AckLog::default();
    acks.extend(backend.acks_within(Duration::ZERO).await);
    agent.terminate().await;

    // Same store, fast check-ins. The agent's session is clean, so the
    // broker does not redeliver: the tasks can only come from the store.
    config.checkin_interval_ms = 100;
    config.journal = env.journal_path(2);
    let _agent = Agent::start(&env, &config);
    let ids = task_ids(&tasks);
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !acks.has_final(id))
        .cloned()
        .collect();
    acks.extend(
        backend
            .collect_final_acks(&missing, Duration::from_secs(20))
            .await,
    );
    for id in &ids {
        assert_eq!(
            acks.status(id),
            AckStatus::Applied,
            "{}",
            acks.final_ack(id).json
        );
    }
    assert_journal_matches(&tasks, &acks, &env.journal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_outbox_drains_and_nothing_is_lost() {
    let env = TestEnv::new("broker-restart");
    let mut broker = Broker::start(&env, BrokerOptions { persistence: true }).await;
    // A persistent session, so acks published while the back end is
    // disconnected wait for it in the (persisted) broker.
    let mut backend = Backend::connect(&broker, BACKEND_ID, false).await;
    let mut config = AgentConfig::new(&env, &broker);
    config.checkin_interval_ms = 1000;
    let mut agent = Agent::start_ready(&env, &broker, &config).await;

    let first = one_task_per_tag("t-br-a", 1);
    for t in &first {
        backend.publish_task(t).await;
    }
    broker
        .wait_pubacks_from_agent(first.len(), Duration::from_secs(10))
        .await;
    broker.stop().await;

    // The radio keeps working without the broker; the acks must wait in the
    // outbox. Restart only once every tag displays its task.
    let first_ids = task_ids(&first);
    eventually(
        "all tasks displayed while the broker is down",
        Duration::from_secs(15),
        || {
            let journal = env.journal();
            first_ids
                .iter()
                .all(|id| journal.contains(id))
                .then_some(())
        },
    )
    .await;
    agent.assert_running();
    let subscribed_before = backend.subscriptions_confirmed();
    let since = broker.log_len();
    broker.restart().await;

    let mut acks = backend
        .collect_final_acks(&first_ids, Duration::from_secs(30))
        .await;
    for id in &first_ids {
        assert_eq!(
            acks.status(id),
            AckStatus::Applied,
            "{}",
            acks.final_ack(id).json
        );
    }

    // The agent subscribed again after reconnecting: new tasks still arrive.
    agent
        .wait_subscribed(&broker, since, Duration::from_secs(15))
        .await;
    backend
        .wait_subscribed(subscribed_before + 1, Duration::from_secs(15))
        .await;
    let second = one_task_per_tag("t-br-b", 2);
    for t in &second {
        backend.publish_task(t).await;
    }
    acks.extend(
        backend
            .collect_final_acks(&task_ids(&second), Duration::from_secs(20))
            .await,
    );
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    assert_latest_per_tag_applied(&all, &acks);
    for id in task_ids(&all) {
        assert_eq!(
            acks.status(&id),
            AckStatus::Applied,
            "{}",
            acks.final_ack(&id).json
        );
    }
    assert_journal_matches(&all, &acks, &env.journal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_burst_loses_nothing_and_applies_nothing_twice() {
    const BURST: usize = 300;
    /// Tasks per publishing step; the pause between steps keeps the burst
    /// flowing long enough to be interrupted.
    const STEP: usize = 20;
    const SIGTERM_AFTER_PUBACKS: usize = 60;

    let env = TestEnv::new("sigterm-burst");
    let broker = Broker::start(&env, BrokerOptions::default()).await;
    let mut backend = Backend::connect(&broker, BACKEND_ID, true).await;
    let mut config = AgentConfig::new(&env, &broker);
    // A persistent agent session: what the agent did not PUBACK before it
    // stopped, and what arrived while it was down, the broker delivers later.
    config.clean_session = false;
    let mut agent = Agent::start_ready(&env, &broker, &config).await;

    let tasks: Vec<serde_json::Value> = (0..BURST)
        .map(|i| {
            task(
                &format!("t-burst-{i:03}"),
                &sim_tag(i % TAGS),
                10_000 + i as u64,
            )
        })
        .collect();
    let publisher = {
        let client = backend.client();
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
    broker
        .wait_pubacks_from_agent(SIGTERM_AFTER_PUBACKS, Duration::from_secs(15))
        .await;
    agent.terminate().await;
    let stored_before_sigterm = broker.pubacks_from_agent();
    publisher.await.expect("the publishing task finished");
    if stored_before_sigterm >= BURST {
        eprintln!("note: the agent stored the whole burst before SIGTERM took effect");
    }

    config.journal = env.journal_path(2);
    let _agent = Agent::start(&env, &config);
    let ids = task_ids(&tasks);
    let mut acks = backend
        .collect_final_acks(&ids, Duration::from_secs(45))
        .await;
    acks.extend(backend.acks_within(QUIET).await);
    // `final_ack` also checks that repeated acks of one task agree.
    assert_latest_per_tag_applied(&tasks, &acks);
    assert_journal_matches(&tasks, &acks, &env.journal());
}
