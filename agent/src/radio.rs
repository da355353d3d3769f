//! The radio task: bridges one [`Radio`] backend to the engine's channels.
//!
//! Reads: the backend's events, `delivery_rx` (content the engine wants
//! shown), `control_rx` (permit-join requests from commands). Writes: `event_tx` (check-ins, outcomes, radio state). It owns the
//! backend; nothing else calls it. A backend error never ends the agent: it
//! is reported as `RadioState::Down` and the task keeps trying.

use std::time::Duration;

use esl_hal::{Delivery, DeliveryFailure, Outcome, Radio, RadioErrorKind, RadioEvent, RadioState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::msg::RadioControl;

/// Deliveries the engine handed over and the backend has not taken: the
/// engine starts at most one per checked-in tag per batch.
pub(crate) const DELIVERY_CAPACITY: usize = 256;
/// Wait after a backend error before asking it again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Control requests not yet taken: operators ask one at a time.
pub(crate) const CONTROL_CAPACITY: usize = 4;

pub(crate) struct RadioTask<R: Radio> {
    pub radio: R,
    pub event_tx: mpsc::Sender<RadioEvent>,
    pub delivery_rx: mpsc::Receiver<Delivery>,
    pub control_rx: mpsc::Receiver<RadioControl>,
    pub shutdown: CancellationToken,
}

impl<R: Radio> RadioTask<R> {
    pub(crate) async fn run(mut self) {
        if self
            .event_tx
            .send(RadioEvent::State(RadioState::Up))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                event = self.radio.next_event() => match event {
                    Ok(event) => {
                        if self.event_tx.send(event).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let closed = e.kind() == RadioErrorKind::Closed;
                        warn!(error = %e, "radio error");
                        let down = RadioEvent::State(RadioState::Down { reason: e.to_string() });
                        if self.event_tx.send(down).await.is_err() || closed {
                            break;
                        }
                        tokio::select! {
                            _ = self.shutdown.cancelled() => break,
                            _ = tokio::time::sleep(ERROR_PAUSE) => {}
                        }
                    }
                },
                Some(control) = self.control_rx.recv() => match control {
                    RadioControl::PermitJoin { seconds } => {
                        match self.radio.permit_join(seconds).await {
                            Ok(()) => info!(seconds, "network open for joining"),
                            Err(e) => warn!(seconds, error = %e, "permit-join failed"),
                        }
                    }
                },
                Some(delivery) = self.delivery_rx.recv() => {
                    let (tag_id, task_id) = (delivery.tag_id.clone(), delivery.task_id.clone());
                    if let Err(e) = self.radio.deliver(delivery).await {
                        // The engine waits for exactly one outcome per
                        // delivery: make one up for a delivery the radio
                        // could not even take.
                        let retryable = e.kind() != RadioErrorKind::InvalidRequest;
                        let outcome = Outcome {
                            tag_id,
                            task_id,
                            result: Err(DeliveryFailure { retryable, reason: e.to_string() }),
                        };
                        if self.event_tx.send(RadioEvent::Outcome(outcome)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        info!("radio stopped");
    }
}
