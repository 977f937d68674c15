//! One callback from `callbacks.queue`, top to bottom: parse, find the
//! commands its `v3` belongs to, and for each whose `succeeded` event is
//! confirmed claim its accepted event, publish it; then settle.
//!
//! As for commands, a callback is acked only after its events are
//! confirmed; the mark that an event is out is set before the ack, so a
//! redelivery (or a copy in another replica) is acknowledged as a repeat
//! instead of publishing again. A callback whose `v3` is unknown, or one
//! of whose commands is still pending, is tried again through the early
//! delay queue ([`super::early`]) until `callbacks.early_grace` has passed,
//! then counts as unmatched. Other callbacks that match nothing are acked
//! at once; one that is not a JSON object is rejected to the dead-letter
//! exchange.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use lapin::{BasicProperties, message::Delivery, types::AMQPValue};
use tracing::Instrument;

use super::{
    Matcher, REDIS_BACKOFF, accepted,
    accepted::AcceptedEvent,
    callback::{self, Candidate},
    early,
    store::{Claim, Mark, Phase, Sent},
};
use crate::{
    broker::{SessionHandle, settle, topology},
    halt::{Halt, Interrupted, Signal},
    meters::{CallbackOutcome, meters},
    redis_client::retry_while_unavailable,
    timestamp,
};

/// Header the callback endpoint sets: when the callback reached the worker.
pub const RECEIVED_AT_HEADER: &str = "x-gewe-received-at";
/// Poll period while another delivery publishes the same accepted event.
const HELD_POLL: Duration = Duration::from_millis(100);

/// A callback delivery on its way through.
struct CallbackDelivery<'a> {
    /// The message as the broker delivered it.
    message: Delivery,
    session: Arc<SessionHandle>,
    halt: Halt,
    received_at: String,
    candidate: Candidate<'a>,
}

impl Matcher {
    /// Handles one callback delivery to completion. Never panics on input;
    /// a broker or Redis problem leaves it to be redelivered.
    pub async fn handle(self: Arc<Self>, message: Delivery, session: Arc<SessionHandle>) {
        let received_at = received_at(&message.properties).unwrap_or_else(timestamp::now);
        let body = match callback::parse(&message.data) {
            Ok(body) => body,
            Err(invalid) => {
                tracing::warn!(reason = %invalid, "callback is not a JSON object; dead-lettering it");
                meters().callback(CallbackOutcome::Invalid).increment(1);
                return settle::dead_letter(&message, "callback").await;
            }
        };
        let candidate = match callback::candidate(&body) {
            Ok(candidate) => candidate,
            Err(why) => {
                let type_name = callback::type_name(&body).unwrap_or("");
                tracing::debug!(type_name, reason = %why, "callback reports no accepted friend request");
                return unmatched(&message).await;
            }
        };
        let span = tracing::info_span!("callback", app_id = candidate.app_id);
        let delivery = CallbackDelivery {
            halt: session.halt(self.shutdown.clone()),
            message,
            session,
            received_at,
            candidate,
        };
        self.match_candidate(&delivery).instrument(span).await;
    }

    async fn match_candidate(&self, delivery: &CallbackDelivery<'_>) {
        let Candidate { app_id, v3, .. } = delivery.candidate;
        let found = retry_while_unavailable(
            REDIS_BACKOFF,
            &delivery.halt,
            "Redis unavailable: holding the callback",
            || self.store.lookup(app_id, v3),
        )
        .await;
        let found = match found {
            Ok(found) => found,
            Err(interrupted) => return give_back(delivery, interrupted).await,
        };
        let (mut published, mut repeated, mut pending) = (0, 0, 0);
        for remembered in found {
            if remembered.phase == Phase::Pending {
                pending += 1;
                continue;
            }
            match self.accept(&remembered.sent, delivery).await {
                Ok(true) => published += 1,
                Ok(false) => repeated += 1,
                // Settled already: given back or requeued.
                Err(Settled) => return,
            }
        }
        if pending > 0 || published + repeated == 0 {
            return self.too_early(delivery, pending).await;
        }
        let outcome = if published > 0 {
            CallbackOutcome::Matched
        } else {
            CallbackOutcome::Repeated
        };
        meters().callback(outcome).increment(1);
        settle::ack(&delivery.message, "callback").await;
    }

    /// Publishes `sent`'s accepted event unless it is out already: `true`
    /// when this delivery published it, `false` for a repeat. On `Err` the
    /// delivery is settled (requeued or given back).
    async fn accept(&self, sent: &Sent, delivery: &CallbackDelivery<'_>) -> Result<bool, Settled> {
        let command_id = sent.command_id.as_str();
        let claim = loop {
            let mark = retry_while_unavailable(
                REDIS_BACKOFF,
                &delivery.halt,
                "Redis unavailable: holding the callback",
                || self.store.claim(command_id),
            )
            .await;
            match mark {
                Ok(Mark::Claimed(claim)) => break claim,
                Ok(Mark::Repeated) => {
                    tracing::info!(
                        command_id,
                        "accepted event already published; no other for this callback"
                    );
                    return Ok(false);
                }
                Ok(Mark::Held) => {
                    if let Err(interrupted) = delivery.halt.sleep(HELD_POLL).await {
                        give_back(delivery, interrupted).await;
                        return Err(Settled);
                    }
                }
                Err(interrupted) => {
                    give_back(delivery, interrupted).await;
                    return Err(Settled);
                }
            }
        };
        let accepted_at = SystemTime::now();
        let event = AcceptedEvent::new(
            sent,
            delivery.candidate.friend_wxid,
            delivery.received_at.clone(),
            timestamp::format(accepted_at),
        );
        let published = accepted::publish(
            &self.result_exchange,
            &event,
            &sent.fields.correlation_id,
            delivery.session.publisher(),
        )
        .await;
        if let Err(e) = published {
            meters().results_publish_failures.increment(1);
            tracing::error!(command_id, error = %e, "accepted event not confirmed; requeueing the callback");
            if e.breaks_channel() {
                delivery.session.publishing_channel_broke();
            }
            if let Err(e) = self.store.release(&claim).await {
                tracing::warn!(error = %e, "could not release the claim on the accepted event; it expires by itself");
            }
            settle::requeue(&delivery.message, "callback").await;
            return Err(Settled);
        }
        self.announced(&claim).await;
        let delay = humantime::parse_rfc3339(&sent.fields.completed_at)
            .ok()
            .and_then(|completed| accepted_at.duration_since(completed).ok());
        if let Some(delay) = delay {
            meters().accept_delay.record(delay.as_secs_f64());
        }
        meters().results_accepted.increment(1);
        tracing::info!(
            command_id,
            accepted_after_s = delay.map(|d| d.as_secs()),
            "friend request accepted; accepted event published"
        );
        Ok(true)
    }

    /// A callback whose `v3` is not known, or has `pending` commands: it
    /// goes round the early delay queue while `callbacks.early_grace`
    /// allows (acked once its copy is confirmed), then counts as unmatched.
    async fn too_early(&self, delivery: &CallbackDelivery<'_>, pending: usize) {
        let message = &delivery.message;
        let tries = self.early.tries(&message.properties);
        if !self.early.may_wait(tries) {
            if pending > 0 {
                tracing::warn!(
                    pending,
                    tries,
                    "callback's commands still have no confirmed succeeded event after callbacks.early_grace; it counts as unmatched"
                );
            } else {
                tracing::debug!(
                    tries,
                    "callback v3 is not one of this account's succeeded commands (unknown, expired or another account's)"
                );
            }
            return unmatched(message).await;
        }
        let properties = early::with_tries(
            &message.properties,
            tries.saturating_add(1),
            RECEIVED_AT_HEADER,
            &delivery.received_at,
        );
        let early = &self.early;
        let declare = async |channel: &_| {
            topology::declare_early_queue(channel, &early.returns_to, early.queue_type).await
        };
        let sent = delivery
            .session
            .publisher()
            .publish_to_delay_queue(&early.queue, &message.data, properties, declare)
            .await;
        match sent {
            Ok(()) => {
                tracing::debug!(
                    tries,
                    pending,
                    "callback came before its command's succeeded event; it is tried again after a delay"
                );
                meters().callback(CallbackOutcome::Early).increment(1);
                settle::ack(message, "callback").await;
            }
            Err(e) => {
                tracing::error!(error = %e, queue = %self.early.queue, "could not delay the early callback; requeueing it");
                if e.breaks_channel() {
                    delivery.session.publishing_channel_broke();
                }
                settle::requeue(message, "callback").await;
            }
        }
    }

    /// Marks the accepted event as out, through a Redis outage until
    /// shutdown (the broker session may be gone meanwhile: a redelivery of
    /// the callback then waits for this and is acked as a repeat).
    async fn announced(&self, claim: &Claim) {
        let until_shutdown = Halt::new(self.shutdown.clone(), Signal::new());
        let marked = retry_while_unavailable(
            REDIS_BACKOFF,
            &until_shutdown,
            "could not mark the accepted event as published in Redis yet",
            || self.store.announced(claim),
        )
        .await;
        if marked.is_err() {
            tracing::warn!(
                "gave up marking the accepted event as published: a repeated callback may publish it again"
            );
        }
    }
}

/// When the callback reached the worker: the endpoint's header when it came
/// that way and is RFC 3339, else `None` (now, as it is consumed).
fn received_at(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    let text = match headers.inner().get(RECEIVED_AT_HEADER)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        _ => return None,
    };
    humantime::parse_rfc3339(&text).ok().map(|_| text)
}

async fn unmatched(delivery: &Delivery) {
    meters().callback(CallbackOutcome::Unmatched).increment(1);
    settle::ack(delivery, "callback").await;
}

/// The delivery was settled on the way (requeued or given back).
struct Settled;

/// A callback without an outcome for now goes back to the queue.
async fn give_back(delivery: &CallbackDelivery<'_>, interrupted: Interrupted) {
    tracing::warn!(reason = %interrupted, "callback not matched for now; it goes back to the queue");
    match interrupted {
        // The broker already has it back.
        Interrupted::SessionLost => {}
        // Callbacks have no hold deadline; listed for completeness.
        Interrupted::Shutdown | Interrupted::ClaimLost | Interrupted::HeldTooLong => {
            settle::requeue(&delivery.message, "callback").await
        }
    }
}
