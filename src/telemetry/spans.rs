//! The spans of one command delivery (contract §9): a consumer span for
//! the delivery, parented on the command's `traceparent`; under it a client
//! span per GeWe attempt and a producer span per published event.
//!
//! They exist only with `telemetry.otlp_endpoint` set: the processor holds
//! an `Option<CommandTracer>`, so with export off a delivery pays one
//! branch per span site and nothing else. No span carries the token, a
//! request or response body, or an error text: only ids, codes and kinds.

use std::{borrow::Cow, sync::Arc};

use opentelemetry::{
    Context, KeyValue,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer as _,
    },
};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::{gewe::ADD_MEMBER_PATH, trace_context::TraceParent};

/// Makes the spans of command deliveries; cheap to clone (one pointer, so
/// each delivery carries 8 bytes of it).
#[derive(Debug, Clone)]
pub struct CommandTracer(Arc<Parts>);

#[derive(Debug)]
struct Parts {
    tracer: SdkTracer,
    /// `amqp.command_queue`: the consumer spans' destination.
    queue: Arc<str>,
    /// `amqp.result_exchange`: the producer spans' destination.
    exchange: Arc<str>,
    /// `process <queue>` and `publish <exchange>`: made once and shared by
    /// every span (a name is a `Cow<'static, str>`; an owned one would be
    /// copied for each span).
    consume_name: &'static str,
    publish_name: &'static str,
    /// GeWe's host and port, for the client spans.
    server: Option<(Arc<str>, i64)>,
}

/// What a delivery's span says about the message and its command.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryFacts<'a> {
    /// The AMQP `message_id`, else the commandId.
    pub message_id: &'a str,
    /// The commandId (resolved, or what could be read of an invalid one).
    pub command_id: &'a str,
    /// Its `appId`, when it could be read.
    pub app_id: Option<&'a str>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
}

/// The W3C ids of a span, as hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanIds {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// Whether the span is sampled (recorded and exported).
    pub sampled: bool,
}

impl SpanIds {
    /// `traceparent` naming this span as the parent.
    pub fn traceparent(&self) -> String {
        let flags = if self.sampled { "01" } else { "00" };
        format!("00-{}-{}-{flags}", self.trace_id, self.span_id)
    }
}

impl CommandTracer {
    /// Spans from `tracer`, for deliveries from `queue`, attempts against
    /// `gewe` (its base URL) and events published to `exchange`. Made once
    /// per worker: its two span names are leaked, a few dozen bytes.
    pub fn new(tracer: SdkTracer, queue: &str, exchange: &str, gewe: &reqwest::Url) -> Self {
        let server = gewe.host_str().map(|host| {
            (
                Arc::from(host),
                i64::from(gewe.port_or_known_default().unwrap_or(0)),
            )
        });
        let leak = |name: String| -> &'static str { Box::leak(name.into_boxed_str()) };
        Self(Arc::new(Parts {
            tracer,
            queue: Arc::from(queue),
            exchange: Arc::from(exchange),
            consume_name: leak(format!("process {queue}")),
            publish_name: leak(format!("publish {exchange}")),
            server,
        }))
    }

    /// Starts the consumer span of a delivery: the child of `parent` (the
    /// command's valid `traceparent`) or the root of a new trace, which
    /// `telemetry.sample_ratio` samples.
    pub fn delivery(&self, parent: Option<&TraceParent>, facts: DeliveryFacts<'_>) -> DeliverySpan {
        let t = &self.0;
        let parent_cx = parent
            .and_then(remote_context)
            .map_or_else(Context::new, |sc| {
                Context::new().with_remote_span_context(sc)
            });
        // Room for what `outcome` adds: the list grows once at most.
        let mut attributes = Vec::with_capacity(10);
        attributes.extend([
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", t.queue.clone()),
            KeyValue::new("messaging.message.id", facts.message_id.to_owned()),
            KeyValue::new("gewe.command_id", facts.command_id.to_owned()),
            KeyValue::new("gewe.redelivered", facts.redelivered),
        ]);
        if let Some(app_id) = facts.app_id {
            attributes.push(KeyValue::new("gewe.app_id", app_id.to_owned()));
        }
        let span = t
            .tracer
            .span_builder(Cow::Borrowed(t.consume_name))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&t.tracer, &parent_cx);
        DeliverySpan {
            cx: Context::new().with_span(span),
            tracer: self.clone(),
        }
    }
}

/// Reads a `traceparent` as the remote parent of the worker's span.
fn remote_context(parent: &TraceParent) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(&parent.trace_id).ok()?;
    let span_id = SpanId::from_hex(&parent.parent_id).ok()?;
    let flags = u8::from_str_radix(&parent.flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// The consumer span of one delivery, parent of its attempts and publishes;
/// ended when dropped.
#[derive(Debug)]
pub struct DeliverySpan {
    /// Holds the span, so children are started under it.
    cx: Context,
    tracer: CommandTracer,
}

impl DeliverySpan {
    /// The span's ids, for the log context and the event's `traceparent`;
    /// `None` once the exporter has shut down (no valid span then).
    pub fn ids(&self) -> Option<SpanIds> {
        let span = self.cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| SpanIds {
            trace_id: format!("{:032x}", sc.trace_id()),
            span_id: format!("{:016x}", sc.span_id()),
            sampled: sc.is_sampled(),
        })
    }

    /// How the delivery ended: `status` of its event (`succeeded`,
    /// `failed`), or what happened instead (`parked`, `requeued`), and the
    /// error kind. A delivery that ends without a confirmed event is an
    /// error of the span.
    pub fn outcome(&self, outcome: &'static str, kind: Option<&'static str>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("gewe.outcome", outcome));
        if let Some(kind) = kind {
            span.set_attribute(KeyValue::new("gewe.error_kind", kind));
        }
        if outcome == "requeued" {
            span.set_status(Status::error(
                "no result event; the command went back to the queue",
            ));
        }
    }

    /// Starts the client span of GeWe attempt `n` (1-based, over every try).
    pub fn attempt(&self, n: u32) -> AttemptSpan {
        let t = &self.tracer.0;
        // Room for what `end` adds.
        let mut attributes = Vec::with_capacity(9);
        attributes.extend([
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("url.template", ADD_MEMBER_PATH),
            KeyValue::new("gewe.attempt", i64::from(n)),
        ]);
        if let Some((host, port)) = &t.server {
            attributes.push(KeyValue::new("server.address", host.clone()));
            attributes.push(KeyValue::new("server.port", *port));
        }
        let span = t
            .tracer
            .span_builder(Cow::Borrowed(CLIENT_SPAN_NAME))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&t.tracer, &self.cx);
        AttemptSpan(span)
    }

    /// Starts the producer span of an event published to the result
    /// exchange with `routing_key` (one of the event's fixed keys).
    pub fn publish(&self, routing_key: &'static str) -> PublishSpan {
        let t = &self.tracer.0;
        // Room for what `end` adds.
        let mut attributes = Vec::with_capacity(6);
        attributes.extend([
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", t.exchange.clone()),
            KeyValue::new("messaging.rabbitmq.destination.routing_key", routing_key),
        ]);
        let span = t
            .tracer
            .span_builder(Cow::Borrowed(t.publish_name))
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes)
            .start_with_context(&t.tracer, &self.cx);
        PublishSpan(span)
    }
}

impl Drop for DeliverySpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// `{method} {url.template}`, as OpenTelemetry names HTTP client spans.
const CLIENT_SPAN_NAME: &str = "POST /gewe/v2/api/group/addGroupMemberAsFriend";

/// The client span of one GeWe attempt.
#[derive(Debug)]
pub struct AttemptSpan(Span);

impl AttemptSpan {
    /// Ends it: GeWe's HTTP status when it answered, and the attempt's
    /// outcome (`success`, the error kind, or `local_error`).
    pub fn end(mut self, status: Option<u16>, outcome: &'static str) {
        if let Some(status) = status {
            self.0.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        self.0.set_attribute(KeyValue::new("gewe.outcome", outcome));
        if outcome != "success" {
            self.0.set_attribute(KeyValue::new("error.type", outcome));
            self.0.set_status(Status::error(outcome));
        }
        self.0.end();
    }
}

/// The producer span of one published event.
#[derive(Debug)]
pub struct PublishSpan(Span);

impl PublishSpan {
    /// Ends it: the event's status and error kind, and whether the broker
    /// confirmed it.
    pub fn end(mut self, status: &'static str, kind: Option<&'static str>, confirmed: bool) {
        self.0.set_attribute(KeyValue::new("gewe.outcome", status));
        if let Some(kind) = kind {
            self.0.set_attribute(KeyValue::new("gewe.error_kind", kind));
        }
        if !confirmed {
            self.0
                .set_status(Status::error("the broker did not confirm the event"));
        }
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_names_itself_in_a_traceparent() {
        let ids = SpanIds {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            sampled: true,
        };
        assert_eq!(
            ids.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let parsed = TraceParent::parse(&ids.traceparent()).expect("valid");
        let sc = remote_context(&parsed).expect("context");
        assert!(sc.is_sampled() && sc.is_remote() && sc.is_valid());
        assert_eq!(format!("{:016x}", sc.span_id()), ids.span_id);
    }

    #[test]
    fn the_client_span_is_named_after_the_request() {
        assert_eq!(CLIENT_SPAN_NAME, format!("POST {ADD_MEMBER_PATH}"));
    }
}
