//! Circuit breaker on systemic GeWe failures (`breaker.*`).
//!
//! Every GeWe attempt, retries included, is admitted here first. After
//! `failure_threshold` consecutive `upstream_unavailable` or `unauthorized`
//! attempts the breaker opens: commands wait before their next attempt
//! instead of turning into failed events, so with the prefetch window full
//! the rest of the backlog stays in the queue. After `cooldown` one probe
//! attempt is let through; its success closes the breaker, its systemic
//! failure opens it for another cooldown.

use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::{
    config::BreakerSettings,
    error_kind::ErrorKind,
    halt::{Halt, Interrupted},
    meters::meters,
};

/// Breaker state, as shown in logs, metrics and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls flow.
    Closed,
    /// Calls wait until the cooldown ends.
    Open,
    /// One probe call is in flight; the others wait for its outcome.
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive: u32,
    open_until: Instant,
}

/// The breaker, shared by all command tasks.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
    changed: Notify,
}

/// Permission to call GeWe; report the outcome with [`Admission::record`].
/// Dropped without a record (the call produced no outcome, or its task was
/// dropped), it is given back, so a half-open breaker never waits forever
/// for a probe that will not report.
#[derive(Debug)]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Admission<'_> {
    /// Whether this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Whether the call may still go out: the probe always, others only
    /// while the breaker is closed (it may have opened during a pacing wait).
    pub fn is_current(&self) -> bool {
        self.probe || self.breaker.state() == State::Closed
    }

    /// Records the call's outcome (`None` = success).
    pub fn record(mut self, failure: Option<ErrorKind>) {
        self.recorded = true;
        self.breaker.record(self.probe, failure);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.release(self.probe);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: &BreakerSettings) -> Self {
        Self {
            threshold: settings.failure_threshold.max(1),
            cooldown: settings.cooldown,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive: 0,
                open_until: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a GeWe call is allowed, or `halt` fires.
    pub async fn admit(&self, halt: &Halt) -> Result<Admission<'_>, Interrupted> {
        let probe = halt.guard(self.wait_for_turn()).await?;
        Ok(Admission {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    /// Returns whether the caller is the probe.
    async fn wait_for_turn(&self) -> bool {
        loop {
            // Register interest before checking, so a change between the
            // check and the await is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait_until = {
                let mut inner = self.lock();
                match inner.state {
                    State::Closed => return false,
                    State::Open if Instant::now() >= inner.open_until => {
                        inner.state = State::HalfOpen;
                        set_gauge(State::HalfOpen);
                        tracing::warn!(
                            "circuit breaker half-open: letting one probe command through"
                        );
                        return true;
                    }
                    State::Open => Some(inner.open_until),
                    State::HalfOpen => None,
                }
            };
            match wait_until {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = &mut changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// A probe that produced no outcome hands its turn to the next caller.
    fn release(&self, probe: bool) {
        if !probe {
            return;
        }
        let mut inner = self.lock();
        if inner.state == State::HalfOpen {
            inner.state = State::Open;
            inner.open_until = Instant::now();
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    fn record(&self, probe: bool, failure: Option<ErrorKind>) {
        let systemic = failure.is_some_and(ErrorKind::systemic);
        let mut inner = self.lock();
        let before = inner.state;
        if systemic {
            inner.consecutive = inner.consecutive.saturating_add(1);
            if probe || inner.consecutive >= self.threshold {
                inner.state = State::Open;
                inner.open_until = Instant::now() + self.cooldown;
            }
        } else {
            inner.consecutive = 0;
            // A non-systemic answer proves GeWe is reachable and takes the token.
            inner.state = State::Closed;
        }
        let after = inner.state;
        drop(inner);
        if before != after || probe {
            match after {
                State::Open => tracing::error!(
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "circuit breaker open: GeWe keeps failing; commands wait before their next attempt"
                ),
                State::Closed => tracing::info!("circuit breaker closed: GeWe answers again"),
                State::HalfOpen => {}
            }
            set_gauge(after);
            self.changed.notify_waiters();
        }
    }
}

fn set_gauge(state: State) {
    let v = match state {
        State::Closed => 0.0,
        State::HalfOpen => 1.0,
        State::Open => 2.0,
    };
    meters().breaker_state.set(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn breaker(threshold: u32, cooldown_ms: u64) -> Arc<Breaker> {
        Arc::new(Breaker::new(&BreakerSettings {
            failure_threshold: threshold,
            cooldown: Duration::from_millis(cooldown_ms),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_of_systemic_failures_only() {
        let b = breaker(3, 1000);
        for _ in 0..5 {
            b.admit(&Halt::never())
                .await
                .expect("admitted")
                .record(Some(ErrorKind::Rejected));
        }
        assert_eq!(b.state(), State::Closed);
        for _ in 0..2 {
            b.admit(&Halt::never())
                .await
                .expect("admitted")
                .record(Some(ErrorKind::UpstreamUnavailable));
        }
        assert_eq!(b.state(), State::Closed);
        b.admit(&Halt::never())
            .await
            .expect("admitted")
            .record(Some(ErrorKind::Unauthorized));
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_after_cooldown_and_success_closes() {
        let b = breaker(1, 1000);
        b.admit(&Halt::never())
            .await
            .expect("admitted")
            .record(Some(ErrorKind::UpstreamUnavailable));
        let start = Instant::now();
        let probe = b.admit(&Halt::never()).await.expect("admitted");
        assert!(start.elapsed() >= Duration::from_millis(1000));
        assert_eq!(b.state(), State::HalfOpen);
        assert!(probe.is_probe());
        let b2 = b.clone();
        let waiter =
            tokio::spawn(
                async move { b2.admit(&Halt::never()).await.expect("admitted").is_probe() },
            );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished(), "others wait for the probe");
        probe.record(None);
        assert_eq!(b.state(), State::Closed);
        assert!(
            !waiter.await.expect("join"),
            "after the probe, calls flow normally"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens() {
        let b = breaker(1, 500);
        b.admit(&Halt::never())
            .await
            .expect("admitted")
            .record(Some(ErrorKind::UpstreamUnavailable));
        b.admit(&Halt::never())
            .await
            .expect("admitted")
            .record(Some(ErrorKind::UpstreamUnavailable));
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_without_outcome_hands_over_its_turn() {
        let b = breaker(1, 500);
        b.admit(&Halt::never())
            .await
            .expect("admitted")
            .record(Some(ErrorKind::UpstreamUnavailable));
        let probe = b.admit(&Halt::never()).await.expect("admitted");
        assert!(probe.is_probe());
        let b2 = b.clone();
        let next =
            tokio::spawn(
                async move { b2.admit(&Halt::never()).await.expect("admitted").is_probe() },
            );
        tokio::task::yield_now().await;
        drop(probe);
        let took_over = tokio::time::timeout(Duration::from_secs(1), next)
            .await
            .expect("the next caller is not stuck")
            .expect("join");
        assert!(took_over, "the next caller becomes the probe");
    }
}
