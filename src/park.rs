//! Parking commands in the broker through outages (`retry.park`, contract §4).
//!
//! A command that ends `app_offline` or `upstream_unavailable` while delays
//! remain is republished, unchanged but for two headers that count its
//! tries, to a delay queue `<amqp.command_queue>.park.<delay>`. The queue's
//! message TTL is the delay and its dead-letter target is the command queue,
//! so the broker hands the command back when the delay has passed: nothing
//! waits in the worker's memory, and a restart loses nothing.
//!
//! The delay queues have the command queue's type. Quorum queues on
//! RabbitMQ 3.10 honour `x-message-ttl` (checked against 3.10.8) and offer
//! at-least-once dead-lettering (`x-dead-letter-strategy`, which needs
//! `x-overflow: reject-publish`), so a parked command cannot be lost on its
//! way back, and it is replicated like the commands themselves. Classic
//! queues dead-letter at most once.

use std::time::Duration;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};

use crate::config::QueueType;

/// Header: how often the command was parked so far.
pub const PARKED_HEADER: &str = "x-gewe-parked";
/// Header: GeWe attempts made for the command so far, over every try.
pub const ATTEMPTS_HEADER: &str = "x-gewe-attempts";
/// Set by quorum queues on delivery; not part of the command.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// `1m`, `10m`, `1h30m`: the delay as the queue name shows it.
pub fn label(delay: Duration) -> String {
    humantime::format_duration(delay)
        .to_string()
        .replace(' ', "")
}

/// The delay queue of `command_queue` for `delay`.
pub fn queue_name(command_queue: &str, delay: Duration) -> String {
    format!("{command_queue}.park.{}", label(delay))
}

/// The arguments of the delay queue for `delay`, exactly as declared.
pub fn queue_arguments(command_queue: &str, delay: Duration, queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(command_queue)),
    );
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    args
}

/// Where a command goes when it cannot be carried out now.
#[derive(Debug, Clone)]
pub struct Parking {
    command_queue: String,
    delays: Vec<Duration>,
}

/// A delay queue to park a command in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The delay queue.
    pub queue: String,
    /// Its delay.
    pub delay: Duration,
}

impl Parking {
    /// Parking into `command_queue`'s delay queues for `delays` (empty: off).
    pub fn new(command_queue: &str, delays: &[Duration]) -> Self {
        Self {
            command_queue: command_queue.to_owned(),
            delays: delays.to_vec(),
        }
    }

    /// The delay queue for a command parked `parked` times so far, while
    /// delays remain.
    pub fn next(&self, parked: u32) -> Option<Slot> {
        let delay = *self.delays.get(usize::try_from(parked).ok()?)?;
        Some(Slot {
            queue: queue_name(&self.command_queue, delay),
            delay,
        })
    }
}

/// The properties of the parked copy: the command's own, with the try
/// counters set.
pub fn parked_properties(
    original: &BasicProperties,
    parked: u32,
    attempts: u32,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let mut inner = headers.inner().clone();
    inner.remove(DELIVERY_COUNT_HEADER);
    inner.insert(
        PARKED_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(parked)),
    );
    inner.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    headers = FieldTable::from(inner);
    original.clone().with_headers(headers)
}

/// A try counter from the headers; 0 when absent or not a count.
pub fn read_counter(headers: Option<&FieldTable>, name: &str) -> u32 {
    let Some(value) = headers.and_then(|h| h.inner().get(name)) else {
        return 0;
    };
    let n: Option<i64> = match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_name_their_queues_and_run_out() {
        let parking = Parking::new(
            "cmds",
            &[Duration::from_secs(60), Duration::from_secs(5400)],
        );
        assert_eq!(
            parking.next(0).map(|s| s.queue),
            Some("cmds.park.1m".into())
        );
        assert_eq!(
            parking.next(1).map(|s| s.queue),
            Some("cmds.park.1h30m".into())
        );
        assert_eq!(parking.next(2), None);
        assert_eq!(Parking::new("cmds", &[]).next(0), None);
    }

    #[test]
    fn counters_survive_a_round_trip_and_bad_values_count_as_zero() {
        let original = BasicProperties::default().with_message_id("m".into());
        let parked = parked_properties(&original, 2, 7);
        let headers = parked.headers().as_ref();
        assert_eq!(read_counter(headers, PARKED_HEADER), 2);
        assert_eq!(read_counter(headers, ATTEMPTS_HEADER), 7);
        assert_eq!(parked.message_id(), original.message_id());
        let mut odd = FieldTable::default();
        odd.insert(PARKED_HEADER.into(), AMQPValue::LongLongInt(-3));
        odd.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongString("x".into()));
        assert_eq!(read_counter(Some(&odd), PARKED_HEADER), 0);
        assert_eq!(read_counter(Some(&odd), ATTEMPTS_HEADER), 0);
        assert_eq!(read_counter(None, PARKED_HEADER), 0);
    }
}
