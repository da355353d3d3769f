//! [`Backend`]: the store back end on a rumqttc client. A spawned task owns
//! the event loop and forwards every received publish through an unbounded
//! channel; the test side sorts them into acks, replies and status reports
//! and waits for them against deadlines.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::acks::{Ack, AckLog};
use super::{Broker, CMD_TOPIC, STATUS_TOPIC, TASK_TOPIC};

/// One message the back end received.
#[derive(Debug)]
struct Received {
    topic: String,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ack,
    Reply,
    Status,
    Other,
}

impl Received {
    fn into_ack(self) -> Ack {
        Ack::parse(self.topic, &self.payload)
    }

    fn kind(&self) -> Kind {
        if self.topic.starts_with("esl_status/") {
            Kind::Status
        } else if self.topic.starts_with("esl_ack/") {
            // Acks and command replies share the reply topic (PROTOCOL §3).
            let is_reply =
                serde_json::from_slice::<Value>(&self.payload).is_ok_and(|v| v["type"] == "reply");
            if is_reply {
                Kind::Reply
            } else {
                Kind::Ack
            }
        } else {
            Kind::Other
        }
    }
}

/// Messages received but not yet asked for, by kind.
#[derive(Default)]
struct Inbox {
    acks: VecDeque<Received>,
    replies: VecDeque<Received>,
    statuses: VecDeque<Received>,
    other: VecDeque<Received>,
}

impl Inbox {
    fn queue(&mut self, kind: Kind) -> &mut VecDeque<Received> {
        match kind {
            Kind::Ack => &mut self.acks,
            Kind::Reply => &mut self.replies,
            Kind::Status => &mut self.statuses,
            Kind::Other => &mut self.other,
        }
    }
}

/// The store back end: publishes tasks, receives acks and status reports.
///
/// Subscribes QoS 1 to `esl_ack/p2p/{client_id}` and `esl_status/#` after
/// every CONNACK, so it keeps listening across broker restarts whether or
/// not the broker kept its session.
pub struct Backend {
    pub client_id: String,
    client: AsyncClient,
    received_rx: mpsc::UnboundedReceiver<Received>,
    inbox: Inbox,
    subacks_rx: watch::Receiver<usize>,
    poller: JoinHandle<()>,
}

/// Requests the back end may queue before `publish` waits: more than the
/// largest burst a scenario sends, so bursts are not paced by the channel.
const BACKEND_REQUEST_CAPACITY: usize = 1024;

impl Backend {
    /// Connects and waits until the broker confirmed the subscriptions.
    pub async fn connect(broker: &Broker, client_id: &str, clean_session: bool) -> Backend {
        Backend::connect_as(broker, client_id, clean_session, None).await
    }

    /// [`Backend::connect`] with a user name and password (secured brokers).
    pub async fn connect_as(
        broker: &Broker,
        client_id: &str,
        clean_session: bool,
        login: Option<(&str, &str)>,
    ) -> Backend {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(clean_session)
            // Outgoing up to 8 MiB: the poison-message test sends 3 MiB.
            .set_max_packet_size(1 << 20, 8 << 20);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, eventloop) = AsyncClient::new(options, BACKEND_REQUEST_CAPACITY);
        let (received_tx, received_rx) = mpsc::unbounded_channel();
        let (subacks_tx, subacks_rx) = watch::channel(0);
        let subscriptions = vec![
            SubscribeFilter::new(format!("esl_ack/p2p/{client_id}"), QoS::AtLeastOnce),
            SubscribeFilter::new("esl_status/#".to_owned(), QoS::AtLeastOnce),
        ];
        let poller = tokio::spawn(poll_events(
            eventloop,
            client.clone(),
            subscriptions,
            received_tx,
            subacks_tx,
        ));
        let backend = Backend {
            client_id: client_id.to_owned(),
            client,
            received_rx,
            inbox: Inbox::default(),
            subacks_rx,
            poller,
        };
        backend.wait_subscribed(1, Duration::from_secs(10)).await;
        backend
    }

    /// Number of SUBACKs so far: one per (re)connection.
    pub fn subscriptions_confirmed(&self) -> usize {
        *self.subacks_rx.borrow()
    }

    /// Waits until `n` subscriptions were confirmed in total, i.e. the back
    /// end is (re)connected and listening.
    pub async fn wait_subscribed(&self, n: usize, timeout: Duration) {
        let mut rx = self.subacks_rx.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "back end {} not subscribed ({n} SUBACKs) within {timeout:?}",
            self.client_id
        );
    }

    /// A handle for publishing from another task (bursts paced in parallel).
    pub fn client(&self) -> AsyncClient {
        self.client.clone()
    }

    pub async fn publish_task(&self, task: &Value) {
        publish_task_with(&self.client, task).await;
    }

    /// Publishes `tasks` in order.
    pub async fn publish_tasks(&self, tasks: &[Value]) {
        for task in tasks {
            self.publish_task(task).await;
        }
    }

    /// Publishes arbitrary bytes on the agent's task topic, QoS 1.
    pub async fn publish_raw(&self, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(TASK_TOPIC, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue a publish on the back end");
    }

    /// Publishes arbitrary bytes on `topic`, QoS 1 (commands, foreign topics).
    #[allow(dead_code)] // used by tests/reliability, not by every harness user
    pub async fn publish_raw_to(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue a publish on the back end");
    }

    async fn next_of(&mut self, kind: Kind, deadline: Instant) -> Option<Received> {
        loop {
            if let Some(message) = self.inbox.queue(kind).pop_front() {
                return Some(message);
            }
            match tokio::time::timeout_at(deadline, self.received_rx.recv()).await {
                Ok(Some(message)) => self.inbox.queue(message.kind()).push_back(message),
                Ok(None) => panic!("the back end's MQTT event loop task ended"),
                Err(_) => return None,
            }
        }
    }

    /// Publishes a command (PROTOCOL §7) on the agent's command topic, QoS 1.
    pub async fn publish_command(&self, command: &Value) {
        self.client
            .publish(CMD_TOPIC, QoS::AtLeastOnce, false, command.to_string())
            .await
            .expect("queue a publish on the back end");
    }

    /// Calls `method` (PROTOCOL §7) with a reply to this back end
    /// (`GID_backend@@@be1`) and returns the reply; panics if none comes in
    /// `timeout`.
    pub async fn call(
        &mut self,
        req_id: &str,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Value {
        self.publish_command(&serde_json::json!({"v": 1, "req_id": req_id,
            "method": method, "params": params, "reply": true,
            "reply_to": "GID_backend@@@be1"}))
            .await;
        self.expect_reply(req_id, timeout).await
    }

    /// The reply to `req_id`; panics if none comes in `timeout`. Replies to
    /// other requests are dropped.
    pub async fn expect_reply(&mut self, req_id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(message) = self.next_of(Kind::Reply, deadline).await else {
                panic!("no reply to {req_id} within {timeout:?}");
            };
            let reply: Value = serde_json::from_slice(&message.payload).expect("replies are JSON");
            if reply["req_id"] == req_id {
                return reply;
            }
        }
    }

    /// Panics if any command reply arrives within `window`.
    pub async fn expect_no_reply(&mut self, window: Duration, why: &str) {
        let deadline = Instant::now() + window;
        if let Some(message) = self.next_of(Kind::Reply, deadline).await {
            panic!(
                "{why}, but got: {}",
                String::from_utf8_lossy(&message.payload)
            );
        }
    }

    /// The next final ack; panics naming `what` if none comes in `timeout`.
    pub async fn expect_final_ack(&mut self, what: &str, timeout: Duration) -> Ack {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(message) = self.next_of(Kind::Ack, deadline).await else {
                panic!("no final ack for {what} within {timeout:?}");
            };
            let ack = message.into_ack();
            if ack.status().is_final() {
                return ack;
            }
        }
    }

    /// Every ack that arrives within `window`.
    pub async fn acks_within(&mut self, window: Duration) -> Vec<Ack> {
        let deadline = Instant::now() + window;
        let mut acks = Vec::new();
        while let Some(message) = self.next_of(Kind::Ack, deadline).await {
            acks.push(message.into_ack());
        }
        acks
    }

    /// Every command reply (PROTOCOL §7) that arrives within `window`, as JSON.
    #[allow(dead_code)] // used by tests/reliability, not by every harness user
    pub async fn replies_within(&mut self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut replies = Vec::new();
        while let Some(message) = self.next_of(Kind::Reply, deadline).await {
            let reply = serde_json::from_slice(&message.payload)
                .expect("the reply was JSON when it was sorted");
            replies.push(reply);
        }
        replies
    }

    /// Every status report that arrives within `window`.
    #[allow(dead_code)] // used by tests/reliability, not by every harness user
    pub async fn statuses_within(&mut self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut statuses = Vec::new();
        while let Some(status) = self.next_status(deadline).await {
            statuses.push(status);
        }
        statuses
    }

    /// Panics if a final ack arrives within `window`.
    pub async fn expect_no_final_ack(&mut self, window: Duration, why: &str) {
        let unexpected: Vec<Value> = self
            .acks_within(window)
            .await
            .into_iter()
            .filter(|a| a.status().is_final())
            .map(|a| a.json)
            .collect();
        assert!(unexpected.is_empty(), "{why}, but got: {unexpected:#?}");
    }

    /// Collects acks until every task in `task_ids` has a final ack; panics
    /// after `timeout` listing what is missing. Returns everything collected.
    pub async fn collect_final_acks(&mut self, task_ids: &[String], timeout: Duration) -> AckLog {
        let deadline = Instant::now() + timeout;
        let mut log = AckLog::default();
        let mut missing: BTreeSet<&str> = task_ids.iter().map(String::as_str).collect();
        while !missing.is_empty() {
            let Some(message) = self.next_of(Kind::Ack, deadline).await else {
                let shown: Vec<&&str> = missing.iter().take(20).collect();
                panic!(
                    "after {timeout:?}, {} of {} tasks have no final ack (first: {shown:?}); received {}",
                    missing.len(),
                    task_ids.len(),
                    log.summary()
                );
            };
            let ack = message.into_ack();
            if ack.status().is_final() {
                if let Some(id) = ack.task_id() {
                    missing.remove(id);
                }
            }
            log.push(ack);
        }
        log
    }

    /// The next status report from the agent (PROTOCOL §6), checked to be
    /// JSON with `"type":"status"` on the agent's status topic.
    async fn next_status(&mut self, deadline: Instant) -> Option<Value> {
        let message = self.next_of(Kind::Status, deadline).await?;
        assert_eq!(
            message.topic, STATUS_TOPIC,
            "status report on an unexpected topic"
        );
        let status: Value = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
            panic!(
                "status report is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&message.payload)
            )
        });
        assert_eq!(
            status["type"], "status",
            "status report without \"type\":\"status\": {status}"
        );
        Some(status)
    }

    /// The first status report (of any kind) that satisfies `wanted`;
    /// panics naming `what` and the last report seen after `timeout`.
    pub async fn expect_status_where(
        &mut self,
        what: &str,
        timeout: Duration,
        mut wanted: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let Some(status) = self.next_status(deadline).await else {
                panic!("no status report with {what} within {timeout:?}; last report: {last:#?}");
            };
            if wanted(&status) {
                return status;
            }
            last = Some(status);
        }
    }

    /// The next status report of `kind` (`hello`, `periodic`); panics
    /// after `timeout`.
    pub async fn expect_status(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(status) = self.next_status(deadline).await else {
                panic!("no \"{kind}\" status report on {STATUS_TOPIC} within {timeout:?}");
            };
            if status["kind"] == kind {
                return status;
            }
        }
    }

    /// Collects `hello` reports (which may come in chunks) until every tag
    /// in `tags` has a record; returns the records by tag id. The panic
    /// message shows the hello reports that did arrive.
    pub async fn expect_hello_tags(
        &mut self,
        tags: &[String],
        timeout: Duration,
    ) -> BTreeMap<String, Value> {
        let deadline = Instant::now() + timeout;
        let mut records = BTreeMap::new();
        let mut hellos = Vec::new();
        while !tags.iter().all(|t| records.contains_key(t)) {
            let Some(status) = self.next_status(deadline).await else {
                panic!(
                    "within {timeout:?} the hello reports listed only tags {:?}, expected {tags:?}; \
                     hello reports received: {hellos:#?}",
                    records.keys()
                );
            };
            if status["kind"] != "hello" {
                continue;
            }
            let list = status["tags"]
                .as_array()
                .unwrap_or_else(|| panic!("hello report without a \"tags\" array: {status}"));
            for record in list {
                let id = record["tag_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("tag record without a string tag_id: {record}"));
                records.insert(id.to_owned(), record.clone());
            }
            hellos.push(status);
        }
        records
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// Publishes `task` as JSON on the agent's task topic, QoS 1.
pub async fn publish_task_with(client: &AsyncClient, task: &Value) {
    let payload = serde_json::to_vec(task).expect("a JSON value serializes");
    client
        .publish(TASK_TOPIC, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue a publish on the back end");
}

/// The back end's event loop. Never awaits a client request (that could
/// deadlock on a full request channel): subscribes with `try_subscribe_many`.
async fn poll_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<SubscribeFilter>,
    received_tx: mpsc::UnboundedSender<Received>,
    subacks_tx: watch::Sender<usize>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Subscriptions are not restored by rumqttc; ask after every
                // CONNACK (harmless when the broker kept the session).
                let _ = client.try_subscribe_many(subscriptions.clone());
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => subacks_tx.send_modify(|n| *n += 1),
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let message = Received {
                    topic: publish.topic,
                    payload: publish.payload.to_vec(),
                };
                if received_tx.send(message).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            // The next poll reconnects at once; pace the retries while the
            // broker is down.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
