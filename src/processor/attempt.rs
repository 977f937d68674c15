//! The GeWe attempts of one command.
//!
//! Every attempt, retries included, is admitted by the circuit breaker,
//! waits for its account's pacing turn and budget, and goes out only while
//! the commandId's claim will outlast it. A call already sent is never
//! abandoned: its answer is what the command's outcome is made of. A
//! command that cannot be sent within `amqp.max_hold` (an open breaker, a
//! far turn, a resting account) or that meets WeChat's "too often" stops
//! with [`Stop::Defer`]: it goes back through the broker.

use tokio::time::Instant;

use super::{CommandDelivery, Processor};
use crate::{
    accounts::calendar::Millis,
    command::Command,
    gewe::{Step, Tally, Verdict, classify},
    halt::Interrupted,
    idempotency::Claim,
    meters::{Deferral, meters},
    outcome::CallOutcome,
    pacing::NoTurn,
};

/// Why a command's attempts stop without an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Shutdown, a lost session or claim: back to the queue.
    Interrupted(Interrupted),
    /// Deferred through the broker, for this reason, until then if known.
    Defer(Deferral, Option<Millis>),
}

impl From<Interrupted> for Stop {
    fn from(i: Interrupted) -> Self {
        match i {
            // The waits of an attempt are for the account's turn.
            Interrupted::HeldTooLong => Stop::Defer(Deferral::Pacing, None),
            other => Stop::Interrupted(other),
        }
    }
}

impl From<NoTurn> for Stop {
    fn from(no: NoTurn) -> Self {
        match no {
            NoTurn::Interrupted(i) => i.into(),
            NoTurn::Rest(rest) => Stop::Defer(rest.reason(), rest.until()),
        }
    }
}

impl Processor {
    /// Attempts `cmd` until it has an outcome. `tally` carries the attempts
    /// made so far (also across a lost claim).
    pub(super) async fn call_gewe(
        &self,
        cmd: &Command,
        claim: &Claim<'_>,
        delivery: &CommandDelivery,
        tally: &mut Tally,
    ) -> Result<CallOutcome, Stop> {
        let halt = &delivery.halt;
        loop {
            let (verdict, probe) = self
                .attempt(cmd, claim, delivery, tally.attempts() + 1)
                .await?;
            let step = self.retry.after(tally, verdict, probe, &mut rand::rng());
            match step {
                Step::Done(result) => {
                    match &result {
                        // Debug, not info: one line per success would put
                        // JSON logging on the hot path; the event is the record.
                        Ok(_) => tracing::debug!(
                            attempts = tally.attempts(),
                            "GeWe accepted the friend request"
                        ),
                        Err(e) => tracing::warn!(
                            attempts = tally.attempts(),
                            kind = e.kind.as_str(),
                            error = %e.message,
                            "GeWe call failed"
                        ),
                    }
                    return Ok(CallOutcome {
                        result,
                        attempts: tally.attempts(),
                    });
                }
                Step::Retry(wait) => {
                    meters().gewe_retries.increment(1);
                    tracing::debug!(
                        attempt = tally.attempts(),
                        wait_ms = wait.as_millis() as u64,
                        "GeWe attempt failed transiently; backing off"
                    );
                    halt.sleep(wait).await?;
                }
            }
        }
    }

    /// One attempt (number `n`): breaker, pacing, claim, request. Returns
    /// the verdict and whether the attempt was the breaker's half-open probe.
    /// Its log lines carry `attempt = n` as a field rather than a span of
    /// their own: a span per attempt costs its formatting on every command,
    /// logged or not.
    async fn attempt(
        &self,
        cmd: &Command,
        claim: &Claim<'_>,
        delivery: &CommandDelivery,
        n: u32,
    ) -> Result<(Verdict, bool), Stop> {
        let halt = &delivery.halt;
        let request = self.gewe.timeout();
        // Before the breaker and pacing: a claim that needs renewing first
        // must not hold a probe or an account's turn meanwhile.
        claim.ready(request, halt).await?;
        let (admission, turn) = loop {
            let admission = match self.breaker.admit(halt).await {
                Ok(admission) => admission,
                Err(Interrupted::HeldTooLong) => return Err(Stop::Defer(Deferral::Breaker, None)),
                Err(other) => return Err(other.into()),
            };
            let turn = self.pacer.turn(&cmd.app_id, halt).await?;
            if admission.is_current() {
                break (admission, turn);
            }
            // The breaker opened while this call waited for its turn.
        };
        claim.ready(request, halt).await?;
        // No new call once shutdown began or the delivery's session is
        // gone: the command goes back to the queue instead.
        halt.check()?;
        tracing::debug!(
            attempt = n,
            waited_ms = turn.waited.as_millis() as u64,
            probe = admission.is_probe(),
            "calling GeWe"
        );
        let span = delivery.trace.as_ref().map(|trace| trace.attempt(n));
        let started = Instant::now();
        let result = self.gewe.add_group_member_as_friend(cmd).await;
        meters()
            .gewe_request_duration
            .record(started.elapsed().as_secs_f64());
        let verdict = classify(&result, &self.redactor);
        if let Some(span) = span {
            let status = result.as_ref().ok().map(|answer| answer.status);
            span.end(status, attempt_outcome(&verdict));
        }
        let probe = admission.is_probe();
        if let Verdict::Local { message } = &verdict {
            // Not GeWe's doing: the breaker hears nothing of it (a dropped
            // admission hands a probe's turn on).
            meters().gewe_local_errors.increment(1);
            tracing::warn!(attempt = n, error = %message, "the request could not leave this process; trying again later");
            drop(admission);
        } else {
            let failure = verdict.failure();
            meters().gewe_request(failure).increment(1);
            admission.record(failure);
        }
        let accounts = self.pacer.accounts();
        accounts.note_outcome(
            &cmd.app_id,
            verdict.failure().map_or("succeeded", |k| k.as_str()),
        );
        turn.sent(verdict.reached_wechat()).await;
        if let Some(text) = verdict
            .failure_texts()
            .and_then(|texts| accounts.policies().too_often(texts))
        {
            // WeChat says the account adds friends too often: it rests, and
            // this command waits for it rather than failing.
            let text = text.to_owned();
            let until = accounts.cool_down(&cmd.app_id, &text).await;
            return Err(Stop::Defer(Deferral::Cooldown, Some(until)));
        }
        Ok((verdict, probe))
    }
}

/// An attempt's outcome as `gewe_requests_total` labels it: `success`, the
/// error kind, or `local_error` (the request never left).
fn attempt_outcome(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Local { .. } => "local_error",
        _ => verdict.failure().map_or("success", |kind| kind.as_str()),
    }
}
