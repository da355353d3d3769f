//! The MQTT link task: the only code that touches the rumqttc event loop.
//!
//! Reads: the broker (via `EventLoop::poll`), `puback_rx` (PUBACKs the
//! engine released after a flush), `report_rx` (status payloads),
//! `outbox_wake` (the engine stored new acks). Writes: `inbound_tx` (tasks
//! and commands for the engine), `link_tx` (connection state), and removes
//! outbox entries from the store once the broker PUBACKed them.
//!
//! What to publish, which PUBACK delivered which outbox entry and which
//! released PUBACKs may be written is decided by `outbox::Outbox`, a state
//! machine without I/O (unit-tested there); `Link` reads the store, drives
//! rumqttc and feeds its events in.
//!
//! Invariants:
//! - Incoming QoS 1 messages are PUBACKed only when the engine says so, and
//!   only on the connection they arrived on (`AckToken::epoch`): a packet id
//!   from an earlier connection means something else on the new one. The
//!   PUBACKs of a released batch are written into the connection directly
//!   with one flush (`write_pubacks`): rumqttc's request channel
//!   would send them one per event-loop turn, behind the incoming burst.
//! - The outbox in the store is the only source of acks and replies. After
//!   every CONNACK the link drops whatever rumqttc kept from the previous
//!   connection and re-reads the outbox oldest first. Within a connection,
//!   `Outgoing::Publish(pkid)` events arrive in the order of our publish
//!   requests, which is how a PUBACK is traced back to an outbox entry.
//! - Nothing is published while disconnected, so no request from the old
//!   connection can slip into the new one and break that ordering.
//! - Reconnects back off exponentially with jitter (rumqttc itself would
//!   retry at once); the wait does not block the other inputs. A refused
//!   login or TLS handshake backs off the same way, so a wrong password
//!   never hammers the broker, and is logged with what to check.
//! - Before each reconnect the login is made again from its source
//!   (`auth::Login`), so a rotated password or token file is picked up.
//! - `MqttOptions` holds the password and its `Debug` prints it: never log
//!   the options.
//! - rumqttc reaches the broker through `broker_io` (a private Unix socket
//!   whose other end opens TCP/TLS/wss), which replaces every PUBLISH over
//!   the size limit by a stand-in (`oversize`): such a message is read and
//!   discarded without holding it, PUBACKed, and handed to the engine as
//!   oversized, so it neither drops the connection nor comes back forever.
//!
//! rumqttc behaviour this relies on that its documentation does not promise
//! (0.25), each pinned by a test in `rumqttc_pins` that drives a real
//! `EventLoop` against a fake broker speaking raw MQTT bytes:
//! 1. Every QoS 1 publish request yields one `Outgoing::Publish(pkid)`
//!    event, in request order, with the id the PUBLISH carries; ids count up
//!    from 1 and wrap at `inflight`, and an id still unacknowledged is not
//!    reused: the request waits (`Outgoing::AwaitAck`), holds back later
//!    ones, and goes out when PUBACKed. The outbox's pkid mapping rests on
//!    this. Pin: `outgoing_publish_events_follow_request_order_and_ids_are_not_reused_in_flight`.
//! 2. With `set_manual_acks(true)` rumqttc writes no PUBACK for an incoming
//!    QoS 1 message by itself. Pin: `manual_acks_leave_pubacks_to_us_and_write_pubacks_sends_them_directly`.
//! 3. `EventLoop::state.handle_outgoing_packet(Request::PubAck)` returns the
//!    packet and pushes one `Outgoing::PubAck` event at the back of
//!    `state.events`; `EventLoop::network` (public field, type not exported)
//!    is `Some` while connected and its `write`/`flush` put packets on the
//!    wire at once. `write_pubacks` uses both. Pin: the same test.
//! 4. `EventLoop::state.events` keeps events read on a connection that then
//!    failed (`EventLoop::clean` does not clear it), and the next `poll`
//!    after the new CONNACK hands them out: the link clears it at every
//!    CONNACK. Pin: `events_of_a_failed_connection_are_handed_out_after_the_next_connack`.
//! 5. `EventLoop::pending` receives the unacknowledged publishes (with their
//!    old ids) when a connection fails, and rumqttc sends them first if the
//!    broker resumes the session: the link clears it at every CONNACK and
//!    replays the outbox instead. Pin: `unacknowledged_publishes_wait_in_pending_for_a_resumed_session`.
//! 6. Credentials set on `EventLoop::mqtt_options` are used at the next
//!    connection (`Link::refresh_credentials`). Pin:
//!    `credentials_changed_on_the_event_loop_apply_at_the_next_connect`.
//! 7. With `Transport::Unix` rumqttc connects to the options' host as a
//!    socket path, and a name with a leading NUL reaches an abstract socket
//!    (`broker_io`); no TLS or WebSocket of rumqttc's is involved. Pin: every
//!    test above connects that way.
//!
//! Not pinned, bounded instead: the `Outgoing::Disconnect` event the
//! shutdown waits for (at most 500 ms).

mod outbox;

pub(crate) mod broker_io;
pub(crate) mod oversize;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions,
    Outgoing, Packet, PubAck, Publish, QoS, Request, StateError, SubscribeFilter,
    SubscribeReasonCode, Transport,
};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::MqttConfig;
use crate::counters::Counters;
use crate::identity::Identity;
pub(crate) use crate::link::broker_io::BrokerSocket;
use crate::msg::{AckToken, Inbound, InboundKind, LinkState, Report};
use crate::security::auth::{Credentials, Login};
use crate::store::{OutboxEntry, Store};

use outbox::Outbox;

/// rumqttc's request channel: our publishes, subscriptions, and the rare
/// PUBACK of a message on an unexpected topic (released PUBACKs are written
/// directly, see `Link::write_pubacks`). The outbox window and one status
/// report bound what we put in at once, far below this.
pub(crate) const REQUEST_CAPACITY: usize = 1024;
/// PUBACKs released by the engine and not yet written: one group commit's
/// worth.
pub(crate) const PUBACK_CAPACITY: usize = 1024;
/// How long shutdown waits for the engine's last PUBACKs and the DISCONNECT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often outbox messages are checked for a missing PUBACK.
const RESEND_CHECK: Duration = Duration::from_secs(1);
/// PUBACKs written per flush at most (the engine releases a flush's worth,
/// typically 100–200, at once).
const PUBACK_BATCH: usize = 1024;

/// Link settings taken from the config once.
#[derive(Debug, Clone)]
pub(crate) struct LinkSettings {
    pub p2p_subscribe: bool,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub publish_timeout: Duration,
    pub window: usize,
    pub connect_timeout: Duration,
    /// `mqtt.host`, for error messages about the broker's certificate.
    pub host: String,
}

impl LinkSettings {
    pub(crate) fn from_config(m: &MqttConfig) -> Self {
        LinkSettings {
            p2p_subscribe: m.p2p_subscribe,
            reconnect_min: Duration::from_millis(m.reconnect_min_ms),
            reconnect_max: Duration::from_millis(m.reconnect_max_ms),
            publish_timeout: Duration::from_secs(m.publish_timeout_s),
            window: usize::from(m.outbox_window),
            connect_timeout: Duration::from_secs(m.connect_timeout_s),
            host: m.host.clone(),
        }
    }
}

/// rumqttc options for the config and identity, connecting through
/// `broker` (which holds the transport, `tls::LinkTransport`), with the
/// login (`auth::Login`) prepared at start-up.
pub(crate) fn mqtt_options(
    m: &MqttConfig,
    identity: &Identity,
    max_payload: usize,
    broker: &BrokerSocket,
    credentials: Option<Credentials>,
) -> MqttOptions {
    let mut o = MqttOptions::new(identity.client_id.clone(), broker.rumqttc_addr(), m.port);
    o.set_transport(Transport::Unix);
    o.set_keep_alive(Duration::from_secs(m.keepalive_s));
    o.set_clean_session(m.clean_session);
    o.set_manual_acks(true);
    // rumqttc drops the connection on an incoming packet over its limit, and
    // a persistent session would bring the same packet back forever. The
    // filter in `broker_io` turns larger PUBLISH packets into small
    // stand-ins, so rumqttc never sees one over this. Outgoing: the payload
    // plus room for header and topic.
    o.set_max_packet_size(broker.rumqttc_incoming_limit(), max_payload + 1024);
    o.set_inflight(m.outbox_window.saturating_add(16));
    // rumqttc replays its own pending requests after a reconnect at this
    // pace; we clear them (the outbox replays instead), so no throttle.
    o.set_pending_throttle(Duration::ZERO);
    if let Some(c) = credentials {
        o.set_credentials(c.username, c.password.expose());
    }
    o
}

/// What went wrong with a connection attempt, in words that say what to
/// check. Never includes a credential.
fn explain_error(e: &ConnectionError, host: &str) -> String {
    // Brokers differ in which code they send for a wrong password (Mosquitto
    // 2: "not authorised"), so both point at every key the login uses.
    const CHECK_LOGIN: &str = "check mqtt.auth, mqtt.username, mqtt.access_key_id, mqtt.instance_id and the secret in mqtt.secret_file / mqtt.secret_env";
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            format!("the broker refused the login: bad user name or password ({CHECK_LOGIN})")
        }
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => format!(
            "the broker refused the login: not authorized, i.e. a wrong user name or password, or a client id this login may not use ({CHECK_LOGIN})"
        ),
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId) => {
            "the broker refused the client id (check mqtt.group_id and the device id)".to_owned()
        }
        other => crate::security::tls::explain(other, host).unwrap_or_else(|| other.to_string()),
    }
}

pub(crate) struct Link {
    pub options: MqttOptions,
    /// Where the broker is, for the log (`mqtts://host:8883`).
    pub url: String,
    pub settings: LinkSettings,
    pub identity: Identity,
    pub store: Arc<Store>,
    pub counters: Arc<Counters>,
    /// Makes the credentials again before each reconnect.
    pub login: Login,
    /// rumqttc's way to the broker, through the poison-message filter.
    pub broker: BrokerSocket,
    pub inbound_tx: mpsc::Sender<Inbound>,
    pub puback_rx: mpsc::Receiver<AckToken>,
    pub report_rx: mpsc::Receiver<Report>,
    pub outbox_wake: Arc<Notify>,
    pub link_tx: watch::Sender<LinkState>,
    pub shutdown: CancellationToken,
}

impl Link {
    pub(crate) async fn run(mut self) {
        // Ends with `run`.
        let _broker_io = match self.broker.spawn() {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the link's socket; no connection to the broker");
                return;
            }
        };
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), REQUEST_CAPACITY);
        let mut network = NetworkOptions::new();
        network.set_connection_timeout(self.settings.connect_timeout.as_secs());
        eventloop.set_network_options(network);
        let mut outbox = Outbox::new(self.settings.window, self.settings.publish_timeout);
        let mut backoff = self.settings.reconnect_min;
        let mut reconnect_at: Option<Instant> = None;
        let mut stopping_until: Option<Instant> = None;
        let mut resend = tokio::time::interval(RESEND_CHECK);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        info!(broker = %self.url, client_id = %self.identity.client_id, "connecting");

        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if stopping_until.is_none() => {
                    // Keep running briefly so the engine's last PUBACKs go out.
                    stopping_until = Some(Instant::now() + SHUTDOWN_GRACE);
                }
                _ = tokio::time::sleep_until(stopping_until.unwrap_or(far_future)), if stopping_until.is_some() => break,
                _ = tokio::time::sleep_until(reconnect_at.unwrap_or(far_future)), if reconnect_at.is_some() => {
                    reconnect_at = None;
                }
                // New acks are stored (at most once per engine flush): ahead
                // of the busy branches below, or a burst of tasks, which
                // keeps them ready, holds the acks back until it ends.
                _ = self.outbox_wake.notified(), if outbox.connected() => self.fill_outbox(&client, &mut outbox),
                // Released PUBACKs go before reading more from the broker: a
                // broker with a large in-flight window must not starve them.
                token = self.puback_rx.recv() => match token {
                    Some(first) => {
                        let mut tokens = vec![first];
                        while tokens.len() < PUBACK_BATCH {
                            match self.puback_rx.try_recv() {
                                Ok(t) => tokens.push(t),
                                Err(_) => break,
                            }
                        }
                        self.write_pubacks(&mut eventloop, &outbox, tokens).await;
                    }
                    // The engine has stopped: its last PUBACKs are out.
                    None => break,
                },
                event = eventloop.poll(), if reconnect_at.is_none() => {
                    // The poll drained requests: room for acks that did not
                    // fit before.
                    if outbox.has_unpublished() {
                        self.fill_outbox(&client, &mut outbox);
                    }
                    match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        let state = outbox.on_connack();
                        backoff = self.settings.reconnect_min;
                        Counters::bump(&self.counters.mqtt_connects);
                        info!(epoch = state.epoch, session_present = ack.session_present, "connected to broker");
                        // The outbox, not rumqttc, replays unacked messages.
                        eventloop.pending.clear();
                        // Events rumqttc read on the previous connection but
                        // had not handed out yet (its `clean` keeps them):
                        // a message among them would be stamped with this
                        // connection's epoch, and its PUBACK would carry an
                        // old packet id that here means another, newer
                        // message, acknowledging it before it is stored.
                        // The broker (or the back end's retry) brings them
                        // again, and old `Outgoing::Publish` events would
                        // shift the outbox's packet-id mapping.
                        eventloop.state.events.clear();
                        if self.settings.p2p_subscribe {
                            let topics = [&self.identity.task_topic, &self.identity.cmd_topic]
                                .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                            if let Err(e) = client.try_subscribe_many(topics) {
                                warn!(error = %e, "cannot queue subscribe");
                            }
                        }
                        self.link_tx.send_replace(state);
                        self.fill_outbox(&client, &mut outbox);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(&client, p, outbox.link().epoch).await,
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(n) = outbox.on_puback(ack.pkid) {
                            Counters::bump(&self.counters.outbox_sent);
                            if let Err(e) = self.store.remove_outbox(n) {
                                warn!(error = %e, outbox = n, "cannot remove a delivered ack from the store; it will be sent again");
                            }
                        }
                        self.fill_outbox(&client, &mut outbox);
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                            warn!(codes = ?ack.return_codes, "broker refused a subscription: tasks or commands will not arrive (check the broker ACL)");
                        } else {
                            info!("subscribed to the task and command topics");
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => outbox.on_outgoing_publish(pkid),
                    Ok(_) => {}
                    Err(e) => {
                        Counters::bump(&self.counters.mqtt_errors);
                        // rumqttc only saw its socket close when the broker
                        // connection could not be opened: say why.
                        let e = self.broker.take_error().unwrap_or(e);
                        let reason = explain_error(&e, &self.settings.host);
                        if outbox.on_connection_lost() {
                            warn!(error = %reason, "connection to broker lost");
                            self.link_tx.send_replace(outbox.link());
                        } else {
                            warn!(error = %reason, retry_in_ms = backoff.as_millis() as u64, "cannot connect to broker");
                        }
                        self.refresh_credentials(&mut eventloop);
                        if stopping_until.is_some() {
                            break;
                        }
                        // Full jitter on the upper half: spreads the
                        // reconnects of many APs after a broker restart.
                        let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
                        reconnect_at = Some(Instant::now() + jittered);
                        backoff = (backoff * 2).min(self.settings.reconnect_max);
                    }
                }},
                Some(report) = self.report_rx.recv(), if outbox.connected() => {
                    match client.try_publish(report.topic, QoS::AtLeastOnce, false, report.payload) {
                        Ok(()) => outbox.report_published(),
                        Err(e) => debug!(error = %e, "status report not queued"),
                    }
                }
                _ = resend.tick(), if outbox.connected() => {
                    self.resend_overdue(&client, &mut outbox);
                    // Backstop: acks stored without a wake reaching the fill
                    // (none is known) wait at most one tick.
                    self.fill_outbox(&client, &mut outbox);
                }
            }
        }
        if outbox.connected() {
            // Best effort: a DISCONNECT lets the broker drop the session at
            // once instead of waiting for the keepalive.
            if client.try_disconnect().is_ok() {
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Ok(ev) = eventloop.poll().await {
                        if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                            break;
                        }
                    }
                })
                .await;
            }
            // rumqttc's side closes; the pump forwards what it wrote (the
            // DISCONNECT) and closes the broker's side before it is dropped.
            drop(eventloop);
            self.broker.wait_idle(Duration::from_millis(500)).await;
        }
        self.link_tx.send_replace(LinkState {
            connected: false,
            epoch: outbox.link().epoch,
        });
        info!("link stopped");
    }

    /// Reads the secret again (a rotated password or token takes effect at
    /// the next connection). A secret that cannot be read now keeps the
    /// previous credentials: the broker will say whether they still work.
    fn refresh_credentials(&self, eventloop: &mut rumqttc::EventLoop) {
        if !self.login.reads_secret() {
            return;
        }
        match self.login.credentials() {
            Ok(Some(c)) => {
                eventloop
                    .mqtt_options
                    .set_credentials(c.username, c.password.expose());
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the MQTT secret again; keeping the previous one")
            }
        }
    }

    async fn on_publish(&self, client: &AsyncClient, p: Publish, epoch: u64) {
        let kind = if p.topic == self.identity.task_topic {
            InboundKind::Task
        } else if p.topic == self.identity.cmd_topic {
            InboundKind::Command
        } else {
            Counters::bump(&self.counters.mqtt_unexpected);
            warn!(topic = %p.topic, "message on an unexpected topic ignored");
            let _ = client.try_ack(&p);
            return;
        };
        let oversized = self.broker.marker().parse(&p.payload);
        if let Some(size) = oversized {
            Counters::bump(&self.counters.messages_oversized);
            warn!(topic = %p.topic, size, "oversized message read and discarded; it is answered as rejected");
        }
        if p.qos != QoS::AtLeastOnce {
            // Accept it (the back end sent it), but note the protocol breach:
            // a QoS 0 task is lost if the agent dies before storing it.
            Counters::bump(&self.counters.mqtt_unexpected);
            debug!(topic = %p.topic, qos = ?p.qos, "message not sent with QoS 1");
        }
        let inbound = Inbound {
            kind,
            token: AckToken {
                epoch,
                pkid: p.pkid,
            },
            payload: if oversized.is_some() {
                Default::default()
            } else {
                p.payload
            },
            oversized,
        };
        // Waiting here is the backpressure: the broker sends no more than its
        // in-flight window until we PUBACK.
        if self.inbound_tx.send(inbound).await.is_err() {
            debug!("engine stopped; message not taken");
        }
    }

    /// Writes the released PUBACKs of the current connection straight into
    /// it ([`write_pubacks`]). Tokens of an earlier connection are dropped
    /// ([`Outbox::pubacks`]): that connection's packet ids mean nothing on
    /// this one, and the broker sends the message again.
    async fn write_pubacks(
        &self,
        eventloop: &mut EventLoop,
        outbox: &Outbox,
        tokens: Vec<AckToken>,
    ) {
        let batch = outbox.pubacks(tokens);
        if batch.stale > 0 {
            debug!(
                count = batch.stale,
                "PUBACKs for an earlier or closed connection dropped; the broker sends those messages again"
            );
        }
        if batch.send.is_empty() {
            return;
        }
        // A peer that stops reading must not freeze the link (shutdown,
        // keepalive): what did not go stays in the buffer for rumqttc's next
        // flush, or the connection fails and the broker sends the messages
        // again.
        match tokio::time::timeout(
            self.settings.connect_timeout,
            write_pubacks(eventloop, &batch.send),
        )
        .await
        {
            Ok(Ok(written)) => {
                for _ in 0..written {
                    Counters::bump(&self.counters.mqtt_pubacks);
                }
            }
            Ok(Err(e)) => debug!(error = %e, "cannot write PUBACKs; the connection is failing"),
            Err(_) => debug!("writing PUBACKs timed out"),
        }
    }

    /// Publishes outbox entries, oldest first, until the window is full
    /// ([`Outbox::fill`]).
    fn fill_outbox(&self, client: &AsyncClient, outbox: &mut Outbox) {
        if let Err(e) = outbox.fill(
            Instant::now(),
            |after, limit| self.store.outbox_after(after, limit),
            |entry| publish_entry(client, entry),
        ) {
            warn!(error = %e, "cannot read the outbox");
        }
    }

    /// Publishes again what the broker has not PUBACKed in time
    /// ([`Outbox::resend_overdue`]).
    fn resend_overdue(&self, client: &AsyncClient, outbox: &mut Outbox) {
        let resent = outbox.resend_overdue(
            Instant::now(),
            |after, limit| self.store.outbox_after(after, limit),
            |entry| publish_entry(client, entry),
        );
        for n in resent {
            Counters::bump(&self.counters.outbox_resent);
            debug!(outbox = n, "no PUBACK in time; published again");
        }
    }
}

/// Hands an outbox entry to rumqttc (QoS 1); false if its request channel
/// is full.
fn publish_entry(client: &AsyncClient, entry: &OutboxEntry) -> bool {
    let queued = client.try_publish(
        entry.topic.clone(),
        QoS::AtLeastOnce,
        false,
        entry.payload.clone(),
    );
    if let Err(e) = &queued {
        debug!(error = %e, "outbox publish not queued; retried after the next event-loop turn");
    }
    queued.is_ok()
}

/// Writes PUBACKs for `pkids` straight into rumqttc's connection, all
/// before one flush; returns how many were written. Through rumqttc's
/// request channel they went out one per event-loop turn, and its loop
/// hands out up to ten buffered incoming messages before it looks at a
/// request: under a burst the PUBACKs fell behind, the broker's window
/// stayed full and ingest sat at ~10 600 tasks/s with the agent half idle
/// (docs/BENCHMARKS.md). This uses the event loop's public `state` (which
/// turns the request into the packet, as rumqttc's own loop does) and
/// `network` (rumqttc internals, pinned by the tests below). A PUBACK needs
/// no packet id or flow control of its own.
async fn write_pubacks(eventloop: &mut EventLoop, pkids: &[u16]) -> Result<usize, StateError> {
    let network = eventloop
        .network
        .as_mut()
        .ok_or(StateError::ConnectionAborted)?;
    let mut written = 0;
    for &pkid in pkids {
        let request = Request::PubAck(PubAck::new(pkid));
        let packet = match eventloop.state.handle_outgoing_packet(request) {
            Ok(Some(packet)) => packet,
            Ok(None) => continue,
            Err(e) => {
                debug!(error = %e, pkid, "PUBACK not written");
                continue;
            }
        };
        // rumqttc notes an `Outgoing::PubAck` event for its user; this link
        // does not read those, so it does not let them pile up.
        if matches!(
            eventloop.state.events.back(),
            Some(Event::Outgoing(Outgoing::PubAck(_)))
        ) {
            eventloop.state.events.pop_back();
        }
        network.write(packet).await?;
        written += 1;
    }
    if written > 0 {
        network.flush().await?;
    }
    Ok(written)
}

/// Pins the rumqttc behaviour listed at the top of this file against a
/// fake broker that speaks raw MQTT 3.1.1 bytes on an abstract Unix
/// socket, the way `broker_io` serves rumqttc. Each test fails if an
/// upgrade changes what the link relies on.
#[cfg(test)]
mod rumqttc_pins {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    use super::*;

    /// Guards every wait: a changed rumqttc must fail the test, not hang it.
    const WAIT: Duration = Duration::from_secs(10);

    struct FakeBroker {
        listener: UnixListener,
        name: String,
    }

    impl FakeBroker {
        fn new() -> FakeBroker {
            let name = format!(
                "\0esl-agent-pin-{}-{}",
                std::process::id(),
                hex::encode(rand::random::<[u8; 8]>())
            );
            let listener = UnixListener::bind(&name).unwrap();
            FakeBroker { listener, name }
        }

        /// The link's options that matter here: the Unix transport with an
        /// abstract name as host, manual acks, no keepalive pings.
        fn options(&self, inflight: u16) -> MqttOptions {
            let mut o = MqttOptions::new("pin", self.name.clone(), 0);
            o.set_transport(Transport::Unix);
            o.set_manual_acks(true);
            o.set_keep_alive(Duration::ZERO);
            o.set_clean_session(false);
            o.set_inflight(inflight);
            o.set_pending_throttle(Duration::ZERO);
            o
        }

        /// Serves one connection attempt while `eventloop` makes it:
        /// returns the CONNECT's body and the socket, after answering with
        /// CONNACK followed by `then` (in the same write).
        async fn connect(
            &self,
            eventloop: &mut EventLoop,
            session_present: bool,
            then: &[u8],
        ) -> (UnixStream, Vec<u8>) {
            let broker = async {
                let (mut s, _) = self.listener.accept().await.unwrap();
                let (kind, connect) = read_packet(&mut s).await;
                assert_eq!(kind, 0x10, "CONNECT");
                let mut reply = vec![0x20, 2, u8::from(session_present), 0];
                reply.extend_from_slice(then);
                s.write_all(&reply).await.unwrap();
                (s, connect)
            };
            let (served, event) = tokio::join!(broker, next(eventloop));
            assert!(
                matches!(event, Event::Incoming(Packet::ConnAck(_))),
                "{event:?}"
            );
            served
        }
    }

    async fn next(eventloop: &mut EventLoop) -> Event {
        tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("an event")
            .expect("no connection error")
    }

    async fn next_error(eventloop: &mut EventLoop) -> ConnectionError {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Err(e)) => e,
            other => panic!("expected a connection error, got {other:?}"),
        }
    }

    /// Reads one MQTT packet: its first byte and its body.
    async fn read_packet(s: &mut UnixStream) -> (u8, Vec<u8>) {
        tokio::time::timeout(WAIT, async {
            let kind = s.read_u8().await.unwrap();
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let b = s.read_u8().await.unwrap();
                len |= usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0; len];
            s.read_exact(&mut body).await.unwrap();
            (kind, body)
        })
        .await
        .expect("a packet from rumqttc")
    }

    /// A PUBLISH from rumqttc: (packet id, payload).
    async fn read_publish(s: &mut UnixStream) -> (u16, Vec<u8>) {
        let (kind, body) = read_packet(s).await;
        assert_eq!(kind & 0xf0, 0x30, "PUBLISH, got {kind:#x}");
        assert_eq!(kind & 0x06, 0x02, "QoS 1");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let at = 2 + topic_len;
        let pkid = u16::from_be_bytes([body[at], body[at + 1]]);
        (pkid, body[at + 2..].to_vec())
    }

    fn publish_qos1(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let len = 2 + topic.len() + 2 + payload.len();
        assert!(len < 128, "one length byte");
        let mut p = vec![0x32, len as u8];
        p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        p.extend_from_slice(topic.as_bytes());
        p.extend_from_slice(&pkid.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn puback(pkid: u16) -> Vec<u8> {
        let [hi, lo] = pkid.to_be_bytes();
        vec![0x40, 2, hi, lo]
    }

    /// The user name in a CONNECT body (MQTT 3.1.1 §3.1.3).
    fn connect_username(body: &[u8]) -> Option<String> {
        let flags = body[7];
        let field = |at: usize| {
            let len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
            (body[at + 2..at + 2 + len].to_vec(), at + 2 + len)
        };
        let (_client_id, mut at) = field(10);
        if flags & 0x04 != 0 {
            at = field(field(at).1).1;
        }
        (flags & 0x80 != 0).then(|| String::from_utf8(field(at).0).unwrap())
    }

    fn publish_events(events: &[Event]) -> Vec<u16> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Outgoing(Outgoing::Publish(pkid)) => Some(*pkid),
                _ => None,
            })
            .collect()
    }

    fn publish(client: &AsyncClient, payload: &str) {
        client
            .try_publish("acks", QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .unwrap();
    }

    /// Pin 1: every QoS 1 publish request becomes one
    /// `Outgoing::Publish(pkid)` event, in request order, with the packet id
    /// the PUBLISH carries; ids count up from 1 and wrap at `inflight`, and
    /// one still unacknowledged is not reused: the request waits
    /// (`AwaitAck`), holds back later ones, and goes out once PUBACKed.
    #[tokio::test]
    async fn outgoing_publish_events_follow_request_order_and_ids_are_not_reused_in_flight() {
        let broker = FakeBroker::new();
        let (client, mut eventloop) = AsyncClient::new(broker.options(4), 16);
        let (mut s, _) = broker.connect(&mut eventloop, false, &[]).await;

        for p in ["a", "b", "c"] {
            publish(&client, p);
        }
        let mut events = Vec::new();
        for _ in 0..3 {
            events.push(next(&mut eventloop).await);
        }
        assert_eq!(publish_events(&events), [1, 2, 3]);
        for (pkid, payload) in [(1, "a"), (2, "b"), (3, "c")] {
            assert_eq!(read_publish(&mut s).await, (pkid, payload.into()));
        }

        // 1 stays unacknowledged; d takes 4, the last id, and e would
        // take 1 again.
        s.write_all(&[puback(2), puback(3)].concat()).await.unwrap();
        for pkid in [2, 3] {
            let event = next(&mut eventloop).await;
            assert_eq!(event, Event::Incoming(Packet::PubAck(PubAck::new(pkid))));
        }
        for p in ["d", "e", "f"] {
            publish(&client, p);
        }
        let mut events = vec![next(&mut eventloop).await, next(&mut eventloop).await];
        assert_eq!(events[1], Event::Outgoing(Outgoing::AwaitAck(1)));
        assert_eq!(read_publish(&mut s).await, (4, "d".into()));
        s.write_all(&puback(1)).await.unwrap();
        for _ in 0..3 {
            events.push(next(&mut eventloop).await);
        }
        assert_eq!(
            events[2],
            Event::Incoming(Packet::PubAck(PubAck::new(1))),
            "{events:?}"
        );
        assert_eq!(publish_events(&events), [4, 1, 2], "d, e, f");
        assert_eq!(read_publish(&mut s).await, (1, "e".into()));
        assert_eq!(read_publish(&mut s).await, (2, "f".into()));
    }

    /// Pin 2: with manual acks rumqttc does not PUBACK an incoming QoS 1
    /// message by itself. Pin 3: `state.handle_outgoing_packet` turns a
    /// PUBACK request into the packet and notes one `Outgoing::PubAck`
    /// event at the back of `state.events`, and `network` (public while
    /// connected) writes it straight away: what `write_pubacks` uses.
    #[tokio::test]
    async fn manual_acks_leave_pubacks_to_us_and_write_pubacks_sends_them_directly() {
        let broker = FakeBroker::new();
        let (client, mut eventloop) = AsyncClient::new(broker.options(4), 16);
        let incoming = [
            publish_qos1("tasks", 7, b"t1"),
            publish_qos1("tasks", 8, b"t2"),
        ]
        .concat();
        let (mut s, _) = broker.connect(&mut eventloop, false, &incoming).await;
        for pkid in [7, 8] {
            match next(&mut eventloop).await {
                Event::Incoming(Packet::Publish(p)) => assert_eq!(p.pkid, pkid),
                other => panic!("{other:?}"),
            }
        }
        // A SUBSCRIBE as a fence: a PUBACK of rumqttc's own would come
        // before it.
        client.try_subscribe("x", QoS::AtLeastOnce).unwrap();
        assert!(matches!(
            next(&mut eventloop).await,
            Event::Outgoing(Outgoing::Subscribe(_))
        ));
        assert_eq!(read_packet(&mut s).await.0, 0x82, "SUBSCRIBE, no PUBACK");

        assert!(eventloop.state.events.is_empty());
        let written = tokio::time::timeout(WAIT, write_pubacks(&mut eventloop, &[8, 7]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(written, 2);
        assert_eq!(read_packet(&mut s).await, (0x40, vec![0, 8]));
        assert_eq!(read_packet(&mut s).await, (0x40, vec![0, 7]));
        assert!(
            eventloop.state.events.is_empty(),
            "the Outgoing::PubAck events were noted at the back and taken off: {:?}",
            eventloop.state.events
        );
    }

    /// Pin 4: events read on a connection that then fails stay in
    /// `state.events` (rumqttc's `clean` keeps them), and after the next
    /// CONNACK the event loop hands them out as if they came on the new
    /// connection: why the link clears `state.events` at every CONNACK.
    #[tokio::test]
    async fn events_of_a_failed_connection_are_handed_out_after_the_next_connack() {
        let broker = FakeBroker::new();
        let (_client, mut eventloop) = AsyncClient::new(broker.options(4), 16);
        // A message, then a PUBACK for nothing we sent, which fails the
        // connection in the same read.
        let then = [publish_qos1("tasks", 1, b"old"), puback(99)].concat();
        let (_s, _) = broker.connect(&mut eventloop, false, &then).await;
        let e = next_error(&mut eventloop).await;
        assert!(
            matches!(e, ConnectionError::MqttState(StateError::Unsolicited(99))),
            "{e:?}"
        );
        assert!(
            eventloop
                .state
                .events
                .iter()
                .any(|e| matches!(e, Event::Incoming(Packet::Publish(p)) if p.payload == "old")),
            "kept: {:?}",
            eventloop.state.events
        );
        let (_s, _) = broker.connect(&mut eventloop, false, &[]).await;
        match next(&mut eventloop).await {
            Event::Incoming(Packet::Publish(p)) => assert_eq!(p.payload, "old"),
            other => panic!("the old connection's message, got {other:?}"),
        }
    }

    /// Pin 5: a publish without PUBACK when the connection fails moves to
    /// `pending` (with its old packet id), which rumqttc sends first on the
    /// next connection if the broker resumes the session: why the link
    /// clears `pending` at every CONNACK and replays the outbox instead.
    #[tokio::test]
    async fn unacknowledged_publishes_wait_in_pending_for_a_resumed_session() {
        let broker = FakeBroker::new();
        let (client, mut eventloop) = AsyncClient::new(broker.options(4), 16);
        let (mut s, _) = broker.connect(&mut eventloop, false, &[]).await;
        publish(&client, "old");
        assert_eq!(
            next(&mut eventloop).await,
            Event::Outgoing(Outgoing::Publish(1))
        );
        assert_eq!(read_publish(&mut s).await, (1, "old".into()));
        drop(s);
        next_error(&mut eventloop).await;
        let pending = |eventloop: &EventLoop| -> Vec<(u16, Vec<u8>)> {
            eventloop
                .pending
                .iter()
                .filter_map(|r| match r {
                    Request::Publish(p) => Some((p.pkid, p.payload.to_vec())),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(pending(&eventloop), [(1, b"old".to_vec())]);

        let (mut s, _) = broker.connect(&mut eventloop, true, &[]).await;
        assert_eq!(pending(&eventloop), [(1, b"old".to_vec())], "kept");
        assert_eq!(
            next(&mut eventloop).await,
            Event::Outgoing(Outgoing::Publish(1))
        );
        assert_eq!(read_publish(&mut s).await, (1, "old".into()), "sent again");
    }

    /// Pin 6: credentials set on the event loop's public `mqtt_options`
    /// are used at its next connection (`refresh_credentials`).
    #[tokio::test]
    async fn credentials_changed_on_the_event_loop_apply_at_the_next_connect() {
        let broker = FakeBroker::new();
        let mut options = broker.options(4);
        options.set_credentials("first", "secret");
        let (_client, mut eventloop) = AsyncClient::new(options, 16);
        let (s, connect) = broker.connect(&mut eventloop, false, &[]).await;
        assert_eq!(connect_username(&connect).as_deref(), Some("first"));
        drop(s);
        next_error(&mut eventloop).await;
        eventloop.mqtt_options.set_credentials("second", "secret");
        let (_s, connect) = broker.connect(&mut eventloop, false, &[]).await;
        assert_eq!(connect_username(&connect).as_deref(), Some("second"));
    }
}
