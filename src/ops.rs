//! Ops HTTP endpoint (contract §5): `/healthz`, `/readyz`, `/metrics`,
//! served within [`limits`] (see [`crate::http_server`]).

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    http_server::{self, Limits},
    meters,
    worker::Readiness,
};

#[derive(Clone)]
struct Ops {
    readiness: Arc<Readiness>,
    metrics: Option<PrometheusHandle>,
}

/// The ops router.
pub fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Ops {
            readiness,
            metrics: meters::recorder(),
        })
}

async fn readyz(State(ops): State<Ops>) -> (StatusCode, String) {
    match ops.readiness.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn metrics(State(ops): State<Ops>) -> String {
    ops.metrics
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds histogram samples into buckets until `shutdown`. The recorder keeps
/// every raw sample until upkeep or a scrape drains them, so without this a
/// worker nobody scrapes would grow by every GeWe call's duration.
async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => handle.run_upkeep(),
        }
    }
}

/// Most connections the ops port keeps open at once.
const MAX_CONNECTIONS: usize = 1024;

/// What the ops port allows: enough connections that a few hundred idle or
/// slow ones cannot starve the probes (but never more than a quarter of
/// the open-file limit), each bounded in time and size.
pub fn limits(fd_limit: Option<u64>) -> Limits {
    let by_limit = fd_limit.map_or(usize::MAX, |l| usize::try_from(l / 4).unwrap_or(usize::MAX));
    Limits {
        max_connections: MAX_CONNECTIONS.min(by_limit).max(8),
        header_read_timeout: Duration::from_secs(5),
        max_connection_age: Duration::from_secs(120),
        max_body_bytes: 1024,
        max_head_bytes: 8 * 1024,
    }
}

/// Serves the ops endpoint on `listener` within `limits` until `shutdown`,
/// keeping the metrics recorder's memory bounded meanwhile.
pub async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    if let Some(handle) = meters::recorder() {
        tokio::spawn(upkeep(handle, shutdown.clone()));
    }
    http_server::serve(listener, router(readiness), limits, shutdown).await;
}
