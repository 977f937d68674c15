//! Keeping a Redis claim alive while its command is handled.
//!
//! A claim is taken before the breaker and pacing waits, which can outlast
//! its lease, so it is renewed in the background. A GeWe request is sent
//! only while the claim is known to hold for longer than the request can
//! take ([`Lease::ready`]): the lease is `gewe.timeout` plus a margin, so
//! normally that is always true, and after a Redis blip the request waits
//! for a renewal instead of going out on a claim that could lapse
//! mid-request and let another replica call too.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::task::AbortOnDropHandle;

use super::redis::{RedisStore, Renewed};
use crate::{
    halt::{Halt, Interrupted},
    meters::meters,
};

/// Renewal period while a claim is held.
const RENEW: Duration = Duration::from_secs(3);
/// A claim not confirmed for `lease - MARGIN` counts as lost: the margin
/// covers the renewal's own round trip and clock drift against Redis.
const MARGIN: Duration = Duration::from_secs(2);
/// Retry of a failed renewal.
const RETRY: Duration = Duration::from_secs(1);
/// Added to `gewe.timeout` to make the lease: at least `RENEW + MARGIN`
/// more, so a request started right before a renewal is due still ends
/// well inside the lease.
pub const LEASE_OVER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handler and the renewal task share about one claim.
struct Watch {
    /// When the claim was sent: the lease runs from no earlier than this.
    since: Instant,
    lease: Duration,
    /// Until when (ms after `since`) the claim is known to hold, minus the
    /// margin; moved on by every confirmed renewal.
    valid_ms: AtomicU64,
    /// Set when Redis says the claim is someone else's.
    taken_over: AtomicBool,
    /// Woken by every confirmed renewal and by the loss of the claim.
    changed: Notify,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Watch {
    fn valid_until(&self) -> Instant {
        self.since + Duration::from_millis(self.valid_ms.load(Ordering::Acquire))
    }

    fn confirmed(&self, sent: Instant) {
        let valid = sent.saturating_duration_since(self.since) + self.lease.saturating_sub(MARGIN);
        self.valid_ms.fetch_max(ms(valid), Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Read by the handler itself, so a starved renewal task cannot make a
    /// lapsed claim look valid.
    fn lost(&self) -> bool {
        self.taken_over.load(Ordering::Acquire) || Instant::now() >= self.valid_until()
    }
}

/// A held claim and its renewal task (stopped when the lease is dropped).
pub struct Lease {
    watch: Arc<Watch>,
    _renewer: AbortOnDropHandle<()>,
}

impl Lease {
    /// Starts renewing the claim on `command_id`, sent at `since`.
    pub fn hold(store: RedisStore, command_id: &str, since: Instant) -> Self {
        let lease = store.lease();
        let watch = Arc::new(Watch {
            since,
            lease,
            valid_ms: AtomicU64::new(ms(lease.saturating_sub(MARGIN))),
            taken_over: AtomicBool::new(false),
            changed: Notify::new(),
        });
        let renewer = tokio::spawn(renew(store, command_id.to_owned(), watch.clone()));
        Self {
            watch,
            _renewer: AbortOnDropHandle::new(renewer),
        }
    }

    /// Waits until a request taking up to `request` would end inside the
    /// claim; `ClaimLost` once the claim is lost.
    pub async fn ready(&self, request: Duration, halt: &Halt) -> Result<(), Interrupted> {
        loop {
            let changed = self.watch.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.watch.lost() {
                return Err(Interrupted::ClaimLost);
            }
            let valid_until = self.watch.valid_until();
            if Instant::now() + request <= valid_until {
                return Ok(());
            }
            tracing::debug!("waiting for the claim to be renewed before calling GeWe");
            halt.guard(async {
                tokio::select! {
                    () = &mut changed => {}
                    () = tokio::time::sleep_until(valid_until) => {}
                }
            })
            .await?;
        }
    }

    /// Whether the claim is lost (taken over, or not confirmed in time).
    pub fn is_lost(&self) -> bool {
        self.watch.lost()
    }
}

/// Renews the claim every [`RENEW`] until it is lost: taken over, or not
/// confirmed before its validity ends, whether Redis refuses or hangs.
async fn renew(store: RedisStore, command_id: String, watch: Arc<Watch>) {
    let mut next = watch.since + RENEW;
    loop {
        let renewal = async {
            tokio::time::sleep_until(next).await;
            let sent = Instant::now();
            (sent, store.renew(&command_id).await)
        };
        tokio::select! {
            () = tokio::time::sleep_until(watch.valid_until()) => {
                // Renewals may still be confirmed after this (the handler
                // reads the clock), but the claim counts as lost.
                meters().claims_lost.increment(1);
                tracing::warn!(%command_id, "could not renew the claim on this commandId in time; no further GeWe request is made for it here");
                watch.changed.notify_waiters();
                return;
            }
            (sent, renewed) = renewal => match renewed {
                Ok(Renewed::Yes) => {
                    watch.confirmed(sent);
                    next = sent + RENEW;
                }
                Ok(Renewed::TakenOver) => {
                    watch.taken_over.store(true, Ordering::Release);
                    meters().claims_lost.increment(1);
                    tracing::warn!(%command_id, "lost the claim on this commandId; no further GeWe request is made for it here");
                    watch.changed.notify_waiters();
                    return;
                }
                Err(e) => {
                    tracing::warn!(%command_id, error = %e, "could not renew the claim on this commandId");
                    next = Instant::now() + RETRY;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_claim_lapses_by_the_clock_without_confirmation() {
        let lease = Duration::from_secs(12);
        let watch = Watch {
            since: Instant::now(),
            lease,
            valid_ms: AtomicU64::new(ms(lease - MARGIN)),
            taken_over: AtomicBool::new(false),
            changed: Notify::new(),
        };
        assert!(!watch.lost());
        tokio::time::advance(lease - MARGIN - Duration::from_millis(1)).await;
        assert!(!watch.lost());
        watch.confirmed(Instant::now());
        tokio::time::advance(lease - MARGIN - Duration::from_millis(1)).await;
        assert!(!watch.lost(), "a confirmed renewal extends it");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(watch.lost(), "nothing confirmed for lease - MARGIN");
    }

    #[test]
    fn the_lease_outlasts_a_request_started_just_before_a_renewal() {
        // Right before a renewal is due, the claim is known to hold for
        // lease - MARGIN - RENEW; a request of gewe.timeout must fit.
        let timeout = Duration::from_secs(10);
        let lease = timeout + LEASE_OVER_TIMEOUT;
        assert!(lease - MARGIN - RENEW > timeout);
    }
}
