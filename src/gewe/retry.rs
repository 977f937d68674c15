//! Exponential backoff with full jitter around GeWe attempts.
//!
//! The policy only looks at [`Verdict`]s: `Success` and `Permanent` stop,
//! `Transient` waits and tries again while attempts remain. Full jitter
//! (a uniform wait in `0..=ceiling`) spreads retries of many replicas out so
//! a recovering GeWe is not hit by a synchronised wave.

use std::{future::Future, time::Duration};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::classify::Verdict;
use crate::{config::RetrySettings, event::EventError};

/// Backoff policy (`retry.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Attempts per command, the first included (≥ 1).
    pub max_attempts: u32,
    /// Ceiling of the first wait.
    pub initial_delay: Duration,
    /// Cap of any single wait, `Retry-After` included.
    pub max_delay: Duration,
    /// Growth of the ceiling per attempt.
    pub multiplier: f64,
}

/// The final result of all attempts for one command.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CallOutcome {
    /// The `v3` ticket, or the error of the last attempt (boxed: outcomes
    /// are kept in the dedupe store, and most of them are successes).
    pub result: Result<String, Box<EventError>>,
    /// Attempts actually made.
    pub attempts: u32,
}

impl From<&RetrySettings> for Backoff {
    fn from(r: &RetrySettings) -> Self {
        Self {
            max_attempts: r.max_attempts.max(1),
            initial_delay: r.initial_delay,
            max_delay: r.max_delay,
            multiplier: r.multiplier,
        }
    }
}

impl Backoff {
    /// Upper bound of the wait after failed attempt number `attempt` (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The wait after failed attempt `attempt`: the server's `Retry-After`
    /// (clamped to `max_delay`) when given, else full jitter below the ceiling.
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        match retry_after {
            Some(wanted) => wanted.min(self.max_delay),
            None => {
                let ceiling = self.ceiling(attempt);
                if ceiling.is_zero() {
                    ceiling
                } else {
                    Duration::from_secs_f64(rng.random_range(0.0..=ceiling.as_secs_f64()))
                }
            }
        }
    }

    /// Runs `attempt(n)` for n = 1, 2, ... until success, a permanent
    /// failure, or `max_attempts` transient failures. An attempt that
    /// returns `Err` (e.g. shutdown) stops the loop without an outcome: the
    /// command must be retried later, not reported. A backoff wait ends
    /// early when `stop` is cancelled, so the next attempt can say so at
    /// once instead of after up to `max_delay`.
    pub async fn run<F, Fut, E>(
        &self,
        stop: &CancellationToken,
        mut attempt: F,
    ) -> Result<CallOutcome, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<Verdict, E>>,
    {
        let mut n = 1;
        loop {
            let result = match attempt(n).await? {
                Verdict::Success { v3 } => Ok(v3),
                Verdict::Permanent(error) => Err(Box::new(error)),
                Verdict::Transient { error, retry_after } => {
                    if n >= self.max_attempts {
                        Err(Box::new(error))
                    } else {
                        let wait = self.delay(n, retry_after, &mut rand::rng());
                        tracing::debug!(attempt = n, wait_ms = wait.as_millis() as u64, error = %error.message, "GeWe attempt failed transiently; backing off");
                        metrics::counter!("gewe_retries_total").increment(1);
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = stop.cancelled() => {}
                        }
                        n += 1;
                        continue;
                    }
                }
            };
            return Ok(CallOutcome {
                result,
                attempts: n,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ErrorKind;
    use rand::{SeedableRng, rngs::StdRng};
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    fn policy(max_attempts: u32) -> Backoff {
        Backoff {
            max_attempts,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }

    fn transient(retry_after: Option<Duration>) -> Verdict {
        Verdict::Transient {
            error: EventError::new(ErrorKind::UpstreamUnavailable, "503", None),
            retry_after,
        }
    }

    #[test]
    fn ceiling_grows_and_is_capped() {
        let p = policy(5);
        assert_eq!(p.ceiling(1), Duration::from_millis(500));
        assert_eq!(p.ceiling(2), Duration::from_secs(1));
        assert_eq!(p.ceiling(3), Duration::from_secs(2));
        assert_eq!(p.ceiling(8), Duration::from_secs(30));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn full_jitter_stays_below_the_ceiling_and_spreads() {
        let p = policy(5);
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<_> = (0..1000).map(|_| p.delay(3, None, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(200)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(1800)));
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let p = policy(5);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(7)), &mut rng),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), &mut rng),
            Duration::from_secs(30)
        );
    }

    /// Records when each attempt started, in paused tokio time.
    async fn run_script(p: Backoff, script: Vec<Verdict>) -> (CallOutcome, Vec<Duration>) {
        let start = Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.into_iter()));
        let t = times.clone();
        let outcome = p
            .run(&CancellationToken::new(), move |_| {
                let t = t.clone();
                let script = script.clone();
                async move {
                    t.lock().expect("lock").push(start.elapsed());
                    let verdict = script
                        .lock()
                        .expect("lock")
                        .next()
                        .expect("script long enough");
                    Ok::<_, ()>(verdict)
                }
            })
            .await
            .expect("never interrupted");
        let times = times.lock().expect("lock").clone();
        (outcome, times)
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_back_off_then_succeed() {
        let (outcome, times) = run_script(
            policy(5),
            vec![
                transient(None),
                transient(None),
                Verdict::Success { v3: "v3_ok".into() },
            ],
        )
        .await;
        assert_eq!(outcome.result, Ok("v3_ok".into()));
        assert_eq!(outcome.attempts, 3);
        assert_eq!(times.len(), 3);
        assert!(times[1] - times[0] <= Duration::from_millis(500));
        assert!(times[2] - times[1] <= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_sets_the_wait() {
        let (_, times) = run_script(
            policy(3),
            vec![
                transient(Some(Duration::from_secs(4))),
                Verdict::Success { v3: "v".into() },
            ],
        )
        .await;
        assert_eq!(times[1] - times[0], Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_cuts_the_backoff_short() {
        let stop = CancellationToken::new();
        let p = policy(5);
        let start = Instant::now();
        let calls = Arc::new(Mutex::new(0u32));
        let (stop2, calls2) = (stop.clone(), calls.clone());
        let result: Result<CallOutcome, &str> = p
            .run(&stop, move |n| {
                let (stop, calls) = (stop2.clone(), calls2.clone());
                async move {
                    *calls.lock().expect("lock") += 1;
                    if n == 1 {
                        stop.cancel();
                        Ok(transient(Some(Duration::from_secs(30))))
                    } else {
                        Err("stopped")
                    }
                }
            })
            .await;
        assert_eq!(result, Err("stopped"));
        assert_eq!(*calls.lock().expect("lock"), 2);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "did not wait out the 30 s backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let (outcome, times) = run_script(
            policy(5),
            vec![Verdict::Permanent(EventError::new(
                ErrorKind::Rejected,
                "no",
                None,
            ))],
        )
        .await;
        assert_eq!(outcome.attempts, 1);
        assert_eq!(times.len(), 1);
        assert_eq!(outcome.result.map_err(|e| e.kind), Err(ErrorKind::Rejected));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_with_an_exact_count() {
        let (outcome, times) =
            run_script(policy(4), (0..4).map(|_| transient(None)).collect()).await;
        assert_eq!(outcome.attempts, 4);
        assert_eq!(times.len(), 4);
        assert_eq!(
            outcome.result.map_err(|e| e.kind),
            Err(ErrorKind::UpstreamUnavailable)
        );
    }
}
