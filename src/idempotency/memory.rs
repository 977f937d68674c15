//! Outcomes remembered in this process (no `redis.url`): bounded, per
//! process, lost on restart.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use quick_cache::sync::Cache;
use tokio::time::Instant;

use super::Record;
use crate::bounded_cache;

/// Bound on commandIds remembered (quick_cache evicts beyond it). An entry
/// costs a few hundred bytes (BENCHMARKS.md), so this caps the store at a
/// few MiB; deployments that need all of `dedupe.window` at high volume
/// set `redis.url`.
pub const MAX_ENTRIES: usize = 20_000;
/// A stored outcome.
pub struct Entry {
    stored: Instant,
    /// The outcome.
    pub record: Record,
    published: AtomicBool,
}

impl Entry {
    /// Whether an event for it was confirmed.
    pub fn is_published(&self) -> bool {
        self.published.load(Ordering::Acquire)
    }

    /// Marks the outcome as announced by a confirmed event.
    pub fn mark_published(&self) {
        self.published.store(true, Ordering::Release);
    }
}

/// The in-process outcome store.
pub struct MemoryStore {
    cache: Cache<String, Arc<Entry>>,
    window: Duration,
}

impl MemoryStore {
    /// A store remembering outcomes for `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            cache: bounded_cache::new(MAX_ENTRIES),
            window,
        }
    }

    /// The outcome of `command_id`, if stored within the window.
    pub fn get(&self, command_id: &str) -> Option<Arc<Entry>> {
        let entry = self.cache.get(command_id)?;
        if entry.stored.elapsed() < self.window {
            return Some(entry);
        }
        self.cache.remove_if(command_id, |e| Arc::ptr_eq(e, &entry));
        None
    }

    /// Stores `record` for `command_id`, not yet published; the entry is
    /// returned so that marking it published needs no second lookup.
    pub fn put(&self, command_id: &str, record: Record) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            stored: Instant::now(),
            record,
            published: AtomicBool::new(false),
        });
        self.cache.insert(command_id.to_owned(), entry.clone());
        entry
    }

    /// Entries held (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{idempotency::Fingerprint, outcome::CallOutcome};

    fn record() -> Record {
        let cmd = crate::command::Command {
            command_id: "c".into(),
            app_id: "a".into(),
            chatroom_id: "r".into(),
            member_wxid: "m".into(),
            content: "x".into(),
        };
        Record::new(
            Fingerprint::of(&cmd),
            CallOutcome {
                result: Ok("v3".into()),
                attempts: 1,
            },
            crate::outcome::Tries::default(),
        )
    }

    #[test]
    fn the_store_stays_bounded_and_keeps_the_recent_outcomes() {
        let store = MemoryStore::new(Duration::from_secs(60));
        let total = MAX_ENTRIES * 3;
        for i in 0..total {
            store.put(&format!("c{i}"), record());
        }
        assert!(store.len() <= MAX_ENTRIES, "{} entries kept", store.len());
        // Outcomes nobody read again are what a redelivery looks for.
        let recent = MAX_ENTRIES * 8 / 10;
        let kept = (total - recent..total)
            .filter(|i| store.cache.peek(format!("c{i}").as_str()).is_some())
            .count();
        assert_eq!(
            kept, recent,
            "of the last {recent} outcomes only {kept} are kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_is_forgotten_after_the_window() {
        let store = MemoryStore::new(Duration::from_secs(60));
        store.put("c", record()).mark_published();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(store.get("c").is_some_and(|e| e.is_published()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(store.get("c").is_none());
        assert!(store.is_empty());
    }
}
