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
    claim,
    dedupe::{Dedupe, Interrupted, Known, Resolved},
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

/// Inside a claimed call: waits, as a command waits for its pacing turn,
/// until the claim is reported lost; false if it is not within `limit`.
async fn claim_lost_within(limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !claim::lost() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Waits for the call (which runs once the command is claimed) to start.
async fn claimed_and_started(started: tokio::sync::oneshot::Receiver<()>) {
    tokio::time::timeout(Duration::from_secs(5), started)
        .await
        .expect("the command is claimed")
        .expect("the call started");
}

fn assert_claim_lost(resolved: Resolved) {
    match resolved {
        Resolved::Retry(e) => assert!(matches!(*e, Interrupted::ClaimLost), "{e}"),
        Resolved::Outcome { known, .. } => panic!("no retry: {:?}", known.outcome),
    }
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
                assert!(!claim::lost(), "a held claim is not lost");
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
            if !claim_lost_within(Duration::from_secs(10)).await {
                return success("requested despite the lost claim");
            }
            Err(Interrupted::ClaimLost)
        })
        .await
    });
    claimed_and_started(taken).await;
    // Another replica holds it now, as after our lease ran out.
    let _: () = conn
        .set_ex(&claim_key, "other-replica", 60)
        .await
        .expect("set");
    let resolved = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the loss is noticed within a renewal period")
        .expect("join");
    assert_claim_lost(resolved);
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

/// A TCP proxy to Redis that can be frozen: connections stay open but no
/// byte moves any more, as when Redis or the network hangs.
async fn freezable_redis_proxy() -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut proxied = url::Url::parse(&redis_url()).expect("redis url");
    let upstream = format!(
        "{}:{}",
        proxied.host_str().unwrap_or("127.0.0.1"),
        proxied.port().unwrap_or(6379)
    );
    proxied.set_host(Some("127.0.0.1")).expect("host");
    proxied.set_port(Some(port)).expect("port");
    let frozen = CancellationToken::new();
    let freeze = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, frozen) = (upstream.clone(), frozen.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let relay = async {
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                    }
                };
                tokio::select! {
                    biased;
                    // Hold both sockets open, silent.
                    () = frozen.cancelled() => std::future::pending::<()>().await,
                    () = relay => {}
                }
            });
        }
    });
    (proxied.to_string(), freeze)
}

#[tokio::test]
async fn a_claim_is_given_up_before_its_lease_runs_out_when_redis_hangs() {
    let prefix = prefix();
    let (proxied, freeze) = freezable_redis_proxy().await;
    let shared = SharedState::new(&proxied, &prefix).expect("redis url");
    let d = Dedupe::new(WINDOW, Some(Arc::new(shared)), CancellationToken::new());
    let claim_key = format!("{prefix}:claim:cmd");
    let (claimed, taken) = tokio::sync::oneshot::channel::<()>();
    let waiting = tokio::spawn(async move {
        d.resolve("cmd", async move {
            let _ = claimed.send(());
            if !claim_lost_within(Duration::from_secs(20)).await {
                return success("requested despite the lost claim");
            }
            // Given up while the lease still holds: no other replica can
            // have claimed the command yet.
            let left: i64 = redis().await.pttl(&claim_key).await.expect("pttl");
            assert!(left > 500, "claim given up with {left} ms of lease left");
            Err(Interrupted::ClaimLost)
        })
        .await
    });
    claimed_and_started(taken).await;
    freeze.cancel();
    let resolved = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the claim is given up")
        .expect("no assertion failed in the call");
    assert_claim_lost(resolved);
    delete_keys(&prefix).await;
}
