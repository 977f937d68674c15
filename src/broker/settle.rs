//! Settling a delivery, commands and callbacks alike: ack it, reject it
//! without requeue (the broker dead-letters it), or requeue it after
//! [`REQUEUE_PAUSE`].
//!
//! None of these can fail in a way that loses the delivery: when the
//! channel is gone or the broker does not take the answer, the broker
//! redelivers the message once the channel closes. That is logged, with
//! `what` the delivery is.

use std::time::Duration;

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};

/// Pause before requeueing, so a persistent problem does not become a hot
/// redelivery loop.
pub const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

/// Acks `delivery` (a `what`: "command", "callback").
pub async fn ack(delivery: &Delivery, what: &'static str) {
    let acked = delivery.acker.ack(BasicAckOptions::default()).await;
    report(acked, what, "acked");
}

/// Rejects `delivery` without requeue, so the broker dead-letters it.
pub async fn dead_letter(delivery: &Delivery, what: &'static str) {
    let rejected = delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await;
    report(rejected, what, "dead-lettered");
}

/// Returns `delivery` to its queue after [`REQUEUE_PAUSE`].
pub async fn requeue(delivery: &Delivery, what: &'static str) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    let nack = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.acker.nack(nack).await {
        tracing::warn!(error = %e, what, "requeue failed; the broker redelivers it when the channel closes");
    }
}

fn report(result: Result<bool, lapin::Error>, what: &'static str, how: &'static str) {
    match result {
        Ok(true) => tracing::debug!(what, how, "delivery settled"),
        Ok(false) => tracing::warn!(
            what,
            how,
            "could not settle the delivery: its channel is gone; the broker will redeliver it"
        ),
        Err(e) => tracing::warn!(
            what,
            how,
            error = %e,
            "could not settle the delivery; the broker will redeliver it"
        ),
    }
}
