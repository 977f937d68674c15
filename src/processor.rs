//! What happens to one delivery: decode, call GeWe (paced, deduplicated,
//! retried), publish the confirmed result event, then settle the delivery.
//!
//! The order is the guarantee: a delivery is acked (or, when invalid,
//! rejected to the dead-letter exchange) only after its event is confirmed.
//! If the event cannot be made safe, the delivery is requeued, so the
//! command is retried rather than lost; the stored outcome keeps the retry
//! from calling GeWe again.

use std::{sync::Arc, time::Duration};

use lapin::{
    BasicProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use tracing::{Instrument, field};

use crate::{
    broker::{PublishError, Publisher},
    command::{self, Command, Envelope},
    config::AmqpSettings,
    dedupe::{Dedupe, Known},
    event::{ErrorKind, EventError, ResultEvent, Status, now_rfc3339},
    gewe::{Backoff, CallOutcome, GeweClient, classify},
    pacing::Pacer,
    redact::Redactor,
};

/// Pause before requeueing a command whose event could not be published, so
/// a persistent broker-side problem does not become a hot redelivery loop.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

/// Shared, immutable state of the command pipeline.
pub struct Processor {
    /// Names of exchanges and queues.
    pub amqp: AmqpSettings,
    /// GeWe client (connection-pooled).
    pub gewe: GeweClient,
    /// Retry policy.
    pub backoff: Backoff,
    /// Per-account pacing.
    pub pacer: Pacer,
    /// Known outcomes.
    pub dedupe: Dedupe,
    /// Token remover.
    pub redactor: Redactor,
}

/// How a delivery is settled once its event is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    DeadLetter,
}

impl Processor {
    /// Handles one delivery to completion. Never panics on input; every
    /// broker error is logged and leaves the delivery to be redelivered.
    pub async fn handle(self: Arc<Self>, delivery: Delivery, publisher: Publisher) {
        metrics::counter!("commands_received_total").increment(1);
        metrics::gauge!("commands_in_flight").increment(1.0);
        let received_at = now_rfc3339();
        let envelope = envelope_of(&delivery.properties);
        let span = tracing::error_span!(
            "command",
            command_id = field::Empty,
            app_id = field::Empty,
            redelivered = delivery.redelivered,
        );
        let work = async {
            let (event, settle) = match command::decode(&delivery.data, &envelope) {
                Ok(cmd) => {
                    span.record("command_id", cmd.command_id.as_str());
                    span.record("app_id", cmd.app_id.as_str());
                    (self.execute(&cmd, received_at).await, Settle::Ack)
                }
                Err(rejected) => {
                    let command::Rejected {
                        reason: invalid,
                        partial,
                    } = *rejected;
                    span.record("command_id", partial.command_id.as_str());
                    if let Some(app) = &partial.app_id {
                        span.record("app_id", app.as_str());
                    }
                    let message = self.redactor.redact(&invalid.to_string()).into_owned();
                    tracing::warn!(reason = %message, "invalid command; dead-lettering it");
                    let event = ResultEvent {
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
                    };
                    (event, Settle::DeadLetter)
                }
            };
            self.publish_and_settle(&delivery, &envelope, &event, settle, &publisher)
                .await;
        };
        work.instrument(span.clone()).await;
        metrics::gauge!("commands_in_flight").decrement(1.0);
    }

    /// Runs (or recalls) the GeWe call for `cmd` and builds its event.
    async fn execute(&self, cmd: &Command, received_at: String) -> ResultEvent {
        let resolved = self
            .dedupe
            .resolve(&cmd.command_id, async {
                let outcome = self.call_gewe(cmd).await;
                Known {
                    outcome,
                    completed_at: now_rfc3339(),
                }
            })
            .await;
        let Known {
            outcome: CallOutcome { result, attempts },
            completed_at,
        } = (*resolved.known).clone();
        if resolved.duplicate {
            tracing::info!("commandId already has a known outcome; republishing it");
            metrics::counter!("commands_duplicate_total").increment(1);
        }
        let (status, v3, error) = match result {
            Ok(v3) => (Status::Succeeded, Some(v3), None),
            Err(e) => (Status::Failed, None, Some(e)),
        };
        ResultEvent {
            command_id: cmd.command_id.clone(),
            status,
            app_id: Some(cmd.app_id.clone()),
            chatroom_id: Some(cmd.chatroom_id.clone()),
            member_wxid: Some(cmd.member_wxid.clone()),
            v3,
            error,
            attempts,
            received_at,
            completed_at,
            duplicate: resolved.duplicate,
        }
    }

    /// All attempts for one command, each waiting for the account's turn.
    async fn call_gewe(&self, cmd: &Command) -> CallOutcome {
        let outcome = self
            .backoff
            .run(|attempt| {
                async move {
                    let turn = self.pacer.turn(&cmd.app_id).await;
                    tracing::debug!(
                        attempt,
                        waited_ms = turn.waited.as_millis() as u64,
                        "calling GeWe"
                    );
                    let started = tokio::time::Instant::now();
                    let result = self.gewe.add_group_member_as_friend(cmd).await;
                    metrics::histogram!("gewe_request_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    let verdict = classify(&result, &self.redactor);
                    let label = match &verdict {
                        crate::gewe::Verdict::Success { .. } => "success",
                        crate::gewe::Verdict::Permanent(e)
                        | crate::gewe::Verdict::Transient { error: e, .. } => e.kind.as_str(),
                    };
                    metrics::counter!("gewe_requests_total", "outcome" => label).increment(1);
                    drop(turn);
                    verdict
                }
                .instrument(tracing::error_span!("attempt", attempt))
            })
            .await;
        match &outcome.result {
            Ok(_) => tracing::info!(
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
        outcome
    }

    async fn publish_and_settle(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        event: &ResultEvent,
        settle: Settle,
        publisher: &Publisher,
    ) {
        let published = self.publish_event(envelope, event, publisher).await;
        let label = event.error_kind().map(ErrorKind::as_str).unwrap_or("none");
        match published {
            Ok(()) => {
                metrics::counter!(
                    "results_published_total",
                    "status" => match event.status { Status::Succeeded => "succeeded", Status::Failed => "failed" },
                    "kind" => label
                )
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
            }
            Err(e) => {
                metrics::counter!("results_publish_failures_total").increment(1);
                tracing::error!(error = %e, "result event not confirmed; requeueing the command");
                tokio::time::sleep(REQUEUE_PAUSE).await;
                if let Err(e) = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                {
                    tracing::warn!(error = %e, "requeue failed; the broker will redeliver the command when the channel closes");
                }
            }
        }
    }

    /// Publishes the event to the result exchange and, when asked, a copy to
    /// `reply_to`, both `mandatory` and confirmed. The event is safe once at
    /// least one queue holds it: an unroutable main event is tolerated only
    /// when the requester's reply queue took the copy, and a vanished reply
    /// queue is tolerated when the result exchange routed the event.
    async fn publish_event(
        &self,
        envelope: &Envelope,
        event: &ResultEvent,
        publisher: &Publisher,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event).unwrap_or_else(|_| b"{}".to_vec());
        let properties = event_properties(envelope, event);
        let main = publisher.publish(
            &self.amqp.result_exchange,
            event.routing_key(),
            true,
            &body,
            properties.clone(),
        );
        let Some(reply_to) = envelope.reply_to.as_deref() else {
            return main.await;
        };
        let reply = publisher.publish("", reply_to, true, &body, properties);
        match tokio::join!(main, reply) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(PublishError::Unroutable { .. })) => {
                tracing::warn!(%reply_to, "reply_to queue no longer exists; result published to the exchange only");
                Ok(())
            }
            (Err(e @ PublishError::Unroutable { .. }), Ok(())) => {
                tracing::warn!(error = %e, "result reached only the reply_to queue; bind a queue to the result exchange");
                Ok(())
            }
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        }
    }
}

/// Reads the properties the worker honours.
pub fn envelope_of(p: &BasicProperties) -> Envelope {
    let s = |v: &Option<ShortString>| v.as_ref().map(|v| v.as_str().to_owned());
    let traceparent = p.headers().as_ref().and_then(|h| {
        h.inner().get("traceparent").and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        })
    });
    Envelope {
        message_id: s(p.message_id()),
        correlation_id: s(p.correlation_id()),
        reply_to: s(p.reply_to()),
        traceparent,
    }
}

/// Contract §4 properties of a result event.
pub fn event_properties(envelope: &Envelope, event: &ResultEvent) -> BasicProperties {
    let correlation = envelope
        .correlation_id
        .clone()
        .unwrap_or_else(|| event.command_id.clone());
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_type(event.routing_key().into())
        .with_timestamp(timestamp);
    if let Ok(c) = ShortString::try_new(correlation) {
        props = props.with_correlation_id(c);
    }
    if let Some(tp) = &envelope.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(tp.as_str().into()),
        );
        props = props.with_headers(headers);
    }
    props
}
