//! Which keys a commandId's scripts touch, and what this replica knows of
//! Redis' boot markers.
//!
//! Everything a script reads or writes for a commandId is under one hash
//! tag, `{i<slot>}` ([`Buckets`]): its claim, its slot's boot marker and
//! restart guard, its record's buckets. So every script touches one hash
//! slot, as Redis Cluster requires, and a node of a Cluster that restarts
//! empty is noticed for its own slots.
//!
//! Versions before this one kept the claim at `<prefix>:claim:<id>`, one
//! boot marker for all of Redis (`<prefix>:boot`) and, before the buckets,
//! the record at `<prefix>:rec:<id>`. While any of those can still exist
//! (the old marker is there, and `dedupe.window` plus a lease have not
//! passed since the first start of this version), scripts read the old
//! record and honour and set the old claim too, so replicas of both
//! versions in a rolling upgrade never both call. That mode needs one
//! Redis server (as those versions did); it ends by itself.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    buckets::{self, BucketId, Buckets, SLOTS},
    redis_client::{Durable, RedisClient, RedisError, millis},
    timestamp::now_millis,
};

/// The hash tag's letter of the idempotency store's keys.
const TAG: &str = "i";
/// Periods per `dedupe.window`: a new commandId's claim reads five or six
/// buckets (with eight it read nine or ten, the most expensive part of a
/// command's Redis work), and records are kept on average 1.13 × the
/// window (with eight, 1.07 ×; BENCHMARKS.md has both).
const PERIODS: u32 = 4;

/// Where the claim on `command_id` is kept (the replica's id, with the
/// lease as its expiry): for operators and tests looking into Redis.
pub fn claim_key(prefix: &str, command_id: &str) -> String {
    let slot = BucketId::of(command_id.as_bytes()).slot();
    buckets::tagged(prefix, TAG, slot, &format!("claim:{command_id}"))
}

/// Until then (ms since the epoch) records and claims of earlier versions
/// may exist. Not known yet: they may.
const COMPAT_UNKNOWN: u64 = u64::MAX;

/// The keys of one commandId's script, in the order the scripts expect
/// ([`super::scripts`]).
pub struct CommandKeys {
    /// Its slot.
    pub slot: u32,
    /// 16 bytes of its SHA-256: its record's field.
    pub field: [u8; 16],
    keys: Vec<String>,
    buckets: usize,
}

impl CommandKeys {
    /// Adds the keys and the leading arguments to `call`. `seen` is the
    /// slot's boot marker as this replica last saw it, for a script that
    /// checks the marker (a fresh one goes with it); `None` for one that
    /// does not, which gets empty strings in their places.
    pub fn apply(&self, call: &mut Durable<'_>, owner: &str, lease: Duration, seen: Option<&str>) {
        for key in &self.keys {
            call.key(key);
        }
        call.arg(owner).arg(millis(lease));
        match seen {
            Some(seen) => call.arg(seen).arg(uuid::Uuid::new_v4().to_string()),
            None => call.arg("").arg(""),
        };
        call.arg(self.buckets).arg(&self.field);
    }
}

/// The key layout of one store, and the boot markers seen.
pub struct Layout {
    prefix: String,
    buckets: Buckets,
    /// How long after this version first ran earlier versions' keys may
    /// remain: the window, a lease, and a margin.
    compat_span: Duration,
    compat_until: AtomicU64,
    looked: tokio::sync::OnceCell<()>,
    seen: Mutex<Vec<String>>,
    warned_at: AtomicU64,
}

/// Which buckets a script reads.
pub enum Reads {
    /// None (renewing or releasing a claim).
    Nothing,
    /// Every bucket that can hold the record.
    Record,
    /// The one a new record goes to (now) first, then every bucket that
    /// can hold a record written since the given time (ms since the epoch;
    /// 0: every bucket).
    RecordAndTarget(u64),
}

impl Layout {
    /// Keys under `prefix` for records kept `window` and claims of `lease`.
    pub fn new(prefix: &str, window: Duration, lease: Duration) -> Self {
        Self {
            prefix: prefix.to_owned(),
            buckets: Buckets::new(prefix, TAG, "r", window, PERIODS),
            compat_span: window + lease + Duration::from_secs(600),
            compat_until: AtomicU64::new(COMPAT_UNKNOWN),
            looked: tokio::sync::OnceCell::new(),
            seen: Mutex::new(vec![String::new(); SLOTS as usize]),
            warned_at: AtomicU64::new(0),
        }
    }

    /// The keys of `command_id`'s script, and the first bucket's expiry
    /// (with [`Reads::RecordAndTarget`]).
    pub fn keys(&self, command_id: &str, reads: Reads) -> (CommandKeys, u64) {
        let id = BucketId::of(command_id.as_bytes());
        let slot = id.slot();
        let now = now_millis();
        let mut keys = vec![
            claim_key(&self.prefix, command_id),
            self.buckets.tagged(slot, "boot"),
            self.buckets.tagged(slot, "guard"),
        ];
        let mut expire_at = 0;
        let lookup = match reads {
            Reads::Nothing => Vec::new(),
            Reads::Record => self.buckets.lookup(&id, now),
            Reads::RecordAndTarget(since) => {
                let (target, at) = self.buckets.target(&id, now);
                expire_at = at;
                let mut all = self.buckets.lookup_since(&id, since, now);
                all.retain(|k| *k != target);
                all.insert(0, target);
                all
            }
        };
        let buckets = lookup.len();
        keys.extend(lookup);
        if now < self.compat_until.load(Ordering::Relaxed) {
            keys.push(format!("{}:rec:{command_id}", self.prefix));
            keys.push(format!("{}:claim:{command_id}", self.prefix));
        }
        let keys = CommandKeys {
            slot,
            field: id.field(),
            keys,
            buckets,
        };
        (keys, expire_at)
    }

    /// The boot marker of `slot` as last seen.
    pub fn seen(&self, slot: u32) -> String {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(slot as usize).cloned().unwrap_or_default()
    }

    /// Takes note of `slot`'s marker; warns (once a lease at most: a
    /// restart changes every slot's) when it changed.
    pub fn saw(&self, slot: u32, marker: &str, lease: Duration) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(known) = seen.get_mut(slot as usize) else {
            return;
        };
        if *known == marker {
            return;
        }
        if !known.is_empty() {
            let now = now_millis();
            let last = self.warned_at.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= millis(lease) {
                self.warned_at.store(now, Ordering::Relaxed);
                tracing::warn!(
                    lease_ms = millis(lease),
                    "Redis lost its data since it was last seen (a restart without persistence?): no new claims in its slots for one lease"
                );
            }
        }
        marker.clone_into(known);
    }

    /// Once per process, before its first script: notes every slot's boot
    /// marker (making those that are missing), so a restart is noticed in
    /// slots this replica has not used yet, and learns whether earlier
    /// versions' keys may exist. Until it succeeds, they are assumed to.
    pub async fn look(&self, client: &RedisClient) -> Result<(), RedisError> {
        self.looked
            .get_or_try_init(|| self.look_once(client))
            .await
            .map(|_| ())
    }

    async fn look_once(&self, client: &RedisClient) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        for slot in 0..SLOTS {
            let key = self.buckets.tagged(slot, "boot");
            pipe.cmd("SET")
                .arg(&key)
                .arg(uuid::Uuid::new_v4().to_string())
                .arg("NX")
                .ignore()
                .get(key);
        }
        let old_boot = format!("{}:boot", self.prefix);
        let compat_key = format!("{}:compat-until", self.prefix);
        pipe.exists(&old_boot).get(&compat_key);
        let mut reply: Vec<redis::Value> = client.query(&pipe).await?;
        let compat = reply.pop().unwrap_or(redis::Value::Nil);
        let exists = reply.pop().unwrap_or(redis::Value::Nil);
        let old: bool = redis::from_redis_value(&exists).map_err(|_| client.unexpected(&exists))?;
        let reply = redis::Value::Array(reply);
        let markers: Vec<Option<String>> =
            redis::from_redis_value(&reply).map_err(|_| client.unexpected(&reply))?;
        let until = match redis::from_redis_value::<Option<u64>>(&compat) {
            Ok(Some(until)) => until,
            _ => {
                // The first start of this version: keys of earlier ones
                // exist only if one of them ever ran here.
                let until = if old {
                    now_millis() + millis(self.compat_span)
                } else {
                    0
                };
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(&compat_key)
                    .arg(until)
                    .arg("NX")
                    .ignore()
                    .get(&compat_key);
                let (until,): (u64,) = client.query(&pipe).await?;
                until
            }
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            for (known, marker) in seen.iter_mut().zip(markers) {
                if let (true, Some(marker)) = (known.is_empty(), marker) {
                    *known = marker;
                }
            }
        }
        self.compat_until.store(until, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(key: &str) -> &str {
        let start = key.find('{').unwrap_or(0);
        let end = key.find('}').unwrap_or(key.len() - 1);
        &key[start..=end]
    }

    #[test]
    fn a_commands_keys_share_one_hash_tag_once_earlier_versions_are_gone() {
        let layout = Layout::new("p", Duration::from_secs(86_400), Duration::from_secs(20));
        layout.compat_until.store(0, Ordering::Relaxed);
        for reads in [Reads::Nothing, Reads::Record, Reads::RecordAndTarget(0)] {
            let (keys, _) = layout.keys("cmd-1", reads);
            let first = tag(&keys.keys[0]).to_owned();
            assert!(first.starts_with("{i"), "{:?}", keys.keys);
            assert!(keys.keys.iter().all(|k| tag(k) == first), "{:?}", keys.keys);
            assert_eq!(keys.keys.len(), 3 + keys.buckets);
        }
        let (keys, expire_at) = layout.keys("cmd-1", Reads::RecordAndTarget(0));
        assert!(expire_at > now_millis());
        assert_eq!(
            keys.keys.iter().filter(|k| **k == keys.keys[3]).count(),
            1,
            "the first bucket is not read twice"
        );
    }

    #[test]
    fn until_redis_was_looked_at_earlier_versions_keys_are_read_too() {
        let layout = Layout::new("p", Duration::from_secs(86_400), Duration::from_secs(20));
        let (keys, _) = layout.keys("cmd-1", Reads::Record);
        assert_eq!(keys.keys.len(), 3 + keys.buckets + 2);
        assert_eq!(keys.keys[keys.keys.len() - 2], "p:rec:cmd-1");
        assert_eq!(keys.keys[keys.keys.len() - 1], "p:claim:cmd-1");
    }
}
