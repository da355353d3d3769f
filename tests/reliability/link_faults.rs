//! Link faults (issue 3): a load run whose agent reaches the broker only
//! through the [`FaultProxy`], which drops the connection, cuts packets in
//! half both ways, delays traffic, and stalls it without closing (only the
//! keepalive can tell); then the broker itself restarts under the running
//! agent. The agent must reconnect with backoff, subscribe again and drain
//! its outbox, and no task or ack may be lost.
//!
//! Strict mode: the agent's session is persistent (`clean_session = false`),
//! the broker persists sessions across its restart, and the back end never
//! publishes a task twice. So every task that reaches its end got there
//! through the broker's redelivery and the agent's store alone; a task or an
//! ack dropped anywhere on the way would leave the run unfinished.

use std::time::Duration;

use tokio::time::Instant;

use crate::harness::{
    Agent, AgentConfig, Backend, Broker, BrokerOptions, TestEnv, BACKEND_ID, TAGS,
};
use crate::load::{summarize, Load, LoadSpec};
use crate::proxy::{Direction, FaultProxy};

/// The agent's keepalive: the shortest the config allows, so a stall is
/// found quickly.
const KEEPALIVE_S: u64 = 5;
/// Longest wait for the agent to be back after a fault ends.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);

/// Waits until the agent says hello after `since` (it reconnected and
/// subscribed again) and returns how long that took.
async fn reconnected(load: &Load, since: Instant, what: &str) -> Duration {
    load.wait_for(what, RECOVERY_DEADLINE, |l| l.hello_since(since).is_some())
        .await;
    load.hello_since(since).expect("waited for it") - since
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_faults_and_broker_restart_lose_nothing() {
    let env = TestEnv::new("link-faults");
    let mut broker = Broker::start(&env, BrokerOptions { persistence: true }).await;
    let backend = Backend::connect(&broker, BACKEND_ID, false).await;
    let proxy = FaultProxy::start(broker.port()).await;
    let mut config = AgentConfig::new(&env, &broker);
    config.port = proxy.port();
    config.clean_session = false;
    config.keepalive_s = KEEPALIVE_S;
    let mut agent = Agent::start_ready(&env, &broker, &config).await;
    let load = Load::start(
        backend,
        LoadSpec {
            prefix: "t-link",
            tasks_per_s: 20,
            tags: TAGS,
            retry_after: None,
            no_retry: None,
        },
    );
    let settle = || tokio::time::sleep(Duration::from_secs(1));
    settle().await;

    let mut after_drop = Vec::new();
    for i in 0..3 {
        let at = Instant::now();
        proxy.drop_all();
        after_drop.push(reconnected(&load, at, &format!("reconnect after drop {i}")).await);
        settle().await;
    }

    let mut after_cut = Vec::new();
    for direction in [Direction::Downstream, Direction::Upstream] {
        for i in 0..3 {
            let cuts = proxy.cuts_done();
            let at = Instant::now();
            proxy.cut_next(direction);
            let what = format!("a {direction:?} packet to be cut ({i})");
            load.wait_for(&what, RECOVERY_DEADLINE, |_| proxy.cuts_done() > cuts)
                .await;
            let what = format!("reconnect after {direction:?} cut {i}");
            after_cut.push(reconnected(&load, at, &what).await);
            settle().await;
        }
    }

    // Slow link: every chunk waits 300 ms each way. Acks must still flow.
    let slow_from = Instant::now();
    proxy.set_delay(Duration::from_millis(300));
    load.wait_for("a final ack over the slow link", RECOVERY_DEADLINE, |l| {
        l.final_ack_since(slow_from).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set_delay(Duration::ZERO);

    // Half-open: nothing moves, nothing closes. The agent's keepalive must
    // notice and open a new connection (which stalls too, until the end).
    let accepted = proxy.accepted();
    let stall_from = Instant::now();
    proxy.stall(true);
    load.wait_for(
        "the agent to give up the stalled connection (keepalive)",
        Duration::from_secs(KEEPALIVE_S * 4),
        |_| proxy.accepted() > accepted,
    )
    .await;
    let stall_detected = stall_from.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stall_end = Instant::now();
    proxy.stall(false);
    let after_stall = reconnected(&load, stall_end, "reconnect after the stall").await;
    settle().await;

    // The broker restarts under the running agent. The back end pauses
    // meanwhile (its own client is not under test here).
    load.set_publishing(false);
    broker.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart_at = Instant::now();
    broker.restart().await;
    let after_restart = reconnected(&load, restart_at, "reconnect after the broker restart").await;
    load.set_publishing(true);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let report = load.finish(Duration::from_secs(60)).await;
    agent.assert_running();
    report.assert_invariants(&env);
    let figures = report.figures();
    crate::load::emit(&format!(
        "[link-faults] {figures}\n\
         [link-faults] connections accepted by the proxy: {} ; run time {:?}\n\
         [link-faults] drop -> hello: {}\n\
         [link-faults] cut -> hello: {}\n\
         [link-faults] stall detected (keepalive {KEEPALIVE_S} s) after {stall_detected:?}; stall end -> hello {after_stall:?}\n\
         [link-faults] broker restart -> hello: {after_restart:?}",
        proxy.accepted(),
        report.duration,
        summarize(after_drop),
        summarize(after_cut),
    ));
    assert_eq!(
        figures.retries, 0,
        "strict mode: the back end never retries"
    );
    agent.terminate().await;
}
