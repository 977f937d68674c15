//! Idempotency by commandId (contract §4, `dedupe.window`).
//!
//! A commandId whose outcome is known is not sent to GeWe again; the stored
//! outcome is republished, with `duplicate: true` once an event for it has
//! been confirmed. Concurrent deliveries of one commandId in this process
//! are coalesced by quick_cache's placeholders (one caller runs the call,
//! the others wait for its stored outcome, and take over if none was
//! stored); across replicas and restarts, [`SharedState`] (Redis) holds the
//! outcomes and a claim per in-flight commandId.
//!
//! Only *definitive* outcomes are stored (success, `rejected`,
//! `unexpected_response`): GeWe may have acted on them. Outcomes that say the
//! request did not get through (`upstream_unavailable`, `unauthorized`,
//! `app_offline`) are not stored, so a redelivery or a republished command
//! tries again once the cause is fixed.

use std::{future::Future, sync::Arc, time::Duration};

use quick_cache::sync::Cache;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    claim,
    event::ErrorKind,
    gewe::CallOutcome,
    shared_state::{Claim, SharedState, StateError},
};

/// Bound on commandIds remembered in memory (quick_cache evicts the least
/// useful entries beyond it). Each entry costs a few hundred bytes (the
/// commandId, the v3 and timestamps; BENCHMARKS.md), so this caps the store
/// at a few MiB. Deployments that need the whole `dedupe.window` covered at
/// high volume set `redis.url`.
const MAX_ENTRIES: usize = 20_000;
/// How often a delivery checks whether another replica's claim produced
/// an outcome (or expired).
const CLAIM_POLL: Duration = Duration::from_millis(100);
/// Backoff while Redis is unavailable.
const REDIS_RETRY_MIN: Duration = Duration::from_millis(200);
const REDIS_RETRY_MAX: Duration = Duration::from_secs(5);

/// A GeWe call outcome plus when it was known.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Known {
    /// The outcome.
    pub outcome: CallOutcome,
    /// RFC 3339 completion time of the original call.
    pub completed_at: String,
    /// Whether an event for it has been confirmed by the broker.
    #[serde(default)]
    pub published: bool,
}

/// Why the call did not produce an outcome: the command is retried later.
#[derive(Debug, thiserror::Error)]
pub enum Interrupted {
    /// The worker is shutting down.
    #[error("the worker is shutting down")]
    Shutdown,
    /// Our Redis claim on the commandId ran out or was taken over while the
    /// command waited: another replica may be calling GeWe for it.
    #[error("the claim on this commandId was lost; another replica may be handling it")]
    ClaimLost,
}

/// What [`Dedupe::resolve`] found.
pub enum Resolved {
    /// The outcome to publish.
    Outcome {
        /// The outcome.
        known: Arc<Known>,
        /// True when this republishes an outcome already announced.
        duplicate: bool,
    },
    /// No outcome now; requeue the command.
    Retry(Arc<Interrupted>),
}

/// An outcome in memory and when it was stored, for the window.
type Entry = (Instant, Arc<Known>);

/// Share of the store kept for entries read again. Most outcomes are never
/// read again, and quick_cache evicts unread ("cold") entries first, so
/// with its default of 97 % a new outcome would be evicted after a few
/// hundred newer ones; with 10 % an unread outcome outlives at least ~80 %
/// of `MAX_ENTRIES` newer ones (tested below).
const HOT_SHARE: f64 = 0.1;
/// Divides `MAX_ENTRIES` exactly.
const SHARDS: usize = 8;

fn new_store() -> Cache<String, Entry> {
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(MAX_ENTRIES)
        .weight_capacity(MAX_ENTRIES as u64)
        .hot_allocation(HOT_SHARE)
        // A fixed shard count (quick_cache defaults to 4 per CPU): the
        // capacity and each shard's share of it do not depend on the host.
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
        Err(_) => Cache::new(MAX_ENTRIES),
    }
}

/// Store of known outcomes: in memory, and in Redis when configured.
#[derive(Clone)]
pub struct Dedupe {
    cache: Arc<Cache<String, Entry>>,
    shared: Option<Arc<SharedState>>,
    window: Duration,
    owner: String,
    shutdown: CancellationToken,
}

impl Dedupe {
    /// A store remembering outcomes for `window`, shared through `shared`;
    /// waits on Redis end when `shutdown` is cancelled.
    pub fn new(
        window: Duration,
        shared: Option<Arc<SharedState>>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            cache: Arc::new(new_store()),
            shared,
            window,
            owner: uuid::Uuid::new_v4().to_string(),
            shutdown,
        }
    }

    /// Returns the stored outcome for `command_id`, or runs `call` (once per
    /// process however many deliveries ask at once, and once across replicas
    /// when Redis is configured) and stores its outcome when definitive.
    pub async fn resolve<F>(&self, command_id: &str, call: F) -> Resolved
    where
        F: Future<Output = Result<Known, Interrupted>>,
    {
        // A value stored after we asked is fresh whatever the window (a
        // waiter handed the outcome of the call it waited for).
        let asked = Instant::now();
        let guard = loop {
            match self.cache.get_value_or_guard_async(command_id).await {
                Ok((stored, known)) if stored >= asked || stored.elapsed() < self.window => {
                    return Resolved::Outcome {
                        duplicate: known.published,
                        known,
                    };
                }
                // Past the window: forget it (unless someone replaced it
                // meanwhile) and look again.
                Ok((stored, _)) => {
                    self.cache.remove_if(command_id, |(s, _)| *s == stored);
                }
                Err(guard) => break guard,
            }
        };
        let outcome = match &self.shared {
            Some(shared) => self.resolve_shared(shared, command_id, call).await,
            None => call
                .await
                .map(|known| (Arc::new(known), true))
                .map_err(Arc::new),
        };
        match outcome {
            Ok((known, ran)) => {
                if is_definitive(&known.outcome) {
                    let _ = guard.insert((Instant::now(), known.clone()));
                }
                // Otherwise the guard is dropped: a waiting delivery of the
                // same commandId makes its own attempt.
                Resolved::Outcome {
                    duplicate: !ran && known.published,
                    known,
                }
            }
            Err(interrupted) => Resolved::Retry(interrupted),
        }
    }

    /// Like the in-memory path, through Redis: a stored outcome, else our
    /// claim and the call. Returns the outcome and whether the call ran here.
    async fn resolve_shared<F>(
        &self,
        shared: &Arc<SharedState>,
        command_id: &str,
        call: F,
    ) -> Result<(Arc<Known>, bool), Arc<Interrupted>>
    where
        F: Future<Output = Result<Known, Interrupted>>,
    {
        let interrupted = |e: Interrupted| Arc::new(e);
        // Redis trouble or another replica's claim: wait here (the delivery
        // stays unacked) rather than requeue, because every requeue counts
        // towards the quorum delivery limit and would end in the dead-letter
        // queue without an event.
        let mut pause = REDIS_RETRY_MIN;
        let claimed_at = loop {
            if self.shutdown.is_cancelled() {
                return Err(interrupted(Interrupted::Shutdown));
            }
            // Before sending: the lease runs from no earlier than this.
            let sent = Instant::now();
            let wait = match shared
                .claim_or_outcome(command_id, &self.owner, claim::LEASE)
                .await
            {
                Ok(Claim::Outcome(known)) => return Ok((Arc::new(*known), false)),
                Ok(Claim::Claimed) => break sent,
                Ok(Claim::Held) => CLAIM_POLL,
                // Written by an incompatible version: reported, then
                // treated as absent rather than blocking the command forever.
                Err(StateError::Corrupt { command_id, reason }) => {
                    tracing::error!(%command_id, %reason, "ignoring an unreadable stored outcome");
                    match shared.claim(&command_id, &self.owner, claim::LEASE).await {
                        Ok(true) => break sent,
                        Ok(false) => CLAIM_POLL,
                        Err(e) => self.redis_failed(&e, &mut pause),
                    }
                }
                Err(e) => self.redis_failed(&e, &mut pause),
            };
            tokio::select! {
                () = self.shutdown.cancelled() => return Err(interrupted(Interrupted::Shutdown)),
                () = tokio::time::sleep(wait) => {}
            }
        };
        // Renewed concurrently, so the call is never starved while a renewal
        // waits on Redis; the call checks `claim::lost()` before each request.
        let result = claim::hold(shared.clone(), command_id, &self.owner, claimed_at, call).await;
        match &result {
            Ok(known) if is_definitive(&known.outcome) => {
                if let Err(e) = shared
                    .store_and_release(command_id, known, self.window, &self.owner)
                    .await
                {
                    // The call happened; failing the command now would only
                    // make things worse. The claim stays, so other replicas
                    // wait for its lease to run out instead of calling at once.
                    tracing::error!(error = %e, "could not store the outcome in Redis; a redelivery could call GeWe again");
                }
            }
            _ => {
                if let Err(e) = shared.release(command_id, &self.owner).await {
                    tracing::warn!(error = %e, "could not release the claim; it expires by itself");
                }
            }
        }
        result.map(|k| (Arc::new(k), true)).map_err(interrupted)
    }

    /// Counts and reports a Redis failure; returns how long to wait before
    /// the next try, doubling `pause` up to its ceiling.
    fn redis_failed(&self, error: &StateError, pause: &mut Duration) -> Duration {
        metrics::counter!("redis_errors_total").increment(1);
        tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "Redis unavailable: holding the command, GeWe is not called");
        let wait = *pause;
        *pause = (*pause * 2).min(REDIS_RETRY_MAX);
        wait
    }

    /// Records that an event for `known` was confirmed, so later deliveries
    /// of the commandId are marked `duplicate`.
    pub async fn mark_published(&self, command_id: &str, known: &Known) {
        if known.published || !is_definitive(&known.outcome) {
            return;
        }
        let published = Known {
            published: true,
            ..known.clone()
        };
        if let Some(shared) = &self.shared
            && let Err(e) = shared
                .store_outcome(command_id, &published, self.window)
                .await
        {
            tracing::warn!(error = %e, "could not mark the outcome as published in Redis");
        }
        self.cache
            .insert(command_id.to_owned(), (Instant::now(), Arc::new(published)));
    }
}

fn is_definitive(outcome: &CallOutcome) -> bool {
    match &outcome.result {
        Ok(_) => true,
        Err(e) => match e.kind {
            ErrorKind::Rejected | ErrorKind::UnexpectedResponse => true,
            ErrorKind::InvalidCommand
            | ErrorKind::Unauthorized
            | ErrorKind::AppOffline
            | ErrorKind::UpstreamUnavailable => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventError;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn known(result: Result<String, EventError>) -> Result<Known, Interrupted> {
        Ok(Known {
            outcome: CallOutcome {
                result: result.map_err(Box::new),
                attempts: 1,
            },
            completed_at: "t".into(),
            published: false,
        })
    }

    fn outcome(r: Resolved) -> (Arc<Known>, bool) {
        match r {
            Resolved::Outcome { known, duplicate } => (known, duplicate),
            Resolved::Retry(e) => panic!("unexpected retry: {e}"),
        }
    }

    #[tokio::test]
    async fn a_published_outcome_is_republished_as_duplicate_without_a_call() {
        let d = Dedupe::new(Duration::from_secs(60), None, CancellationToken::new());
        let calls = AtomicU32::new(0);
        let (first, dup) = outcome(
            d.resolve("c1", async {
                calls.fetch_add(1, Ordering::SeqCst);
                known(Ok("v3".into()))
            })
            .await,
        );
        assert!(!dup);
        // Not yet confirmed: a redelivery publishes it as a first event.
        let (_, dup) = outcome(d.resolve("c1", async { known(Ok("x".into())) }).await);
        assert!(!dup);
        d.mark_published("c1", &first).await;
        let (second, dup) = outcome(
            d.resolve("c1", async {
                calls.fetch_add(1, Ordering::SeqCst);
                known(Ok("other".into()))
            })
            .await,
        );
        assert!(dup);
        assert_eq!(second.outcome.result, Ok("v3".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_deliveries_make_one_call() {
        let d = Dedupe::new(Duration::from_secs(60), None, CancellationToken::new());
        let calls = Arc::new(AtomicU32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c1 = calls.clone();
        let d1 = d.clone();
        let first = tokio::spawn(async move {
            outcome(
                d1.resolve("c", async move {
                    c1.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.await;
                    known(Ok("v3".into()))
                })
                .await,
            )
            .0
        });
        tokio::task::yield_now().await;
        let c2 = calls.clone();
        let d2 = d.clone();
        let second = tokio::spawn(async move {
            outcome(
                d2.resolve("c", async move {
                    c2.fetch_add(1, Ordering::SeqCst);
                    known(Ok("v3b".into()))
                })
                .await,
            )
            .0
        });
        tokio::task::yield_now().await;
        let _ = tx.send(());
        let (a, b) = (first.await.expect("join"), second.await.expect("join"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.outcome.result, b.outcome.result);
    }

    #[tokio::test]
    async fn a_waiter_takes_the_outcome_it_waited_for_however_short_the_window() {
        let d = Dedupe::new(Duration::ZERO, None, CancellationToken::new());
        let calls = Arc::new(AtomicU32::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let (d, calls) = (d.clone(), calls.clone());
            async move {
                d.resolve("c", async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let _ = released.await;
                    known(Ok("v3".into()))
                })
                .await
            }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let (d, calls) = (d.clone(), calls.clone());
            async move {
                d.resolve("c", async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    known(Ok("v3b".into()))
                })
                .await
            }
        });
        tokio::task::yield_now().await;
        let _ = release.send(());
        let (a, _) = outcome(first.await.expect("join"));
        let (b, _) = outcome(second.await.expect("join"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.outcome.result, b.outcome.result);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_is_forgotten_after_the_window() {
        let d = Dedupe::new(Duration::from_secs(60), None, CancellationToken::new());
        let (first, _) = outcome(d.resolve("c", async { known(Ok("v3".into())) }).await);
        d.mark_published("c", &first).await;
        tokio::time::advance(Duration::from_secs(59)).await;
        let (kept, dup) = outcome(d.resolve("c", async { known(Ok("new".into())) }).await);
        assert!(dup);
        assert_eq!(kept.outcome.result, Ok("v3".into()));
        tokio::time::advance(Duration::from_secs(2)).await;
        let (fresh, dup) = outcome(d.resolve("c", async { known(Ok("new".into())) }).await);
        assert!(!dup);
        assert_eq!(fresh.outcome.result, Ok("new".into()));
    }

    #[tokio::test]
    async fn the_store_stays_bounded_and_keeps_the_recent_outcomes() {
        let d = Dedupe::new(Duration::from_secs(60), None, CancellationToken::new());
        let total = MAX_ENTRIES * 3;
        for i in 0..total {
            d.resolve(&format!("c{i}"), async { known(Ok("v3".into())) })
                .await;
        }
        let len = d.cache.len();
        assert!(len <= MAX_ENTRIES, "{len} entries kept");
        // Outcomes nobody read again are what a redelivery looks for.
        let recent = MAX_ENTRIES * 8 / 10;
        let kept = (total - recent..total)
            .filter(|i| d.cache.peek(format!("c{i}").as_str()).is_some())
            .count();
        assert_eq!(
            kept, recent,
            "of the last {recent} outcomes only {kept} are kept"
        );
    }

    #[tokio::test]
    async fn transient_outcomes_and_interruptions_are_not_stored() {
        let d = Dedupe::new(Duration::from_secs(60), None, CancellationToken::new());
        let unavailable = || {
            known(Err(EventError::new(
                ErrorKind::UpstreamUnavailable,
                "503",
                None,
            )))
        };
        let (_, dup) = outcome(d.resolve("c", async { unavailable() }).await);
        assert!(!dup);
        assert!(matches!(
            d.resolve("c", async { Err(Interrupted::Shutdown) }).await,
            Resolved::Retry(_)
        ));
        let (again, dup) = outcome(d.resolve("c", async { known(Ok("v3".into())) }).await);
        assert!(!dup);
        assert_eq!(again.outcome.result, Ok("v3".into()));
    }
}
