//! The Redis connection shared by idempotency, pacing and the callbacks'
//! store (`redis.url`, or the master named by `redis.sentinels`), its health
//! as `/readyz` reports it, and waiting an outage out
//! ([`retry_while_unavailable`]).
//!
//! Every operation goes through [`RedisClient::run`] or, for writes that
//! must survive a failover, [`RedisClient::run_durable`]; both record
//! whether Redis answered, and a background probe keeps that current while
//! no command runs. Callers that get a [`RedisError`] must not call GeWe:
//! neither idempotency nor pacing could be guaranteed. The connection
//! ([`link`]) follows the master across a failover ([`sentinel`]).

mod durable;
mod link;
mod sentinel;

use std::{
    sync::{LazyLock, Mutex, PoisonError},
    time::Duration,
};

use redis::{FromRedisValue, Script, ScriptInvocation};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use durable::Durable;

use self::{
    link::{Link, Source},
    sentinel::{RedisRoleError, Sentinels, master_role},
};
use crate::{
    backoff::{Backoff, Waits},
    config::{RedisSettings, redact_url_password},
    halt::{Halt, Interrupted},
    meters::meters,
};

/// How often the health probe pings Redis.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a durable write waits for a replica's acknowledgement. Within
/// one data centre a replica acknowledges in well under a millisecond; a
/// replica that takes longer is treated as absent (the command is held).
const REPLICA_WAIT: Duration = Duration::from_millis(500);

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
    /// Connecting failed a moment ago; not tried again yet.
    #[error("Redis at {url} is unavailable: {reason}")]
    Unreachable {
        /// Redis URL (or the sentinels), password redacted.
        url: String,
        /// The last failure.
        reason: String,
    },
    /// No sentinel named a master: it is down and not replaced yet, or the
    /// sentinels cannot be reached.
    #[error("no Redis master known for '{master}': {reason}")]
    NoMaster {
        /// `redis.master_name`.
        master: String,
        /// What each sentinel said.
        reason: String,
    },
    /// The server a sentinel named is not (or no longer) the master.
    #[error("Redis at {url} is not the master (ROLE {role})")]
    NotMaster {
        /// The server, password redacted.
        url: String,
        /// What it says it is.
        role: String,
    },
    /// A durable write ran, but no replica acknowledged it in time: a
    /// failover now could lose it, so it must not be relied on.
    #[error("Redis at {url}: no replica acknowledged the write within {wait_ms} ms")]
    NotReplicated {
        /// The master, password redacted.
        url: String,
        /// How long it waited.
        wait_ms: u64,
    },
    /// The master has no replica connected, so durable writes cannot be
    /// acknowledged (found by the health check, before any write fails).
    #[error(
        "the Redis master at {url} has no replica connected: writes that guard a friend request cannot be acknowledged"
    )]
    NoReplica {
        /// The master, password redacted.
        url: String,
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

/// Redis (one server, or the master Sentinel names), connected on first
/// use and again after each loss, with a health record.
pub struct RedisClient {
    /// `redis.url` redacted, or `sentinel:<master>@<sentinels>`.
    url: String,
    link: Link,
    /// Replicas a durable write waits for: 1 with Sentinel, else 0 (a
    /// single server has no replica to promote, so nothing to lose).
    replicas: u32,
    /// `None` while healthy; otherwise the last error, for `/readyz`.
    unhealthy: Mutex<Option<String>>,
    /// Whether Redis answers, for [`RedisClient::until_healthy`].
    healthy: watch::Sender<bool>,
}

impl RedisClient {
    /// A client for the one server at `url`; connects on first use, so a
    /// Redis outage at start-up holds commands instead of stopping the worker.
    pub fn new(url: &str) -> Result<Self, RedisError> {
        let redacted = redact_url_password(url);
        let client = redis::Client::open(url).map_err(|source| RedisError::Unavailable {
            url: redacted.clone(),
            source,
        })?;
        Ok(Self::with_source(
            redacted.clone(),
            Source::Direct {
                client,
                url: redacted,
            },
            0,
        ))
    }

    /// The client `settings` describe: through the sentinels when
    /// `redis.sentinels` is set, else `redis.url`; `None` without either.
    pub fn from_settings(settings: &RedisSettings) -> Result<Option<Self>, RedisError> {
        if settings.uses_sentinel() {
            let sentinels = Sentinels::new(settings)?;
            let url = sentinels.describe();
            return Ok(Some(Self::with_source(url, Source::Sentinel(sentinels), 1)));
        }
        settings.url.as_deref().map(Self::new).transpose()
    }

    fn with_source(url: String, source: Source, replicas: u32) -> Self {
        Self {
            url,
            link: Link::new(source),
            replicas,
            // Unknown until the first answer: not ready before Redis is.
            unhealthy: Mutex::new(Some("not connected yet".to_owned())),
            healthy: watch::Sender::new(false),
        }
    }

    /// The URL, password redacted (with Sentinel: the master's name and
    /// the sentinels).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server connected to now (with Sentinel: the current master).
    pub fn current_server(&self) -> Option<String> {
        self.link.current_url()
    }

    /// `None` while Redis answers; otherwise why it does not.
    pub fn unhealthy_reason(&self) -> Option<String> {
        self.unhealthy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns once Redis answers (at once if it does now).
    pub async fn until_healthy(&self) {
        let mut healthy = self.healthy.subscribe();
        // The sender lives as long as `self`: this cannot fail while borrowed.
        let _ = healthy.wait_for(|h| *h).await;
    }

    fn set_health(&self, error: Option<&RedisError>) {
        let mut unhealthy = self
            .unhealthy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *unhealthy = error.map(ToString::to_string);
        self.healthy.send_if_modified(|h| {
            let was = *h;
            *h = error.is_none();
            was != *h
        });
    }

    /// An [`RedisError::UnexpectedReply`] for `reply`.
    pub fn unexpected(&self, reply: &redis::Value) -> RedisError {
        RedisError::UnexpectedReply {
            url: self.link.current_url().unwrap_or_else(|| self.url.clone()),
            reply: format!("{reply:?}").chars().take(200).collect(),
        }
    }

    /// Runs one script invocation, recording Redis' health and counting
    /// failures in `redis_errors_total`. For writes a failover must not
    /// lose, use [`RedisClient::run_durable`].
    pub async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        // Boxed: the redis future is about 4 KiB, and every caller's state
        // machine (the command pipeline's included, Redis configured or
        // not) would otherwise carry it inline and copy it on each call.
        let result = Box::pin(async {
            let mut current = self.link.connection().await?;
            match invocation.invoke_async(&mut current.conn).await {
                Ok(value) => Ok(value),
                Err(e) => Err(self.failed(&current, e).await),
            }
        })
        .await;
        self.observe(result)
    }

    /// Runs a pipeline (or one command) in one round trip, recording
    /// Redis' health like [`RedisClient::run`] (not waited for by a
    /// replica: for what a failover may lose).
    pub async fn query<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, RedisError> {
        let result = Box::pin(async {
            let mut current = self.link.connection().await?;
            match pipe.query_async(&mut current.conn).await {
                Ok(value) => Ok(value),
                Err(e) => Err(self.failed(&current, e).await),
            }
        })
        .await;
        self.observe(result)
    }

    /// Runs `call`'s script and, with Sentinel, waits for a replica to
    /// acknowledge it (`WAIT 1`, in the same pipeline):
    /// [`RedisError::NotReplicated`] when none did, so the caller does not
    /// rely on a write a failover could lose. The script must be safe to
    /// run again: the caller retries it after that error.
    pub async fn run_durable<T: FromRedisValue>(
        &self,
        call: &Durable<'_>,
    ) -> Result<T, RedisError> {
        let result = Box::pin(async {
            let mut current = self.link.connection().await?;
            let (reply, acknowledged) = match call
                .run(&mut current.conn, self.replicas, REPLICA_WAIT)
                .await
            {
                Ok(done) => done,
                Err(e) => return Err(self.failed(&current, e).await),
            };
            if acknowledged < self.replicas {
                return Err(RedisError::NotReplicated {
                    url: current.url.clone(),
                    wait_ms: millis(REPLICA_WAIT),
                });
            }
            T::from_owned_redis_value(reply.clone()).map_err(|_| self.unexpected(&reply))
        })
        .await;
        self.observe(result)
    }

    async fn failed(&self, current: &link::Current, source: redis::RedisError) -> RedisError {
        self.link.failed(current, &source).await;
        RedisError::Unavailable {
            url: current.url.clone(),
            source,
        }
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

    /// One health check: `PING` a single server; with Sentinel, `ROLE`:
    /// the server must still be the master and have a replica to
    /// acknowledge durable writes.
    async fn check(&self) -> Result<(), RedisError> {
        let mut current = self.link.connection().await?;
        if self.replicas == 0 {
            return match redis::cmd("PING")
                .query_async::<String>(&mut current.conn)
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => Err(self.failed(&current, e).await),
            };
        }
        match master_role(&mut current.conn).await {
            Ok(replicas) if replicas >= self.replicas as usize => Ok(()),
            Ok(_) => Err(RedisError::NoReplica {
                url: current.url.clone(),
            }),
            Err(RedisRoleError::Redis(e)) => Err(self.failed(&current, e).await),
            Err(RedisRoleError::Not(role)) => {
                self.link.drop_connection(None).await;
                Err(RedisError::NotMaster {
                    url: current.url.clone(),
                    role,
                })
            }
        }
    }

    /// Checks Redis every second until `stop`, so `/readyz` notices an
    /// outage (or a refused password, or a master without replicas) while
    /// no command is running. With Sentinel it also listens for
    /// `+switch-master`, so a failover is followed at once.
    pub async fn probe(&self, stop: CancellationToken) {
        let watch = async {
            if let Source::Sentinel(sentinels) = &self.link.source {
                // Every sentinel announces the same switch: logged once.
                let last = Mutex::new(String::new());
                let switched = |announcement: &str| {
                    let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
                    if *last != announcement {
                        tracing::warn!(%announcement, "Sentinel announced a new Redis master");
                        announcement.clone_into(&mut last);
                    }
                    self.link.master_switched();
                };
                sentinels.watch(switched, stop.clone()).await;
            }
        };
        let checks = async {
            let mut every = tokio::time::interval(PROBE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let was = self.unhealthy_reason();
                match self.observe(self.check().await) {
                    Ok(()) if was.is_some() => {
                        tracing::info!(url = %self.url, server = ?self.current_server(), "Redis answers")
                    }
                    Err(e) if was.is_none() => tracing::warn!(error = %e, "Redis unavailable"),
                    Ok(()) | Err(_) => {}
                }
            }
        };
        tokio::join!(watch, checks);
    }
}
