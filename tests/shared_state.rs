//! The Redis-backed idempotency store against the real Redis: two replicas
//! (two `Dedupe` instances with their own owner ids) on one commandId, and
//! an unreadable stored outcome. Each test uses its own key prefix.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use common::redis_url;
use gewe_friend_worker::{
    dedupe::{self, Dedupe, Interrupted, Known, Resolved},
    gewe::CallOutcome,
    shared_state::SharedState,
};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

const WINDOW: Duration = Duration::from_secs(600);

fn prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// A replica: its own in-memory store and owner id, the shared Redis.
fn replica(prefix: &str) -> Dedupe {
    let shared = SharedState::new(&redis_url(), prefix).expect("redis url");
    Dedupe::new(WINDOW, Some(Arc::new(shared)), CancellationToken::new())
}

fn success(v3: &str) -> Result<Known, Interrupted> {
    Ok(Known {
        outcome: CallOutcome {
            result: Ok(v3.to_owned()),
            attempts: 1,
        },
        completed_at: "2026-11-25T00:00:00.000Z".into(),
        published: false,
    })
}

fn v3_of(resolved: Resolved) -> String {
    match resolved {
        Resolved::Outcome { known, .. } => known.outcome.result.clone().expect("a success"),
        Resolved::Retry(e) => panic!("no outcome: {e}"),
    }
}

/// A direct connection, to look at and tamper with the stored state.
async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

async fn delete_keys(prefix: &str) {
    let mut conn = redis().await;
    let keys: Vec<String> = conn.keys(format!("{prefix}:*")).await.expect("keys");
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.expect("del");
    }
}

#[tokio::test]
async fn a_replica_waits_for_the_claim_holder_and_publishes_its_outcome() {
    let prefix = prefix();
    let (a, b) = (replica(&prefix), replica(&prefix));
    let calls = Arc::new(AtomicU32::new(0));
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (started, claimed) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn({
        let calls = calls.clone();
        async move {
            a.resolve("cmd", async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = started.send(());
                let _ = released.await;
                assert!(!dedupe::claim_lost(), "a held claim is not lost");
                success("v3_from_a")
            })
            .await
        }
    });
    // A holds the claim and is calling GeWe; B must wait, not call.
    tokio::time::timeout(Duration::from_secs(5), claimed)
        .await
        .expect("A claims the command")
        .expect("A's call started");
    let mut second = tokio::spawn({
        let calls = calls.clone();
        async move {
            b.resolve("cmd", async move {
                calls.fetch_add(1, Ordering::SeqCst);
                success("v3_from_b")
            })
            .await
        }
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut second)
            .await
            .is_err(),
        "B waits while A holds the claim"
    );
    let _ = release.send(());
    let from_a = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("A finishes")
        .expect("join");
    let from_b = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("B gets A's outcome")
        .expect("join");
    assert_eq!(v3_of(from_a), "v3_from_a");
    assert_eq!(v3_of(from_b), "v3_from_a");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "GeWe is called once");
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn an_unreadable_stored_outcome_is_replaced_by_a_new_call() {
    let prefix = prefix();
    let mut conn = redis().await;
    let key = format!("{prefix}:outcome:cmd");
    let _: () = conn
        .set_ex(&key, "written by another version", 60)
        .await
        .expect("set");
    let resolved = tokio::time::timeout(
        Duration::from_secs(5),
        replica(&prefix).resolve("cmd", async { success("v3_new") }),
    )
    .await
    .expect("not blocked by the unreadable outcome");
    assert_eq!(v3_of(resolved), "v3_new");
    let stored: String = conn.get(&key).await.expect("get");
    assert!(stored.contains("v3_new"), "outcome replaced: {stored}");
    let claim: Option<String> = conn.get(format!("{prefix}:claim:cmd")).await.expect("get");
    assert_eq!(claim, None, "the claim is released");
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn a_claim_taken_over_while_waiting_is_seen_before_the_request() {
    let prefix = prefix();
    let mut conn = redis().await;
    let claim_key = format!("{prefix}:claim:cmd");
    let (claimed, taken) = tokio::sync::oneshot::channel::<()>();
    let d = replica(&prefix);
    let waiting = tokio::spawn(async move {
        d.resolve("cmd", async move {
            let _ = claimed.send(());
            // Waiting for the account's turn, as under pacing: the renewal
            // finds the claim gone and the wait ends without a request.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !dedupe::claim_lost() {
                if tokio::time::Instant::now() > deadline {
                    return success("requested despite the lost claim");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(Interrupted::ClaimLost)
        })
        .await
    });
    tokio::time::timeout(Duration::from_secs(5), taken)
        .await
        .expect("the command is claimed")
        .expect("the call started");
    // Another replica holds it now, as after our lease ran out.
    let _: () = conn.set(&claim_key, "other-replica").await.expect("set");
    let resolved = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the loss is noticed within a renewal period")
        .expect("join");
    match resolved {
        Resolved::Retry(e) => assert!(matches!(*e, Interrupted::ClaimLost), "{e}"),
        Resolved::Outcome { known, .. } => panic!("no retry: {:?}", known.outcome),
    }
    let holder: Option<String> = conn.get(&claim_key).await.expect("get");
    assert_eq!(
        holder.as_deref(),
        Some("other-replica"),
        "their claim stays"
    );
    let outcome: Option<String> = conn
        .get(format!("{prefix}:outcome:cmd"))
        .await
        .expect("get");
    assert_eq!(
        outcome, None,
        "nothing stored for a call that did not happen"
    );
    delete_keys(&prefix).await;
}
