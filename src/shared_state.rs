//! State shared by all replicas through Redis (`redis.url`): known outcomes
//! per commandId, in-flight claims, and per-account pacing reservations.
//!
//! Every operation is a single atomic Redis command or Lua script, so two
//! replicas can never both believe they own a commandId or the same pacing
//! slot. When Redis cannot be reached the caller gets a [`StateError`] and
//! must not call GeWe: neither idempotency nor pacing could be guaranteed.

use std::{sync::LazyLock, time::Duration};

use redis::{
    AsyncCommands, FromRedisValue, Script, ScriptInvocation, Value, aio::ConnectionManager,
};
use tokio::sync::OnceCell;

use crate::{config::redact_url_password, dedupe::Known};

/// Redis could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Connecting or a command failed.
    #[error("Redis at {url} is unavailable: {source}")]
    Unavailable {
        /// Redis URL, password redacted.
        url: String,
        /// The client error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered a script with something it never returns: treated
    /// like an outage (retried), never as "no outcome".
    #[error("Redis at {url} gave an unexpected reply: {reply}")]
    UnexpectedReply {
        /// Redis URL, password redacted.
        url: String,
        /// The reply, abbreviated.
        reply: String,
    },
    /// A stored value could not be decoded (written by an incompatible version).
    #[error("Redis holds an unreadable outcome for commandId {command_id}: {reason}")]
    Corrupt {
        /// The command.
        command_id: String,
        /// Decoder error.
        reason: String,
    },
}

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

/// The stored outcome if there is one, else the claim if nobody else holds
/// it: one atomic step, so an outcome stored and released by another
/// replica between our read and our claim cannot be missed. A claim that is
/// already ours (a renewal that timed out but ran) is taken again: one
/// process resolves a commandId once at a time. KEYS[1] = outcome,
/// KEYS[2] = claim, ARGV[1] = owner, ARGV[2] = lease ms. Returns the
/// outcome, 1 (claimed) or 0 (held by another replica).
static CLAIM_OR_OUTCOME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Stores an outcome and releases our claim in one step. KEYS[1] = outcome,
/// KEYS[2] = claim, ARGV[1] = outcome, ARGV[2] = window ms, ARGV[3] = owner.
static STORE_AND_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"#,
    )
});

/// Extends the claim only if it is still ours.
static RENEW_CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#,
    )
});

/// Deletes the claim only if it is still ours.
static RELEASE_CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// What [`SharedState::claim_or_outcome`] found.
pub enum Claim {
    /// An outcome is stored (undecodable ones are reported as
    /// [`StateError::Corrupt`]).
    Outcome(Box<Known>),
    /// The claim is ours: call GeWe.
    Claimed,
    /// Another replica holds the claim.
    Held,
}

/// A TTL or lease in Redis' milliseconds; never 0, which Redis refuses.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Lazily connected, auto-reconnecting Redis client.
pub struct SharedState {
    url: String,
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
}

impl SharedState {
    /// A client for `url`; connects on first use so that a Redis outage at
    /// start-up delays commands instead of crashing the worker.
    pub fn new(url: &str, prefix: &str) -> Result<Self, StateError> {
        let client = redis::Client::open(url).map_err(|source| StateError::Unavailable {
            url: redact_url_password(url),
            source,
        })?;
        Ok(Self {
            url: redact_url_password(url),
            client,
            connection: OnceCell::new(),
            prefix: prefix.to_owned(),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, StateError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(2)
            .set_max_delay(500);
        self.connection
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
            .map_err(|e| self.unavailable(e))
    }

    fn unavailable(&self, source: redis::RedisError) -> StateError {
        StateError::Unavailable {
            url: self.url.clone(),
            source,
        }
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    /// Runs one script invocation on the shared connection.
    async fn run<T: FromRedisValue>(
        &self,
        invocation: &mut ScriptInvocation<'_>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn().await?;
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// The stored outcome of `command_id`, or else a claim on it for `lease`.
    pub async fn claim_or_outcome(
        &self,
        command_id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim, StateError> {
        let found: Value = self
            .run(
                CLAIM_OR_OUTCOME
                    .key(self.key("outcome", command_id))
                    .key(self.key("claim", command_id))
                    .arg(owner)
                    .arg(millis(lease)),
            )
            .await?;
        let corrupt = |reason: String| StateError::Corrupt {
            command_id: command_id.to_owned(),
            reason,
        };
        match found {
            Value::BulkString(raw) => serde_json::from_slice(&raw)
                .map(|known| Claim::Outcome(Box::new(known)))
                .map_err(|e| corrupt(e.to_string())),
            Value::Int(1) => Ok(Claim::Claimed),
            Value::Int(0) => Ok(Claim::Held),
            other => Err(StateError::UnexpectedReply {
                url: self.url.clone(),
                reply: format!("{other:?}").chars().take(200).collect(),
            }),
        }
    }

    /// Stores the outcome of `command_id` for `window` and releases the
    /// claim `owner` holds on it.
    pub async fn store_and_release(
        &self,
        command_id: &str,
        known: &Known,
        window: Duration,
        owner: &str,
    ) -> Result<(), StateError> {
        self.run::<i64>(
            STORE_AND_RELEASE
                .key(self.key("outcome", command_id))
                .key(self.key("claim", command_id))
                .arg(serde_json::to_string(known).unwrap_or_default())
                .arg(millis(window))
                .arg(owner),
        )
        .await
        .map(|_| ())
    }

    /// Stores the outcome of `command_id` for `window`.
    pub async fn store_outcome(
        &self,
        command_id: &str,
        known: &Known,
        window: Duration,
    ) -> Result<(), StateError> {
        let mut conn = self.conn().await?;
        let value = serde_json::to_string(known).unwrap_or_default();
        conn.pset_ex::<_, _, ()>(self.key("outcome", command_id), value, millis(window))
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Claims `command_id` for `lease`; false when another replica holds it.
    pub async fn claim(
        &self,
        command_id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StateError> {
        let mut conn = self.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key("claim", command_id))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(set.is_some())
    }

    /// Releases a claim taken by `owner`.
    pub async fn release(&self, command_id: &str, owner: &str) -> Result<(), StateError> {
        self.run::<i64>(RELEASE_CLAIM.key(self.key("claim", command_id)).arg(owner))
            .await
            .map(|_| ())
    }

    /// Extends a claim held by `owner` to `lease` from now; false when the
    /// claim is no longer ours (it expired and another replica took it).
    pub async fn renew(
        &self,
        command_id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StateError> {
        self.run::<i64>(
            RENEW_CLAIM
                .key(self.key("claim", command_id))
                .arg(owner)
                .arg(millis(lease)),
        )
        .await
        .map(|renewed| renewed == 1)
    }

    /// Reserves the next call start for `app_id`; returns the wait before it.
    pub async fn reserve_start(
        &self,
        app_id: &str,
        interval: Duration,
    ) -> Result<Duration, StateError> {
        let wait_ms: i64 = self
            .run(
                RESERVE_START
                    .key(self.key("pace", app_id))
                    .arg(interval.as_millis() as u64),
            )
            .await?;
        Ok(Duration::from_millis(wait_ms.max(0) as u64))
    }
}
