//! The one multiplexed connection to Redis, and making it again.
//!
//! Every operation shares one connection (commands are pipelined on it).
//! It is dropped when an operation fails in a way that says the server is
//! gone or is no longer the master (a connection error, a timeout, a
//! `READONLY` or `MASTERDOWN` reply), or when a sentinel announces
//! `+switch-master`; the next operation then connects again, through the
//! sentinels when they are configured. redis-rs' `ConnectionManager` is not
//! used: built on a resolved address it reconnects to the old master for
//! ever (redis-rs#1438).

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{AsyncConnectionConfig, ErrorKind, aio::MultiplexedConnection};
use tokio::time::Instant;

use super::{
    RedisError,
    sentinel::{RedisRoleError, Sentinels, master_role},
};
use crate::config::redact_url_password;

/// Connect, and each answer, give up after this.
const TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connect, callers get its error for this long instead of
/// each trying again (sixty-four commands in flight would otherwise ask the
/// sentinels sixty-four times a round).
const RETRY_GAP: Duration = Duration::from_millis(200);

/// Where the connection goes.
pub(super) enum Source {
    /// One server, `redis.url`.
    Direct {
        client: redis::Client,
        /// The URL, password redacted.
        url: String,
    },
    /// The master the sentinels name.
    Sentinel(Sentinels),
}

/// A connection and which one it is (so a failure drops only that one).
#[derive(Clone)]
pub(super) struct Current {
    pub(super) conn: MultiplexedConnection,
    generation: u64,
    /// The server, password redacted.
    pub(super) url: String,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    generation: u64,
    failed: Option<(Instant, String)>,
    /// The last master connected to, to log a change once.
    last_url: Option<String>,
}

/// The shared connection.
pub(super) struct Link {
    pub(super) source: Source,
    state: tokio::sync::Mutex<State>,
    /// The URL of the current connection, readable without waiting.
    shown: Mutex<Option<String>>,
    /// Set when a sentinel announced a new master: the connection is
    /// dropped at the next operation.
    switched: AtomicBool,
}

impl Link {
    pub(super) fn new(source: Source) -> Self {
        Self {
            source,
            state: tokio::sync::Mutex::new(State::default()),
            shown: Mutex::new(None),
            switched: AtomicBool::new(false),
        }
    }

    /// A sentinel announced a new master: stop using the current one.
    pub(super) fn master_switched(&self) {
        self.switched.store(true, Ordering::Release);
    }

    /// The server the connection goes to now, if connected.
    pub(super) fn current_url(&self) -> Option<String> {
        self.shown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The connection, made (and the master found) if there is none.
    pub(super) async fn connection(&self) -> Result<Current, RedisError> {
        let mut state = self.state.lock().await;
        if self.switched.swap(false, Ordering::AcqRel) {
            state.current = None;
            state.failed = None;
        }
        if let Some(current) = &state.current {
            return Ok(current.clone());
        }
        if let Some((at, reason)) = &state.failed
            && at.elapsed() < RETRY_GAP
        {
            return Err(self.recent(reason.clone()));
        }
        match self.connect().await {
            Ok((conn, url)) => {
                state.generation += 1;
                if state.last_url.as_deref() != Some(url.as_str()) {
                    if let Source::Sentinel(_) = self.source {
                        tracing::info!(master = %url, "connected to the Redis master");
                    }
                    state.last_url = Some(url.clone());
                }
                let current = Current {
                    conn,
                    generation: state.generation,
                    url,
                };
                state.current = Some(current.clone());
                state.failed = None;
                *self.shown.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(current.url.clone());
                Ok(current)
            }
            Err(e) => {
                state.failed = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    fn recent(&self, reason: String) -> RedisError {
        match &self.source {
            Source::Direct { url, .. } => RedisError::Unreachable {
                url: url.clone(),
                reason,
            },
            Source::Sentinel(sentinels) => RedisError::Unreachable {
                url: sentinels.describe(),
                reason,
            },
        }
    }

    async fn connect(&self) -> Result<(MultiplexedConnection, String), RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(TIMEOUT)
            .set_response_timeout(TIMEOUT);
        match &self.source {
            Source::Direct { client, url } => client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(|conn| (conn, url.clone()))
                .map_err(|source| RedisError::Unavailable {
                    url: url.clone(),
                    source,
                }),
            Source::Sentinel(sentinels) => {
                let info = sentinels.resolve().await?;
                let url = redact_url_password(&format!("redis://{}/{}", info.addr, info.redis.db));
                let unavailable = |source| RedisError::Unavailable {
                    url: url.clone(),
                    source,
                };
                let client = redis::Client::open(info).map_err(unavailable)?;
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(unavailable)?;
                match master_role(&mut conn).await {
                    Ok(_) => Ok((conn, url)),
                    Err(RedisRoleError::Redis(source)) => Err(unavailable(source)),
                    Err(RedisRoleError::Not(role)) => Err(RedisError::NotMaster { url, role }),
                }
            }
        }
    }

    /// Takes note that an operation on `current` failed with `error`:
    /// drops the connection when the error says the server is gone or is
    /// not the master any more, so the next operation finds it again.
    pub(super) async fn failed(&self, current: &Current, error: &redis::RedisError) {
        if needs_new_connection(error) {
            self.drop_connection(Some(current.generation)).await;
        }
    }

    /// Drops the connection `generation` (any when `None`).
    pub(super) async fn drop_connection(&self, generation: Option<u64>) {
        let mut state = self.state.lock().await;
        if let Some(current) = &state.current
            && generation.is_none_or(|g| g == current.generation)
        {
            state.current = None;
            *self.shown.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

/// Whether `error` means the connection is useless: the server is gone,
/// hangs, or is no longer the master.
fn needs_new_connection(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(error.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown)
        || matches!(error.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demoted_or_gone_server_is_left_and_a_script_error_is_not() {
        let gone =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(needs_new_connection(&gone));
        let demoted = redis::RedisError::from((ErrorKind::ReadOnly, "READONLY"));
        assert!(needs_new_connection(&demoted));
        let down = redis::RedisError::from((ErrorKind::MasterDown, "MASTERDOWN"));
        assert!(needs_new_connection(&down));
        let script = redis::RedisError::from((ErrorKind::NoScriptError, "NOSCRIPT"));
        assert!(!needs_new_connection(&script));
        let lua = redis::RedisError::from((ErrorKind::ResponseError, "ERR user_script:1"));
        assert!(!needs_new_connection(&lua));
    }
}
