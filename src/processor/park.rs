//! Parking a command whose account or GeWe is unreachable (`retry.park`).

use super::{Inbound, Processor};
use crate::{
    command,
    idempotency::Record,
    meters::{Requeue, meters},
    park::Slot,
};

impl Processor {
    /// The delay queue for `record`'s command, when its outcome may be
    /// tried again later and delays remain.
    pub(super) fn park_slot(&self, record: &Record, d: &Inbound) -> Option<Slot> {
        if !record.outcome().result.as_ref().err()?.kind.parkable() {
            return None;
        }
        self.parking.next(d.envelope.parked())
    }

    /// Publishes the command, unchanged but for its try counters, to
    /// `slot`'s delay queue; acks the delivery once that copy is confirmed,
    /// requeues it otherwise. No event: it comes with the last try.
    pub(super) async fn park(&self, slot: Slot, attempts: u32, d: &Inbound) {
        let parked = d.envelope.parked().saturating_add(1);
        let properties = command::with_try_counters(&d.delivery.properties, parked, attempts);
        let published = d
            .session
            .publisher()
            .publish("", &slot.queue, true, &d.delivery.data, properties)
            .await;
        match published {
            Ok(()) => {
                meters().commands_parked.increment(1);
                tracing::info!(
                    queue = %slot.queue,
                    delay_ms = slot.delay.as_millis() as u64,
                    parked,
                    attempts,
                    "parked the command; it comes back after the delay"
                );
                self.ack(d).await;
            }
            Err(e) => {
                tracing::error!(error = %e, queue = %slot.queue, "could not park the command; requeueing it");
                if e.breaks_channel() {
                    d.session.publishing_channel_broke();
                }
                self.requeue(d, Requeue::PublishFailed).await;
            }
        }
    }
}
