//! Callbacks that arrive before the worker can match them (contract §6):
//! a member who needs no verification accepts at once, so GeWe's
//! `ModContacts` callback can beat GeWe's HTTP answer, or the `succeeded`
//! event's confirm, to the worker.
//!
//! Such a callback is published (confirmed) to the delay queue
//! `<callbacks.queue>.early`, whose messages return to the callbacks queue
//! after [`EARLY_DELAY`], and only then acked; it carries the number of
//! tries so far in [`TRIES_HEADER`]. Once the tries cover
//! `callbacks.early_grace` it counts as unmatched. The delay lives in the
//! broker and the state in the store, so this holds across replicas (with
//! Redis) and restarts, and no delivery is held while it waits.
//!
//! The count is honoured only on a message that came back from that delay
//! queue (its `x-death` names it): a publisher cannot make a callback skip
//! its tries.

use std::time::Duration;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};

use crate::{broker::topology::EARLY_DELAY, config::QueueType};

/// Header with the times a callback went through the early delay queue.
pub const TRIES_HEADER: &str = "x-gewe-early";

/// The early delay queue and how long callbacks go round it.
#[derive(Debug, Clone)]
pub struct Early {
    /// `<callbacks.queue>.early`.
    pub queue: String,
    /// `callbacks.queue`, where the delay queue returns callbacks.
    pub returns_to: String,
    /// `amqp.queue_type`, to declare the delay queue again when missing.
    pub queue_type: QueueType,
    /// `callbacks.early_grace`.
    pub grace: Duration,
}

impl Early {
    /// Tries of `properties`' callback so far: 0 unless it came back from
    /// this delay queue.
    pub fn tries(&self, properties: &BasicProperties) -> u32 {
        let Some(headers) = properties.headers().as_ref() else {
            return 0;
        };
        if !died_in(headers, &self.queue) {
            return 0;
        }
        match headers.inner().get(TRIES_HEADER) {
            Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
            Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether a callback tried `tries` times may go round once more.
    pub fn may_wait(&self, tries: u32) -> bool {
        EARLY_DELAY.saturating_mul(tries) < self.grace
    }
}

/// Whether `headers`' `x-death` (set by the broker when it dead-letters a
/// message) names `queue`.
fn died_in(headers: &FieldTable, queue: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return false;
    };
    deaths.as_slice().iter().any(|death| match death {
        AMQPValue::FieldTable(death) => match death.inner().get("queue") {
            Some(AMQPValue::LongString(name)) => name.as_bytes() == queue.as_bytes(),
            Some(AMQPValue::ShortString(name)) => name.as_str() == queue,
            _ => false,
        },
        _ => false,
    })
}

/// `properties` with [`TRIES_HEADER`] set to `tries` and, when the callback
/// did not come through the endpoint, `received_at` as the time it arrived
/// (so the accepted event says when it was first seen).
pub fn with_tries(
    properties: &BasicProperties,
    tries: u32,
    received_header: &str,
    received_at: &str,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        TRIES_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(tries)),
    );
    if !headers.inner().contains_key(received_header) {
        headers.insert(
            received_header.into(),
            AMQPValue::LongString(received_at.into()),
        );
    }
    properties
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldArray;

    use super::*;

    fn early() -> Early {
        Early {
            queue: "cb.early".into(),
            returns_to: "cb".into(),
            queue_type: QueueType::Quorum,
            grace: Duration::from_secs(10),
        }
    }

    fn with_death(queue: &str, tries: i64) -> BasicProperties {
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString(queue.into()));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        headers.insert(TRIES_HEADER.into(), AMQPValue::LongLongInt(tries));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn tries_count_only_on_a_message_back_from_the_delay_queue() {
        let e = early();
        assert_eq!(e.tries(&BasicProperties::default()), 0);
        assert_eq!(e.tries(&with_death("cb.early", 3)), 3);
        // Forged: no x-death, or another queue's.
        let mut forged = FieldTable::default();
        forged.insert(TRIES_HEADER.into(), AMQPValue::LongLongInt(99));
        assert_eq!(e.tries(&BasicProperties::default().with_headers(forged)), 0);
        assert_eq!(e.tries(&with_death("other", 99)), 0);
        assert_eq!(e.tries(&with_death("cb.early", -1)), 0);
    }

    #[test]
    fn a_callback_waits_until_its_tries_cover_the_grace() {
        let e = early();
        let rounds = (0..100).take_while(|t| e.may_wait(*t)).count() as u32;
        assert_eq!(rounds, 5, "10s of 2s rounds");
        let p = with_tries(&BasicProperties::default(), 2, "x-at", "t0");
        let headers = p.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get(TRIES_HEADER),
            Some(&AMQPValue::LongLongInt(2))
        );
        assert_eq!(
            headers.inner().get("x-at"),
            Some(&AMQPValue::LongString("t0".into()))
        );
    }
}
