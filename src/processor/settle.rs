//! Publishing a delivery's event and settling the delivery.
//!
//! Settling follows the event: ack after a confirmed event, reject to the
//! dead-letter exchange after a confirmed `invalid_command` event, requeue
//! (after a pause) when the event was not confirmed.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

use super::{Inbound, Processor};
use crate::{
    error_kind::ErrorKind,
    event::ResultEvent,
    meters::{Requeue, meters},
    outbound::publish_event,
};

/// Pause before requeueing, so a persistent problem does not become a hot
/// redelivery loop.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

impl Processor {
    /// Publishes `event` with a confirm; true when the broker took it. A
    /// confirmed `succeeded` event's `v3` is remembered for callbacks before
    /// the delivery is settled.
    pub(super) async fn publish(&self, event: &ResultEvent<'_>, d: &Inbound) -> bool {
        // Boxed: it holds two publishes at once (result exchange and
        // `reply_to`); inline, every path that publishes would carry them.
        match Box::pin(publish_event(
            &self.result_exchange,
            &d.envelope,
            event,
            d.session.publisher(),
        ))
        .await
        {
            Ok(()) => {
                meters().result_published(event.error_kind()).increment(1);
                if let Some(callbacks) = &self.callbacks {
                    callbacks.remember(event, &d.envelope, &d.halt).await;
                }
                true
            }
            Err(e) => {
                meters().results_publish_failures.increment(1);
                // One line per command, saying what the lost event said: a
                // success must never go silent.
                let status = event.status.as_str();
                let kind = event.error_kind().map(ErrorKind::as_str);
                let v3 = event.v3.as_deref();
                let then = if self.is_last_delivery(d) {
                    "the broker dead-letters the command now: its last delivery under amqp.delivery_limit"
                } else {
                    "the command goes back to the queue"
                };
                if e.is_unroutable() {
                    tracing::warn!(status, kind, v3, %then, "result event unroutable: no queue is bound to the result exchange for it");
                } else {
                    tracing::error!(error = %e, status, kind, v3, %then, "result event not confirmed");
                }
                if e.breaks_channel() {
                    // Only a new session can publish again.
                    d.session.publishing_channel_broke();
                }
                false
            }
        }
    }

    /// Whether a requeue now makes the broker dead-letter the delivery:
    /// a quorum queue delivers a message while its `x-delivery-count` (0 on
    /// the first delivery) is at most the limit. Classic queues have none.
    fn is_last_delivery(&self, d: &Inbound) -> bool {
        self.delivery_limit
            .is_some_and(|limit| d.envelope.delivery_count >= limit)
    }

    /// Acks a delivery whose event was confirmed.
    pub(super) async fn ack(&self, d: &Inbound) {
        let acked = d.delivery.acker.ack(BasicAckOptions::default()).await;
        report_settled(acked, "acked");
    }

    /// Publishes an `invalid_command` event, then rejects the delivery
    /// without requeue so the broker dead-letters the original.
    pub(super) async fn refuse(&self, event: &ResultEvent<'_>, d: &Inbound) {
        if !self.publish(event, d).await {
            return self.requeue(d, Requeue::PublishFailed).await;
        }
        let rejected = d
            .delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await;
        report_settled(rejected, "dead-lettered");
    }

    /// Returns the delivery to the queue after [`REQUEUE_PAUSE`].
    pub(super) async fn requeue(&self, d: &Inbound, reason: Requeue) {
        meters().requeued(reason).increment(1);
        tokio::time::sleep(REQUEUE_PAUSE).await;
        let nack = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        if let Err(e) = d.delivery.acker.nack(nack).await {
            tracing::warn!(error = %e, "requeue failed; the broker redelivers the command when the channel closes");
        }
    }
}

fn report_settled(result: Result<bool, lapin::Error>, how: &str) {
    match result {
        Ok(true) => tracing::debug!(how, "result confirmed; delivery settled"),
        Ok(false) => tracing::warn!(
            how,
            "result confirmed but the channel is gone; the broker will redeliver the command"
        ),
        Err(e) => {
            tracing::warn!(how, error = %e, "result confirmed but settling failed; the broker will redeliver the command")
        }
    }
}
