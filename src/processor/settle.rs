//! How a delivery ends: its result event published, then the delivery
//! settled; or, for a command whose account or GeWe is unreachable while
//! `retry.park` delays remain, a copy parked in a delay queue and the
//! delivery acked (no event: it comes with the last try).
//!
//! Settling follows what was published: ack after a confirmed event or
//! parked copy, reject to the dead-letter exchange after a confirmed
//! `invalid_command` event, requeue (after a pause) when nothing was
//! confirmed.

use super::{CommandDelivery, Processor};
use crate::{
    broker::settle,
    command::{self, NextTry},
    error_kind::ErrorKind,
    event::ResultEvent,
    idempotency::Record,
    meters::{Requeue, meters},
    outbound::publish_event,
    outcome::Tries,
    park::Slot,
};

impl Processor {
    /// Publishes `event` with a confirm; true when the broker took it. A
    /// confirmed `succeeded` event's `v3` is remembered for callbacks before
    /// the delivery is settled.
    pub(super) async fn publish(
        &self,
        event: &ResultEvent<'_>,
        delivery: &CommandDelivery,
    ) -> bool {
        let span = delivery
            .trace
            .as_ref()
            .map(|trace| trace.publish(event.routing_key()));
        // Boxed: it holds two publishes at once (result exchange and
        // `reply_to`); inline, every path that publishes would carry them.
        let published = Box::pin(publish_event(
            &self.result_exchange,
            &delivery.envelope,
            event,
            delivery.session.publisher(),
        ))
        .await;
        let kind = event.error_kind().map(ErrorKind::as_str);
        if let Some(span) = span {
            span.end(event.status.as_str(), kind, published.is_ok());
        }
        match published {
            Ok(()) => {
                if let Some(trace) = &delivery.trace {
                    trace.outcome(event.status.as_str(), kind);
                }
                meters().result_published(event.error_kind()).increment(1);
                if let Some(matcher) = &self.matcher {
                    // The event is out: remembering it must not stop at
                    // the hold deadline.
                    matcher
                        .confirm(event, &delivery.envelope, &delivery.halt.without_deadline())
                        .await;
                }
                true
            }
            Err(e) => {
                meters().results_publish_failures.increment(1);
                // One line per command, saying what the lost event said: a
                // success must never go silent.
                let status = event.status.as_str();
                let v3 = event.v3.as_deref();
                let then = if self.is_last_delivery(delivery) {
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
                    delivery.session.publishing_channel_broke();
                }
                false
            }
        }
    }

    /// Whether a requeue now makes the broker dead-letter the delivery:
    /// a quorum queue delivers a message while its `x-delivery-count` (0 on
    /// the first delivery) is at most the limit. Classic queues have none.
    fn is_last_delivery(&self, delivery: &CommandDelivery) -> bool {
        self.delivery_limit
            .is_some_and(|limit| delivery.envelope.delivery_count() >= limit)
    }

    /// Acks a delivery whose event was confirmed.
    pub(super) async fn ack(&self, delivery: &CommandDelivery) {
        settle::ack(&delivery.message, "command").await;
    }

    /// Publishes an `invalid_command` event, then rejects the delivery
    /// without requeue so the broker dead-letters the original.
    pub(super) async fn refuse(&self, event: &ResultEvent<'_>, delivery: &CommandDelivery) {
        if !self.publish(event, delivery).await {
            return self.requeue(delivery, Requeue::PublishFailed).await;
        }
        settle::dead_letter(&delivery.message, "command").await;
    }

    /// Returns the delivery to the queue after [`settle::REQUEUE_PAUSE`].
    pub(super) async fn requeue(&self, delivery: &CommandDelivery, reason: Requeue) {
        meters().requeued(reason).increment(1);
        if let Some(trace) = &delivery.trace {
            trace.outcome("requeued", None);
        }
        settle::requeue(&delivery.message, "command").await;
    }

    /// The delay queue for `record`'s command, when its outcome may be
    /// tried again later and delays remain.
    pub(super) fn park_slot(&self, record: &Record, delivery: &CommandDelivery) -> Option<Slot> {
        if !record.outcome().result.as_ref().err()?.kind.parkable() {
            return None;
        }
        self.parking.next(delivery.envelope.tries().parked)
    }

    /// Publishes the command, unchanged but for its try counters, to
    /// `slot`'s delay queue; acks the delivery once that copy is confirmed,
    /// requeues it otherwise. No event: it comes with the last try.
    pub(super) async fn park(&self, slot: Slot, attempts: u32, delivery: &CommandDelivery) {
        let earlier = delivery.envelope.tries();
        let tries = Tries {
            parked: earlier.parked.saturating_add(1),
            deferred: earlier.deferred,
        };
        let properties = command::with_tries(
            &delivery.message.properties,
            NextTry {
                tries,
                attempts,
                first_received: delivery
                    .envelope
                    .first_received()
                    .unwrap_or(&delivery.received_at),
            },
        );
        if self
            .send_to_delay_queue(&slot.queue, slot.delay, properties, delivery)
            .await
        {
            meters().commands_parked.increment(1);
            if let Some(trace) = &delivery.trace {
                trace.outcome("parked", None);
            }
            tracing::info!(
                queue = %slot.queue,
                delay_ms = slot.delay.as_millis() as u64,
                parked = tries.parked,
                attempts,
                "parked the command; it comes back after the delay"
            );
            self.ack(delivery).await;
        } else {
            self.requeue(delivery, Requeue::PublishFailed).await;
        }
    }
}
