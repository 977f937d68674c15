//! Per-account pacing of GeWe calls (`pacing.*`).
//!
//! WeChat restricts accounts that add friends in bursts, so for each `appId`
//! at most `per_app_concurrency` calls run at once and two call starts are at
//! least `per_app_min_interval` apart, retries included. Waiting commands
//! await a semaphore and a timer: no task spins. State of idle accounts is
//! dropped so memory does not grow with the number of accounts ever seen.
//!
//! With Redis configured the interval is reserved atomically in Redis
//! (server clock), so all replicas together keep one interval per account;
//! the concurrency limit stays per process. While Redis is unreachable the
//! turn waits (with backoff) instead of letting an unpaced call through.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    config::PacingSettings,
    shared_state::{SharedState, StateError},
};

/// Sweep idle accounts once the map holds this many entries.
const SWEEP_THRESHOLD: usize = 1024;

struct Account {
    slots: Arc<Semaphore>,
    next_start: Mutex<Instant>,
}

/// In-process pacer shared by all command tasks.
pub struct Pacer {
    concurrency: usize,
    interval: Duration,
    accounts: Mutex<HashMap<String, Arc<Account>>>,
    shared: Option<Arc<SharedState>>,
}

/// Held while a GeWe call for the account is in flight.
pub struct Turn {
    _permit: Option<OwnedSemaphorePermit>,
    /// Time spent waiting for this turn.
    pub waited: Duration,
}

impl Pacer {
    /// A pacer with the configured limits; intervals live in `shared` when given.
    pub fn new(settings: &PacingSettings, shared: Option<Arc<SharedState>>) -> Self {
        Self {
            concurrency: settings.per_app_concurrency.max(1) as usize,
            interval: settings.per_app_min_interval,
            accounts: Mutex::new(HashMap::new()),
            shared,
        }
    }

    /// Waits until `app_id` may start a call, then reserves the start.
    /// Cancel-safe: dropping the future gives the slot back.
    pub async fn turn(&self, app_id: &str) -> Turn {
        let began = Instant::now();
        let account = self.account(app_id);
        // The semaphore is never closed, so this is always `Some`.
        let permit = account.slots.clone().acquire_owned().await.ok();
        if let (Some(shared), false) = (&self.shared, self.interval.is_zero()) {
            let wait = reserve_shared(shared, app_id, self.interval).await;
            tokio::time::sleep(wait).await;
        } else if !self.interval.is_zero() {
            let start_at = {
                let mut next = account
                    .next_start
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let start_at = (*next).max(Instant::now());
                *next = start_at + self.interval;
                start_at
            };
            tokio::time::sleep_until(start_at).await;
        }
        let waited = began.elapsed();
        metrics::histogram!("pacing_wait_seconds").record(waited.as_secs_f64());
        Turn {
            _permit: permit,
            waited,
        }
    }

    /// Accounts currently tracked (for tests and metrics).
    pub fn tracked_accounts(&self) -> usize {
        self.accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn account(&self, app_id: &str) -> Arc<Account> {
        let mut map = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(a) = map.get(app_id) {
            return a.clone();
        }
        if map.len() >= SWEEP_THRESHOLD {
            let now = Instant::now();
            // Idle: nobody holds or waits for it and its interval has passed,
            // so forgetting it cannot let a call start too early.
            map.retain(|_, a| {
                Arc::strong_count(a) > 1
                    || *a.next_start.lock().unwrap_or_else(PoisonError::into_inner) > now
            });
        }
        let a = Arc::new(Account {
            slots: Arc::new(Semaphore::new(self.concurrency)),
            next_start: Mutex::new(Instant::now()),
        });
        map.insert(app_id.to_owned(), a.clone());
        a
    }
}

/// Reserves a start in Redis, retrying with backoff while it is unavailable:
/// an account is never called unpaced.
async fn reserve_shared(shared: &SharedState, app_id: &str, interval: Duration) -> Duration {
    let mut pause = Duration::from_millis(200);
    loop {
        match shared.reserve_start(app_id, interval).await {
            Ok(wait) => return wait,
            Err(e) => {
                report(&e, pause);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn report(e: &StateError, retry_in: Duration) {
    metrics::counter!("redis_errors_total").increment(1);
    tracing::warn!(error = %e, retry_in_ms = retry_in.as_millis() as u64, "Redis unavailable: pacing waits, GeWe is not called");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(concurrency: u32, interval_ms: u64) -> Arc<Pacer> {
        Arc::new(Pacer::new(
            &PacingSettings {
                per_app_concurrency: concurrency,
                per_app_min_interval: Duration::from_millis(interval_ms),
            },
            None,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn starts_of_one_account_are_spaced() {
        let p = pacer(5, 200);
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..4 {
            let _turn = p.turn("a").await;
            starts.push(t0.elapsed());
        }
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(200), "{starts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_accounts_are_not_delayed() {
        let p = pacer(1, 1000);
        let _a1 = p.turn("a").await;
        let t0 = Instant::now();
        let _b = p.turn("b").await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limits_calls_in_flight() {
        let p = pacer(1, 0);
        let first = p.turn("a").await;
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.turn("a").await.waited });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let waited = waiter.await.expect("joined");
        assert!(waited >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_accounts_are_forgotten() {
        let p = pacer(1, 10);
        for i in 0..10_000 {
            drop(p.turn(&format!("app-{i}")).await);
            if i % 100 == 0 {
                tokio::time::advance(Duration::from_millis(20)).await;
            }
        }
        tokio::time::advance(Duration::from_millis(20)).await;
        drop(p.turn("last").await);
        assert!(
            p.tracked_accounts() <= SWEEP_THRESHOLD + 1,
            "{}",
            p.tracked_accounts()
        );
    }
}
