//! What happens to one delivery: decode, call GeWe (breaker-gated, paced,
//! deduplicated, retried), publish the confirmed result event, then settle.
//!
//! The order is the guarantee: a delivery is acked (or, when invalid,
//! rejected to the dead-letter exchange) only after its event is confirmed.
//! If the event cannot be made safe, or no outcome could be had (shutdown,
//! Redis down, another replica on it), the delivery is requeued, so the
//! command is retried rather than lost; a stored outcome keeps the retry
//! from calling GeWe again.

use std::{sync::Arc, time::Duration};

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    breaker::Breaker,
    broker::{PublishError, Publisher},
    claim,
    command::{self, Command, Envelope},
    dedupe::{Dedupe, Interrupted, Known, Resolved},
    event::{ErrorKind, EventError, ResultEvent, Status, now_rfc3339},
    gewe::{Backoff, CallOutcome, GeweClient, Verdict, classify},
    outbound::{envelope_of, publish_event},
    pacing::Pacer,
    redact::Redactor,
    trace_context::TraceParent,
};

/// Pause before requeueing a command that got no confirmed event, so a
/// persistent problem does not become a hot redelivery loop.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

/// Shared, immutable state of the command pipeline.
pub struct Processor {
    /// Topic exchange results are published to.
    pub result_exchange: String,
    /// GeWe client (connection-pooled).
    pub gewe: GeweClient,
    /// Retry policy.
    pub backoff: Backoff,
    /// Per-account pacing.
    pub pacer: Pacer,
    /// Known outcomes.
    pub dedupe: Dedupe,
    /// Circuit breaker on systemic failures.
    pub breaker: Arc<Breaker>,
    /// Token remover.
    pub redactor: Redactor,
    /// Cancelled on shutdown: no new GeWe call starts after it.
    pub shutdown: CancellationToken,
}

/// The session a delivery belongs to.
#[derive(Clone)]
pub struct SessionHandle {
    /// Confirm-mode publishing channel.
    pub publisher: Publisher,
    /// Cancelled by a task that finds the session's channels broken.
    pub broken: CancellationToken,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    DeadLetter,
}

impl Processor {
    /// Handles one delivery to completion. Never panics on input; every
    /// broker error is logged and leaves the delivery to be redelivered.
    pub async fn handle(self: Arc<Self>, delivery: Delivery, session: SessionHandle) {
        metrics::counter!("commands_received_total").increment(1);
        metrics::gauge!("commands_in_flight").increment(1.0);
        let received_at = now_rfc3339();
        let mut envelope = envelope_of(&delivery.properties);
        let decoded = command::decode(&delivery.data, &envelope);
        // The caller's trace context: this span becomes its child, and the
        // result event carries this span as the parent.
        let parent = envelope.traceparent.as_deref().and_then(TraceParent::parse);
        let child = parent.as_ref().map(TraceParent::child);
        let (command_id, app_id) = match &decoded {
            Ok(cmd) => (cmd.command_id.as_str(), Some(cmd.app_id.as_str())),
            Err(rejected) => (
                rejected.partial.command_id.as_str(),
                rejected.partial.app_id.as_deref(),
            ),
        };
        // ERROR level so the span (and its ids) exists whatever RUST_LOG says.
        // Every field is set here, at creation: the JSON log format re-parses
        // a span's fields on each later `record`.
        let span = tracing::error_span!(
            "command",
            command_id,
            app_id,
            redelivered = delivery.redelivered,
            trace_id = parent.as_ref().map(|p| p.trace_id.as_str()),
            span_id = child.as_ref().map(|(id, _)| id.as_str()),
            parent_span_id = parent.as_ref().map(|p| p.parent_id.as_str()),
        );
        envelope.traceparent = child.map(|(_, header)| header);
        let work = async {
            match decoded {
                Ok(cmd) => match self.execute(&cmd, received_at).await {
                    Ok((event, known)) => {
                        let confirmed = self
                            .publish_and_settle(&delivery, &envelope, &event, Settle::Ack, &session)
                            .await;
                        if confirmed {
                            self.dedupe.mark_published(&cmd.command_id, &known).await;
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "no outcome for now; requeueing the command");
                        let label = match &*reason {
                            Interrupted::Shutdown => "shutdown",
                            Interrupted::ClaimLost => "claim_lost",
                        };
                        metrics::counter!("commands_requeued_total", "reason" => label)
                            .increment(1);
                        requeue(&delivery).await;
                    }
                },
                Err(rejected) => {
                    let event = self.invalid_event(*rejected, received_at);
                    self.publish_and_settle(
                        &delivery,
                        &envelope,
                        &event,
                        Settle::DeadLetter,
                        &session,
                    )
                    .await;
                }
            }
        };
        work.instrument(span.clone()).await;
        metrics::gauge!("commands_in_flight").decrement(1.0);
    }

    fn invalid_event(&self, rejected: command::Rejected, received_at: String) -> ResultEvent {
        let command::Rejected { reason, partial } = rejected;
        let message = self.redactor.redact(&reason.to_string()).into_owned();
        tracing::warn!(reason = %message, "invalid command; dead-lettering it");
        ResultEvent {
            command_id: partial.command_id,
            status: Status::Failed,
            app_id: partial.app_id,
            chatroom_id: partial.chatroom_id,
            member_wxid: partial.member_wxid,
            v3: None,
            error: Some(EventError::new(ErrorKind::InvalidCommand, message, None)),
            attempts: 0,
            received_at,
            completed_at: now_rfc3339(),
            duplicate: false,
        }
    }

    /// Runs (or recalls) the GeWe call for `cmd` and builds its event.
    async fn execute(
        &self,
        cmd: &Command,
        received_at: String,
    ) -> Result<(ResultEvent, Arc<Known>), Arc<Interrupted>> {
        let (known, duplicate) = loop {
            // Boxed: the nested async state machines (dedupe, breaker,
            // retries, pacing, HTTP) are otherwise deep enough to exceed
            // rustc's default query depth in release builds.
            let resolved = self
                .dedupe
                .resolve(
                    &cmd.command_id,
                    Box::pin(async {
                        let admission = tokio::select! {
                            a = self.breaker.admit() => a,
                            () = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
                        };
                        let outcome = self.call_gewe(cmd).await;
                        // Without an outcome the admission is dropped, which
                        // hands a probe's turn on.
                        if let Ok(o) = &outcome {
                            admission.record(o.result.as_ref().err().map(|e| e.kind));
                        }
                        Ok(Known {
                            outcome: outcome?,
                            completed_at: now_rfc3339(),
                            published: false,
                        })
                    }),
                )
                .await;
            match resolved {
                Resolved::Outcome { known, duplicate } => break (known, duplicate),
                // Look again while holding the delivery: the replica that
                // has the claim now stores an outcome, or the claim frees
                // up. A requeue would count towards the delivery limit.
                Resolved::Retry(reason) if matches!(*reason, Interrupted::ClaimLost) => {
                    tracing::warn!(%reason, "waiting for the commandId's outcome instead");
                }
                Resolved::Retry(reason) => return Err(reason),
            }
        };
        if duplicate {
            tracing::info!("commandId already has a published outcome; republishing it");
            metrics::counter!("commands_duplicate_total").increment(1);
        }
        let CallOutcome { result, attempts } = known.outcome.clone();
        let (status, v3, error) = match result {
            Ok(v3) => (Status::Succeeded, Some(v3), None),
            Err(e) => (Status::Failed, None, Some(*e)),
        };
        let event = ResultEvent {
            command_id: cmd.command_id.clone(),
            status,
            app_id: Some(cmd.app_id.clone()),
            chatroom_id: Some(cmd.chatroom_id.clone()),
            member_wxid: Some(cmd.member_wxid.clone()),
            v3,
            error,
            attempts,
            received_at,
            completed_at: known.completed_at.clone(),
            duplicate,
        };
        Ok((event, known))
    }

    /// All attempts for one command, each waiting for the account's turn.
    async fn call_gewe(&self, cmd: &Command) -> Result<CallOutcome, Interrupted> {
        let outcome = self
            .backoff
            .run(&self.shutdown, |attempt| {
                async move {
                    // No new call once shutdown began: the command goes back
                    // to the queue instead of racing the grace period.
                    let turn = tokio::select! {
                        turn = self.pacer.turn(&cmd.app_id) => turn,
                        () = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
                    };
                    if self.shutdown.is_cancelled() {
                        return Err(Interrupted::Shutdown);
                    }
                    // The waits above can outlast a Redis outage; a claim
                    // lost meanwhile means another replica may call.
                    if claim::lost() {
                        return Err(Interrupted::ClaimLost);
                    }
                    tracing::debug!(waited_ms = turn.waited.as_millis() as u64, "calling GeWe");
                    let started = tokio::time::Instant::now();
                    let result = self.gewe.add_group_member_as_friend(cmd).await;
                    metrics::histogram!("gewe_request_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    let verdict = classify(&result, &self.redactor);
                    let label = match &verdict {
                        Verdict::Success { .. } => "success",
                        Verdict::Permanent(e) | Verdict::Transient { error: e, .. } => {
                            e.kind.as_str()
                        }
                    };
                    metrics::counter!("gewe_requests_total", "outcome" => label).increment(1);
                    drop(turn);
                    Ok(verdict)
                }
                .instrument(tracing::error_span!("attempt", attempt))
            })
            .await?;
        match &outcome.result {
            // Debug, not info: one line per success would put JSON logging
            // on the hot path; the result event is the record.
            Ok(_) => tracing::debug!(
                attempts = outcome.attempts,
                "GeWe accepted the friend request"
            ),
            Err(e) => tracing::warn!(
                attempts = outcome.attempts,
                kind = e.kind.as_str(),
                error = %e.message,
                "GeWe call failed"
            ),
        }
        Ok(outcome)
    }

    /// Publishes `event`; on confirm settles the delivery as `settle` says,
    /// otherwise requeues it. Returns whether the event was confirmed.
    async fn publish_and_settle(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        event: &ResultEvent,
        settle: Settle,
        session: &SessionHandle,
    ) -> bool {
        let published =
            publish_event(&self.result_exchange, envelope, event, &session.publisher).await;
        let label = event.error_kind().map(ErrorKind::as_str).unwrap_or("none");
        match published {
            Ok(()) => {
                let status = match event.status {
                    Status::Succeeded => "succeeded",
                    Status::Failed => "failed",
                };
                metrics::counter!("results_published_total", "status" => status, "kind" => label)
                    .increment(1);
                let settled = match settle {
                    Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
                    Settle::DeadLetter => {
                        delivery
                            .acker
                            .reject(BasicRejectOptions { requeue: false })
                            .await
                    }
                };
                match settled {
                    Ok(true) => tracing::debug!(
                        routing_key = event.routing_key(),
                        "result confirmed; delivery settled"
                    ),
                    Ok(false) => tracing::warn!(
                        "result confirmed but the channel is gone; the broker will redeliver the command"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "result confirmed but settling failed; the broker will redeliver the command")
                    }
                }
                true
            }
            Err(e) => {
                metrics::counter!("results_publish_failures_total").increment(1);
                tracing::error!(error = %e, "result event not confirmed; requeueing the command");
                if matches!(e, PublishError::Broker { .. } | PublishError::NotConfirmed) {
                    // The publishing channel is dead (e.g. the exchange is
                    // missing): only a new session can publish again.
                    session.broken.cancel();
                }
                requeue(delivery).await;
                false
            }
        }
    }
}

async fn requeue(delivery: &Delivery) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    let nack = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.acker.nack(nack).await {
        tracing::warn!(error = %e, "requeue failed; the broker redelivers the command when the channel closes");
    }
}
