//! Publication of result events (contract §4): properties, the result
//! exchange and the `reply_to` copy, and when an event counts as delivered.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::{
    broker::{PublishError, Publisher},
    command::Envelope,
    event::ResultEvent,
};

/// Why a result event is not known to be safe in the broker.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The event could not be encoded; never published as something else.
    #[error("the result event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    /// The broker did not take it.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl OutboundError {
    /// Whether no queue would take the event (nothing bound for it).
    pub fn is_unroutable(&self) -> bool {
        match self {
            OutboundError::Publish(PublishError::Unroutable { .. }) => true,
            OutboundError::Publish(
                PublishError::Nacked { .. }
                | PublishError::Broker { .. }
                | PublishError::NotConfirmed,
            )
            | OutboundError::Encode(_) => false,
        }
    }

    /// Whether the publishing channel is unusable afterwards, so only a
    /// new session can publish again.
    pub fn breaks_channel(&self) -> bool {
        match self {
            OutboundError::Encode(_) => false,
            OutboundError::Publish(e) => e.breaks_channel(),
        }
    }
}

/// Publishes the event to the result exchange and, when asked, a copy to
/// `reply_to`, both `mandatory` and confirmed. The event is safe once at
/// least one queue holds it: an unroutable main event is tolerated only
/// when the requester's reply queue took the copy, and a vanished reply
/// queue is tolerated when the result exchange routed the event.
pub async fn publish_event(
    result_exchange: &str,
    envelope: &Envelope,
    event: &ResultEvent<'_>,
    publisher: &Publisher,
) -> Result<(), OutboundError> {
    // A result event is 300-600 bytes: one allocation instead of a 128-byte
    // start and two or three doublings.
    let mut body = Vec::with_capacity(640);
    event.write_json(&mut body)?;
    let properties = event_properties(envelope, event);
    let routing_key = event.routing_key();
    let Some(reply_to) = envelope.reply_to() else {
        // The common case: the properties are moved, not copied.
        return Ok(publisher
            .publish(result_exchange, routing_key, true, &body, properties)
            .await?);
    };
    let main = publisher.publish(
        result_exchange,
        routing_key,
        true,
        &body,
        properties.clone(),
    );
    let reply = publisher.publish("", reply_to, true, &body, properties);
    match tokio::join!(main, reply) {
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(PublishError::Unroutable { .. })) => {
            tracing::warn!(%reply_to, "reply_to queue no longer exists; result published to the exchange only");
            Ok(())
        }
        (Err(e @ PublishError::Unroutable { .. }), Ok(())) => {
            tracing::warn!(error = %e, "result reached only the reply_to queue; bind a queue to the result exchange");
            Ok(())
        }
        (Err(e), _) | (Ok(()), Err(e)) => Err(e.into()),
    }
}

/// Contract §4 properties of a result event.
pub fn event_properties(envelope: &Envelope, event: &ResultEvent<'_>) -> BasicProperties {
    let correlation = envelope.correlation_id().unwrap_or(&event.command_id);
    properties(
        correlation,
        event.routing_key(),
        envelope.event_traceparent(),
    )
}

/// Contract §4 properties of any event on the result exchange:
/// `correlation_id`, a fresh `message_id`, `type` = `routing_key`,
/// persistent JSON with a `timestamp`, and the trace context when given.
pub fn properties(
    correlation_id: &str,
    routing_key: &str,
    traceparent: Option<&str>,
) -> BasicProperties {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_type(routing_key.into())
        .with_timestamp(timestamp);
    if let Ok(c) = ShortString::try_new(correlation_id) {
        props = props.with_correlation_id(c);
    }
    if let Some(tp) = traceparent {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString(tp.into()));
        props = props.with_headers(headers);
    }
    props
}
