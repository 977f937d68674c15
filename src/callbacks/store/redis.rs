//! Remembered `v3`s and accepted marks in Redis (`redis.url`), shared by
//! every replica and kept across restarts.
//!
//! `<prefix>:v3h:<hex SHA-256 of (appId, v3)>` is a hash: one field per
//! commandId whose request got that `v3`, holding its [`Fields`], its
//! phase and when it was remembered, as JSON. The key expires
//! `callbacks.match_window` after its last write; older fields are skipped
//! on reads and pruned on writes. A callback is looked up with one
//! `HGETALL`. `<prefix>:accepted:<commandId>` is the mark: a claim (the
//! owner's id, with a lease) while one delivery publishes the accepted
//! event, then `announced` for the window. Each step is one script.

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::Script;
use serde::{Deserialize, Serialize};

use super::{CLAIM_LEASE, Claim, Fields, MAX_PER_V3, Mark, Phase, Remembered, Sent, v3_digest};
use crate::redis_client::{RELEASE_IF_OWNED, RedisClient, RedisError, millis};

/// KEYS: entry. ARGV: commandId, record, `1` when confirmed, now ms,
/// window ms, most fields. A known command keeps its record but for
/// becoming confirmed; a new one prunes expired fields and the oldest
/// beyond the bound first.
static REMEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  if ARGV[3] == '1' then
    local rec = cjson.decode(old)
    if not rec.confirmed then
      rec.confirmed = true
      redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
    end
  end
else
  local now, window = tonumber(ARGV[4]), tonumber(ARGV[5])
  local all = redis.call('HGETALL', KEYS[1])
  local oldest, oldest_at, live = nil, nil, 0
  for i = 1, #all, 2 do
    local ok, rec = pcall(cjson.decode, all[i + 1])
    local at = ok and tonumber(rec.at) or 0
    if now - at >= window then
      redis.call('HDEL', KEYS[1], all[i])
    else
      live = live + 1
      if not oldest_at or at < oldest_at then oldest, oldest_at = all[i], at end
    end
  end
  if live >= tonumber(ARGV[6]) and oldest then redis.call('HDEL', KEYS[1], oldest) end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"#,
    )
});

/// KEYS: entry, legacy key. Returns the entry's fields and records, and
/// the legacy record (if any) under the field `""`.
static LOOKUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local found = redis.call('HGETALL', KEYS[1])
local legacy = redis.call('GET', KEYS[2])
if legacy then
  table.insert(found, '')
  table.insert(found, legacy)
end
return found
"#,
    )
});

/// What versions before the `(appId, v3)` entries remembered, under
/// `<prefix>:v3:<len(appId)>:<appId>:<v3>`, once the `succeeded` event was
/// confirmed. Still read, so a callback for a request sent before an
/// upgrade matches; those keys expire within `callbacks.match_window`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Legacy {
    command_id: String,
    #[serde(flatten)]
    fields: Fields,
}

/// One command as stored in an entry's field.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    fields: Fields,
    confirmed: bool,
    /// When it was first remembered, in ms since the epoch.
    at: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// KEYS: mark. ARGV: owner, lease ms. Returns `repeated`, `held` or
/// `claimed`.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local mark = redis.call('GET', KEYS[1])
if mark == 'announced' then return 'repeated' end
if mark and mark ~= ARGV[1] then return 'held' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'claimed'
"#,
    )
});

/// KEYS: mark. ARGV: window ms. Whoever holds the claim: the event is out.
static ANNOUNCED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[1], 'announced', 'PX', ARGV[1])
return 1
"#,
    )
});

/// The Redis store.
pub struct RedisStore {
    client: Arc<RedisClient>,
    prefix: String,
    window: Duration,
}

impl RedisStore {
    /// A store under `prefix`, remembering for `window`.
    pub fn new(client: Arc<RedisClient>, prefix: &str, window: Duration) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
            window,
        }
    }

    fn v3_key(&self, app_id: &str, v3: &str) -> String {
        let digest: String = v3_digest(app_id, v3)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}:v3h:{digest}", self.prefix)
    }

    fn legacy_key(&self, app_id: &str, v3: &str) -> String {
        format!("{}:v3:{}:{app_id}:{v3}", self.prefix, app_id.len())
    }

    fn mark_key(&self, command_id: &str) -> String {
        format!("{}:accepted:{command_id}", self.prefix)
    }

    pub(super) async fn remember(&self, sent: &Sent, phase: Phase) -> Result<(), RedisError> {
        let record = Record {
            fields: sent.fields.clone(),
            confirmed: phase == Phase::Confirmed,
            at: now_ms(),
        };
        // A `Record` is strings, a flag and a number: encoding cannot fail.
        let json = serde_json::to_string(&record).unwrap_or_default();
        self.client
            .run::<i64>(
                REMEMBER
                    .key(self.v3_key(&sent.app_id, &sent.v3))
                    .arg(&sent.command_id)
                    .arg(json)
                    .arg(if record.confirmed { "1" } else { "0" })
                    .arg(record.at)
                    .arg(millis(self.window))
                    .arg(MAX_PER_V3),
            )
            .await
            .map(|_| ())
    }

    pub(super) async fn lookup(
        &self,
        app_id: &str,
        v3: &str,
    ) -> Result<Vec<Remembered>, RedisError> {
        let stored: Vec<(String, String)> = self
            .client
            .run(
                LOOKUP
                    .key(self.v3_key(app_id, v3))
                    .key(self.legacy_key(app_id, v3)),
            )
            .await?;
        let since = now_ms().saturating_sub(millis(self.window));
        let mut found = Vec::with_capacity(stored.len());
        for (command_id, json) in stored {
            if command_id.is_empty() {
                if let Some(legacy) = read_legacy(app_id, v3, &json) {
                    found.push((0, legacy));
                }
                continue;
            }
            match serde_json::from_str::<Record>(&json) {
                Ok(record) if record.at > since => found.push((
                    record.at,
                    Remembered {
                        sent: Sent {
                            command_id,
                            app_id: app_id.to_owned(),
                            v3: v3.to_owned(),
                            fields: record.fields,
                        },
                        phase: if record.confirmed {
                            Phase::Confirmed
                        } else {
                            Phase::Pending
                        },
                    },
                )),
                Ok(_) => {}
                // Written by another version: matching it could announce
                // the wrong command, so it matches nothing.
                Err(e) => {
                    tracing::error!(%app_id, %command_id, error = %e, "Redis holds a remembered v3 this version cannot read; it matches nothing");
                }
            }
        }
        found.sort_by_key(|(at, _)| *at);
        Ok(found.into_iter().map(|(_, r)| r).collect())
    }

    pub(super) async fn claim(&self, claim: Claim) -> Result<Mark, RedisError> {
        let state: String = self
            .client
            .run(
                CLAIM
                    .key(self.mark_key(&claim.command_id))
                    .arg(&claim.owner)
                    .arg(millis(CLAIM_LEASE)),
            )
            .await?;
        match state.as_str() {
            "claimed" => Ok(Mark::Claimed(claim)),
            "repeated" => Ok(Mark::Repeated),
            "held" => Ok(Mark::Held),
            other => Err(self
                .client
                .unexpected(&redis::Value::SimpleString(other.to_owned()))),
        }
    }

    pub(super) async fn announced(&self, claim: &Claim) -> Result<(), RedisError> {
        self.client
            .run::<i64>(
                ANNOUNCED
                    .key(self.mark_key(&claim.command_id))
                    .arg(millis(self.window)),
            )
            .await
            .map(|_| ())
    }

    pub(super) async fn release(&self, claim: &Claim) -> Result<(), RedisError> {
        self.client
            .run::<i64>(
                RELEASE_IF_OWNED
                    .key(self.mark_key(&claim.command_id))
                    .arg(&claim.owner),
            )
            .await
            .map(|_| ())
    }
}

/// A remembered `v3` of an earlier version: its command was confirmed.
fn read_legacy(app_id: &str, v3: &str, json: &str) -> Option<Remembered> {
    match serde_json::from_str::<Legacy>(json) {
        Ok(legacy) => Some(Remembered {
            sent: Sent {
                command_id: legacy.command_id,
                app_id: app_id.to_owned(),
                v3: v3.to_owned(),
                fields: legacy.fields,
            },
            phase: Phase::Confirmed,
        }),
        Err(e) => {
            tracing::error!(%app_id, error = %e, "Redis holds a remembered v3 of an earlier version this one cannot read; it matches nothing");
            None
        }
    }
}
