//! systemd notifications from the real binary (`Type=notify` unit, see
//! `systemd/esl-agent.service`): the test plays systemd's side of
//! `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`. READY only after the first
//! CONNACK, watchdog pings from the start (also while the broker is
//! unreachable), STOPPING when SIGTERM arrives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::harness::{eventually, Agent, AgentConfig, Broker, BrokerOptions, TestEnv};

/// `WatchdogSec=2`: the agent must ping every second.
const WATCHDOG_USEC: &str = "2000000";

/// What the agent sent to "systemd", one entry per datagram.
#[derive(Clone, Default)]
struct Notifications(Arc<Mutex<Vec<String>>>);

impl Notifications {
    /// Binds the notification socket and records every datagram.
    fn listen(path: &std::path::Path) -> Notifications {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        let seen = Notifications::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                log.0.lock().expect("not poisoned").push(message);
            }
        });
        seen
    }

    /// How many datagrams carried the line `line` (e.g. `READY=1`).
    fn count(&self, line: &str) -> usize {
        let all = self.0.lock().expect("not poisoned");
        all.iter().filter(|m| m.lines().any(|l| l == line)).count()
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().expect("not poisoned").clone()
    }

    async fn wait_for(&self, line: &str, at_least: usize, timeout: Duration) {
        let what = format!("{at_least} notification(s) with {line:?}");
        eventually(&what, timeout, || {
            (self.count(line) >= at_least).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_after_connack_watchdog_from_start_stopping_at_sigterm() {
    let env = TestEnv::new("systemd-notify");
    let mut broker = Broker::start(&env, BrokerOptions::default()).await;
    // The agent starts while its broker is down, as after a power cut that
    // took the store's uplink with it.
    broker.stop().await;
    let socket = env.path().join("notify.sock");
    let systemd = Notifications::listen(&socket);
    let mut config = AgentConfig::new(&env, &broker);
    config.env = vec![
        ("NOTIFY_SOCKET".into(), socket.display().to_string()),
        ("WATCHDOG_USEC".into(), WATCHDOG_USEC.into()),
    ];
    let mut agent = Agent::start(&env, &config);

    // Alive (watchdog pings) and trying (connection errors in its log), but
    // not ready.
    systemd
        .wait_for("WATCHDOG=1", 3, Duration::from_secs(15))
        .await;
    let agent_log = env.agent_log();
    eventually(
        "two failed connection attempts in the agent log",
        Duration::from_secs(15),
        || {
            let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
            (log.matches("cannot connect to broker").count() >= 2).then_some(())
        },
    )
    .await;
    agent.assert_running();
    assert_eq!(
        systemd.count("READY=1"),
        0,
        "READY=1 before any CONNACK: {:?}",
        systemd.all()
    );

    let since = broker.log_len();
    broker.restart().await;
    agent
        .wait_subscribed(&broker, since, Duration::from_secs(15))
        .await;
    systemd
        .wait_for("READY=1", 1, Duration::from_secs(10))
        .await;
    let pings_when_ready = systemd.count("WATCHDOG=1");
    systemd
        .wait_for("WATCHDOG=1", pings_when_ready + 2, Duration::from_secs(10))
        .await;

    agent.terminate().await;
    systemd
        .wait_for("STOPPING=1", 1, Duration::from_secs(5))
        .await;
    assert_eq!(
        systemd.count("READY=1"),
        1,
        "exactly one READY=1: {:?}",
        systemd.all()
    );
}
