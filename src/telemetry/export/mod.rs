//! OTLP/HTTP trace export (`telemetry.*`, contract §9): the tracer the
//! command spans ([`super::spans`]) are made with, the bounded buffer they
//! wait in ([`buffer`]) and the exporter that posts them as protobuf to
//! `<telemetry.otlp_endpoint>/v1/traces` through the worker's own HTTP
//! client ([`client`]).
//!
//! Sampling: a span with a parent (a command's valid `traceparent`) follows
//! the parent's sampled flag; a trace the worker starts is sampled with
//! `telemetry.sample_ratio`.

mod buffer;
mod client;

use std::{sync::Arc, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter as _},
};
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};

pub(crate) use buffer::Limits;
use buffer::{Buffer, Drops, export_loop};
use client::ExportClient;

use crate::{config::TelemetrySettings, meters::meters};

/// The sizes and times of the export (not configurable: the contract
/// names none, and these are the SDK's own defaults but for the linger,
/// shorter so traces show up within seconds).
pub(crate) const LIMITS: Limits = Limits {
    capacity: 2048,
    batch: 512,
    linger: Duration::from_secs(1),
    timeout: Duration::from_secs(10),
    report_every: Duration::from_secs(60),
};

/// The path OTLP/HTTP receives traces on.
const TRACES_PATH: &str = "v1/traces";

/// Trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExportSetupError {
    /// The HTTP client could not be built (TLS set-up).
    #[error("could not build the trace exporter's HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The endpoint is not usable as a base URL.
    #[error("`telemetry.otlp_endpoint` is not a usable base URL: {0}")]
    Endpoint(#[from] url::ParseError),
    /// The OTLP exporter refused its configuration (e.g. an `OTEL_EXPORTER_OTLP_*`
    /// environment variable it cannot honour).
    #[error("could not build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Trace export while it runs: the tracer, and the task that exports.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    stop: oneshot::Sender<Instant>,
    exporting: JoinHandle<()>,
}

impl Traces {
    /// Starts exporting to `settings.otlp_endpoint`; `None` when export is
    /// off. Must be called within the tokio runtime (the export task is
    /// spawned on it).
    pub fn start(settings: &TelemetrySettings) -> Result<Option<Self>, ExportSetupError> {
        match &settings.otlp_endpoint {
            Some(endpoint) => Self::start_with(endpoint, settings, LIMITS).map(Some),
            None => Ok(None),
        }
    }

    /// [`Traces::start`] to `endpoint` with `limits`.
    pub(crate) fn start_with(
        endpoint: &str,
        settings: &TelemetrySettings,
        limits: Limits,
    ) -> Result<Self, ExportSetupError> {
        let url = traces_url(endpoint)?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(ExportClient::new(limits.timeout)?)
            .with_endpoint(url.as_str())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(limits.timeout)
            // A failed batch is dropped and counted: a retry would hold
            // the next batches back, and the buffer would drop those.
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .build()?;
        let drops = Arc::new(Drops::new(
            limits.report_every,
            meters().telemetry_spans_dropped.clone(),
        ));
        let (buffer, queue) = Buffer::new(&limits, drops.clone());
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        // The provider would hand the resource to the SDK's processors; the
        // buffer hands the exporter nothing, so it gets it here.
        exporter.set_resource(&resource);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(buffer)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let (stop, stopped) = oneshot::channel();
        let exporting = tokio::spawn(export_loop(exporter, queue, drops, limits, stopped));
        Ok(Self {
            provider,
            stop,
            exporting,
        })
    }

    /// The tracer command spans are made with.
    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("gewe-friend-worker")
    }

    /// Exports what is still buffered, within `within`; spans ending after
    /// this are dropped (counted).
    pub async fn shutdown(self, within: Duration) {
        let deadline = Instant::now() + within;
        let _ = self.stop.send(deadline);
        let mut exporting = self.exporting;
        if tokio::time::timeout_at(deadline, &mut exporting)
            .await
            .is_err()
        {
            exporting.abort();
        }
        let _ = self.provider.shutdown();
    }
}

/// `<endpoint>/v1/traces`, the endpoint's own path kept.
fn traces_url(endpoint: &str) -> Result<url::Url, url::ParseError> {
    let base = if endpoint.ends_with('/') {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/")
    };
    url::Url::parse(&base)?.join(TRACES_PATH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_go_to_the_endpoints_v1_traces() {
        for (endpoint, url) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://jaeger:4318/", "http://jaeger:4318/v1/traces"),
            (
                "https://otlp.example/base",
                "https://otlp.example/base/v1/traces",
            ),
        ] {
            assert_eq!(traces_url(endpoint).expect(endpoint).as_str(), url);
        }
    }
}
