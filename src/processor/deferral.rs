//! Deferring a command whose account cannot send now (contract §7), and
//! the delay-queue publish that deferral and parking share.
//!
//! A deferred command is republished, body and properties unchanged but
//! for its try headers, to the deferral queue whose delay best fits its
//! account's next opening; the delivery is acked once that copy is
//! confirmed. No event and no stored outcome: the command's one event comes
//! when it is carried out, or `expired` once it has waited
//! `accounts.max_wait` since it first arrived.

use std::time::Duration;

use lapin::BasicProperties;

use super::{CommandDelivery, Processor};
use crate::{
    accounts::calendar::Millis,
    broker::topology,
    command::{self, NextTry},
    defer::defer_slot,
    error_kind::ErrorKind,
    gewe::Tally,
    halt::Interrupted,
    meters::{Deferral, Requeue, meters},
    outcome::{CallOutcome, EventError, Tries},
    timestamp,
};

impl Processor {
    /// The `expired` outcome, when the command has waited for its account
    /// `accounts.max_wait` since it first arrived.
    pub(super) fn expiry(&self, delivery: &CommandDelivery, tally: &Tally) -> Option<CallOutcome> {
        let accounts = self.pacer.accounts();
        let max_wait = accounts.policies().max_wait;
        let first = delivery.envelope.first_received().and_then(parse_millis)?;
        let waited = Duration::from_millis(accounts.now().saturating_sub(first));
        if waited < max_wait {
            return None;
        }
        meters().commands_expired.increment(1);
        let message = format!(
            "the command waited {} for its account (accounts.max_wait is {}) and was not sent",
            humantime::format_duration(Duration::from_secs(waited.as_secs())),
            humantime::format_duration(max_wait),
        );
        tracing::warn!(%message, "command expired");
        Some(CallOutcome {
            result: Err(Box::new(EventError::new(ErrorKind::Expired, message, None))),
            attempts: tally.attempts(),
        })
    }

    /// Defers the command for `reason` until about `until`: a copy to the
    /// deferral queue, then the ack.
    pub(super) async fn defer(
        &self,
        reason: Deferral,
        until: Option<Millis>,
        tally: &Tally,
        delivery: &CommandDelivery,
    ) {
        if delivery.halt.session_lost() {
            return self.give_back(delivery, Interrupted::SessionLost).await;
        }
        let slot = defer_slot(&self.amqp.command_queue, until, self.pacer.accounts().now());
        let earlier = delivery.envelope.tries();
        let tries = Tries {
            parked: earlier.parked,
            deferred: earlier.deferred.saturating_add(1),
        };
        let first_received = delivery
            .envelope
            .first_received()
            .unwrap_or(&delivery.received_at);
        let properties = command::with_tries(
            &delivery.message.properties,
            NextTry {
                tries,
                attempts: tally.attempts(),
                first_received,
            },
        );
        if self
            .send_to_delay_queue(&slot.queue, slot.delay, properties, delivery)
            .await
        {
            meters().deferred(reason).increment(1);
            if let Some(trace) = &delivery.trace {
                trace.outcome("deferred", None);
            }
            tracing::info!(
                reason = reason.label(),
                queue = %slot.queue,
                until = until.map(timestamp::format_millis),
                deferred = tries.deferred,
                "the account cannot send now; deferred the command"
            );
            self.ack(delivery).await;
        } else {
            self.requeue(delivery, Requeue::PublishFailed).await;
        }
    }

    /// Publishes the command's copy to the delay queue `queue` with a
    /// confirm; true once the broker has it. A queue that is missing (an
    /// operator deleted it) is declared again and the publish retried once,
    /// so the command is never sent to GeWe again for that reason.
    pub(super) async fn send_to_delay_queue(
        &self,
        queue: &str,
        delay: Duration,
        properties: BasicProperties,
        delivery: &CommandDelivery,
    ) -> bool {
        let publisher = delivery.session.publisher();
        let declare = async |channel: &_| {
            topology::declare_delay_queue(channel, &self.amqp, queue, delay).await
        };
        let sent = publisher
            .publish_to_delay_queue(queue, &delivery.message.data, properties, declare)
            .await;
        let Err(error) = sent else {
            return true;
        };
        tracing::error!(%error, queue, "the copy for the delay queue was not confirmed");
        if error.breaks_channel() || !publisher.is_open() {
            delivery.session.publishing_channel_broke();
        }
        false
    }
}

/// An RFC 3339 time as milliseconds since the epoch.
fn parse_millis(text: &str) -> Option<Millis> {
    let ts: jiff::Timestamp = text.parse().ok()?;
    u64::try_from(ts.as_millisecond()).ok()
}
