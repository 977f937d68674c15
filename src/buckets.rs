//! Where per-command state lives in Redis: packed into hash buckets.
//!
//! A key per command costs Redis about a hundred bytes of its own (the key,
//! its object, its expiry entry) on top of what it holds, and millions of
//! commands are kept for a day (outcomes, `dedupe.window`) or a month
//! (remembered `v3`s, `callbacks.match_window`). So entries are fields,
//! named by 16 bytes of a SHA-256 ([`BucketId`]), of hashes
//! `<prefix>:{<tag><slot>}:<kind>:<period>`: the slot spreads ids over 1024
//! hashes and is a hash tag, so every bucket one id can be in is one Redis
//! Cluster slot and a script that reads them touches one slot; the period
//! is the time slice (a fraction of the window) in which the entry was
//! written. A bucket expires as a whole once its newest entry is a window
//! old (plus a margin for clocks that disagree), so an entry lives at least
//! the window and on average half a period longer; a lookup reads the
//! bucket of every period that can still hold a live entry. More periods
//! per window keep entries closer to the window (memory), fewer make a
//! lookup read fewer buckets (each a call inside a script: server CPU).

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::redis_client::millis as ms;

/// Buckets per period, and hash tags per kind of entry.
pub const SLOTS: u32 = 1024;
/// Clocks of replicas may disagree by this much without an entry being
/// missed or dropped early.
const CLOCK_MARGIN: Duration = Duration::from_secs(600);

/// What an entry is filed under: a SHA-256 of its id, computed once per
/// operation and used for both its bucket and its field.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BucketId([u8; 32]);

impl BucketId {
    /// The id of `bytes` (a commandId, say).
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// An id that already is a SHA-256 (of a composite key).
    pub fn from_digest(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The entry's field in its bucket: 16 bytes of the hash (ids may be
    /// hundreds of bytes; two colliding is as unlikely as any 128-bit
    /// collision, and what is stored tells them apart where it matters).
    pub fn field(&self) -> [u8; 16] {
        let mut field = [0u8; 16];
        field.copy_from_slice(&self.0[..16]);
        field
    }

    /// Which of the [`SLOTS`] the id's entries (and whatever else a
    /// script needs beside them, [`Buckets::tagged`]) are in.
    pub fn slot(&self) -> u32 {
        u32::from_be_bytes([self.0[16], self.0[17], self.0[18], self.0[19]]) % SLOTS
    }
}

/// `<prefix>:{<tag><slot>}:<what>`: see [`Buckets::tagged`].
pub fn tagged(prefix: &str, tag: &str, slot: u32, what: &str) -> String {
    format!("{prefix}:{{{tag}{slot}}}:{what}")
}

/// The bucket layout of one kind of entry.
#[derive(Clone)]
pub struct Buckets {
    prefix: String,
    tag: &'static str,
    kind: &'static str,
    window_ms: u64,
    span_ms: u64,
    margin_ms: u64,
}

impl Buckets {
    /// Buckets `<prefix>:{<tag><slot>}:<kind>:<period>` for entries kept
    /// `window`, in `periods` periods per window. Each kind of entry needs
    /// its own `tag`: it is what keeps two kinds out of each other's
    /// hashes.
    pub fn new(
        prefix: &str,
        tag: &'static str,
        kind: &'static str,
        window: Duration,
        periods: u32,
    ) -> Self {
        let window_ms = ms(window);
        Self {
            prefix: prefix.to_owned(),
            tag,
            kind,
            window_ms,
            span_ms: (window_ms / u64::from(periods.max(1))).max(1000),
            margin_ms: ms(CLOCK_MARGIN),
        }
    }

    fn key(&self, slot: u32, period: u64) -> String {
        format!(
            "{}:{{{}{slot}}}:{}:{period}",
            self.prefix, self.tag, self.kind
        )
    }

    /// `<prefix>:{<tag><slot>}:<what>`: a key in the same hash slot as
    /// the buckets of ids in `slot`, for what a script reads or writes
    /// with them.
    pub fn tagged(&self, slot: u32, what: &str) -> String {
        tagged(&self.prefix, self.tag, slot, what)
    }

    /// The bucket an entry written at `now_ms` goes to, and when (ms since
    /// the epoch) that bucket may expire.
    pub fn target(&self, id: &BucketId, now_ms: u64) -> (String, u64) {
        let period = now_ms / self.span_ms;
        let expire_at = (period + 1) * self.span_ms + self.window_ms + self.margin_ms;
        (self.key(id.slot(), period), expire_at)
    }

    /// Every bucket that can hold a live entry of `id` at `now_ms`, newest
    /// first.
    pub fn lookup(&self, id: &BucketId, now_ms: u64) -> Vec<String> {
        self.lookup_since(id, 0, now_ms)
    }

    /// Of those, the buckets an entry written since `since_ms` (by any
    /// replica, whose clock may be off by the margin) can be in: a
    /// lookup that already found nothing in the others need not read them
    /// again.
    pub fn lookup_since(&self, id: &BucketId, since_ms: u64, now_ms: u64) -> Vec<String> {
        let slot = id.slot();
        let newest = now_ms.saturating_add(self.margin_ms) / self.span_ms;
        let oldest = now_ms
            .saturating_sub(self.window_ms + self.margin_ms)
            .max(since_ms.saturating_sub(self.margin_ms))
            / self.span_ms;
        (oldest..=newest).rev().map(|p| self.key(slot, p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_found_for_the_whole_window_from_any_clock_within_the_margin() {
        let window = Duration::from_secs(24 * 3600);
        let b = Buckets::new("p", "i", "r", window, 8);
        let id = BucketId::of(b"cmd-1");
        let stored_at = 1_764_770_000_000;
        let (target, expire_at) = b.target(&id, stored_at);
        assert!(
            target.starts_with("p:{i") && target.contains("}:r:"),
            "{target}"
        );
        assert!(expire_at >= stored_at + ms(window) + ms(CLOCK_MARGIN));
        assert!(expire_at <= stored_at + ms(window) + ms(CLOCK_MARGIN) + b.span_ms);
        for skew in [-(ms(CLOCK_MARGIN) as i64), 0, ms(CLOCK_MARGIN) as i64] {
            for age in [0, 1, ms(window) / 2, ms(window)] {
                let now = (stored_at + age).saturating_add_signed(skew);
                assert!(
                    b.lookup(&id, now).contains(&target),
                    "age {age} skew {skew}"
                );
            }
        }
        // The window and both margins: nine or ten periods.
        assert!((9..=10).contains(&b.lookup(&id, stored_at).len()));
        assert_ne!(id.slot(), BucketId::of(b"cmd-2").slot());
    }

    #[test]
    fn an_entry_written_since_a_lookup_is_in_the_fewer_buckets_read_after_it() {
        let window = Duration::from_secs(24 * 3600);
        let b = Buckets::new("p", "i", "r", window, 8);
        let id = BucketId::of(b"cmd-1");
        let looked_at = 1_764_770_000_000;
        for skew in [-(ms(CLOCK_MARGIN) as i64), 0, ms(CLOCK_MARGIN) as i64] {
            for later in [0, 1, 60_000, b.span_ms, 3 * b.span_ms] {
                let writer_clock = (looked_at + later).saturating_add_signed(skew);
                let (target, _) = b.target(&id, writer_clock);
                let now = looked_at + later;
                let read = b.lookup_since(&id, looked_at, now);
                assert!(read.contains(&target), "later {later} skew {skew}");
                assert!(read.len() < b.lookup(&id, now).len(), "{read:?}");
            }
        }
    }

    #[test]
    fn every_bucket_of_an_id_shares_one_hash_tag() {
        let b = Buckets::new("p", "v", "v", Duration::from_secs(30 * 86_400), 8);
        let id = BucketId::of(b"x");
        let keys = b.lookup(&id, 1_764_770_000_000);
        let tag = |k: &str| k[k.find('{').unwrap_or(0)..=k.find('}').unwrap_or(0)].to_owned();
        assert!(keys.iter().all(|k| tag(k) == tag(&keys[0])), "{keys:?}");
        assert!(tag(&keys[0]).starts_with("{v"), "{keys:?}");
    }
}
