//! Idempotency by commandId (contract §3, §4; `dedupe.window`, `redis.url`).
//!
//! A delivery first [`Idempotency::acquire`]s its commandId. It then either
//! finds an outcome whose event was confirmed (republished as a duplicate,
//! or refused when the commandId was used for another request), or holds a
//! [`Claim`]: nobody else, in this process or (with Redis) any replica,
//! handles the commandId until the holder has stored its outcome *and*
//! confirmed its event, or let go. So one GeWe call is made per commandId,
//! and exactly one confirmed event per commandId is unmarked: copies that
//! arrive meanwhile wait, then find the outcome marked published.
//!
//! Without Redis the outcomes live in this process ([`memory`]); with Redis
//! they and the claims live there ([`redis`]), the claim kept alive by a
//! [`lease`]. Only definitive outcomes are stored ([`Record::is_definitive`]).

mod compact;
mod layout;
mod lease;
mod local;
mod memory;
mod record;
mod redis;
mod scripts;

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

pub use layout::claim_key;
pub use lease::LEASE_OVER_TIMEOUT;
pub use memory::MAX_ENTRIES;
pub use record::{Fingerprint, Record};

use self::{
    lease::Lease,
    local::{LocalClaims, LocalGuard},
    memory::{Entry, MemoryStore},
    redis::{Acquired, RedisStore},
};
use crate::{
    backoff::Backoff,
    halt::{Halt, Interrupted, Signal},
    redis_client::{RedisClient, note_unavailable},
};

/// Poll period while another replica holds a commandId.
const HELD_POLL: Duration = Duration::from_millis(100);
/// Longest wait for Redis to answer again before the claim is checked anew.
const HEALTH_POLL: Duration = Duration::from_secs(1);
/// Waits while Redis is unavailable.
const REDIS_BACKOFF: Backoff =
    Backoff::doubling(Duration::from_millis(100), Duration::from_secs(2));

/// What [`Idempotency::acquire`] found for a commandId.
pub enum Found<'a> {
    /// An outcome for this request whose event was already confirmed:
    /// republish it with `duplicate: true`.
    Duplicate(Record),
    /// The commandId already has an outcome for another request.
    Conflict,
    /// The commandId has a stored outcome this version cannot read: it is
    /// neither republished nor called again.
    Unreadable(String),
    /// This delivery now handles the commandId. `stored` is an outcome
    /// for this request whose event was never confirmed: publish it
    /// unmarked instead of calling GeWe.
    Claimed {
        /// The claim.
        claim: Claim<'a>,
        /// A stored, unannounced outcome.
        stored: Option<Record>,
    },
}

/// Where outcomes are kept.
enum Backend {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// The idempotency store: local claims plus the outcome backend.
pub struct Idempotency {
    local: LocalClaims,
    backend: Backend,
}

impl Idempotency {
    /// Outcomes kept in this process for `window`.
    pub fn in_memory(window: Duration) -> Self {
        Self {
            local: LocalClaims::default(),
            backend: Backend::Memory(MemoryStore::new(window)),
        }
    }

    /// Outcomes and claims kept in Redis under `prefix` for `window`;
    /// claims last `lease` without renewal.
    pub fn in_redis(
        client: Arc<RedisClient>,
        prefix: &str,
        window: Duration,
        lease: Duration,
    ) -> Self {
        Self {
            local: LocalClaims::default(),
            backend: Backend::Redis(RedisStore::new(client, prefix, window, lease)),
        }
    }

    /// Looks up `command_id` for the request `fingerprint`, waiting while
    /// another task or replica handles it.
    pub async fn acquire<'a>(
        &'a self,
        command_id: &'a str,
        fingerprint: Fingerprint,
        halt: &Halt,
    ) -> Result<Found<'a>, Interrupted> {
        let local = self.local.acquire(command_id, halt).await?;
        // An unpublished in-memory entry found here is the one this claim
        // marks published, unless it stores a new one.
        let mut entry = None;
        let mut absent_since = 0;
        let (stored, lease) = match &self.backend {
            Backend::Memory(memory) => match memory.get(command_id) {
                Some(found) if found.is_published() => {
                    return Ok(announced(found.record.clone(), fingerprint));
                }
                Some(found) => {
                    let record = found.record.clone();
                    entry = Some(found);
                    (Some(record), None)
                }
                None => (None, None),
            },
            Backend::Redis(redis) => {
                let mut waits = REDIS_BACKOFF.waits();
                loop {
                    let sent = Instant::now();
                    let sent_ms = crate::timestamp::now_millis();
                    let wait = match redis.acquire(command_id).await {
                        Ok(Acquired::Published(record)) => {
                            return Ok(announced(record, fingerprint));
                        }
                        Ok(Acquired::Claimed(stored)) => {
                            if stored.is_none() {
                                absent_since = sent_ms;
                            }
                            break (stored, Some(Lease::hold(redis.clone(), command_id, sent)));
                        }
                        Ok(Acquired::Wait) => HELD_POLL,
                        Ok(Acquired::Unreadable { reason, claimed }) => {
                            if claimed && let Err(e) = redis.release(command_id).await {
                                tracing::warn!(error = %e, "could not release the claim; it expires by itself");
                            }
                            return Ok(Found::Unreadable(reason));
                        }
                        Err(e) => note_unavailable(
                            &e,
                            &mut waits,
                            "Redis unavailable: holding the command, GeWe is not called",
                        ),
                    };
                    halt.sleep(wait).await?;
                }
            }
        };
        let claim = Claim {
            store: self,
            command_id,
            _local: local,
            lease,
            entry,
            absent_since,
        };
        match stored {
            Some(record) if record.fingerprint() != fingerprint => {
                claim.release().await;
                Ok(Found::Conflict)
            }
            stored => Ok(Found::Claimed { claim, stored }),
        }
    }
}

fn announced<'a>(record: Record, fingerprint: Fingerprint) -> Found<'a> {
    if record.fingerprint() == fingerprint {
        Found::Duplicate(record)
    } else {
        Found::Conflict
    }
}

/// Whether a stored outcome is the one to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored, and the claim is still ours: publish it.
    Kept,
    /// The claim was lost meanwhile (or another outcome was there): look
    /// the commandId up again.
    Lost,
    /// The record could not be encoded, so it could not be stored: nothing
    /// may be published for it (the command is requeued).
    Unencodable,
}

/// The right to handle one commandId until the event is confirmed.
pub struct Claim<'a> {
    store: &'a Idempotency,
    command_id: &'a str,
    _local: LocalGuard<'a>,
    lease: Option<Lease>,
    /// The in-memory entry this claim found or stored, marked published
    /// without a second lookup.
    entry: Option<Arc<Entry>>,
    /// When Redis last had no record for the commandId (ms since the
    /// epoch; 0 when it had one or is not used).
    absent_since: u64,
}

impl Claim<'_> {
    /// Waits until a GeWe request of up to `request` may be sent under this
    /// claim; `ClaimLost` when another replica may be calling instead. With
    /// Redis it also waits while Redis does not answer (no master known
    /// during a failover): no call is made on state that may be gone.
    pub async fn ready(&self, request: Duration, halt: &Halt) -> Result<(), Interrupted> {
        let (Some(lease), Backend::Redis(redis)) = (&self.lease, &self.store.backend) else {
            return Ok(());
        };
        loop {
            lease.ready(request, halt).await?;
            if redis.client().unhealthy_reason().is_none() {
                return Ok(());
            }
            tracing::debug!("Redis does not answer: the GeWe call waits");
            // Bounded, so a lapsing claim is noticed by `lease.ready`.
            let _ = halt
                .guard(tokio::time::timeout(
                    HEALTH_POLL,
                    redis.client().until_healthy(),
                ))
                .await?;
        }
    }

    /// Stores GeWe's definitive answer before anything is published. Once
    /// GeWe answered, a Redis outage is waited out (the claim stays
    /// renewed); only the end of the process stops it.
    pub async fn store(&mut self, record: &Record) -> Stored {
        match &self.store.backend {
            Backend::Memory(memory) => {
                self.entry = Some(memory.put(self.command_id, record.clone()));
                Stored::Kept
            }
            Backend::Redis(redis) => {
                let packed = match compact::encode(record) {
                    Ok(packed) => packed,
                    Err(e) => {
                        tracing::error!(error = %e, "could not encode GeWe's answer for Redis");
                        return Stored::Unencodable;
                    }
                };
                let mut waits = REDIS_BACKOFF.waits();
                loop {
                    match redis
                        .store(self.command_id, &packed, self.absent_since)
                        .await
                    {
                        Ok(true) => return Stored::Kept,
                        Ok(false) => return Stored::Lost,
                        Err(e) => {
                            let wait = note_unavailable(
                                &e,
                                &mut waits,
                                "could not store GeWe's answer in Redis yet; holding it and the command",
                            );
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            }
        }
    }

    /// Whether the claim is known to be lost (Redis only).
    pub fn is_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::is_lost)
    }

    /// The event for the stored outcome was confirmed: later copies are
    /// duplicates. Retried through a Redis outage until `shutdown` (the
    /// broker session may be gone meanwhile: a redelivery of this command
    /// waits for this and is then published as the duplicate it is).
    pub async fn published(self, shutdown: &Signal) {
        match &self.store.backend {
            Backend::Memory(_) => {
                if let Some(entry) = &self.entry {
                    entry.mark_published();
                }
            }
            Backend::Redis(redis) => {
                let mut waits = REDIS_BACKOFF.waits();
                loop {
                    match redis.published(self.command_id).await {
                        Ok(()) => return,
                        Err(e) => {
                            let wait = note_unavailable(
                                &e,
                                &mut waits,
                                "could not mark the outcome as published in Redis yet",
                            );
                            let gave_up = tokio::select! {
                                () = shutdown.raised() => true,
                                () = tokio::time::sleep(wait) => false,
                            };
                            if gave_up {
                                tracing::warn!(
                                    "gave up marking the outcome as published: a later copy of this command may be published unmarked"
                                );
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Lets go without announcing anything; a stored outcome stays.
    pub async fn release(self) {
        if let Backend::Redis(redis) = &self.store.backend
            && let Err(e) = redis.release(self.command_id).await
        {
            tracing::warn!(error = %e, "could not release the claim; it expires by itself");
        }
    }
}
