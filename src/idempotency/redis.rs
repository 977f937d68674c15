//! Outcomes and claims in Redis (`redis.url`), shared by every replica.
//!
//! Per commandId: the stored [`Record`], packed ([`compact`]; 128 added to
//! its first byte once an event for it was confirmed), as a field of a hash
//! bucket ([`Buckets`]); and a claim `claim:<id>` naming the
//! replica that is handling the command, with a lease. Every step is one
//! Lua script, so two replicas never both own a commandId, and every write
//! is durable ([`RedisClient::run_durable`]): a replica acknowledged it
//! before it is relied on.
//!
//! Redis without persistence forgets every claim when it restarts, and a
//! replica whose GeWe call is in flight would then find its claim gone
//! while another takes it and calls too. A boot marker (a key without
//! expiry) tells a replica that Redis lost its data since it last looked;
//! it then sets a guard for one lease, during which no free commandId is
//! claimed, while the holders of earlier claims re-assert theirs at their
//! next renewal.

use std::{
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use redis::{Script, Value};

use super::{Record, compact};
use crate::buckets::{BucketId, Buckets};
use crate::redis_client::{Durable, RELEASE_IF_OWNED, RedisClient, RedisError, millis};

/// Shared by the scripts that can be first to see Redis again after a
/// restart: notices lost data and sets the guard.
const BOOT: &str = r#"
local function boot(bootk, guardk, seen, fresh, lease)
  local marker = redis.call('GET', bootk)
  if not marker then
    redis.call('SET', bootk, fresh)
    if seen ~= '' then redis.call('SET', guardk, '1', 'PX', lease) end
    return fresh
  end
  if seen ~= '' and marker ~= seen then
    redis.call('SET', guardk, '1', 'PX', lease, 'NX')
  end
  return marker
end
"#;

/// Finds the record of field `field` in the buckets `KEYS[first..]`, then
/// in the legacy hash `legacy`. Returns its key, the record, its published
/// flag (`'1'`) and 1 when it is compact (0: legacy JSON). A compact
/// record's first byte is its tag, with 128 added once it is published.
const FIND: &str = r#"
local function find(legacy, first, field)
  for i = first, #KEYS do
    local v = redis.call('HGET', KEYS[i], field)
    if v then
      local tag = string.byte(v, 1)
      if tag >= 128 then return KEYS[i], string.char(tag - 128) .. string.sub(v, 2), '1', 1 end
      return KEYS[i], v, '0', 1
    end
  end
  local old = redis.call('HMGET', legacy, 'r', 'p')
  if old[1] then return legacy, old[1], old[2], 0 end
  return nil, nil, nil, 0
end
"#;

/// KEYS: legacy record, claim, boot, guard, buckets. ARGV: owner, lease
/// ms, seen marker, new marker, field. Returns {state, record or '',
/// compact, marker}; state is `published` (no claim needed), `claimed`,
/// `held` (another replica) or `guarded`.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{BOOT}{FIND}{}",
        r#"
local marker = boot(KEYS[3], KEYS[4], ARGV[3], ARGV[4], ARGV[2])
local _, rec, p, compact = find(KEYS[1], 5, ARGV[5])
if rec and p == '1' then return {'published', rec, compact, marker} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'held', '', 0, marker} end
if (not holder) and redis.call('EXISTS', KEYS[4]) == 1 then return {'guarded', '', 0, marker} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'claimed', rec or '', compact, marker}
"#
    ))
});

/// KEYS: claim, boot, guard. ARGV: owner, lease ms, seen marker, new
/// marker. Returns {1 renewed | 2 re-asserted (it was gone) | 0 taken over,
/// marker}.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{BOOT}{}",
        r#"
local marker = boot(KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[2])
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, marker}
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {2, marker}
end
return {0, marker}
"#
    ))
});

/// KEYS: legacy record, claim, target bucket, buckets. ARGV: record,
/// bucket expiry (ms since the epoch), owner, field. Stores the record
/// unless one is there (the first answer wins). Returns {stored, claim ours}.
static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FIND}{}",
        r#"
local _, rec, p, compact = find(KEYS[1], 4, ARGV[4])
local stored = 0
if not rec then
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
  redis.call('PEXPIREAT', KEYS[3], ARGV[2])
  stored = 1
elseif compact == 1 and p == '0' and rec == ARGV[1] then
  -- This very record, stored by a try whose WAIT failed: stored.
  stored = 1
end
local ours = 0
if redis.call('GET', KEYS[2]) == ARGV[3] then ours = 1 end
return {stored, ours}
"#
    ))
});

/// KEYS: legacy record, claim, buckets. ARGV: owner, field. Marks the
/// record published and releases the claim if it is ours.
static PUBLISHED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FIND}{}",
        r#"
local key, rec, _, compact = find(KEYS[1], 3, ARGV[2])
if rec and compact == 1 then
  redis.call('HSET', key, ARGV[2], string.char(string.byte(rec, 1) + 128) .. string.sub(rec, 2))
elseif rec then redis.call('HSET', key, 'p', '1') end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"#
    ))
});

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
    prefix: String,
    owner: String,
    buckets: Buckets,
    lease: Duration,
    /// The boot marker this replica last saw ('' before the first answer).
    seen: Mutex<String>,
}

impl RedisStore {
    /// A store under `prefix`, remembering outcomes for `window` and
    /// claiming commandIds for `lease`.
    pub fn new(client: Arc<RedisClient>, prefix: &str, window: Duration, lease: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                prefix: prefix.to_owned(),
                owner: uuid::Uuid::new_v4().to_string(),
                buckets: Buckets::new(prefix, "i", "r", window),
                lease,
                seen: Mutex::new(String::new()),
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

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.inner.prefix)
    }

    fn seen(&self) -> String {
        self.inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn saw(&self, marker: &str) {
        let mut seen = self
            .inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *seen != marker {
            if !seen.is_empty() {
                tracing::warn!(
                    lease_ms = millis(self.inner.lease),
                    "Redis lost its data since it was last seen (a restart without persistence?): no new claims for one lease"
                );
            }
            marker.clone_into(&mut seen);
        }
    }

    /// Runs one of the scripts that watch Redis' boot marker ([`BOOT`]):
    /// `keys` first, then the marker's keys, then `more_keys`; the marker's
    /// arguments, then `more_args`. Returns the reply with the marker it
    /// reported (taken note of) split off.
    async fn with_boot<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        more_keys: &[String],
        more_args: &[&[u8]],
    ) -> Result<T, RedisError> {
        let mut call = Durable::new(script);
        for key in keys {
            call.key(key);
        }
        call.key(format!("{}:boot", self.inner.prefix))
            .key(format!("{}:guard", self.inner.prefix));
        for key in more_keys {
            call.key(key);
        }
        call.arg(&self.inner.owner)
            .arg(millis(self.inner.lease))
            .arg(self.seen())
            .arg(uuid::Uuid::new_v4().to_string());
        for arg in more_args {
            call.arg(*arg);
        }
        let mut reply: Vec<Value> = self.inner.client.run_durable(&call).await?;
        let marker = match reply.pop() {
            Some(Value::BulkString(marker)) => String::from_utf8_lossy(&marker).into_owned(),
            other => return Err(self.inner.client.unexpected(&other.unwrap_or(Value::Nil))),
        };
        self.saw(&marker);
        let rest = Value::Array(reply);
        redis::from_redis_value(&rest).map_err(|_| self.inner.client.unexpected(&rest))
    }

    /// The stored outcome of `command_id` if announced, else our claim on it.
    pub async fn acquire(&self, command_id: &str) -> Result<Acquired, RedisError> {
        let id = BucketId::of(command_id.as_bytes());
        let (state, record, packed): (String, Vec<u8>, i64) = self
            .with_boot(
                &ACQUIRE,
                &[self.key("rec", command_id), self.key("claim", command_id)],
                &self
                    .inner
                    .buckets
                    .lookup(&id, crate::timestamp::now_millis()),
                &[&id.field()],
            )
            .await?;
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
        let (state,): (i64,) = self
            .with_boot(&RENEW, &[self.key("claim", command_id)], &[], &[])
            .await?;
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
    /// was stored and the claim is still ours.
    pub async fn store(&self, command_id: &str, packed: &[u8]) -> Result<bool, RedisError> {
        let buckets = &self.inner.buckets;
        let id = BucketId::of(command_id.as_bytes());
        let now = crate::timestamp::now_millis();
        let (target, expire_at) = buckets.target(&id, now);
        let mut call = Durable::new(&STORE);
        call.key(self.key("rec", command_id))
            .key(self.key("claim", command_id))
            .key(target);
        for bucket in buckets.lookup(&id, now) {
            call.key(bucket);
        }
        call.arg(packed)
            .arg(expire_at)
            .arg(&self.inner.owner)
            .arg(&id.field());
        let (stored, ours): (i64, i64) = self.inner.client.run_durable(&call).await?;
        Ok(stored == 1 && ours == 1)
    }

    /// Marks the outcome announced and releases our claim.
    pub async fn published(&self, command_id: &str) -> Result<(), RedisError> {
        let id = BucketId::of(command_id.as_bytes());
        let mut call = Durable::new(&PUBLISHED);
        call.key(self.key("rec", command_id))
            .key(self.key("claim", command_id));
        for bucket in self
            .inner
            .buckets
            .lookup(&id, crate::timestamp::now_millis())
        {
            call.key(bucket);
        }
        call.arg(&self.inner.owner).arg(&id.field());
        self.inner
            .client
            .run_durable::<i64>(&call)
            .await
            .map(|_| ())
    }

    /// Releases our claim (the stored outcome, if any, stays).
    pub async fn release(&self, command_id: &str) -> Result<(), RedisError> {
        self.inner
            .client
            .run::<i64>(
                RELEASE_IF_OWNED
                    .key(self.key("claim", command_id))
                    .arg(&self.inner.owner),
            )
            .await
            .map(|_| ())
    }
}
