//! What happens to one delivery, top to bottom: decode it (so that even a
//! delivery still waiting logs under its commandId), wait for a slot of
//! `amqp.prefetch`, find or claim the commandId's outcome, call GeWe if
//! there is none (breaker-gated, paced, retried: [`attempt`]), store a
//! definitive answer, publish the confirmed result event, then settle
//! ([`settle`]).
//!
//! The order is the guarantee. A delivery is acked (or, when invalid,
//! rejected to the dead-letter exchange) only after its event is confirmed,
//! and GeWe's answer is stored before the event is published, so a
//! redelivery republishes it instead of calling again. While a delivery
//! handles its commandId, copies wait for it; the first confirmed event is
//! the only one not marked `duplicate`.

mod attempt;
mod deferral;
mod settle;

use std::{sync::Arc, time::Duration};

use attempt::Stop;

use lapin::message::Delivery;
use tokio::sync::Semaphore;

use crate::{
    breaker::Breaker,
    broker::SessionHandle,
    callbacks::Matcher,
    command::{self, Command, Envelope},
    config::AmqpSettings,
    event::ResultEvent,
    gewe::{GeweClient, RetryPolicy, Tally},
    halt::{Halt, Interrupted, Signal},
    idempotency::{Fingerprint, Found, Idempotency, Record, Stored},
    meters::{Deferral, Requeue, meters},
    pacing::Pacer,
    park::Parking,
    redact::Redactor,
    telemetry::{CommandContext, CommandTracer, DeliveryFacts, DeliverySpan, command_scope},
    timestamp,
};

/// The parts of the command pipeline, shared by all deliveries.
pub struct Processor {
    /// Names of the command queue and its delay queues, and how to declare
    /// one again.
    amqp: AmqpSettings,
    /// How long a delivery may wait before its GeWe call must start (see
    /// [`hold_budget`]).
    hold: Duration,
    result_exchange: String,
    gewe: GeweClient,
    retry: RetryPolicy,
    pacer: Pacer,
    idempotency: Idempotency,
    breaker: Arc<Breaker>,
    parking: Parking,
    redactor: Redactor,
    shutdown: Signal,
    delivery_limit: Option<u32>,
    /// One permit per delivery being processed, across broker sessions: a
    /// lost session's calls still finishing never add to a new session's
    /// prefetch.
    slots: Semaphore,
    /// With `callbacks.enabled`: remembers the `v3` of succeeded events.
    matcher: Option<Arc<Matcher>>,
    /// With `telemetry.otlp_endpoint`: makes each delivery's spans.
    tracer: Option<CommandTracer>,
}

/// What [`Processor::new`] is made of.
pub struct Parts {
    /// The broker settings: queue names, `amqp.max_hold`.
    pub amqp: AmqpSettings,
    /// `gewe.timeout`, to fit the last call inside `amqp.max_hold`.
    pub gewe_timeout: Duration,
    /// Topic exchange results are published to.
    pub result_exchange: String,
    /// GeWe client (connection-pooled).
    pub gewe: GeweClient,
    /// Retry policy of GeWe attempts.
    pub retry: RetryPolicy,
    /// Per-account pacing and budgets.
    pub pacer: Pacer,
    /// Known outcomes and claims.
    pub idempotency: Idempotency,
    /// Circuit breaker on systemic failures.
    pub breaker: Arc<Breaker>,
    /// Delay queues for commands tried again later (`retry.park`).
    pub parking: Parking,
    /// Token remover.
    pub redactor: Redactor,
    /// Raised on shutdown: no new GeWe call starts after it.
    pub shutdown: Signal,
    /// `amqp.prefetch`: deliveries processed at once.
    pub prefetch: u16,
    /// `amqp.delivery_limit` when the queue enforces it (quorum).
    pub delivery_limit: Option<u32>,
    /// With `callbacks.enabled`: where succeeded commands are remembered.
    pub matcher: Option<Arc<Matcher>>,
    /// With `telemetry.otlp_endpoint`: the delivery spans' maker.
    pub tracer: Option<CommandTracer>,
}

/// A command delivery on its way through: the message and what settling
/// and publishing need.
struct CommandDelivery {
    /// The message as the broker delivered it.
    message: Delivery,
    envelope: Envelope,
    received_at: String,
    session: Arc<SessionHandle>,
    halt: Halt,
    /// With trace export: the delivery's consumer span (ended when the
    /// delivery is dropped, after it is settled).
    trace: Option<DeliverySpan>,
}

/// Counts a delivery in `commands_in_flight` while it lives.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        meters().commands_in_flight.increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        meters().commands_in_flight.decrement(1.0);
    }
}

impl Processor {
    /// A pipeline made of `parts`.
    pub fn new(parts: Parts) -> Self {
        Self {
            hold: hold_budget(parts.amqp.max_hold, parts.gewe_timeout),
            amqp: parts.amqp,
            result_exchange: parts.result_exchange,
            gewe: parts.gewe,
            retry: parts.retry,
            pacer: parts.pacer,
            idempotency: parts.idempotency,
            breaker: parts.breaker,
            parking: parts.parking,
            redactor: parts.redactor,
            shutdown: parts.shutdown,
            delivery_limit: parts.delivery_limit,
            slots: Semaphore::new(usize::from(parts.prefetch.max(1))),
            matcher: parts.matcher,
            tracer: parts.tracer,
        }
    }

    /// The GeWe client (for start-up logs).
    pub fn gewe(&self) -> &GeweClient {
        &self.gewe
    }

    /// Handles one delivery to completion. Never panics on input; every
    /// broker error is logged and leaves the delivery to be redelivered.
    pub async fn handle(self: Arc<Self>, message: Delivery, session: Arc<SessionHandle>) {
        meters().commands_received.increment(1);
        let received_at = timestamp::now();
        let mut envelope = Envelope::from_properties(&message.properties, &self.amqp.command_queue);
        let decoded = command::decode(&message.data, &envelope);
        let (command_id, app_id) = match &decoded {
            Ok(cmd) => (cmd.command_id.as_str(), Some(cmd.app_id.as_str())),
            Err(rejected) => (
                rejected.partial.command_id.as_str(),
                rejected.partial.app_id.as_deref(),
            ),
        };
        // The caller's trace context: the worker's handling becomes its
        // child span, and the result event carries that span as the parent.
        let (trace, (trace_id, span_id, parent_span_id)) = match &self.tracer {
            None => match envelope.continue_trace() {
                Some((parent, span_id)) => (
                    None,
                    (Some(parent.trace_id), Some(span_id), Some(parent.parent_id)),
                ),
                None => (None, (None, None, None)),
            },
            Some(tracer) => {
                let parent = envelope.take_traceparent();
                let facts = DeliveryFacts {
                    message_id: envelope.message_id().unwrap_or(command_id),
                    command_id,
                    app_id,
                    redelivered: message.redelivered,
                };
                let span = tracer.delivery(parent.as_ref(), facts);
                let ids = span.ids().map_or((None, None, None), |ids| {
                    envelope.set_event_traceparent(ids.traceparent());
                    (
                        Some(ids.trace_id),
                        Some(ids.span_id),
                        parent.map(|p| p.parent_id),
                    )
                });
                (Some(span), ids)
            }
        };
        // What every log line about this command says (in place of a
        // tracing span, which every command would pay for, logged or not).
        let context = CommandContext {
            command_id: command_id.to_owned(),
            app_id: app_id.map(str::to_owned),
            redelivered: message.redelivered,
            trace_id,
            span_id,
            parent_span_id,
        };
        let halt = session
            .halt(self.shutdown.clone())
            .holding_until(tokio::time::Instant::now() + self.hold);
        let delivery = CommandDelivery {
            message,
            envelope,
            received_at,
            session,
            halt,
            trace,
        };
        command_scope(context, self.process(decoded, &delivery)).await;
    }

    async fn process(
        &self,
        decoded: Result<Command, Box<command::Rejected>>,
        delivery: &CommandDelivery,
    ) {
        // Without the hold deadline: slots are short of prefetch only while
        // a lost session's calls finish, and those end within their hold.
        let slot = match delivery
            .halt
            .without_deadline()
            .guard(self.slots.acquire())
            .await
        {
            Ok(Ok(slot)) => slot,
            // The semaphore is never closed.
            Ok(Err(_)) => return self.give_back(delivery, Interrupted::Shutdown).await,
            Err(interrupted) => return self.give_back(delivery, interrupted).await,
        };
        let _in_flight = InFlight::enter();
        match decoded {
            Ok(cmd) => self.carry_out(&cmd, delivery).await,
            Err(rejected) => {
                let command::Rejected { reason, partial } = *rejected;
                let message = self.redactor.redact(&reason.to_string()).into_owned();
                tracing::warn!(reason = %message, "invalid command; dead-lettering it");
                let event = ResultEvent::invalid(partial, message, &delivery.received_at);
                self.refuse(&event, delivery).await;
            }
        }
        drop(slot);
    }

    /// A valid command: its outcome is found or made, then announced; or,
    /// when its account cannot send now, it is deferred.
    async fn carry_out(&self, cmd: &Command, delivery: &CommandDelivery) {
        let fingerprint = Fingerprint::of(cmd);
        // Kept across a lost claim and earlier tries, so `attempts` counts
        // every request.
        let mut tally = Tally::after_earlier_tries(delivery.envelope.prior_attempts());
        loop {
            let found = match self
                .idempotency
                .acquire(&cmd.command_id, fingerprint, &delivery.halt)
                .await
            {
                Ok(found) => found,
                // Waited for a copy or for Redis as long as the hold allows.
                Err(Interrupted::HeldTooLong) => {
                    return self.defer(Deferral::Pacing, None, &tally, delivery).await;
                }
                Err(interrupted) => return self.give_back(delivery, interrupted).await,
            };
            let (mut claim, stored) = match found {
                Found::Duplicate(record) => return self.republish(cmd, &record, delivery).await,
                Found::Conflict => return self.refuse_reused_id(cmd, delivery).await,
                Found::Unreadable(reason) => {
                    return self.refuse_unreadable(cmd, &reason, delivery).await;
                }
                Found::Claimed { claim, stored } => (claim, stored),
            };
            let record = match stored {
                Some(record) => record,
                None => {
                    let outcome = match self.call_gewe(cmd, &claim, delivery, &mut tally).await {
                        Ok(outcome) => outcome,
                        Err(Stop::Interrupted(Interrupted::ClaimLost)) => {
                            tracing::warn!(
                                "the claim on this commandId was lost before the request; looking it up again"
                            );
                            continue;
                        }
                        Err(Stop::Defer(reason, until)) => match self.expiry(delivery, &tally) {
                            Some(expired) => expired,
                            None => {
                                claim.release().await;
                                return self.defer(reason, until, &tally, delivery).await;
                            }
                        },
                        Err(Stop::Interrupted(interrupted)) => {
                            claim.release().await;
                            return self.give_back(delivery, interrupted).await;
                        }
                    };
                    let record = Record::new(fingerprint, outcome, delivery.envelope.tries());
                    // GeWe answered: keep the answer before anything is
                    // published, so no redelivery calls again.
                    if record.is_definitive() {
                        match claim.store(&record).await {
                            Stored::Kept => {}
                            Stored::Lost => {
                                tracing::warn!(
                                    "the claim on this commandId was lost while storing GeWe's answer; looking it up again"
                                );
                                continue;
                            }
                            Stored::Unencodable => {
                                claim.release().await;
                                return self.requeue(delivery, Requeue::PublishFailed).await;
                            }
                        }
                    }
                    record
                }
            };
            if delivery.halt.session_lost() {
                // The stored answer waits for the redelivery.
                claim.release().await;
                return self.give_back(delivery, Interrupted::SessionLost).await;
            }
            if let Some(slot) = self.park_slot(&record, delivery) {
                // Not stored: the next try calls GeWe again.
                claim.release().await;
                return self.park(slot, record.outcome().attempts, delivery).await;
            }
            let event = ResultEvent::of_outcome(
                cmd,
                record.outcome(),
                record.tries(),
                &delivery.received_at,
                record.completed_at(),
                false,
            );
            if let Some(matcher) = &self.matcher {
                // Before the event: a callback that beats its confirm waits
                // for it instead of counting as unmatched.
                matcher
                    .expect(&event, &delivery.envelope, &delivery.halt)
                    .await;
            }
            if self.publish(&event, delivery).await {
                if record.is_definitive() {
                    claim.published(&self.shutdown).await;
                } else {
                    claim.release().await;
                }
                self.ack(delivery).await;
            } else {
                // The next copy of this command publishes it unmarked.
                claim.release().await;
                self.requeue(delivery, Requeue::PublishFailed).await;
            }
            return;
        }
    }

    /// An outcome already announced: published again, marked duplicate.
    async fn republish(&self, cmd: &Command, record: &Record, delivery: &CommandDelivery) {
        tracing::info!("commandId already has a published outcome; republishing it");
        meters().commands_duplicate.increment(1);
        let event = ResultEvent::of_outcome(
            cmd,
            record.outcome(),
            record.tries(),
            &delivery.received_at,
            record.completed_at(),
            true,
        );
        if self.publish(&event, delivery).await {
            self.ack(delivery).await;
        } else {
            self.requeue(delivery, Requeue::PublishFailed).await;
        }
    }

    /// A commandId reused for another request gets neither that request's
    /// outcome nor a GeWe call.
    async fn refuse_reused_id(&self, cmd: &Command, delivery: &CommandDelivery) {
        let message = format!(
            "commandId '{}' was already used for another request (a different appId, chatroomId, memberWxid or content); give each request its own commandId",
            cmd.command_id
        );
        self.refuse_command(cmd, &message, delivery).await;
    }

    /// A stored outcome this version cannot read: calling again could
    /// double the friend request, so the command is dead-lettered.
    async fn refuse_unreadable(&self, cmd: &Command, reason: &str, delivery: &CommandDelivery) {
        let message = format!(
            "commandId '{}' has a stored outcome this version cannot read ({reason}); it was not sent to GeWe again",
            cmd.command_id
        );
        self.refuse_command(cmd, &message, delivery).await;
    }

    /// A valid command that is not carried out: `invalid_command` saying
    /// why, and the original to the dead letters.
    async fn refuse_command(&self, cmd: &Command, message: &str, delivery: &CommandDelivery) {
        let message = self.redactor.redact(message).into_owned();
        tracing::warn!(reason = %message, "command refused; dead-lettering it");
        let event = ResultEvent::invalid(cmd.partial(), message, &delivery.received_at);
        self.refuse(&event, delivery).await;
    }

    /// Gives a delivery without an outcome back to the queue.
    async fn give_back(&self, delivery: &CommandDelivery, interrupted: Interrupted) {
        tracing::warn!(reason = %interrupted, "no outcome for now; the command goes back to the queue");
        match interrupted {
            // The broker already has it back; nothing to settle on a dead channel.
            Interrupted::SessionLost => {
                meters().requeued(Requeue::SessionLost).increment(1);
                if let Some(trace) = &delivery.trace {
                    trace.outcome("requeued", None);
                }
            }
            Interrupted::Shutdown => self.requeue(delivery, Requeue::Shutdown).await,
            Interrupted::ClaimLost => self.requeue(delivery, Requeue::ClaimLost).await,
            // Deferred where it can happen; here only a wait that had no
            // deadline could end, so this is not expected.
            Interrupted::HeldTooLong => self.requeue(delivery, Requeue::Shutdown).await,
        }
    }
}

/// How long a delivery may wait (for a copy, the breaker, its turn, a
/// backoff) before its last GeWe call must start: `amqp.max_hold` less one
/// call (`gewe.timeout`) and a margin for storing and publishing the result
/// (a tenth of the hold, at most a second), so the delivery is settled
/// within `amqp.max_hold`.
pub fn hold_budget(max_hold: Duration, gewe_timeout: Duration) -> Duration {
    let margin = (max_hold / 10).min(Duration::from_secs(1));
    max_hold
        .saturating_sub(gewe_timeout)
        .saturating_sub(margin)
        .max(Duration::from_secs(1))
}
