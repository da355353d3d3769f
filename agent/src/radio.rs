//! The radio task: bridges one [`Radio`] backend to the engine's channels.
//!
//! Reads: the backend's events, `delivery_rx` (content the engine wants
//! shown), `control_rx` (permit-join and channel-change requests from commands). Writes: `event_tx` (check-ins, outcomes, radio state). It owns the
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
                        // The backend's own error, if it gave one, is the
                        // source: shown after the message, once.
                        let reason = crate::report::chain(&e);
                        warn!(error = %reason, "radio error");
                        let down = RadioEvent::State(RadioState::Down { reason });
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
                            Err(e) => warn!(seconds, error = %crate::report::chain(&e), "permit-join failed"),
                        }
                    }
                    RadioControl::ChangeChannel { channel } => {
                        match self.radio.change_channel(channel).await {
                            Ok(()) => info!(channel, "network moved to the new channel"),
                            Err(e) => warn!(channel, error = %crate::report::chain(&e), "channel change failed"),
                        }
                    }
                },
                Some(delivery) = self.delivery_rx.recv() => {
                    let (tag_id, task_id) = (delivery.tag_id.clone(), delivery.task_id.clone());
                    if let Err(e) = self.radio.deliver(delivery).await {
                        // The engine waits for exactly one outcome per
                        // delivery: make one up for a delivery the radio
                        // could not even take.
                        let retryable = e.kind().is_retryable();
                        let outcome = Outcome {
                            tag_id,
                            task_id,
                            result: Err(DeliveryFailure { retryable, reason: crate::report::chain(&e) }),
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

#[cfg(test)]
mod tests {
    use esl_hal::RadioError;

    use super::*;

    /// A radio whose deliveries fail with a backend error underneath.
    struct Refusing;

    impl Radio for Refusing {
        async fn next_event(&mut self) -> Result<RadioEvent, RadioError> {
            std::future::pending().await
        }

        async fn deliver(&mut self, _: Delivery) -> Result<(), RadioError> {
            let cause =
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bitmap is 10 bytes short");
            Err(RadioError::new(RadioErrorKind::InvalidRequest, "image refused").with_source(cause))
        }
    }

    #[tokio::test]
    async fn a_refused_delivery_is_one_final_outcome_that_keeps_the_backends_cause() {
        let (event_tx, mut event_rx) = mpsc::channel(8);
        let (delivery_tx, delivery_rx) = mpsc::channel(8);
        let (_control_tx, control_rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let task = RadioTask {
            radio: Refusing,
            event_tx,
            delivery_rx,
            control_rx,
            shutdown: shutdown.clone(),
        };
        let running = tokio::spawn(task.run());
        assert_eq!(
            event_rx.recv().await,
            Some(RadioEvent::State(RadioState::Up))
        );
        delivery_tx
            .send(Delivery {
                tag_id: "T1".into(),
                task_id: "t1".into(),
                content: b"{}".to_vec(),
                content_hash: "h".into(),
            })
            .await
            .unwrap();
        let Some(RadioEvent::Outcome(outcome)) = event_rx.recv().await else {
            panic!("an outcome for the refused delivery");
        };
        assert_eq!(outcome.task_id, "t1");
        let failure = outcome.result.unwrap_err();
        assert!(!failure.retryable, "an invalid request is final");
        assert!(
            failure
                .reason
                .ends_with("image refused: bitmap is 10 bytes short"),
            "{}",
            failure.reason
        );
        shutdown.cancel();
        running.await.unwrap();
    }
}
