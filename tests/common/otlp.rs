//! An OTLP/HTTP trace receiver for the tests: `POST /v1/traces` with the
//! real protobuf, decoded with `opentelemetry-proto`. It keeps every
//! request's raw headers and body (to look for what must not be there) and
//! the spans decoded from it; it can be told to answer 500 or never.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{AnyValue, any_value::Value as Any},
};
use prost::Message;
use serde_json::Value;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200 with an (empty) `ExportTraceServiceResponse`.
    Accept,
    /// 500.
    Fail,
    /// Never: the request hangs until the client gives up.
    Hang,
}

/// One span as received, flattened for assertions.
#[derive(Debug, Clone)]
pub struct SpanSeen {
    /// Hex, as in a `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind`: 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attributes: HashMap<String, Value>,
    /// OTLP `Status.code`: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// The resource's `service.name`.
    pub service: Option<String>,
}

impl SpanSeen {
    /// Attribute `key` as a string, if it is one.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(Value::as_str)
    }

    /// Attribute `key` as an integer, if it is one.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.attributes.get(key).and_then(Value::as_i64)
    }
}

/// What one request brought.
#[derive(Debug, Clone)]
pub struct Posted {
    /// Every header, name and raw value.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

#[derive(Debug)]
struct Shared {
    answer: Mutex<Answer>,
    posted: Mutex<Vec<Posted>>,
    spans: Mutex<Vec<SpanSeen>>,
}

/// A running receiver; its base URL is `telemetry.otlp_endpoint`.
#[derive(Debug, Clone)]
pub struct Collector {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Collector {
    /// Listens on an ephemeral port, answering `answer`.
    pub async fn start(answer: Answer) -> Self {
        let shared = Arc::new(Shared {
            answer: Mutex::new(answer),
            posted: Mutex::new(Vec::new()),
            spans: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the collector");
        let addr = listener.local_addr().expect("collector address");
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, shared }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers `answer` from now on.
    pub fn answer_with(&self, answer: Answer) {
        *self.shared.answer.lock().expect("lock") = answer;
    }

    /// Every span received so far, whatever the answer was.
    pub fn spans(&self) -> Vec<SpanSeen> {
        self.shared.spans.lock().expect("lock").clone()
    }

    /// Every request received so far.
    pub fn posted(&self) -> Vec<Posted> {
        self.shared.posted.lock().expect("lock").clone()
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.posted.lock().expect("lock").push(Posted {
        headers: headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect(),
        body: body.clone(),
    });
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest").into_response();
    };
    shared.spans.lock().expect("lock").extend(flatten(request));
    let answer = *shared.answer.lock().expect("lock");
    match answer {
        Answer::Accept => (
            [(CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response(),
        Answer::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "collector failing").into_response(),
        Answer::Hang => std::future::pending().await,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn json(value: Option<&AnyValue>) -> Value {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => Value::from(s.as_str()),
        Some(Any::IntValue(i)) => Value::from(*i),
        Some(Any::BoolValue(b)) => Value::from(*b),
        Some(Any::DoubleValue(d)) => Value::from(*d),
        other => Value::from(format!("{other:?}")),
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<SpanSeen> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans.resource.as_ref().and_then(|r| {
            r.attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| json(kv.value.as_ref()).as_str().map(str::to_owned))
        });
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(SpanSeen {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), json(kv.value.as_ref())))
                        .collect(),
                    status_code: span.status.map_or(0, |s| s.code),
                    service: service.clone(),
                });
            }
        }
    }
    out
}
