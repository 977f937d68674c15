//! Outcomes and claims in Redis (`redis.url`), shared by every replica.
//!
//! Per commandId: the stored [`Record`], packed ([`compact`]; 128 added to
//! its first byte once an event for it was confirmed), as a field of a hash
//! bucket ([`crate::buckets`]); and a claim naming the replica that is
//! handling the command, with a lease; all of it in the commandId's hash
//! slot ([`layout`]). Every step is one Lua script ([`scripts`]), so two
//! replicas never both own a commandId, and every write is durable
//! ([`RedisClient::run_durable`]): a replica acknowledged it before it is
//! relied on. A boot marker per slot lets a replica notice that Redis lost
//! its data and hold off new claims for a lease ([`scripts`] says why).

use std::{sync::Arc, time::Duration};

use redis::{Script, Value};

use super::{
    Record, compact,
    layout::{CommandKeys, Layout, Reads},
    scripts::{ACQUIRE, PUBLISHED, RELEASE, RENEW, STORE},
};
use crate::redis_client::{Durable, RedisClient, RedisError};

/// What [`RedisStore::acquire`] found.
pub enum Acquired {
    /// An outcome whose event was confirmed.
    Published(Record),
    /// The claim is ours; an outcome stored but not yet announced, if any.
    Claimed(Option<Record>),
    /// Another replica holds the claim, or the restart guard is up.
    Wait,
    /// A record this version cannot read (written by another version).
    Unreadable {
        /// Why it could not be read.
        reason: String,
        /// Whether the claim was taken (and must be released).
        claimed: bool,
    },
}

/// How a renewal went.
pub enum Renewed {
    /// The claim is ours for another lease.
    Yes,
    /// Another replica holds it now.
    TakenOver,
}

/// Redis side of the idempotency store. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Arc<RedisClient>,
    owner: String,
    layout: Layout,
    lease: Duration,
}

impl RedisStore {
    /// A store under `prefix`, remembering outcomes for `window` and
    /// claiming commandIds for `lease`.
    pub fn new(client: Arc<RedisClient>, prefix: &str, window: Duration, lease: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                owner: uuid::Uuid::new_v4().to_string(),
                layout: Layout::new(prefix, window, lease),
                lease,
            }),
        }
    }

    /// The Redis client.
    pub fn client(&self) -> &RedisClient {
        &self.inner.client
    }

    /// How long a claim lives without renewal.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// The keys of `command_id`'s script, once this replica looked at
    /// Redis' boot markers (or could not yet: then earlier versions' keys
    /// are read too).
    async fn keys(&self, command_id: &str, reads: Reads) -> (CommandKeys, u64) {
        let inner = &self.inner;
        if let Err(error) = inner.layout.look(&inner.client).await {
            tracing::debug!(%error, "could not look at Redis' boot markers yet");
        }
        inner.layout.keys(command_id, reads)
    }

    /// `script` with `keys`, `more_args` after the common arguments;
    /// durable. `boot`: the script checks the slot's boot marker, so it
    /// gets the one last seen and a fresh one.
    async fn call<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &CommandKeys,
        boot: bool,
        more_args: &[&[u8]],
    ) -> Result<T, RedisError> {
        let inner = &self.inner;
        let mut call = Durable::new(script);
        let seen = boot.then(|| inner.layout.seen(keys.slot));
        keys.apply(&mut call, &inner.owner, inner.lease, seen.as_deref());
        for arg in more_args {
            call.arg(*arg);
        }
        inner.client.run_durable(&call).await
    }

    /// Runs a script that reports the slot's boot marker last, and takes
    /// note of it.
    async fn with_boot<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &CommandKeys,
    ) -> Result<T, RedisError> {
        let mut reply: Vec<Value> = self.call(script, keys, true, &[]).await?;
        let marker = match reply.pop() {
            Some(Value::BulkString(marker)) => String::from_utf8_lossy(&marker).into_owned(),
            other => return Err(self.inner.client.unexpected(&other.unwrap_or(Value::Nil))),
        };
        self.inner.layout.saw(keys.slot, &marker, self.inner.lease);
        let rest = Value::Array(reply);
        redis::from_redis_value(&rest).map_err(|_| self.inner.client.unexpected(&rest))
    }

    /// The stored outcome of `command_id` if announced, else our claim on it.
    pub async fn acquire(&self, command_id: &str) -> Result<Acquired, RedisError> {
        let (keys, _) = self.keys(command_id, Reads::Record).await;
        let (state, record, packed): (String, Vec<u8>, i64) =
            self.with_boot(&ACQUIRE, &keys).await?;
        let decoded = (!record.is_empty()).then(|| match packed {
            1 => compact::decode(&record).map_err(|e| e.to_string()),
            _ => serde_json::from_slice::<Record>(&record).map_err(|e| e.to_string()),
        });
        let unreadable = |reason: String, claimed| {
            tracing::error!(%command_id, error = %reason, "Redis holds a record for this commandId that this version cannot read");
            Acquired::Unreadable { reason, claimed }
        };
        match (state.as_str(), decoded) {
            ("published", Some(Ok(record))) => Ok(Acquired::Published(record)),
            ("published", Some(Err(e))) => Ok(unreadable(e, false)),
            ("claimed", None) => Ok(Acquired::Claimed(None)),
            ("claimed", Some(Ok(record))) => Ok(Acquired::Claimed(Some(record))),
            ("claimed", Some(Err(e))) => Ok(unreadable(e, true)),
            ("held" | "guarded", _) => Ok(Acquired::Wait),
            (other, _) => Err(self
                .inner
                .client
                .unexpected(&Value::SimpleString(other.to_owned()))),
        }
    }

    /// Extends our claim on `command_id`.
    pub async fn renew(&self, command_id: &str) -> Result<Renewed, RedisError> {
        let (keys, _) = self.keys(command_id, Reads::Nothing).await;
        let (state,): (i64,) = self.with_boot(&RENEW, &keys).await?;
        match state {
            1 => Ok(Renewed::Yes),
            2 => {
                tracing::warn!(%command_id, "the claim on this commandId was gone from Redis; re-asserted it");
                Ok(Renewed::Yes)
            }
            0 => Ok(Renewed::TakenOver),
            other => Err(self.inner.client.unexpected(&Value::Int(other))),
        }
    }

    /// Stores the packed record unless an outcome is there; true when it
    /// was stored and the claim is still ours. `absent_since`: when (ms
    /// since the epoch) a lookup found no record (0: not known), so only
    /// the buckets written since are read again.
    pub async fn store(
        &self,
        command_id: &str,
        packed: &[u8],
        absent_since: u64,
    ) -> Result<bool, RedisError> {
        let reads = Reads::RecordAndTarget(absent_since);
        let (keys, expire_at) = self.keys(command_id, reads).await;
        let expire_at = expire_at.to_string();
        let (stored, ours): (i64, i64) = self
            .call(&STORE, &keys, false, &[packed, expire_at.as_bytes()])
            .await?;
        Ok(stored == 1 && ours == 1)
    }

    /// Marks the outcome announced and releases our claim.
    pub async fn published(&self, command_id: &str) -> Result<(), RedisError> {
        // The record was mostly just stored, in the bucket a store would
        // use now: read that one first (the newest buckets, read first
        // otherwise, are often the future ones the clock margin adds).
        let (keys, _) = self.keys(command_id, Reads::RecordAndTarget(0)).await;
        self.call::<i64>(&PUBLISHED, &keys, false, &[])
            .await
            .map(|_| ())
    }

    /// Releases our claim (the stored outcome, if any, stays).
    pub async fn release(&self, command_id: &str) -> Result<(), RedisError> {
        let (keys, _) = self.keys(command_id, Reads::Nothing).await;
        self.call::<i64>(&RELEASE, &keys, false, &[])
            .await
            .map(|_| ())
    }
}
