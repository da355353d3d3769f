//! The demo back end's MQTT connection: client `GID_backend@@@pricing`,
//! subscribed with QoS 1 to its P2P reply topic (acks and command replies)
//! and to every agent's status.
//!
//! Owns the rumqttc event loop. One spawned task polls it and only forwards
//! what arrives over `incoming_tx`; it never waits on a publish
//! (LIBRARY-NOTES: that deadlocks when the request queue is full). The
//! caller publishes with `try_publish`, never `.await`ing the client, since
//! it is also the reader of `incoming_rx`.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use super::broker::EmbeddedBroker;

/// The back end's client id; the agent's `mqtt.ack_to`.
pub(crate) const BACKEND_ID: &str = "GID_backend@@@pricing";
/// rumqttc's request queue. The demo publishes at most one send tick's
/// worth of tasks at once (a few at the default rate); a full queue only
/// delays the rest to the next tick.
const REQUEST_CAPACITY: usize = 512;
/// Messages from the agent not yet read by the demo. The reader is a tight
/// loop; when it lags, the poller waits and rumqttd holds back (QoS 1).
const INCOMING_CAPACITY: usize = 256;
/// Until the broker thread listens, connecting is refused; this long it is
/// tried again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a clean DISCONNECT may take at the end.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) struct Backend {
    client: AsyncClient,
    incoming_rx: mpsc::Receiver<Bytes>,
    poller: JoinHandle<()>,
}

impl Backend {
    /// Connects to `broker` and subscribes to `topics`; returns once the
    /// broker confirmed the subscription. `max_packet` must cover the
    /// agent's largest status report, or rumqttc drops the connection.
    pub(crate) async fn connect(
        broker: &EmbeddedBroker,
        topics: &[String],
        max_packet: usize,
    ) -> anyhow::Result<Backend> {
        let mut options = MqttOptions::new(BACKEND_ID, "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(max_packet, max_packet);
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let filters: Vec<SubscribeFilter> = topics
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce))
            .collect();
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let event = tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .with_context(|| {
                    format!(
                        "the embedded broker on 127.0.0.1:{} did not answer",
                        broker.port
                    )
                })?;
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.try_subscribe_many(filters.clone())?
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        bail!("the embedded broker refused the back end's subscriptions");
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) if broker.failed() => {
                    bail!(
                        "the embedded broker could not listen on 127.0.0.1:{} ({e})",
                        broker.port
                    )
                }
                Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_CAPACITY);
        let poller = tokio::spawn(poll(client.clone(), eventloop, filters, incoming_tx));
        Ok(Backend {
            client,
            incoming_rx,
            poller,
        })
    }

    /// The next message from the agent; `None` once the poller has stopped.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        self.incoming_rx.recv().await
    }

    /// Queues a QoS 1 publish; false when rumqttc's queue is full.
    pub(crate) fn try_publish(&self, topic: &str, payload: Vec<u8>) -> bool {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
    }

    pub(crate) async fn disconnect(self) {
        let _ = self.client.try_disconnect();
        // Unblocks a poller waiting to hand over a message nobody reads.
        drop(self.incoming_rx);
        let mut poller = self.poller;
        if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut poller)
            .await
            .is_err()
        {
            poller.abort();
        }
    }
}

/// Polls the event loop until the DISCONNECT is out. A lost connection is
/// retried (rumqttc reconnects on the next poll) and subscribed again: the
/// session is clean.
async fn poll(
    client: AsyncClient,
    mut eventloop: EventLoop,
    filters: Vec<SubscribeFilter>,
    incoming_tx: mpsc::Sender<Bytes>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // An error means the demo stopped reading; keep polling
                // until the DISCONNECT it asked for has gone out.
                let _ = incoming_tx.send(p.payload).await;
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    warn!(error = %e, "back end: cannot subscribe again");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if incoming_tx.is_closed() {
                    return;
                }
                warn!(error = %e, "back end: connection to the embedded broker lost; reconnecting");
                tokio::time::sleep(RETRY_PAUSE * 4).await;
            }
        }
    }
}
