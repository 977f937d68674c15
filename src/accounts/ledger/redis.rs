//! The budget state of every account in Redis, shared by every replica and
//! kept across restarts.
//!
//! One hash per account (`<prefix>:acct:<appId>`) and one sorted set of the
//! accounts seen (`<prefix>:accounts`, scored by when, refreshed once an
//! hour per account and outside the scripts, so that each script touches
//! one key, as Redis Cluster requires). Admitting a call
//! (pause, cooldown, the day's count and the pacing turn) is one script, so
//! it is one round trip and holds exactly under concurrency: two replicas
//! can never both take the last unit of a day. The pacing turn is reserved
//! on Redis' own clock, so replicas with skewed clocks still keep the gap.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use redis::Script;
use tokio::time::Instant;

use super::{Admission, AdmitRequest, KEEP_MS, Snapshot};
use crate::{
    accounts::{AccountError, calendar::Millis},
    backoff::Backoff,
    halt::{Halt, Interrupted},
    redis_client::{Durable, RedisClient, millis, retry_while_unavailable},
};

/// Waits while Redis is unavailable.
const REDIS_BACKOFF: Backoff =
    Backoff::doubling(Duration::from_millis(200), Duration::from_secs(5));
/// How often an account's entry in the registry (`<prefix>:accounts`, the
/// console's list) is refreshed: the list shows accounts seen in the last
/// seven days, so an hour's staleness is not seen, and every call does
/// not write a key that all accounts share.
const REGISTER_EVERY: Duration = Duration::from_secs(3600);
/// How often the last outcomes are written, in one pipeline.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// KEYS: account hash. ARGV: now, day, limit, interval ms, max wait ms,
/// keep ms, register every ms. Returns {code, value, register}:
/// code 0 go (wait ms), 1 paused (until, -1 until resumed), 2 cooling
/// (until), 3 over limit, 4 too far (wait ms); register 1 when the
/// account's entry in the registry is due (then the caller writes it: the
/// registry is another key, in another hash slot).
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'pu', 'cu', 'day', 'sent', 'next', 'rg')
local register = 0
if now - tonumber(h[6] or '0') >= tonumber(ARGV[7]) then register = 1 end
local pu = tonumber(h[1] or '0')
if pu == -1 or pu > now then return {1, pu, register} end
local cu = tonumber(h[2] or '0')
if cu > now then return {2, cu, register} end
local sent = 0
if h[3] == ARGV[2] then sent = tonumber(h[4] or '0') end
local limit = tonumber(ARGV[3])
if limit > 0 and sent >= limit then return {3, 0, register} end
local interval = tonumber(ARGV[4])
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start = clock
if interval > 0 then start = math.max(clock, tonumber(h[5] or '0')) end
local wait = start - clock
if wait > tonumber(ARGV[5]) then return {4, wait, register} end
redis.call('HSET', KEYS[1], 'day', ARGV[2], 'sent', sent + 1, 'next', start + interval, 'ls', now + wait)
-- Only here, where the key gets its expiry: written on an early return,
-- the field could create a key that never expires.
if register == 1 then redis.call('HSET', KEYS[1], 'rg', now) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {0, wait, register}
"#,
    )
});

/// KEYS: account hash. ARGV: now. {1, until} paused, {2, until} cooling, {0, 0}.
static RESTS_NOW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'pu', 'cu')
local pu = tonumber(h[1] or '0')
if pu == -1 or pu > now then return {1, pu} end
local cu = tonumber(h[2] or '0')
if cu > now then return {2, cu} end
return {0, 0}
"#,
    )
});

/// KEYS: account hash. ARGV: day. Gives a unit back to that day only.
static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'day') == ARGV[1] and tonumber(redis.call('HGET', KEYS[1], 'sent') or '0') > 0 then
  return redis.call('HINCRBY', KEYS[1], 'sent', -1)
end
return -1
"#,
    )
});

/// Budget state in Redis.
pub struct RedisLedger {
    client: Arc<RedisClient>,
    prefix: String,
    outcomes: Arc<Mutex<Outcomes>>,
}

#[derive(Default)]
struct Outcomes {
    pending: HashMap<String, &'static str>,
    flushing: bool,
}

impl RedisLedger {
    /// Accounts under `prefix` on `client`.
    pub fn new(client: Arc<RedisClient>, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
            outcomes: Arc::default(),
        }
    }

    fn key(&self, app_id: &str) -> String {
        format!("{}:acct:{app_id}", self.prefix)
    }

    fn registry(&self) -> String {
        format!("{}:accounts", self.prefix)
    }

    /// See [`super::Ledger::admit`].
    pub async fn admit(
        &self,
        req: &AdmitRequest<'_>,
        halt: &Halt,
    ) -> Result<Admission, Interrupted> {
        let (key, client) = (self.key(req.app_id), &self.client);
        let (code, value, register): (i64, i64, i64) = retry_while_unavailable(
            REDIS_BACKOFF,
            halt,
            "Redis unavailable: account budgets cannot be checked, GeWe is not called",
            // Durable: a unit or a turn a failover could lose would let
            // another replica send past the limit or too early. Retried
            // after a write no replica acknowledged, the script may take a
            // second unit: the day ends early, never late.
            || {
                let mut call = Durable::new(&ADMIT);
                call.key(&key)
                    .arg(req.now)
                    .arg(req.day)
                    .arg(req.limit)
                    .arg(req.interval_ms)
                    .arg(req.max_wait_ms)
                    .arg(KEEP_MS)
                    .arg(millis(REGISTER_EVERY));
                async move { client.run_durable(&call).await }
            },
        )
        .await?;
        if register == 1 {
            self.register(req.app_id, req.now).await;
        }
        Ok(decode(code, value))
    }

    /// Notes in the registry that `app_id` was seen at `now`, for the
    /// console's list. Best effort: missed, the account is listed again
    /// at its next registration.
    async fn register(&self, app_id: &str, now: Millis) {
        if let Err(error) = self
            .client
            .query::<()>(&self.registration(app_id, now))
            .await
        {
            tracing::warn!(%error, app_id, "could not list the account for the console; it is listed again within the hour");
        }
    }

    /// The registry's entry for `app_id`, seen at `now`.
    fn registration(&self, app_id: &str, now: Millis) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.zadd(self.registry(), app_id, now).ignore();
        pipe
    }

    /// Whether Redis answers now (a failover in progress: no).
    pub fn healthy(&self) -> bool {
        self.client.unhealthy_reason().is_none()
    }

    /// Resolves once Redis answers (with Sentinel: a master is known).
    pub async fn until_healthy(&self) {
        self.client.until_healthy().await;
    }

    /// See [`super::Ledger::rests_now`].
    pub async fn rests_now(
        &self,
        app_id: &str,
        now: Millis,
        halt: &Halt,
    ) -> Result<Option<Admission>, Interrupted> {
        let (key, client) = (self.key(app_id), &self.client);
        let (code, value): (i64, i64) = retry_while_unavailable(
            REDIS_BACKOFF,
            halt,
            "Redis unavailable: account budgets cannot be checked, GeWe is not called",
            || {
                let mut invocation = RESTS_NOW.key(&key);
                invocation.arg(now);
                async move { client.run(&invocation).await }
            },
        )
        .await?;
        Ok((code != 0).then(|| decode(code, value)))
    }

    /// See [`super::Ledger::give_back`]. Best effort: a unit not given back
    /// only makes the account's day shorter, never longer.
    pub async fn give_back(&self, app_id: &str, day: &str) {
        let key = self.key(app_id);
        let mut invocation = GIVE_BACK.key(&key);
        invocation.arg(day);
        if let Err(error) = self.client.run::<i64>(&invocation).await {
            tracing::warn!(%error, app_id, "could not give a daily unit back; the account's day ends one request early");
        }
    }

    /// See [`super::Ledger::cool_down`]. Tried until Redis answers or a
    /// few seconds pass: other replicas must hear of it.
    pub async fn cool_down(&self, app_id: &str, until: Millis, reason: &str, now: Millis) {
        let keep = until.saturating_sub(now).saturating_add(KEEP_MS);
        let mut pipe = redis::pipe();
        pipe.hset_multiple(
            self.key(app_id),
            &[("cu", until.to_string()), ("cr", reason.to_owned())],
        )
        .ignore()
        .cmd("PEXPIRE")
        .arg(self.key(app_id))
        .arg(keep)
        .ignore();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut waits = REDIS_BACKOFF.waits();
        while let Err(error) = self.client.query::<()>(&pipe).await {
            if Instant::now() >= deadline {
                tracing::error!(%error, app_id, "could not record the cooldown in Redis; other replicas may call this account meanwhile");
                return;
            }
            tokio::time::sleep(waits.next_wait()).await;
        }
    }

    /// See [`super::Ledger::note_outcome`]: buffered and written once a
    /// second in one pipeline, so the console's column costs no round trip
    /// per call.
    pub fn note_outcome(&self, app_id: &str, outcome: &'static str) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        outcomes.pending.insert(app_id.to_owned(), outcome);
        if outcomes.flushing {
            return;
        }
        outcomes.flushing = true;
        let (shared, client, prefix) = (
            self.outcomes.clone(),
            self.client.clone(),
            self.prefix.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(FLUSH_EVERY).await;
            let pending = {
                let mut outcomes = shared.lock().unwrap_or_else(PoisonError::into_inner);
                outcomes.flushing = false;
                std::mem::take(&mut outcomes.pending)
            };
            let mut pipe = redis::pipe();
            for (app, outcome) in pending {
                pipe.hset(format!("{prefix}:acct:{app}"), "lo", outcome)
                    .ignore();
            }
            if let Err(error) = client.query::<()>(&pipe).await {
                tracing::debug!(%error, "could not write the accounts' last outcomes");
            }
        });
    }

    /// See [`super::Ledger::pause`].
    pub async fn pause(
        &self,
        app_id: &str,
        until: Option<Millis>,
        reason: Option<&str>,
        now: Millis,
    ) -> Result<(), AccountError> {
        let key = self.key(app_id);
        let until_field = until.map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX));
        // Atomic on the account's key only: the registry is in another
        // hash slot, and a transaction may not span two.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&key, "pu", until_field)
            .ignore()
            .hset(&key, "pr", reason.unwrap_or(""))
            .ignore();
        match until {
            // A pause until resumed outlives any expiry.
            None => pipe.persist(&key).ignore(),
            Some(t) => pipe
                .pexpire(
                    &key,
                    i64::try_from(t.saturating_sub(now).saturating_add(KEEP_MS))
                        .unwrap_or(i64::MAX),
                )
                .ignore(),
        };
        self.client.query::<()>(&pipe).await.map_err(unavailable)?;
        self.client
            .query::<()>(&self.registration(app_id, now))
            .await
            .map_err(unavailable)
    }

    /// See [`super::Ledger::resume`].
    pub async fn resume(&self, app_id: &str) -> Result<(), AccountError> {
        let key = self.key(app_id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hdel(&key, &["pu", "pr"])
            .ignore()
            .pexpire(&key, i64::try_from(KEEP_MS).unwrap_or(i64::MAX))
            .ignore();
        self.client.query::<()>(&pipe).await.map_err(unavailable)
    }

    /// See [`super::Ledger::list`]. Trims accounts not seen for
    /// [`super::KEEP_DAYS`] from the registry on the way.
    pub async fn list(&self, since: Millis) -> Result<Vec<Snapshot>, AccountError> {
        let registry = self.registry();
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&registry)
            .arg("-inf")
            .arg(format!(
                "({}",
                since.saturating_sub(KEEP_MS - 7 * 24 * 3600 * 1000)
            ))
            .ignore()
            .zrangebyscore(&registry, since, "+inf");
        let (apps,): (Vec<String>,) = self.client.query(&pipe).await.map_err(unavailable)?;
        let mut pipe = redis::pipe();
        for app in &apps {
            pipe.hget(
                self.key(app),
                &["day", "sent", "pu", "pr", "cu", "cr", "ls", "lo"],
            );
        }
        let rows: Vec<Vec<Option<String>>> = if apps.is_empty() {
            Vec::new()
        } else {
            self.client.query(&pipe).await.map_err(unavailable)?
        };
        Ok(apps
            .into_iter()
            .zip(rows)
            .map(|(app_id, row)| snapshot(app_id, &row))
            .collect())
    }
}

fn unavailable(e: crate::redis_client::RedisError) -> AccountError {
    AccountError::Unavailable(e.to_string())
}

fn decode(code: i64, value: i64) -> Admission {
    let ms = |v: i64| u64::try_from(v).unwrap_or(0);
    match code {
        0 => Admission::Go { wait_ms: ms(value) },
        1 if value < 0 => Admission::Paused(None),
        1 => Admission::Paused(Some(ms(value))),
        2 => Admission::Cooling(ms(value)),
        3 => Admission::OverLimit,
        _ => Admission::TooFar { wait_ms: ms(value) },
    }
}

fn snapshot(app_id: String, row: &[Option<String>]) -> Snapshot {
    let field = |i: usize| row.get(i).cloned().flatten().filter(|s| !s.is_empty());
    let number = |i: usize| field(i).and_then(|s| s.parse::<i64>().ok());
    let paused = match number(2) {
        Some(-1) => Some(None),
        Some(t) if t > 0 => Some(Some(u64::try_from(t).unwrap_or(0))),
        _ => None,
    };
    Snapshot {
        app_id,
        day: field(0).unwrap_or_default(),
        sent: number(1).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        paused,
        pause_reason: field(3),
        cool_until: number(4).and_then(|n| u64::try_from(n).ok()),
        cool_reason: field(5),
        last_sent: number(6).and_then(|n| u64::try_from(n).ok()),
        last_outcome: field(7),
    }
}
