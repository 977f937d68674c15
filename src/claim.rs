//! Holding a Redis claim on a commandId while its GeWe call runs.
//!
//! A claim is taken before the breaker and pacing waits, which can last
//! longer than its lease. It is renewed in the background, and the call
//! asks [`lost`] right before each GeWe request: a claim that another
//! replica took over, or that could not be confirmed in time (Redis refusing
//! or hanging), means another replica may call, so no request is sent.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::shared_state::SharedState;

/// How long a claim lives without renewal: a crashed replica's claim blocks
/// the command at most this long.
pub const LEASE: Duration = Duration::from_secs(10);
/// Renewal period while the call runs.
const RENEW: Duration = Duration::from_secs(3);
/// A claim not confirmed for `LEASE - MARGIN` counts as lost, so no request
/// leaves after the lease may have run out.
const MARGIN: Duration = Duration::from_secs(2);
/// Retry of a failed renewal.
const RETRY: Duration = Duration::from_secs(1);

/// What the call and the renewal task share about one claim.
struct Watch {
    /// When the claim was sent: the lease runs from no earlier than this.
    since: Instant,
    /// Until when (ms after `since`) the claim is known to hold, minus the
    /// margin; moved on by every confirmed renewal.
    valid_ms: AtomicU64,
    /// Set when Redis says the claim is someone else's.
    taken_over: AtomicBool,
}

impl Watch {
    fn new(since: Instant) -> Self {
        Self {
            since,
            valid_ms: AtomicU64::new(ms(LEASE - MARGIN)),
            taken_over: AtomicBool::new(false),
        }
    }

    fn valid_until(&self) -> Instant {
        self.since + Duration::from_millis(self.valid_ms.load(Ordering::Acquire))
    }

    /// A renewal sent at `sent` was confirmed.
    fn confirmed(&self, sent: Instant) {
        let valid = sent.saturating_duration_since(self.since) + LEASE - MARGIN;
        self.valid_ms.store(ms(valid), Ordering::Release);
    }

    /// Read by the call itself, so a starved renewal task cannot make a
    /// lapsed claim look valid.
    fn lost(&self) -> bool {
        self.taken_over.load(Ordering::Acquire) || Instant::now() >= self.valid_until()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

tokio::task_local! {
    /// The claim the current task's call runs under; absent outside one.
    static CURRENT: Arc<Watch>;
}

/// Whether the current task runs under a Redis claim that is lost or may
/// have run out. Callers check it right before each GeWe request.
pub fn lost() -> bool {
    CURRENT.try_with(|w| w.lost()).unwrap_or(false)
}

/// Runs `call` under `owner`'s claim on `command_id`, sent at `claimed_at`,
/// renewing it until `call` ends (or is dropped).
pub async fn hold<F: Future>(
    shared: Arc<SharedState>,
    command_id: &str,
    owner: &str,
    claimed_at: Instant,
    call: F,
) -> F::Output {
    let watch = Arc::new(Watch::new(claimed_at));
    // Aborted however this future ends (dropped on shutdown, say): a claim
    // renewed forever would block the command on every replica.
    let _renewer = AbortOnDropHandle::new(tokio::spawn(renew(
        shared,
        command_id.to_owned(),
        owner.to_owned(),
        watch.clone(),
    )));
    CURRENT.scope(watch, call).await
}

/// Renews the claim every [`RENEW`] until the claim is lost: taken over, or
/// not confirmed before its validity ends, whether Redis refuses or hangs.
async fn renew(shared: Arc<SharedState>, command_id: String, owner: String, watch: Arc<Watch>) {
    let mut next = watch.since + RENEW;
    loop {
        let renewal = async {
            tokio::time::sleep_until(next).await;
            let sent = Instant::now();
            (sent, shared.renew(&command_id, &owner, LEASE).await)
        };
        tokio::select! {
            () = tokio::time::sleep_until(watch.valid_until()) => {
                metrics::counter!("claims_lost_total").increment(1);
                tracing::warn!(%command_id, "could not renew the claim on this commandId in time; no further GeWe request is made for it here");
                return;
            }
            (sent, renewed) = renewal => match renewed {
                Ok(true) => {
                    watch.confirmed(sent);
                    next = sent + RENEW;
                }
                Ok(false) => {
                    watch.taken_over.store(true, Ordering::Release);
                    metrics::counter!("claims_lost_total").increment(1);
                    tracing::warn!(%command_id, "lost the claim on this commandId; no further GeWe request is made for it here");
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
        let watch = Watch::new(Instant::now());
        assert!(!watch.lost());
        tokio::time::advance(LEASE - MARGIN - Duration::from_millis(1)).await;
        assert!(!watch.lost());
        watch.confirmed(Instant::now());
        tokio::time::advance(LEASE - MARGIN - Duration::from_millis(1)).await;
        assert!(!watch.lost(), "a confirmed renewal extends it");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(watch.lost(), "nothing confirmed for LEASE - MARGIN");
    }
}
