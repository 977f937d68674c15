//! The worker with trace export on: a local OTLP/HTTP sink that takes
//! `POST /v1/traces`, decodes and counts the spans and answers 200, and
//! the report of the traced worker against the worker without export, per
//! round (issue 25: at most 15 % more CPU per message).

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::{cpu, phases::Run, spread};

/// Spans and requests the sink took.
#[derive(Debug, Default)]
pub struct Counts {
    spans: AtomicU64,
    requests: AtomicU64,
}

/// The sink's endpoint, set once it listens: the traced worker's
/// `telemetry.otlp_endpoint`.
static ENDPOINT: OnceLock<String> = OnceLock::new();

/// `http://<sink>` once [`spawn_sink`] ran.
pub fn endpoint() -> Option<&'static str> {
    ENDPOINT.get().map(String::as_str)
}

/// Starts the sink on an ephemeral port until `stop`.
pub async fn spawn_sink(stop: CancellationToken) -> anyhow::Result<Arc<Counts>> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let counts = Arc::new(Counts::default());
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(counts.clone());
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    let _ = ENDPOINT.set(format!("http://{addr}"));
    Ok(counts)
}

impl Counts {
    /// Spans taken so far, and resets the count.
    pub fn take_spans(&self) -> u64 {
        self.spans.swap(0, Ordering::Relaxed)
    }

    /// Requests taken so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

async fn receive(State(counts): State<Arc<Counts>>, body: Bytes) -> Response {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let spans: usize = request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    counts.spans.fetch_add(spans as u64, Ordering::Relaxed);
    counts.requests.fetch_add(1, Ordering::Relaxed);
    (
        [(CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// Prints the traced worker against the worker, round by round (each
/// round ran both back to back), and the spans the sink received.
pub fn report(worker: &[&Run], traced: &[&Run], spans: &[u64], n: usize) {
    let micros = |v: f64| format!("{v:.1}");
    let rate = |v: f64| format!("{v:.0}");
    let ratio = |v: f64| format!("{v:.2}");
    let cpu = |runs: &[&Run]| {
        runs.iter()
            .filter_map(|r| r.cpu.child_us)
            .collect::<Vec<_>>()
    };
    let rates = |runs: &[&Run]| runs.iter().map(|r| r.rate).collect::<Vec<_>>();
    let per_round = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>();
    println!();
    println!("Trace export (worker → OTLP/HTTP sink in the bench process), same rounds:");
    println!();
    println!("| worker | msg/s | CPU µs per message (its process) | peak RSS |");
    println!("| --- | --- | --- | --- |");
    for (name, runs) in [("export off", worker), ("export on", traced)] {
        let rss = runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
        println!(
            "| {name} | {} | {} | {:.1} MiB |",
            spread(&rates(runs), rate),
            spread(&cpu(runs), micros),
            rss as f64 / 1024.0
        );
    }
    println!();
    println!("| ratio (per round, median and range) | value |");
    println!("| --- | --- |");
    println!(
        "| export on / off, CPU per message (target ≤ 1.15) | {} |",
        spread(&per_round(&cpu(traced), &cpu(worker)), ratio)
    );
    println!(
        "| export on / off, msg/s | {} |",
        spread(&per_round(&rates(traced), &rates(worker)), ratio)
    );
    let expected = (n * 3) as f64;
    let received: Vec<f64> = spans.iter().map(|&s| s as f64).collect();
    println!(
        "| spans received by the sink per round / expected ({expected:.0}: consumer, client, producer per command) | {} |",
        spread(
            &received.iter().map(|r| r / expected).collect::<Vec<_>>(),
            ratio
        )
    );
    if let Some(c) = traced.iter().find(|r| r.cpu.child_us.is_some()) {
        println!(
            "| bench process (sink included) in a traced round, CPU µs per message | {} |",
            cpu::opt(Some(c.cpu.bench_us), 1)
        );
    }
}
