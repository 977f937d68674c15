//! Remembered `v3`s and accepted marks in Redis (`redis.url`), shared by
//! every replica and kept across restarts.
//!
//! `<prefix>:v3:<len(appId)>:<appId>:<v3>` holds the [`Sent`] as JSON,
//! expiring after `callbacks.match_window`: a callback is looked up with
//! one `GET`. `<prefix>:accepted:<commandId>` is the mark: a claim (the
//! owner's id, with a lease) while one delivery publishes the accepted
//! event, then `announced` for the window. Each step is one script.

use std::{sync::Arc, sync::LazyLock, time::Duration};

use redis::Script;

use super::{CLAIM_LEASE, Claim, Mark, Sent, sent_key};
use crate::redis_client::{RELEASE_IF_OWNED, RedisClient, RedisError, millis};

/// KEYS: v3 key. ARGV: record, window ms. Keeps an existing record.
static REMEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return 1
"#,
    )
});

/// KEYS: v3 key. Returns the record or nil.
static LOOKUP: LazyLock<Script> =
    LazyLock::new(|| Script::new("return redis.call('GET', KEYS[1])"));

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
        format!("{}:v3:{}", self.prefix, sent_key(app_id, v3))
    }

    fn mark_key(&self, command_id: &str) -> String {
        format!("{}:accepted:{command_id}", self.prefix)
    }

    pub(super) async fn remember(&self, sent: &Sent) -> Result<(), RedisError> {
        // A `Sent` is strings only: encoding cannot fail.
        let json = serde_json::to_string(sent).unwrap_or_default();
        self.client
            .run::<i64>(
                REMEMBER
                    .key(self.v3_key(&sent.app_id, &sent.v3))
                    .arg(json)
                    .arg(millis(self.window)),
            )
            .await
            .map(|_| ())
    }

    pub(super) async fn lookup(&self, app_id: &str, v3: &str) -> Result<Option<Sent>, RedisError> {
        let stored: Option<String> = self
            .client
            .run(&LOOKUP.key(self.v3_key(app_id, v3)))
            .await?;
        let Some(json) = stored else {
            return Ok(None);
        };
        match serde_json::from_str(&json) {
            Ok(sent) => Ok(Some(sent)),
            Err(e) => {
                // Written by another version: matching it could announce
                // the wrong command, so it matches nothing.
                tracing::error!(%app_id, error = %e, "Redis holds a remembered v3 this version cannot read; the callback matches nothing");
                Ok(None)
            }
        }
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
