//! The in-process caches of entries written once and read rarely, if
//! ever: the in-memory idempotency store (outcomes, read again only by a
//! redelivery) and the callbacks' memory of `v3`s (read at most once,
//! days later). Bounded, so memory does not grow with traffic.

use quick_cache::sync::Cache;

/// Share of a cache kept for entries read again. quick_cache evicts unread
/// ("cold") entries first, and most entries here are never read again;
/// with its default of 97 % a new entry would be evicted after a few
/// hundred newer ones, with 10 % it outlives at least ~80 % of `capacity`
/// newer ones (tested with the in-memory idempotency store).
const HOT_SHARE: f64 = 0.1;
/// Divides both bounds (`idempotency::MAX_ENTRIES`,
/// `callbacks::MAX_REMEMBERED`) exactly: capacity does not depend on the
/// host.
const SHARDS: usize = 8;

/// A cache of at most `capacity` entries that keeps new, unread entries
/// long enough (see [`HOT_SHARE`]).
pub fn new<K: Eq + std::hash::Hash, V: Clone>(capacity: usize) -> Cache<K, V> {
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(capacity)
        .weight_capacity(capacity as u64)
        .hot_allocation(HOT_SHARE)
        .shards(SHARDS)
        .build();
    match options {
        Ok(options) => Cache::with_options(
            options,
            Default::default(),
            Default::default(),
            Default::default(),
        ),
        // Only invalid constants could fail; fall back to the defaults.
        Err(_) => Cache::new(capacity),
    }
}
