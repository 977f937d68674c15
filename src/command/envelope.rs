//! The AMQP properties of a command delivery that the worker honours, and
//! the try counters it keeps in the headers of a parked or deferred copy
//! (`retry.park`, contract §4; deferral, §7): the command carries its own
//! history, so nothing about it waits in the worker's memory.
//!
//! Those counters are the worker's own, so they are believed only on a
//! message that comes back from one of the worker's delay queues: its
//! latest `x-death` entry, which only the broker writes, names
//! `<command_queue>.park.*` or `<command_queue>.defer.*` with reason
//! `expired`. On any other message they are ignored, so a publisher cannot
//! skip parking, forge attempt counts or make a command look older.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::{outcome::Tries, trace_context::TraceParent};

/// Header: how often the command was parked so far.
pub const PARKED_HEADER: &str = "x-gewe-parked";
/// Header: GeWe attempts made for the command so far, over every try.
pub const ATTEMPTS_HEADER: &str = "x-gewe-attempts";
/// Header: how often the command was deferred for its account so far.
pub const DEFERRED_HEADER: &str = "x-gewe-deferred";
/// Header: when the command first arrived (RFC 3339), for `accounts.max_wait`.
pub const FIRST_RECEIVED_HEADER: &str = "x-gewe-first-received";
/// Set by the broker when a message is dead-lettered (here: by a delay
/// queue's TTL); the latest entry comes first.
const X_DEATH_HEADER: &str = "x-death";
/// Set by quorum queues on delivery; not part of the command.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// AMQP properties of the delivery that the worker honours.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// `message_id` property.
    message_id: Option<String>,
    /// `correlation_id` property.
    correlation_id: Option<String>,
    /// `reply_to` property.
    reply_to: Option<String>,
    /// The `traceparent` header (W3C trace context) as received, until
    /// [`Envelope::continue_trace`] takes it.
    traceparent: Option<String>,
    /// The `traceparent` the command's events carry, set by
    /// [`Envelope::continue_trace`].
    event_traceparent: Option<String>,
    /// `x-gewe-parked` and `x-gewe-deferred`, when trusted.
    tries: Tries,
    /// `x-gewe-attempts`: GeWe attempts made on earlier tries, when trusted.
    prior_attempts: u32,
    /// `x-gewe-first-received`, when trusted.
    first_received: Option<String>,
    /// `x-delivery-count` (quorum queues): earlier deliveries of this one.
    delivery_count: u32,
}

impl Envelope {
    /// Reads the properties the worker honours from a delivery consumed
    /// from `command_queue`.
    pub fn from_properties(p: &BasicProperties, command_queue: &str) -> Self {
        let s = |v: &Option<ShortString>| v.as_ref().map(|v| v.as_str().to_owned());
        let traceparent = p.headers().as_ref().and_then(|h| {
            h.inner().get("traceparent").and_then(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            })
        });
        let headers = p.headers().as_ref();
        let trusted = headers.filter(|h| back_from_delay_queue(h, command_queue));
        Self {
            message_id: s(p.message_id()),
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            traceparent,
            event_traceparent: None,
            tries: Tries {
                parked: read_counter(trusted, PARKED_HEADER),
                deferred: read_counter(trusted, DEFERRED_HEADER),
            },
            prior_attempts: read_counter(trusted, ATTEMPTS_HEADER),
            first_received: trusted.and_then(|h| read_text(h, FIRST_RECEIVED_HEADER)),
            delivery_count: read_counter(headers, DELIVERY_COUNT_HEADER),
        }
    }

    /// Makes the worker's handling of the command a child span of the
    /// caller's trace, when the command carries a valid `traceparent`
    /// (anything else is ignored, as the W3C spec says): returns the
    /// caller's header and the worker's new span id. From then on
    /// [`Envelope::event_traceparent`] names that span as the parent.
    pub fn continue_trace(&mut self) -> Option<(TraceParent, String)> {
        let parent = self.take_traceparent()?;
        let (span_id, header) = parent.child();
        self.event_traceparent = Some(header);
        Some((parent, span_id))
    }

    /// The command's `traceparent`, when valid (once: it is taken).
    pub fn take_traceparent(&mut self) -> Option<TraceParent> {
        TraceParent::parse(&self.traceparent.take()?)
    }

    /// Sets the `traceparent` the command's events carry: the worker's span
    /// for the delivery, as the exported trace has it.
    pub fn set_event_traceparent(&mut self, header: String) {
        self.event_traceparent = Some(header);
    }

    /// The `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The `correlation_id` property.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The `reply_to` property: where a copy of the result event goes.
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }

    /// The `traceparent` the command's events carry: the worker's span in
    /// the caller's trace (see [`Envelope::continue_trace`]).
    pub fn event_traceparent(&self) -> Option<&str> {
        self.event_traceparent.as_deref()
    }

    /// Times this command was parked and deferred so far.
    pub fn tries(&self) -> Tries {
        self.tries
    }

    /// When the command first arrived, if it came back from a delay queue.
    pub fn first_received(&self) -> Option<&str> {
        self.first_received.as_deref()
    }

    /// `x-gewe-attempts`: GeWe attempts made on earlier tries.
    pub fn prior_attempts(&self) -> u32 {
        self.prior_attempts
    }

    /// `x-delivery-count` (quorum queues): earlier deliveries of this one.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }
}

/// What a command's copy for its next try carries in its headers.
#[derive(Debug, Clone, Copy)]
pub struct NextTry<'a> {
    /// Times parked and deferred, this one included.
    pub tries: Tries,
    /// GeWe attempts so far.
    pub attempts: u32,
    /// When the command first arrived (RFC 3339).
    pub first_received: &'a str,
}

/// The properties of a command's copy for its next try: the command's
/// own (`traceparent` included), with the try counters set and the
/// broker's delivery count and dead-letter history removed.
pub fn with_tries(original: &BasicProperties, next: NextTry<'_>) -> BasicProperties {
    let mut inner = original
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    inner.remove(DELIVERY_COUNT_HEADER);
    // Only the copy's own trip through the delay queue may vouch for it.
    inner.remove(X_DEATH_HEADER);
    inner.remove("x-first-death-queue");
    inner.remove("x-first-death-reason");
    inner.remove("x-first-death-exchange");
    let count = |n: u32| AMQPValue::LongLongInt(i64::from(n));
    inner.insert(PARKED_HEADER.into(), count(next.tries.parked));
    inner.insert(DEFERRED_HEADER.into(), count(next.tries.deferred));
    inner.insert(ATTEMPTS_HEADER.into(), count(next.attempts));
    inner.insert(
        FIRST_RECEIVED_HEADER.into(),
        AMQPValue::LongString(next.first_received.into()),
    );
    original.clone().with_headers(FieldTable::from(inner))
}

/// Whether the latest `x-death` entry says the message expired in one of
/// `command_queue`'s delay queues.
fn back_from_delay_queue(headers: &FieldTable, command_queue: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get(X_DEATH_HEADER) else {
        return false;
    };
    let Some(AMQPValue::FieldTable(latest)) = deaths.as_slice().first() else {
        return false;
    };
    let queue = read_text(latest, "queue").unwrap_or_default();
    let reason = read_text(latest, "reason").unwrap_or_default();
    let delay_queue = queue
        .strip_prefix(command_queue)
        .is_some_and(|rest| rest.starts_with(".park.") || rest.starts_with(".defer."));
    delay_queue && reason == "expired"
}

/// A text header (long or short string).
fn read_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A try counter from the headers; 0 when absent or not a count.
fn read_counter(headers: Option<&FieldTable>, name: &str) -> u32 {
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

    /// `properties` as they come back from `queue` after its TTL.
    fn dead_lettered(properties: &BasicProperties, queue: &str, reason: &str) -> BasicProperties {
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString(queue.into()));
        death.insert("reason".into(), AMQPValue::LongString(reason.into()));
        let mut inner = properties.headers().clone().unwrap_or_default();
        inner.insert(
            X_DEATH_HEADER.into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        properties.clone().with_headers(inner)
    }

    #[test]
    fn counters_are_believed_only_back_from_a_delay_queue() {
        let original = BasicProperties::default().with_message_id("m".into());
        let next = NextTry {
            tries: Tries {
                parked: 2,
                deferred: 3,
            },
            attempts: 7,
            first_received: "2026-12-03T10:00:00.000Z",
        };
        let copy = with_tries(&original, next);
        assert_eq!(copy.message_id(), original.message_id());
        for (queue, reason, trusted) in [
            ("cmds.defer.1m", "expired", true),
            ("cmds.park.10m", "expired", true),
            ("cmds.defer.1m", "rejected", false),
            ("other.defer.1m", "expired", false),
            ("cmds", "expired", false),
        ] {
            let e = Envelope::from_properties(&dead_lettered(&copy, queue, reason), "cmds");
            let want = if trusted { (2, 3, 7) } else { (0, 0, 0) };
            assert_eq!(
                (e.tries().parked, e.tries().deferred, e.prior_attempts()),
                want,
                "{queue} {reason}"
            );
            assert_eq!(e.first_received().is_some(), trusted);
        }
        // Published straight to the command queue, forged: ignored.
        let forged = Envelope::from_properties(&copy, "cmds");
        assert_eq!(forged.tries(), Tries::default());
        // The next copy drops the old history.
        let again = with_tries(&dead_lettered(&copy, "cmds.defer.1m", "expired"), next);
        assert!(
            !again
                .headers()
                .as_ref()
                .expect("headers")
                .inner()
                .contains_key(X_DEATH_HEADER)
        );
    }

    #[test]
    fn bad_counter_values_count_as_zero() {
        let mut odd = FieldTable::default();
        odd.insert(PARKED_HEADER.into(), AMQPValue::LongLongInt(-3));
        odd.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongString("x".into()));
        assert_eq!(read_counter(Some(&odd), PARKED_HEADER), 0);
        assert_eq!(read_counter(Some(&odd), ATTEMPTS_HEADER), 0);
        assert_eq!(read_counter(None, PARKED_HEADER), 0);
    }

    #[test]
    fn events_continue_the_callers_trace_and_a_bad_header_is_ignored() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString(header.into()));
        let properties = BasicProperties::default().with_headers(headers);
        let mut envelope = Envelope::from_properties(&properties, "cmds");
        assert_eq!(envelope.event_traceparent(), None);
        let (parent, span_id) = envelope.continue_trace().expect("a valid header");
        assert_eq!(parent.parent_id, "00f067aa0ba902b7");
        assert_eq!(
            envelope.event_traceparent(),
            Some(format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span_id}-01").as_str())
        );
        let mut odd = FieldTable::default();
        odd.insert("traceparent".into(), AMQPValue::LongString("00-zz".into()));
        let mut envelope =
            Envelope::from_properties(&BasicProperties::default().with_headers(odd), "cmds");
        assert!(envelope.continue_trace().is_none());
        assert_eq!(envelope.event_traceparent(), None);
    }
}
