//! The AMQP properties of a command delivery that the worker honours, and
//! the try counters it keeps in the headers of a parked copy (`retry.park`,
//! contract §4): the command carries its own history, so nothing about it
//! waits in the worker's memory.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::trace_context::TraceParent;

/// Header: how often the command was parked so far.
pub const PARKED_HEADER: &str = "x-gewe-parked";
/// Header: GeWe attempts made for the command so far, over every try.
pub const ATTEMPTS_HEADER: &str = "x-gewe-attempts";
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
    /// `x-gewe-parked`: times this command was parked so far (`retry.park`).
    parked: u32,
    /// `x-gewe-attempts`: GeWe attempts made on earlier tries.
    prior_attempts: u32,
    /// `x-delivery-count` (quorum queues): earlier deliveries of this one.
    delivery_count: u32,
}

impl Envelope {
    /// Reads the properties the worker honours from a delivery.
    pub fn from_properties(p: &BasicProperties) -> Self {
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
        Self {
            message_id: s(p.message_id()),
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            traceparent,
            event_traceparent: None,
            parked: read_counter(headers, PARKED_HEADER),
            prior_attempts: read_counter(headers, ATTEMPTS_HEADER),
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

    /// `x-gewe-parked`: times this command was parked so far.
    pub fn parked(&self) -> u32 {
        self.parked
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

/// The properties of a command's copy for its next try (`retry.park`):
/// the command's own, with the try counters set and the broker's
/// delivery count removed.
pub fn with_try_counters(
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

    #[test]
    fn counters_survive_a_round_trip_and_bad_values_count_as_zero() {
        let original = BasicProperties::default().with_message_id("m".into());
        let parked = with_try_counters(&original, 2, 7);
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

    #[test]
    fn events_continue_the_callers_trace_and_a_bad_header_is_ignored() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString(header.into()));
        let properties = BasicProperties::default().with_headers(headers);
        let mut envelope = Envelope::from_properties(&properties);
        assert_eq!(envelope.event_traceparent(), None);
        let (parent, span_id) = envelope.continue_trace().expect("a valid header");
        assert_eq!(parent.parent_id, "00f067aa0ba902b7");
        assert_eq!(
            envelope.event_traceparent(),
            Some(format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span_id}-01").as_str())
        );
        let mut odd = FieldTable::default();
        odd.insert("traceparent".into(), AMQPValue::LongString("00-zz".into()));
        let mut envelope = Envelope::from_properties(&BasicProperties::default().with_headers(odd));
        assert!(envelope.continue_trace().is_none());
        assert_eq!(envelope.event_traceparent(), None);
    }
}
