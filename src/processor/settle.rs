//! Publishing a delivery's event and settling the delivery.
//!
//! Settling follows the event: ack after a confirmed event, reject to the
//! dead-letter exchange after a confirmed `invalid_command` event, requeue
//! (after a pause) when the event was not confirmed.

use super::{Inbound, Processor};
use crate::{
    broker::settle,
    error_kind::ErrorKind,
    event::ResultEvent,
    meters::{Requeue, meters},
    outbound::publish_event,
};

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
            .is_some_and(|limit| d.envelope.delivery_count() >= limit)
    }

    /// Acks a delivery whose event was confirmed.
    pub(super) async fn ack(&self, d: &Inbound) {
        settle::ack(&d.delivery, "command").await;
    }

    /// Publishes an `invalid_command` event, then rejects the delivery
    /// without requeue so the broker dead-letters the original.
    pub(super) async fn refuse(&self, event: &ResultEvent<'_>, d: &Inbound) {
        if !self.publish(event, d).await {
            return self.requeue(d, Requeue::PublishFailed).await;
        }
        settle::dead_letter(&d.delivery, "command").await;
    }

    /// Returns the delivery to the queue after [`settle::REQUEUE_PAUSE`].
    pub(super) async fn requeue(&self, d: &Inbound, reason: Requeue) {
        meters().requeued(reason).increment(1);
        settle::requeue(&d.delivery, "command").await;
    }
}
