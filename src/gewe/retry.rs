//! Exponential backoff with full jitter around GeWe attempts.
//!
//! The policy only looks at [`Verdict`]s, one attempt at a time
//! ([`Backoff::after`]): `Success` and `Permanent` end the command,
//! `Transient` asks for another attempt after a wait while attempts remain.
//! The caller makes the attempts (each admitted by the breaker and paced);
//! this module only decides. Full jitter (a uniform wait in `0..=ceiling`)
//! spreads retries of many replicas out so a recovering GeWe is not hit by
//! a synchronised wave.

use std::time::Duration;

use rand::Rng;

use super::classify::Verdict;
use crate::{config::RetrySettings, outcome::EventError};

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

/// Attempts made for one command so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Every GeWe HTTP attempt (what the event's `attempts` reports).
    pub attempts: u32,
    /// Attempts that count towards `retry.max_attempts`: all but the
    /// breaker's half-open probes. A probe that fails means GeWe is still
    /// down, which is the breaker's business: the command waits for the
    /// next probe instead of using up its retries.
    pub counted: u32,
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The command has its outcome.
    Done(Result<String, Box<EventError>>),
    /// Try again after this wait.
    Retry(Duration),
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

    /// Records an attempt in `tally` and decides what follows it. `probe`:
    /// the attempt was the breaker's half-open probe (see [`Tally::counted`]).
    pub fn after(
        &self,
        tally: &mut Tally,
        verdict: Verdict,
        probe: bool,
        rng: &mut impl Rng,
    ) -> Step {
        match verdict {
            // Nothing reached GeWe: no attempt to count, none used up.
            Verdict::Local { .. } => Step::Retry(self.delay(tally.counted.max(1), None, rng)),
            Verdict::Success { v3 } => {
                tally.count(probe);
                Step::Done(Ok(v3))
            }
            Verdict::Permanent(error) => {
                tally.count(probe);
                Step::Done(Err(Box::new(error)))
            }
            Verdict::Transient { error, retry_after } => {
                tally.count(probe);
                if !probe && tally.counted >= self.max_attempts {
                    Step::Done(Err(Box::new(error)))
                } else {
                    Step::Retry(self.delay(tally.counted.max(1), retry_after, rng))
                }
            }
        }
    }
}

impl Tally {
    /// One more attempt reached GeWe.
    fn count(&mut self, probe: bool) {
        self.attempts = self.attempts.saturating_add(1);
        if !probe {
            self.counted = self.counted.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_kind::ErrorKind;
    use rand::{SeedableRng, rngs::StdRng};

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
        let mut tally = Tally::default();
        assert_eq!(
            p.after(
                &mut tally,
                transient(Some(Duration::from_secs(4))),
                false,
                &mut rng
            ),
            Step::Retry(Duration::from_secs(4))
        );
    }

    /// Feeds `script` to the policy as successive attempts; returns the
    /// final result, the tally and the waits asked for in between.
    fn run(
        p: Backoff,
        script: Vec<(Verdict, bool)>,
    ) -> (Result<String, Box<EventError>>, Tally, Vec<Duration>) {
        let mut rng = StdRng::seed_from_u64(3);
        let mut tally = Tally::default();
        let mut waits = Vec::new();
        for (verdict, probe) in script {
            match p.after(&mut tally, verdict, probe, &mut rng) {
                Step::Done(result) => return (result, tally, waits),
                Step::Retry(wait) => waits.push(wait),
            }
        }
        panic!("script too short: {tally:?}");
    }

    #[test]
    fn transient_failures_back_off_then_succeed() {
        let (result, tally, waits) = run(
            policy(5),
            vec![
                (transient(None), false),
                (transient(None), false),
                (Verdict::Success { v3: "v3_ok".into() }, false),
            ],
        );
        assert_eq!(result, Ok("v3_ok".into()));
        assert_eq!(tally.attempts, 3);
        assert!(waits[0] <= Duration::from_millis(500));
        assert!(waits[1] <= Duration::from_secs(1));
    }

    #[test]
    fn permanent_failures_are_not_retried() {
        let (result, tally, waits) = run(
            policy(5),
            vec![(
                Verdict::Permanent(EventError::new(ErrorKind::Rejected, "no", None)),
                false,
            )],
        );
        assert_eq!(tally.attempts, 1);
        assert!(waits.is_empty());
        assert_eq!(result.map_err(|e| e.kind), Err(ErrorKind::Rejected));
    }

    #[test]
    fn gives_up_after_max_attempts_with_an_exact_count() {
        let (result, tally, waits) = run(
            policy(4),
            (0..4).map(|_| (transient(None), false)).collect(),
        );
        assert_eq!(tally.attempts, 4);
        assert_eq!(waits.len(), 3);
        assert_eq!(
            result.map_err(|e| e.kind),
            Err(ErrorKind::UpstreamUnavailable)
        );
    }

    #[test]
    fn a_local_shortage_is_retried_without_counting_an_attempt() {
        let local = || Verdict::Local {
            message: "Too many open files".into(),
        };
        let (result, tally, waits) = run(
            policy(1),
            vec![
                (local(), false),
                (local(), false),
                (Verdict::Success { v3: "v3".into() }, false),
            ],
        );
        assert_eq!(result, Ok("v3".into()));
        assert_eq!(
            tally,
            Tally {
                attempts: 1,
                counted: 1
            }
        );
        assert_eq!(waits.len(), 2);
    }

    #[test]
    fn failed_probes_do_not_use_up_the_retries() {
        // Two counted failures of two allowed would end the command; the
        // probes in between only add to the attempts reported.
        let (result, tally, _) = run(
            policy(2),
            vec![
                (transient(None), false),
                (transient(None), true),
                (transient(None), true),
                (Verdict::Success { v3: "back".into() }, true),
            ],
        );
        assert_eq!(result, Ok("back".into()));
        assert_eq!(
            tally,
            Tally {
                attempts: 4,
                counted: 1
            }
        );
        let (result, tally, _) = run(
            policy(2),
            vec![
                (transient(None), true),
                (transient(None), false),
                (transient(None), false),
            ],
        );
        assert!(result.is_err());
        assert_eq!(
            tally,
            Tally {
                attempts: 3,
                counted: 2
            }
        );
    }
}
