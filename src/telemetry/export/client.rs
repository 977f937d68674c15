//! The exporter's HTTP client: the worker's own reqwest (0.12, rustls on
//! ring) behind OpenTelemetry's `HttpClient` trait, so trace export adds
//! no second HTTP stack or TLS provider to the binary. It is a client of
//! its own, never the GeWe client: that one sends the token on every
//! request.

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};

/// Most of a collector's answer that is read: an OTLP answer is a few
/// bytes; anything longer is cut off, not buffered.
const MAX_ANSWER: usize = 64 * 1024;

/// Posts OTLP batches with a bound on the whole exchange.
#[derive(Debug, Clone)]
pub(super) struct ExportClient {
    http: reqwest::Client,
}

impl ExportClient {
    /// A client whose requests (connection, upload, answer) end after
    /// `timeout` whatever the collector does.
    pub(super) fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("gewe-friend-worker/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout)
            // One export is in flight at a time.
            .pool_max_idle_per_host(1)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http })
    }
}

#[async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut answer = self
            .http
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = answer.status();
        let headers = std::mem::take(answer.headers_mut());
        let mut read = BytesMut::new();
        while let Some(chunk) = answer.chunk().await? {
            let room = MAX_ANSWER.saturating_sub(read.len());
            read.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
        let mut response = Response::new(read.freeze());
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}
