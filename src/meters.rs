//! Every metric the worker exports, registered once (contract §5).
//!
//! All series exist from start-up, counters at 0 and `breaker_state` at 0, so
//! alerts and `rate()` work before the first command. Handles are resolved
//! once here rather than per message: `metrics::counter!` with labels looks
//! its key up on every call.
//!
//! The process-wide Prometheus recorder is installed before the first handle
//! is made; a handle made without a recorder would record nothing.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::event::ErrorKind;

/// Why a delivery went back to the queue without a result event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Shutdown began before the command had an outcome.
    Shutdown,
    /// The broker session died; the broker put the delivery back.
    SessionLost,
    /// The result could not be made safe: its event was not confirmed
    /// (unroutable, nacked, channel gone), or the event or the outcome
    /// could not be encoded.
    PublishFailed,
    /// The commandId's claim was lost where the command could not wait for
    /// it again (not expected: such commands look their id up again).
    ClaimLost,
}

impl Requeue {
    const ALL: [Requeue; 4] = [
        Requeue::Shutdown,
        Requeue::SessionLost,
        Requeue::PublishFailed,
        Requeue::ClaimLost,
    ];

    fn label(self) -> &'static str {
        match self {
            Requeue::Shutdown => "shutdown",
            Requeue::SessionLost => "session_lost",
            Requeue::PublishFailed => "publish_failed",
            Requeue::ClaimLost => "claim_lost",
        }
    }

    fn index(self) -> usize {
        match self {
            Requeue::Shutdown => 0,
            Requeue::SessionLost => 1,
            Requeue::PublishFailed => 2,
            Requeue::ClaimLost => 3,
        }
    }
}

/// Registered metric handles.
pub struct Meters {
    /// `commands_received_total`.
    pub commands_received: Counter,
    /// `commands_in_flight`: deliveries holding a prefetch slot.
    pub commands_in_flight: Gauge,
    /// `commands_duplicate_total`: stored outcomes republished.
    pub commands_duplicate: Counter,
    /// `results_publish_failures_total`.
    pub results_publish_failures: Counter,
    /// `gewe_request_duration_seconds`.
    pub gewe_request_duration: Histogram,
    /// `gewe_retries_total`.
    pub gewe_retries: Counter,
    /// `pacing_wait_seconds`.
    pub pacing_wait: Histogram,
    /// `broker_reconnects_total`.
    pub broker_reconnects: Counter,
    /// `redis_errors_total`.
    pub redis_errors: Counter,
    /// `claims_lost_total`.
    pub claims_lost: Counter,
    /// `breaker_state`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Gauge,
    /// `commands_parked_total`: commands put in a delay queue (`retry.park`).
    pub commands_parked: Counter,
    /// `results_published_total{status="succeeded",kind="none"}`.
    results_succeeded: Counter,
    /// `results_published_total{status="failed",kind}` by [`ErrorKind`].
    results_failed: [Counter; ErrorKind::ALL.len()],
    /// `gewe_requests_total{outcome="success"}`.
    gewe_success: Counter,
    /// `gewe_requests_total{outcome}` by [`ErrorKind`].
    gewe_failed: [Counter; ErrorKind::ALL.len()],
    /// `gewe_requests_total{outcome="local_error"}`: requests that never
    /// left (out of file descriptors).
    pub gewe_local_errors: Counter,
    /// `commands_requeued_total{reason}`.
    requeued: [Counter; Requeue::ALL.len()],
}

impl Meters {
    /// `results_published_total` for an event of this outcome.
    pub fn result_published(&self, failure: Option<ErrorKind>) -> &Counter {
        match failure {
            None => &self.results_succeeded,
            Some(kind) => &self.results_failed[kind.index()],
        }
    }

    /// `gewe_requests_total` for one attempt's outcome.
    pub fn gewe_request(&self, failure: Option<ErrorKind>) -> &Counter {
        match failure {
            None => &self.gewe_success,
            Some(kind) => &self.gewe_failed[kind.index()],
        }
    }

    /// `commands_requeued_total{reason}`.
    pub fn requeued(&self, reason: Requeue) -> &Counter {
        &self.requeued[reason.index()]
    }

    fn register() -> Self {
        describe();
        let requests =
            |outcome: &'static str| metrics::counter!("gewe_requests_total", "outcome" => outcome);
        let meters = Self {
            commands_received: metrics::counter!("commands_received_total"),
            commands_in_flight: metrics::gauge!("commands_in_flight"),
            commands_duplicate: metrics::counter!("commands_duplicate_total"),
            results_publish_failures: metrics::counter!("results_publish_failures_total"),
            gewe_request_duration: metrics::histogram!("gewe_request_duration_seconds"),
            gewe_retries: metrics::counter!("gewe_retries_total"),
            pacing_wait: metrics::histogram!("pacing_wait_seconds"),
            broker_reconnects: metrics::counter!("broker_reconnects_total"),
            redis_errors: metrics::counter!("redis_errors_total"),
            claims_lost: metrics::counter!("claims_lost_total"),
            breaker_state: metrics::gauge!("breaker_state"),
            commands_parked: metrics::counter!("commands_parked_total"),
            results_succeeded: metrics::counter!("results_published_total", "status" => "succeeded", "kind" => "none"),
            results_failed: ErrorKind::ALL.map(|k| {
                metrics::counter!("results_published_total", "status" => "failed", "kind" => k.as_str())
            }),
            gewe_success: requests("success"),
            gewe_failed: ErrorKind::ALL.map(|k| requests(k.as_str())),
            gewe_local_errors: requests("local_error"),
            requeued: Requeue::ALL.map(|r| metrics::counter!("commands_requeued_total", "reason" => r.label())),
        };
        // Touch every series so it is rendered before its first event.
        meters.commands_in_flight.set(0.0);
        meters.breaker_state.set(0.0);
        meters
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("commands_received_total", "Command deliveries received.");
    describe_gauge!(
        "commands_in_flight",
        "Deliveries being processed (at most amqp.prefetch)."
    );
    describe_counter!(
        "commands_duplicate_total",
        "Stored outcomes republished with duplicate: true."
    );
    describe_counter!(
        "results_published_total",
        "Result events confirmed by the broker, by status and error kind."
    );
    describe_counter!(
        "results_publish_failures_total",
        "Result events the broker did not confirm."
    );
    describe_counter!("gewe_requests_total", "GeWe HTTP attempts, by outcome.");
    describe_histogram!(
        "gewe_request_duration_seconds",
        Unit::Seconds,
        "Duration of one GeWe HTTP attempt."
    );
    describe_counter!(
        "gewe_retries_total",
        "GeWe attempts that failed transiently and were retried."
    );
    describe_histogram!(
        "pacing_wait_seconds",
        Unit::Seconds,
        "Time a command waited for its account's pacing turn."
    );
    describe_counter!(
        "broker_reconnects_total",
        "Broker sessions reopened after a loss."
    );
    describe_counter!(
        "commands_requeued_total",
        "Deliveries returned to the queue without a result event, by reason."
    );
    describe_counter!("redis_errors_total", "Failed Redis operations.");
    describe_counter!(
        "claims_lost_total",
        "Redis claims on a commandId lost before the command finished."
    );
    describe_counter!(
        "commands_parked_total",
        "Commands parked in a delay queue to be tried again later (retry.park)."
    );
    describe_gauge!(
        "breaker_state",
        "Circuit breaker: 0 closed, 1 half-open, 2 open."
    );
}

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static METERS: OnceLock<Meters> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
pub fn recorder() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// The worker's metric handles (registering every series on first use).
pub fn meters() -> &'static Meters {
    METERS.get_or_init(|| {
        let _ = recorder();
        Meters::register()
    })
}
