//! Exponential backoff with full jitter around GeWe attempts.
//!
//! The policy only looks at [`Verdict`]s, one attempt at a time
//! ([`RetryPolicy::after`]): `Success` and `Permanent` end the command,
//! `Transient` asks for another attempt after a wait while attempts remain.
//! The caller makes the attempts (each admitted by the breaker and paced);
//! this module only decides. The waits are [`Backoff`]'s with full jitter
//! (a uniform wait below the ceiling), which spreads retries of many
//! replicas out so a recovering GeWe is not hit by a synchronised wave.

use std::time::Duration;

use rand::Rng;

use super::classify::Verdict;
use crate::{backoff::Backoff, config::RetrySettings, outcome::EventError};

/// The retry policy of GeWe attempts (`retry.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per command, the first included (≥ 1).
    max_attempts: u32,
    /// The waits between attempts; its cap also bounds `Retry-After`.
    backoff: Backoff,
}

/// Attempts made for one command so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Every GeWe HTTP attempt (what the event's `attempts` reports).
    attempts: u32,
    /// Attempts that count towards `retry.max_attempts`: all but the
    /// breaker's half-open probes. A probe that fails means GeWe is still
    /// down, which is the breaker's business: the command waits for the
    /// next probe instead of using up its retries.
    counted: u32,
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The command has its outcome.
    Done(Result<String, Box<EventError>>),
    /// Try again after this wait.
    Retry(Duration),
}

impl From<&RetrySettings> for RetryPolicy {
    fn from(r: &RetrySettings) -> Self {
        Self::new(
            r.max_attempts,
            Backoff::new(r.initial_delay, r.max_delay, r.multiplier),
        )
    }
}

impl RetryPolicy {
    /// At most `max_attempts` counted attempts per command (at least one),
    /// waiting as `backoff` says between them.
    pub fn new(max_attempts: u32, backoff: Backoff) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            backoff,
        }
    }

    /// The wait after failed attempt `attempt` (1-based): the server's
    /// `Retry-After` (clamped to the backoff's cap) when given, else full
    /// jitter below the backoff's ceiling.
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        match retry_after {
            Some(wanted) => wanted.min(self.backoff.max()),
            None => self.backoff.full_jitter(attempt.saturating_sub(1), rng),
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
            Verdict::Transient {
                error, retry_after, ..
            } => {
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
    /// A command's tally on a new try, after `attempts` made on earlier
    /// ones (they are reported, but its retries start afresh).
    pub fn after_earlier_tries(attempts: u32) -> Self {
        Self {
            attempts,
            counted: 0,
        }
    }

    /// Every GeWe HTTP attempt made for the command so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

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

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy::new(
            max_attempts,
            Backoff::new(Duration::from_millis(500), Duration::from_secs(30), 2.0),
        )
    }

    fn transient(retry_after: Option<Duration>) -> Verdict {
        Verdict::Transient {
            error: EventError::new(ErrorKind::UpstreamUnavailable, "503", None),
            retry_after,
            reached_wechat: false,
        }
    }

    #[test]
    fn without_retry_after_the_wait_is_below_the_attempts_ceiling() {
        let p = policy(5);
        let mut rng = StdRng::seed_from_u64(7);
        for (attempt, ceiling) in [(1, 500), (2, 1000), (3, 2000), (9, 30_000)] {
            for _ in 0..100 {
                let wait = p.delay(attempt, None, &mut rng);
                assert!(
                    wait <= Duration::from_millis(ceiling),
                    "{attempt}: {wait:?}"
                );
            }
        }
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
        p: RetryPolicy,
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
