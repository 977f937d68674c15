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

use crate::error_kind::ErrorKind;

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

/// What became of one GeWe callback taken from the callbacks queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// It matched a succeeded command: its `add_friend.accepted` event was
    /// confirmed.
    Matched,
    /// It matched nothing (another type, a chatroom, a profile change,
    /// another account, an unknown or expired `v3`); acknowledged.
    Unmatched,
    /// It matched a command whose accepted event was already published.
    Repeated,
    /// Not a JSON object: dead-lettered.
    Invalid,
    /// Its `v3` is not known yet, or its command's `succeeded` event is
    /// not confirmed yet: sent through the early delay queue to be tried
    /// again (counted once per try, within `callbacks.early_grace`).
    Early,
}

impl CallbackOutcome {
    const ALL: [CallbackOutcome; 5] = [
        CallbackOutcome::Matched,
        CallbackOutcome::Unmatched,
        CallbackOutcome::Repeated,
        CallbackOutcome::Invalid,
        CallbackOutcome::Early,
    ];

    /// Label value of `callbacks_total{outcome}`.
    pub fn label(self) -> &'static str {
        match self {
            CallbackOutcome::Matched => "matched",
            CallbackOutcome::Unmatched => "unmatched",
            CallbackOutcome::Repeated => "repeated",
            CallbackOutcome::Invalid => "invalid",
            CallbackOutcome::Early => "early",
        }
    }

    fn index(self) -> usize {
        match self {
            CallbackOutcome::Matched => 0,
            CallbackOutcome::Unmatched => 1,
            CallbackOutcome::Repeated => 2,
            CallbackOutcome::Invalid => 3,
            CallbackOutcome::Early => 4,
        }
    }
}

/// Why a command was deferred through the broker's delay queues instead of
/// being held or sent (contract §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// The account reached `accounts.daily_limit` for its day.
    DailyLimit,
    /// Outside the account's `accounts.active_hours`.
    ActiveHours,
    /// The account rests after WeChat said it adds friends too often.
    Cooldown,
    /// An operator paused the account.
    Paused,
    /// The account's pacing turn is further away than `amqp.max_hold`.
    Pacing,
    /// The circuit breaker stays open longer than `amqp.max_hold`.
    Breaker,
}

impl Deferral {
    const ALL: [Deferral; 6] = [
        Deferral::DailyLimit,
        Deferral::ActiveHours,
        Deferral::Cooldown,
        Deferral::Paused,
        Deferral::Pacing,
        Deferral::Breaker,
    ];

    /// Label value of `commands_deferred_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Deferral::DailyLimit => "daily_limit",
            Deferral::ActiveHours => "active_hours",
            Deferral::Cooldown => "cooldown",
            Deferral::Paused => "paused",
            Deferral::Pacing => "pacing",
            Deferral::Breaker => "breaker",
        }
    }

    fn index(self) -> usize {
        match self {
            Deferral::DailyLimit => 0,
            Deferral::ActiveHours => 1,
            Deferral::Cooldown => 2,
            Deferral::Paused => 3,
            Deferral::Pacing => 4,
            Deferral::Breaker => 5,
        }
    }
}

/// Statuses `POST /gewe/callback` answers with.
pub const CALLBACK_HTTP_STATUSES: [u16; 6] = [200, 400, 401, 408, 413, 503];

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
    /// `callbacks_accept_delay_seconds`: from a command's `completedAt` to
    /// its `acceptedAt`.
    pub accept_delay: Histogram,
    /// `results_published_total{status="accepted",kind="none"}`.
    pub results_accepted: Counter,
    /// `callbacks_total{outcome}`.
    callbacks: [Counter; CallbackOutcome::ALL.len()],
    /// `callback_requests_total{status}`, by [`CALLBACK_HTTP_STATUSES`].
    callback_requests: [Counter; CALLBACK_HTTP_STATUSES.len()],
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
    /// `commands_deferred_total{reason}`.
    deferred: [Counter; Deferral::ALL.len()],
    /// `account_cooldowns_total`: cooldowns started.
    pub account_cooldowns: Counter,
    /// `commands_expired_total`: commands that waited past
    /// `accounts.max_wait` and failed `expired`.
    pub commands_expired: Counter,
    /// `telemetry_spans_dropped_total`: spans that could not be exported.
    pub telemetry_spans_dropped: Counter,
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

    /// `commands_deferred_total{reason}`.
    pub fn deferred(&self, reason: Deferral) -> &Counter {
        &self.deferred[reason.index()]
    }

    /// `callbacks_total{outcome}`.
    pub fn callback(&self, outcome: CallbackOutcome) -> &Counter {
        &self.callbacks[outcome.index()]
    }

    /// `callback_requests_total{status}`; `None` for a status the endpoint
    /// never answers with.
    pub fn callback_request(&self, status: u16) -> Option<&Counter> {
        CALLBACK_HTTP_STATUSES
            .iter()
            .position(|s| *s == status)
            .map(|i| &self.callback_requests[i])
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
            accept_delay: metrics::histogram!("callbacks_accept_delay_seconds"),
            results_accepted: metrics::counter!("results_published_total", "status" => "accepted", "kind" => "none"),
            callbacks: CallbackOutcome::ALL
                .map(|o| metrics::counter!("callbacks_total", "outcome" => o.label())),
            callback_requests: CALLBACK_HTTP_STATUSES
                .map(|s| metrics::counter!("callback_requests_total", "status" => s.to_string())),
            deferred: Deferral::ALL
                .map(|r| metrics::counter!("commands_deferred_total", "reason" => r.label())),
            account_cooldowns: metrics::counter!("account_cooldowns_total"),
            commands_expired: metrics::counter!("commands_expired_total"),
            telemetry_spans_dropped: metrics::counter!("telemetry_spans_dropped_total"),
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
    describe_counter!(
        "callbacks_total",
        "GeWe callbacks taken from the callbacks queue, by outcome."
    );
    describe_histogram!(
        "callbacks_accept_delay_seconds",
        Unit::Seconds,
        "Time from a command's completedAt to its acceptedAt."
    );
    describe_counter!(
        "callback_requests_total",
        "POST /gewe/callback requests, by the HTTP status answered."
    );
    describe_counter!(
        "commands_deferred_total",
        "Commands deferred through a delay queue instead of held or sent, by reason."
    );
    describe_counter!(
        "account_cooldowns_total",
        "Account cooldowns started after WeChat said the account adds friends too often."
    );
    describe_counter!(
        "commands_expired_total",
        "Commands that waited for their account longer than accounts.max_wait and failed expired."
    );
    describe_counter!(
        "telemetry_spans_dropped_total",
        "Trace spans dropped instead of exported (buffer full or collector failing)."
    );
}

/// Buckets of `callbacks_accept_delay_seconds`: members accept after
/// seconds (the simulator) to weeks, not within the `_seconds` default's 30 s.
const ACCEPT_DELAY_BUCKETS: [f64; 13] = [
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    3.0 * 3600.0,
    6.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    3.0 * 86400.0,
    7.0 * 86400.0,
    30.0 * 86400.0,
];

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
                .ok()?
                // A full name wins over a suffix.
                .set_buckets_for_metric(
                    Matcher::Full("callbacks_accept_delay_seconds".to_owned()),
                    &ACCEPT_DELAY_BUCKETS,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The series later features increment (account budgets, trace export)
    /// are listed from start-up, like every other one, so dashboards and
    /// alerts on them work before their first event. (Other unit tests in
    /// this process may have counted some already; the suite checks the
    /// zeros on a fresh worker.)
    #[test]
    fn budget_and_telemetry_series_are_rendered_at_zero_from_start_up() {
        let _ = meters();
        let text = recorder().expect("recorder installed").render();
        for series in [
            r#"commands_deferred_total{reason="daily_limit"}"#,
            r#"commands_deferred_total{reason="active_hours"}"#,
            r#"commands_deferred_total{reason="cooldown"}"#,
            r#"commands_deferred_total{reason="paused"}"#,
            r#"commands_deferred_total{reason="pacing"}"#,
            r#"commands_deferred_total{reason="breaker"}"#,
            "account_cooldowns_total",
            "commands_expired_total",
            "telemetry_spans_dropped_total",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{series} "))),
                "{series} is not rendered:\n{text}"
            );
        }
    }
}
