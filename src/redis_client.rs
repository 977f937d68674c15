//! The Redis connection shared by idempotency, pacing and the callbacks'
//! store (`redis.url`), its health as `/readyz` reports it, and waiting an
//! outage out ([`retry_while_unavailable`]).
//!
//! Every operation goes through [`RedisClient::run`], which records whether
//! Redis answered; a background probe keeps that current while no command
//! runs. Callers that get a [`RedisError`] must not call GeWe: neither
//! idempotency nor pacing could be guaranteed.

use std::{
    sync::{LazyLock, Mutex, PoisonError},
    time::Duration,
};

use redis::{FromRedisValue, Script, ScriptInvocation, aio::ConnectionManager};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::{Backoff, Waits},
    config::redact_url_password,
    halt::{Halt, Interrupted},
    meters::meters,
};

/// How often the health probe pings Redis.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// KEYS: a claim. ARGV: its owner. Deletes the claim only if it is still
/// that owner's (a claim that expired may be someone else's by now).
pub static RELEASE_IF_OWNED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// A TTL or lease in Redis' milliseconds; never 0, which Redis refuses.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Logs that Redis did not answer, with `what` waits for it, and returns
/// how long to wait before the next try.
pub fn note_unavailable(error: &RedisError, waits: &mut Waits, what: &'static str) -> Duration {
    let wait = waits.next_wait();
    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "{what}");
    wait
}

/// Runs `op` until Redis answers, waiting as `backoff` says (and logging
/// `what`) while it does not; stops retrying when `halt` fires. The first
/// try is always made: work finishing during the shutdown grace period
/// still completes.
pub async fn retry_while_unavailable<T, F, Fut>(
    backoff: Backoff,
    halt: &Halt,
    what: &'static str,
    mut op: F,
) -> Result<T, Interrupted>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    let mut waits = backoff.waits();
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                halt.sleep(note_unavailable(&error, &mut waits, what))
                    .await?
            }
        }
    }
}

/// Redis could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Connecting, authenticating or a command failed.
    #[error("Redis at {url} is unavailable: {source}")]
    Unavailable {
        /// Redis URL, password redacted.
        url: String,
        /// The client error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered something a script never returns: treated like an
    /// outage (retried), never as "nothing stored".
    #[error("Redis at {url} gave an unexpected reply: {reply}")]
    UnexpectedReply {
        /// Redis URL, password redacted.
        url: String,
        /// The reply, abbreviated.
        reply: String,
    },
}

/// Lazily connected, auto-reconnecting Redis client with a health record.
pub struct RedisClient {
    url: String,
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    /// `None` while healthy; otherwise the last error, for `/readyz`.
    unhealthy: Mutex<Option<String>>,
}

impl RedisClient {
    /// A client for `url`; connects on first use, so a Redis outage at
    /// start-up holds commands instead of stopping the worker.
    pub fn new(url: &str) -> Result<Self, RedisError> {
        let redacted = redact_url_password(url);
        let client = redis::Client::open(url).map_err(|source| RedisError::Unavailable {
            url: redacted.clone(),
            source,
        })?;
        Ok(Self {
            url: redacted,
            client,
            connection: OnceCell::new(),
            // Unknown until the first answer: not ready before Redis is.
            unhealthy: Mutex::new(Some("not connected yet".to_owned())),
        })
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `None` while Redis answers; otherwise why it does not.
    pub fn unhealthy_reason(&self) -> Option<String> {
        self.unhealthy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_health(&self, error: Option<&RedisError>) {
        let mut unhealthy = self
            .unhealthy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match error {
            None => *unhealthy = None,
            Some(e) => *unhealthy = Some(e.to_string()),
        }
    }

    async fn conn(&self) -> Result<ConnectionManager, RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1)
            .set_max_delay(500);
        self.connection
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
            .map_err(|e| self.unavailable(e))
    }

    fn unavailable(&self, source: redis::RedisError) -> RedisError {
        RedisError::Unavailable {
            url: self.url.clone(),
            source,
        }
    }

    /// An [`RedisError::UnexpectedReply`] for `reply`.
    pub fn unexpected(&self, reply: &redis::Value) -> RedisError {
        RedisError::UnexpectedReply {
            url: self.url.clone(),
            reply: format!("{reply:?}").chars().take(200).collect(),
        }
    }

    /// Runs one script invocation, recording Redis' health and counting
    /// failures in `redis_errors_total`.
    pub async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        // Boxed: the redis future is about 4 KiB, and every caller's state
        // machine (the command pipeline's included, Redis configured or
        // not) would otherwise carry it inline and copy it on each call.
        let result = Box::pin(async {
            let mut conn = self.conn().await?;
            invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.unavailable(e))
        })
        .await;
        self.observe(result)
    }

    /// Runs a pipeline (or one command) in one round trip, recording
    /// Redis' health like [`RedisClient::run`].
    pub async fn query<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, RedisError> {
        let result = Box::pin(async {
            let mut conn = self.conn().await?;
            pipe.query_async(&mut conn)
                .await
                .map_err(|e| self.unavailable(e))
        })
        .await;
        self.observe(result)
    }

    /// Records the outcome of an operation in the health state.
    pub fn observe<T>(&self, result: Result<T, RedisError>) -> Result<T, RedisError> {
        match &result {
            Ok(_) => self.set_health(None),
            Err(e) => {
                meters().redis_errors.increment(1);
                self.set_health(Some(e));
            }
        }
        result
    }

    async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(e))
    }

    /// Pings Redis every second until `stop`, so `/readyz` notices an
    /// outage (or a refused password) while no command is running.
    pub async fn probe(&self, stop: CancellationToken) {
        let mut every = tokio::time::interval(PROBE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let was = self.unhealthy_reason();
            match self.observe(self.ping().await) {
                Ok(()) if was.is_some() => tracing::info!(url = %self.url, "Redis answers"),
                Err(e) if was.is_none() => tracing::warn!(error = %e, "Redis unavailable"),
                Ok(()) | Err(_) => {}
            }
        }
    }
}
