//! The one backoff schedule behind every retry loop: waits that start at an
//! initial one and grow by a factor (doubling, unless configured) up to a
//! cap, optionally jittered.
//!
//! GeWe's retries draw each wait below the current ceiling
//! ([`Backoff::full_jitter`]) so that many replicas do not hit a recovering
//! GeWe in one wave; the waits for Redis and for a broker node are plain
//! ([`Waits`]), as only this process waits on them.

use std::time::Duration;

use rand::Rng;

/// How waits grow between tries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
}

impl Backoff {
    /// Waits doubling from `initial` up to `max`.
    pub const fn doubling(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            multiplier: 2.0,
        }
    }

    /// Waits growing by `multiplier` (taken as 1 when smaller, or not a
    /// number) from `initial` up to `max`.
    pub fn new(initial: Duration, max: Duration, multiplier: f64) -> Self {
        Self {
            initial,
            max,
            multiplier: if multiplier >= 1.0 { multiplier } else { 1.0 },
        }
    }

    /// The cap of any wait.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The wait before retry number `retry` (0 for the first):
    /// `initial × multiplier^retry`, at most the cap.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exp = retry.min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// A wait drawn uniformly from `0..=ceiling(retry)` ("full jitter").
    pub fn full_jitter(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        if ceiling.is_zero() {
            ceiling
        } else {
            Duration::from_secs_f64(rng.random_range(0.0..=ceiling.as_secs_f64()))
        }
    }

    /// The waits of one retry loop, from the first.
    pub fn waits(self) -> Waits {
        Waits {
            backoff: self,
            retry: 0,
        }
    }
}

/// Where a retry loop is in its [`Backoff`].
#[derive(Debug, Clone)]
pub struct Waits {
    backoff: Backoff,
    retry: u32,
}

impl Waits {
    /// The wait the next retry takes, without using it up.
    pub fn peek(&self) -> Duration {
        self.backoff.ceiling(self.retry)
    }

    /// The wait the next retry takes; the one after it is longer, up to
    /// the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.peek();
        self.retry = self.retry.saturating_add(1);
        wait
    }

    /// Back to the first wait (what failed works again).
    pub fn reset(&mut self) {
        self.retry = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_ceiling_grows_by_the_multiplier_and_is_capped() {
        let b = Backoff::new(500 * MS, Duration::from_secs(30), 2.0);
        assert_eq!(b.ceiling(0), 500 * MS);
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(2), Duration::from_secs(2));
        assert_eq!(b.ceiling(7), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
        let slow = Backoff::new(100 * MS, Duration::from_secs(1), 1.5);
        assert_eq!(slow.ceiling(2), 225 * MS);
        let flat = Backoff::new(100 * MS, Duration::from_secs(1), f64::NAN);
        assert_eq!(flat.ceiling(9), 100 * MS);
    }

    #[test]
    fn waits_double_up_to_the_cap_and_start_over_on_reset() {
        let mut waits = Backoff::doubling(200 * MS, Duration::from_secs(1)).waits();
        assert_eq!(waits.peek(), 200 * MS);
        let seen: Vec<_> = (0..5).map(|_| waits.next_wait()).collect();
        assert_eq!(
            seen,
            [
                200 * MS,
                400 * MS,
                800 * MS,
                Duration::from_secs(1),
                Duration::from_secs(1)
            ]
        );
        waits.reset();
        assert_eq!(waits.next_wait(), 200 * MS);
    }

    #[test]
    fn full_jitter_stays_below_the_ceiling_and_spreads() {
        let b = Backoff::new(500 * MS, Duration::from_secs(30), 2.0);
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<_> = (0..1000).map(|_| b.full_jitter(2, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays.iter().any(|d| *d < 200 * MS));
        assert!(delays.iter().any(|d| *d > 1800 * MS));
        let zero = Backoff::doubling(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.full_jitter(3, &mut rng), Duration::ZERO);
    }
}
