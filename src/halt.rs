//! Why a command stops waiting before it has an outcome.
//!
//! A delivery waits at several points (a free prefetch slot, the commandId's
//! claim, the circuit breaker, its account's pacing turn, a backoff). Each of
//! those waits ends early for one of two reasons: the worker is shutting down
//! (the command goes back to the queue), or the broker session the delivery
//! came from is gone (the broker has already put it back, and whatever this
//! task still holds, such as a pacing turn, must be given up for the
//! redelivery). [`Halt`] bundles both signals so every wait selects on one
//! future, with a third end for command deliveries: the hold deadline
//! (`amqp.max_hold`). RabbitMQ closes a channel whose delivery stays
//! unacknowledged past its `consumer_timeout`, so a wait that would run past
//! the deadline ends with [`Interrupted::HeldTooLong`] and the command is
//! deferred through the broker instead.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Why a command was not carried to an outcome now; it is tried again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    /// The worker is shutting down: no new GeWe call starts.
    #[error("the worker is shutting down")]
    Shutdown,
    /// The broker session of this delivery is gone; the broker redelivers it.
    #[error("the broker session of this delivery was lost")]
    SessionLost,
    /// The Redis claim on the commandId ran out or was taken over: another
    /// replica may be handling it, so this one looks again.
    #[error("the claim on this commandId was lost; another replica may be handling it")]
    ClaimLost,
    /// Waiting longer would hold the delivery past `amqp.max_hold`.
    #[error("the delivery was held as long as amqp.max_hold allows")]
    HeldTooLong,
}

impl Interrupted {
    /// Label for `commands_requeued_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Interrupted::Shutdown => "shutdown",
            Interrupted::SessionLost => "session_lost",
            Interrupted::ClaimLost => "claim_lost",
            Interrupted::HeldTooLong => "held_too_long",
        }
    }
}

/// A one-way stop signal (shutdown begins, a broker session is gone) that
/// every step of every command checks.
///
/// Checking is one atomic load. `CancellationToken::is_cancelled` takes the
/// token's mutex, and so do cloning and dropping a token: with every
/// in-flight command checking the same process-wide token several times,
/// from both runtime threads, that one lock was shared by all of them. The
/// token is kept for waiting on the signal.
#[derive(Debug, Clone, Default)]
pub struct Signal(Arc<SignalState>);

#[derive(Debug, Default)]
struct SignalState {
    raised: AtomicBool,
    token: CancellationToken,
}

impl Signal {
    /// A signal not raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the signal: checks see it from now on, waiters wake.
    pub fn raise(&self) {
        // Before the token: a waiter woken by it already sees the flag.
        self.0.raised.store(true, Ordering::Release);
        self.0.token.cancel();
    }

    /// Whether the signal was raised.
    pub fn is_raised(&self) -> bool {
        self.0.raised.load(Ordering::Acquire)
    }

    /// Resolves once the signal is raised.
    pub fn raised(&self) -> WaitForCancellationFuture<'_> {
        self.0.token.cancelled()
    }
}

/// The two signals, and the optional deadline, that end a delivery's waits.
#[derive(Debug, Clone)]
pub struct Halt {
    shutdown: Signal,
    session: Signal,
    deadline: Option<Instant>,
}

impl Halt {
    /// Waits end on `shutdown` (process-wide) or `session` (this delivery's
    /// broker session was lost).
    pub fn new(shutdown: Signal, session: Signal) -> Self {
        Self {
            shutdown,
            session,
            deadline: None,
        }
    }

    /// The same signals, and waits end at `deadline` too.
    pub fn holding_until(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The same signals without the deadline: for what must finish once
    /// begun (storing an outcome, publishing the result).
    pub fn without_deadline(&self) -> Self {
        Self::new(self.shutdown.clone(), self.session.clone())
    }

    /// Time left before the deadline (`Duration::MAX` without one).
    pub fn hold_left(&self) -> Duration {
        self.deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }

    /// A halt that never fires (tools and tests outside a session).
    pub fn never() -> Self {
        Self::new(Signal::new(), Signal::new())
    }

    /// Why waiting must stop now, if it must.
    pub fn check(&self) -> Result<(), Interrupted> {
        if self.session.is_raised() {
            Err(Interrupted::SessionLost)
        } else if self.shutdown.is_raised() {
            Err(Interrupted::Shutdown)
        } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Err(Interrupted::HeldTooLong)
        } else {
            Ok(())
        }
    }

    /// Whether the delivery's session is gone (publishing is pointless).
    pub fn session_lost(&self) -> bool {
        self.session.is_raised()
    }

    /// Resolves when either signal fires, with the reason.
    pub async fn fired(&self) -> Interrupted {
        tokio::select! {
            biased;
            () = self.session.raised() => Interrupted::SessionLost,
            () = self.shutdown.raised() => Interrupted::Shutdown,
        }
    }

    /// Runs `wait` unless a signal fires first.
    ///
    /// `wait` is polled before the signals: most waits (a free slot, a
    /// closed breaker, no pacing) are ready at once, and then the signals'
    /// waiter registrations, two locked list insertions and removals, are
    /// never made. The signals were checked just before, and the steps that
    /// must not run after one check again: the GeWe call both signals,
    /// publishing a lost session.
    pub async fn guard<F: Future>(&self, wait: F) -> Result<F::Output, Interrupted> {
        self.check()?;
        let deadline = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            out = wait => Ok(out),
            reason = self.fired() => Err(reason),
            () = deadline => Err(Interrupted::HeldTooLong),
        }
    }

    /// Sleeps for `d` unless a signal fires first.
    pub async fn sleep(&self, d: Duration) -> Result<(), Interrupted> {
        self.guard(tokio::time::sleep(d)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lost_session_ends_a_wait_and_says_so() {
        let (shutdown, session) = (Signal::new(), Signal::new());
        let halt = Halt::new(shutdown.clone(), session.clone());
        let waiting = tokio::spawn({
            let halt = halt.clone();
            async move { halt.sleep(Duration::from_secs(3600)).await }
        });
        tokio::task::yield_now().await;
        session.raise();
        assert_eq!(waiting.await.expect("join"), Err(Interrupted::SessionLost));
        shutdown.raise();
        assert_eq!(halt.check(), Err(Interrupted::SessionLost));
        let other = Halt::new(shutdown, Signal::new());
        assert_eq!(other.check(), Err(Interrupted::Shutdown));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_hold_deadline_ends_there() {
        let halt = Halt::never().holding_until(Instant::now() + Duration::from_secs(10));
        let began = Instant::now();
        assert_eq!(
            halt.sleep(Duration::from_secs(60)).await,
            Err(Interrupted::HeldTooLong)
        );
        assert_eq!(began.elapsed(), Duration::from_secs(10));
        assert_eq!(halt.hold_left(), Duration::ZERO);
        assert_eq!(halt.without_deadline().check(), Ok(()));
        assert_eq!(Halt::never().hold_left(), Duration::MAX);
    }
}
