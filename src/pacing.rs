//! Per-account pacing of GeWe calls (`pacing.*`).
//!
//! WeChat restricts accounts that add friends in bursts, so for each `appId`
//! at most `per_app_concurrency` calls run at once and two call starts are at
//! least `per_app_min_interval` apart, retries included. Waiting commands
//! await a semaphore and a timer: no task spins. A wait that is given up
//! (shutdown, or the delivery's broker session is gone) hands its place on:
//! the in-process interval is taken only when the call starts. State of idle
//! accounts is dropped so memory does not grow with the accounts ever seen.
//!
//! With Redis configured the interval is reserved atomically in Redis
//! (server clock), so all replicas together keep one interval per account;
//! the concurrency limit stays per process. A Redis reservation is taken
//! before the wait, so an abandoned one stays spent (safe: later calls only
//! start later). While Redis is unreachable the turn waits (with backoff)
//! instead of letting an unpaced call through. A reservation is a durable
//! write ([`RedisClient::run_durable`]): one a failover could lose would let
//! another replica start a call too early; retried, it only moves later.
//! No reservation is made while Redis does not answer, and one whose wait
//! saw Redis go away is made again: a call starts close to its reserved
//! start, never long after it.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use redis::Script;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    backoff::Backoff,
    config::PacingSettings,
    halt::{Halt, Interrupted},
    meters::meters,
    redis_client::{Durable, RedisClient, retry_while_unavailable},
};

/// Sweep idle accounts once the map holds this many entries.
const SWEEP_THRESHOLD: usize = 1024;
/// Waits while Redis is unavailable.
const REDIS_BACKOFF: Backoff =
    Backoff::doubling(Duration::from_millis(200), Duration::from_secs(5));

/// Reserves the next start for an account: returns how long to wait (ms).
/// KEYS[1] = pacing key, ARGV[1] = interval ms. Uses the server clock so
/// replicas with skewed clocks still agree.
static RESERVE_START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(now, nxt)
redis.call('SET', KEYS[1], start + interval, 'PX', (start - now) + interval + 1000)
return start - now
"#,
    )
});

struct Account {
    slots: Arc<Semaphore>,
    next_start: Mutex<Instant>,
}

/// Pacing reservations kept in Redis, shared by every replica.
pub struct RedisPacing {
    client: Arc<RedisClient>,
    prefix: String,
}

impl RedisPacing {
    /// Reservations under `prefix` on `client`.
    pub fn new(client: Arc<RedisClient>, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
        }
    }

    /// Reserves a start for `app_id`, retrying while Redis is unavailable:
    /// an account is never called unpaced. Returns the wait before it.
    async fn reserve(
        &self,
        app_id: &str,
        interval: Duration,
        halt: &Halt,
    ) -> Result<Duration, Interrupted> {
        let key = format!("{}:pace:{app_id}", self.prefix);
        let (key, client) = (key.as_str(), &self.client);
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let wait_ms: i64 = retry_while_unavailable(
            REDIS_BACKOFF,
            halt,
            "Redis unavailable: pacing waits, GeWe is not called",
            // Durable: a reservation lost in a failover would let another
            // replica start a call for this account too early.
            || async move {
                client
                    .run_durable(Durable::new(&RESERVE_START).key(key).arg(interval_ms))
                    .await
            },
        )
        .await?;
        Ok(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)))
    }
}

/// In-process pacer shared by all command tasks.
pub struct Pacer {
    concurrency: usize,
    interval: Duration,
    /// ahash: randomly seeded per process like std's SipHash, so input
    /// cannot pick collisions, and cheaper on short keys.
    accounts: Mutex<HashMap<String, Arc<Account>, ahash::RandomState>>,
    redis: Option<RedisPacing>,
}

/// Held while a GeWe call for the account is in flight.
pub struct Turn {
    _permit: Option<OwnedSemaphorePermit>,
    /// Time spent waiting for this turn.
    pub waited: Duration,
}

impl Pacer {
    /// A pacer with the configured limits; intervals live in `redis` when given.
    pub fn new(settings: &PacingSettings, redis: Option<RedisPacing>) -> Self {
        Self {
            concurrency: settings.per_app_concurrency.max(1) as usize,
            interval: settings.per_app_min_interval,
            accounts: Mutex::new(HashMap::default()),
            redis,
        }
    }

    /// Waits until `app_id` may start a call, then takes the start.
    /// Dropping the future, or `halt` firing, gives the slot back.
    pub async fn turn(&self, app_id: &str, halt: &Halt) -> Result<Turn, Interrupted> {
        let began = Instant::now();
        let account = self.account(app_id);
        // The semaphore is never closed, so this is always `Some`.
        let permit = halt
            .guard(account.slots.clone().acquire_owned())
            .await?
            .ok();
        if !self.interval.is_zero() {
            match &self.redis {
                Some(redis) => loop {
                    halt.guard(redis.client.until_healthy()).await?;
                    let wait = redis.reserve(app_id, self.interval, halt).await?;
                    halt.sleep(wait).await?;
                    if redis.client.unhealthy_reason().is_none() {
                        break;
                    }
                    // Redis went away (a failover) while this call waited:
                    // no call starts before it answers again, and by then
                    // the start reserved may be long past, so another call
                    // could start right after this one. A new start is
                    // reserved once it answers.
                },
                None => loop {
                    // The start is taken only when it has come, so a waiter
                    // that gives up leaves the interval to the next one.
                    let start_at = {
                        let mut next = account
                            .next_start
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        let now = Instant::now();
                        if *next <= now {
                            *next = now + self.interval;
                            break;
                        }
                        *next
                    };
                    halt.guard(tokio::time::sleep_until(start_at)).await?;
                },
            }
        }
        let waited = began.elapsed();
        meters().pacing_wait.record(waited.as_secs_f64());
        Ok(Turn {
            _permit: permit,
            waited,
        })
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
            let _turn = p.turn("a", &Halt::never()).await.expect("turn");
            starts.push(t0.elapsed());
        }
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(200), "{starts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_accounts_are_not_delayed() {
        let p = pacer(1, 1000);
        let _a1 = p.turn("a", &Halt::never()).await.expect("turn");
        let t0 = Instant::now();
        let _b = p.turn("b", &Halt::never()).await.expect("turn");
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limits_calls_in_flight() {
        let p = pacer(1, 0);
        let first = p.turn("a", &Halt::never()).await.expect("turn");
        let p2 = p.clone();
        let waiter =
            tokio::spawn(async move { p2.turn("a", &Halt::never()).await.expect("turn").waited });
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
            drop(p.turn(&format!("app-{i}"), &Halt::never()).await);
            if i % 100 == 0 {
                tokio::time::advance(Duration::from_millis(20)).await;
            }
        }
        tokio::time::advance(Duration::from_millis(20)).await;
        drop(p.turn("last", &Halt::never()).await);
        assert!(
            p.tracked_accounts() <= SWEEP_THRESHOLD + 1,
            "{}",
            p.tracked_accounts()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_its_start_to_the_next() {
        let p = pacer(5, 1000);
        let _first = p.turn("a", &Halt::never()).await.expect("turn");
        let session = crate::halt::Signal::new();
        let halt = Halt::new(crate::halt::Signal::new(), session.clone());
        let abandoned = tokio::spawn({
            let p = p.clone();
            async move { p.turn("a", &halt).await.map(|t| t.waited) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        session.raise();
        assert_eq!(
            abandoned.await.expect("join").err(),
            Some(Interrupted::SessionLost)
        );
        let t0 = Instant::now();
        let _next = p.turn("a", &Halt::never()).await.expect("turn");
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(900),
            "the next call starts one interval after the first, not two"
        );
    }
}
