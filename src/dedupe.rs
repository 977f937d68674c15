//! Idempotency by commandId (contract §4, `dedupe.window`).
//!
//! A commandId whose outcome is known is not sent to GeWe again; the stored
//! outcome is republished with `duplicate: true`. Concurrent deliveries of
//! one commandId are coalesced: moka runs one initialiser and hands its
//! result to every waiter, so they produce a single GeWe call.
//!
//! Only *definitive* outcomes are stored (success, `rejected`,
//! `unexpected_response`): GeWe may have acted on them. Outcomes that say the
//! request did not get through (`upstream_unavailable`, `unauthorized`,
//! `app_offline`) are not stored, so a redelivery or a republished command
//! tries again once the cause is fixed.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use moka::future::Cache;

use crate::{event::ErrorKind, gewe::CallOutcome};

/// Bound on remembered commandIds; at ~200 bytes each, about 100 MB worst case
/// is avoided by keeping it at 200k (≈40 MB).
const MAX_ENTRIES: u64 = 200_000;

/// A GeWe call outcome plus when it was known.
#[derive(Debug, Clone)]
pub struct Known {
    /// The outcome.
    pub outcome: CallOutcome,
    /// RFC 3339 completion time of the original call.
    pub completed_at: String,
}

/// In-memory store of known outcomes.
#[derive(Clone)]
pub struct Dedupe {
    cache: Cache<String, Arc<Known>>,
}

/// What [`Dedupe::resolve`] found.
pub struct Resolved {
    /// The outcome to publish.
    pub known: Arc<Known>,
    /// True when this caller did not make the call itself.
    pub duplicate: bool,
}

impl Dedupe {
    /// A store remembering outcomes for `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(window.max(Duration::from_millis(1)))
                .build(),
        }
    }

    /// Returns the stored outcome for `command_id`, or runs `call` (once,
    /// however many deliveries ask at the same time) and stores its outcome
    /// when definitive.
    pub async fn resolve<F>(&self, command_id: &str, call: F) -> Resolved
    where
        F: Future<Output = Known>,
    {
        let ran = Arc::new(AtomicBool::new(false));
        let ran_here = ran.clone();
        let result = self
            .cache
            .try_get_with_by_ref(command_id, async move {
                ran_here.store(true, Ordering::Relaxed);
                let known = Arc::new(call.await);
                if is_definitive(&known.outcome) {
                    Ok(known)
                } else {
                    Err(known)
                }
            })
            .await;
        let ran = ran.load(Ordering::Relaxed);
        match result {
            Ok(known) => Resolved {
                known,
                duplicate: !ran,
            },
            // Not stored: report it as this delivery's own outcome. A
            // concurrent waiter receives the same non-definitive result.
            Err(known) => Resolved {
                known: (*known).clone(),
                duplicate: false,
            },
        }
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
    use std::sync::atomic::AtomicU32;

    fn known(result: Result<String, EventError>) -> Known {
        Known {
            outcome: CallOutcome {
                result,
                attempts: 1,
            },
            completed_at: "t".into(),
        }
    }

    #[tokio::test]
    async fn second_resolution_is_a_duplicate_without_a_call() {
        let d = Dedupe::new(Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let first = d
            .resolve("c1", async {
                calls.fetch_add(1, Ordering::SeqCst);
                known(Ok("v3".into()))
            })
            .await;
        let second = d
            .resolve("c1", async {
                calls.fetch_add(1, Ordering::SeqCst);
                known(Ok("other".into()))
            })
            .await;
        assert!(!first.duplicate);
        assert!(second.duplicate);
        assert_eq!(second.known.outcome.result, Ok("v3".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_deliveries_make_one_call() {
        let d = Dedupe::new(Duration::from_secs(60));
        let calls = Arc::new(AtomicU32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c1 = calls.clone();
        let d1 = d.clone();
        let first = tokio::spawn(async move {
            d1.resolve("c", async move {
                c1.fetch_add(1, Ordering::SeqCst);
                let _ = rx.await;
                known(Ok("v3".into()))
            })
            .await
            .duplicate
        });
        tokio::task::yield_now().await;
        let c2 = calls.clone();
        let d2 = d.clone();
        let second = tokio::spawn(async move {
            d2.resolve("c", async move {
                c2.fetch_add(1, Ordering::SeqCst);
                known(Ok("v3b".into()))
            })
            .await
            .duplicate
        });
        tokio::task::yield_now().await;
        let _ = tx.send(());
        let (a, b) = (first.await.expect("join"), second.await.expect("join"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(a ^ b, "exactly one is the duplicate");
    }

    #[tokio::test]
    async fn transient_outcomes_are_not_stored() {
        let d = Dedupe::new(Duration::from_secs(60));
        let unavailable = || {
            known(Err(EventError::new(
                ErrorKind::UpstreamUnavailable,
                "503",
                None,
            )))
        };
        assert!(!d.resolve("c", async { unavailable() }).await.duplicate);
        let again = d.resolve("c", async { known(Ok("v3".into())) }).await;
        assert!(!again.duplicate);
        assert_eq!(again.known.outcome.result, Ok("v3".into()));
    }
}
