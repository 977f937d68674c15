//! Ops HTTP endpoint (contract §5): `/healthz`, `/readyz`, `/metrics`.

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{meters, worker::Readiness};

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

/// Serves the ops endpoint on `listener` until `shutdown`, keeping the
/// metrics recorder's memory bounded meanwhile.
pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, shutdown: CancellationToken) {
    if let Some(handle) = meters::recorder() {
        tokio::spawn(upkeep(handle, shutdown.clone()));
    }
    let app = router(readiness);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "ops endpoint stopped");
    }
}
