//! Remembered `v3`s and accepted marks in Redis (`redis.url`), shared by
//! every replica and kept across restarts.
//!
//! A `(appId, v3)` is a field, named by 16 bytes of its SHA-256, of a hash
//! bucket `<prefix>:{v<slot>}:v:<period>` ([`Buckets`]) kept for
//! `callbacks.match_window`; its value is the packed records ([`packed`])
//! of every command whose request got that `v3` in that period, each
//! `pending` or `confirmed` and when it was first remembered. A callback is
//! looked up with one script that reads the field in every bucket of the
//! window, all in one hash slot. `<prefix>:accepted:<commandId>` is the
//! mark: a claim (the owner's id, with a lease) while one delivery
//! publishes the accepted event, then `announced` for the window. Each
//! step is one script.
//!
//! What earlier versions wrote is still read until it expires, within
//! `callbacks.match_window` of the upgrade: a hash `v3h:<hex SHA-256>` of
//! JSON records per commandId, and before that a key per `(appId, v3)`.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
    time::Duration,
};

use redis::Script;

use super::{
    CLAIM_LEASE, Claim, MAX_PER_V3, Mark, Phase, Remembered, Sent, legacy, packed, v3_digest,
};
use crate::{
    buckets::{BucketId, Buckets},
    redis_client::{RELEASE_IF_OWNED, RedisClient, RedisError, millis},
    timestamp::now_millis,
};

/// KEYS: target bucket. ARGV: field, identity, record, `1` when
/// confirmed, bucket expiry (ms since the epoch), most records. A known
/// command keeps its record (and when it was first remembered) but for
/// becoming confirmed; a new one is appended, the oldest dropped beyond
/// the bound. Records are framed by their length in two bytes.
static REMEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local blob = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local id, body = ARGV[2], ARGV[3]
local kept, pos, known = {{}}, 1, false
while pos + 1 <= #blob do
  local len = string.byte(blob, pos) * 256 + string.byte(blob, pos + 1)
  local rec = string.sub(blob, pos + 2, pos + 1 + len)
  pos = pos + 2 + len
  if string.sub(rec, {at}, {at} - 1 + #id) == id then
    if ARGV[4] ~= '1' then return 0 end
    known = true
    rec = string.sub(body, 1, 1) .. string.sub(rec, 2, {at} - 1) .. string.sub(body, {at})
  end
  table.insert(kept, rec)
end
if not known then
  while #kept >= tonumber(ARGV[6]) do table.remove(kept, 1) end
  table.insert(kept, body)
end
for i, rec in ipairs(kept) do
  kept[i] = string.char(math.floor(#rec / 256), #rec % 256) .. rec
end
redis.call('HSET', KEYS[1], ARGV[1], table.concat(kept))
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
return 1
"#,
        at = packed::IDENTITY_AT + 1,
    ))
});

/// KEYS: the buckets of the window. ARGV: field. Returns the field's
/// value in each (`''` where it has none).
static LOOKUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local found = {}
for i, key in ipairs(KEYS) do
  found[i] = redis.call('HGET', key, ARGV[1]) or ''
end
return found
"#,
    )
});

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
    buckets: Buckets,
}

impl RedisStore {
    /// A store under `prefix`, remembering for `window`.
    pub fn new(client: Arc<RedisClient>, prefix: &str, window: Duration) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
            window,
            // Eight periods: a callback's lookup is rare, its 30 days of
            // entries are most of Redis' memory.
            buckets: Buckets::new(prefix, "v", "v", window, 8),
        }
    }

    fn mark_key(&self, command_id: &str) -> String {
        format!("{}:accepted:{command_id}", self.prefix)
    }

    pub(super) async fn remember(&self, sent: &Sent, phase: Phase) -> Result<(), RedisError> {
        let id = BucketId::from_digest(v3_digest(&sent.app_id, &sent.v3));
        let now = now_millis();
        let (target, expire_at) = self.buckets.target(&id, now);
        self.client
            .run::<i64>(
                REMEMBER
                    .key(target)
                    .arg(&id.field())
                    .arg(packed::identity(&sent.command_id))
                    .arg(packed::encode(&sent.command_id, &sent.fields, phase, now))
                    .arg(if phase == Phase::Confirmed { "1" } else { "0" })
                    .arg(expire_at)
                    .arg(MAX_PER_V3),
            )
            .await
            .map(|_| ())
    }

    /// Every command remembered for `(app_id, v3)` within the window,
    /// oldest first; one that was remembered in two periods (pending in
    /// one, confirmed in the next) once, confirmed.
    pub(super) async fn lookup(
        &self,
        app_id: &str,
        v3: &str,
    ) -> Result<Vec<Remembered>, RedisError> {
        let id = BucketId::from_digest(v3_digest(app_id, v3));
        let now = now_millis();
        let mut call = LOOKUP.prepare_invoke();
        for bucket in self.buckets.lookup(&id, now) {
            call.key(bucket);
        }
        call.arg(&id.field());
        let (values, earlier) = tokio::join!(
            self.client.run::<Vec<Vec<u8>>>(&call),
            legacy::lookup(&self.client, &self.prefix, app_id, v3),
        );
        let since = now.saturating_sub(millis(self.window));
        let mut by_command: HashMap<String, (u64, Remembered)> = HashMap::new();
        let mut note = |command_id: String, at: u64, fields, phase| {
            if at <= since && at != legacy::AT {
                return;
            }
            let entry = by_command.entry(command_id.clone()).or_insert_with(|| {
                let sent = Sent {
                    command_id,
                    app_id: app_id.to_owned(),
                    v3: v3.to_owned(),
                    fields,
                };
                (at, Remembered { sent, phase })
            });
            entry.0 = entry.0.min(at);
            if phase == Phase::Confirmed {
                entry.1.phase = Phase::Confirmed;
            }
        };
        for value in values? {
            match packed::decode_all(&value) {
                Ok(records) => {
                    for r in records {
                        note(r.command_id, r.at, r.fields, r.phase);
                    }
                }
                // Written by a later version: matching it could announce
                // the wrong command, so it matches nothing.
                Err(e) => {
                    tracing::error!(%app_id, error = %e, "Redis holds a remembered v3 this version cannot read; it matches nothing");
                }
            }
        }
        for r in earlier? {
            note(r.command_id, r.at, r.fields, r.phase);
        }
        let mut found: Vec<_> = by_command.into_values().collect();
        found.sort_by(|a, b| (a.0, &a.1.sent.command_id).cmp(&(b.0, &b.1.sent.command_id)));
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
