//! Where an outcome lives in Redis: packed into hash buckets.
//!
//! A key per commandId costs Redis about a hundred bytes of its own (the
//! key, its object, its expiry entry) on top of the record. So records are
//! fields (named by 16 bytes of the commandId's hash) of hashes `<prefix>:{i<slot>}:r:<period>`:
//! the slot spreads commandIds over 1024 hashes (and is a hash tag, so a
//! bucket is one Redis Cluster slot), the period is the time slice (an
//! eighth of `dedupe.window`) in which the record was stored. A bucket
//! expires as a whole once its newest record is `dedupe.window` old (plus a
//! margin for clocks that disagree), so a record lives at least the window
//! and on average a sixteenth longer; a lookup reads the buckets of every
//! period that can still hold a live record.
//!
//! Records written before this layout (`<prefix>:rec:<id>`, JSON) are still
//! read until they expire, one `dedupe.window` after the upgrade.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::redis_client::millis as ms;

/// Buckets per period.
const SLOTS: u32 = 1024;
/// Periods per `dedupe.window`.
const PERIODS_PER_WINDOW: u32 = 8;
/// Clocks of replicas may disagree by this much without a record being
/// missed or dropped early.
const CLOCK_MARGIN: Duration = Duration::from_secs(600);

/// The bucket layout of one store.
#[derive(Clone)]
pub struct Buckets {
    prefix: String,
    window_ms: u64,
    span_ms: u64,
    margin_ms: u64,
}

impl Buckets {
    /// Buckets under `prefix` for records kept `window`.
    pub fn new(prefix: &str, window: Duration) -> Self {
        let window_ms = ms(window);
        Self {
            prefix: prefix.to_owned(),
            window_ms,
            span_ms: (window_ms / u64::from(PERIODS_PER_WINDOW)).max(1000),
            margin_ms: ms(CLOCK_MARGIN),
        }
    }

    fn slot(command_id: &str) -> u32 {
        let digest = Sha256::digest(command_id.as_bytes());
        u32::from_be_bytes([digest[16], digest[17], digest[18], digest[19]]) % SLOTS
    }

    /// The field a commandId's record has in its bucket: 16 bytes of its
    /// SHA-256 (a commandId may be 255 bytes; two colliding is as likely as
    /// two fingerprints colliding, and would still be told apart by them).
    pub fn field(command_id: &str) -> [u8; 16] {
        let digest = Sha256::digest(command_id.as_bytes());
        let mut field = [0u8; 16];
        field.copy_from_slice(&digest[..16]);
        field
    }

    fn key(&self, slot: u32, period: u64) -> String {
        format!("{}:{{i{slot}}}:r:{period}", self.prefix)
    }

    /// The bucket a record stored at `now_ms` goes to, and when (ms since
    /// the epoch) that bucket may expire.
    pub fn target(&self, command_id: &str, now_ms: u64) -> (String, u64) {
        let period = now_ms / self.span_ms;
        let expire_at = (period + 1) * self.span_ms + self.window_ms + self.margin_ms;
        (self.key(Self::slot(command_id), period), expire_at)
    }

    /// Every bucket that can hold a live record of `command_id` at
    /// `now_ms`, newest first.
    pub fn lookup(&self, command_id: &str, now_ms: u64) -> Vec<String> {
        let slot = Self::slot(command_id);
        let newest = now_ms.saturating_add(self.margin_ms) / self.span_ms;
        let oldest = now_ms.saturating_sub(self.window_ms + self.margin_ms) / self.span_ms;
        (oldest..=newest).rev().map(|p| self.key(slot, p)).collect()
    }

    /// The key of a record written before the buckets.
    pub fn legacy(&self, command_id: &str) -> String {
        format!("{}:rec:{command_id}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_found_for_the_whole_window_from_any_clock_within_the_margin() {
        let window = Duration::from_secs(24 * 3600);
        let b = Buckets::new("p", window);
        let stored_at = 1_764_770_000_000;
        let (target, expire_at) = b.target("cmd-1", stored_at);
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
                    b.lookup("cmd-1", now).contains(&target),
                    "age {age} skew {skew}"
                );
            }
        }
        // The window and both margins: nine or ten periods.
        assert!((9..=10).contains(&b.lookup("cmd-1", stored_at).len()));
        assert_ne!(Buckets::slot("cmd-1"), Buckets::slot("cmd-2"));
    }
}
