//! What the worker remembers to match callbacks: per `(appId, v3)`, every
//! command whose request got that `v3` within `callbacks.match_window`
//! (GeWe may return the same `v3` for later requests to the same member),
//! each `pending` from the moment GeWe's answer is stored and `confirmed`
//! once its `succeeded` event is; and per commandId a mark that its
//! accepted event was published.
//!
//! In memory ([`memory`]) when `redis.url` is unset: per process, bounded.
//! In Redis ([`redis`]) otherwise, so a callback matches whichever replica
//! takes it, after restarts too, and two replicas handling copies of one
//! callback publish one accepted event: the mark is claimed atomically
//! before publishing and set once the event is confirmed.
//!
//! An entry is found by a hash of `(appId, v3)`: the `v3` (about 220
//! characters from WeChat) is neither a key nor stored; the callback that
//! looks it up carries it.

mod legacy;
mod memory;
mod packed;
mod redis;

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use memory::MAX_REMEMBERED;

use self::{memory::MemoryStore, redis::RedisStore};
use crate::{
    command::Envelope,
    event::{ResultEvent, Status},
    redis_client::{RedisClient, RedisError},
};

/// How long a claim on a commandId's accepted event lasts: the time one
/// confirmed publish may take. A holder that dies is replaced after it.
pub const CLAIM_LEASE: Duration = Duration::from_secs(30);

/// Most commands remembered for one `(appId, v3)`; beyond it the oldest
/// is forgotten. A member asked this often within the window is a bug
/// (GeWe returning one `v3` for everything), not a reused ticket.
pub const MAX_PER_V3: usize = 64;

/// A succeeded command, as remembered for its `v3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The command's id.
    pub command_id: String,
    /// The account that sent the request.
    pub app_id: String,
    /// GeWe's ticket for the request.
    pub v3: String,
    /// What else the accepted event says.
    pub fields: Fields,
}

/// What is stored of a succeeded command besides its ids and `v3`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fields {
    /// The group.
    pub chatroom_id: String,
    /// The member asked.
    pub member_wxid: String,
    /// The `correlation_id` of the command's events, for the accepted one.
    pub correlation_id: String,
    /// The succeeded event's `completedAt`.
    pub completed_at: String,
}

impl Sent {
    /// What to remember of an event: only a succeeded one has a `v3` to
    /// match. The correlation id is the one the event carries (contract
    /// §4), so the accepted event carries it too.
    pub fn of(event: &ResultEvent<'_>, envelope: &Envelope) -> Option<Self> {
        if event.status != Status::Succeeded {
            return None;
        }
        Some(Self {
            command_id: event.command_id.clone().into_owned(),
            app_id: event.app_id.as_deref()?.to_owned(),
            v3: event.v3.as_deref()?.to_owned(),
            fields: Fields {
                chatroom_id: event.chatroom_id.as_deref()?.to_owned(),
                member_wxid: event.member_wxid.as_deref()?.to_owned(),
                correlation_id: envelope
                    .correlation_id()
                    .map_or_else(|| event.command_id.clone().into_owned(), str::to_owned),
                completed_at: event.completed_at.clone().into_owned(),
            },
        })
    }
}

/// Where a remembered command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// GeWe's answer is stored; its `succeeded` event is not confirmed yet.
    Pending,
    /// Its `succeeded` event was confirmed: an accepted event may follow.
    Confirmed,
}

/// One command found for a callback's `(appId, v3)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// The command.
    pub sent: Sent,
    /// Whether its `succeeded` event was confirmed.
    pub phase: Phase,
}

/// The entry of `(appId, v3)`: a SHA-256, so no pair spells another's and
/// the long `v3` is not kept.
fn v3_digest(app_id: &str, v3: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(app_id.len().to_le_bytes());
    hash.update(app_id.as_bytes());
    hash.update(v3.as_bytes());
    hash.finalize().into()
}

/// A claim on publishing a commandId's accepted event.
#[derive(Debug, Clone)]
pub struct Claim {
    command_id: String,
    owner: String,
}

/// What [`Store::claim`] found.
#[derive(Debug)]
pub enum Mark {
    /// Ours: publish the accepted event, then [`Store::announced`].
    Claimed(Claim),
    /// The accepted event was published already.
    Repeated,
    /// Another delivery (here or in another replica) is publishing it.
    Held,
}

/// Where the remembered `v3`s and marks live.
pub enum Store {
    /// This process only.
    Memory(MemoryStore),
    /// Redis, shared by every replica.
    Redis(RedisStore),
}

impl Store {
    /// Remembers for `window`, in this process.
    pub fn in_memory(window: Duration) -> Self {
        Store::Memory(MemoryStore::new(window))
    }

    /// Remembers for `window` in Redis, under `prefix`.
    pub fn in_redis(client: Arc<RedisClient>, prefix: &str, window: Duration) -> Self {
        Store::Redis(RedisStore::new(client, prefix, window))
    }

    /// Remembers `sent` under its `(appId, v3)` in `phase`. A pending
    /// command never undoes a confirmation, and a command already there
    /// keeps its first time (a republished duplicate changes nothing).
    pub async fn remember(&self, sent: &Sent, phase: Phase) -> Result<(), RedisError> {
        match self {
            Store::Memory(m) => {
                m.remember(sent, phase);
                Ok(())
            }
            Store::Redis(r) => r.remember(sent, phase).await,
        }
    }

    /// Every command whose request got `v3` from `app_id`'s account within
    /// the window, oldest first. One round trip with Redis.
    pub async fn lookup(&self, app_id: &str, v3: &str) -> Result<Vec<Remembered>, RedisError> {
        match self {
            Store::Memory(m) => Ok(m.lookup(app_id, v3)),
            Store::Redis(r) => r.lookup(app_id, v3).await,
        }
    }

    /// Claims publishing `command_id`'s accepted event (atomically, across
    /// replicas with Redis).
    pub async fn claim(&self, command_id: &str) -> Result<Mark, RedisError> {
        let claim = Claim {
            command_id: command_id.to_owned(),
            owner: uuid::Uuid::new_v4().to_string(),
        };
        match self {
            Store::Memory(m) => Ok(m.claim(claim)),
            Store::Redis(r) => r.claim(claim).await,
        }
    }

    /// The accepted event of the claim's commandId was confirmed: later
    /// callbacks for it are repeats.
    pub async fn announced(&self, claim: &Claim) -> Result<(), RedisError> {
        match self {
            Store::Memory(m) => {
                m.announced(claim);
                Ok(())
            }
            Store::Redis(r) => r.announced(claim).await,
        }
    }

    /// Gives the claim up without an event (the publish failed).
    pub async fn release(&self, claim: &Claim) -> Result<(), RedisError> {
        match self {
            Store::Memory(m) => {
                m.release(claim);
                Ok(())
            }
            Store::Redis(r) => r.release(claim).await,
        }
    }
}
