//! The idempotency store against the real Redis: replicas (stores with
//! their own owner ids) on one commandId, reuse of a commandId for another
//! request, lost claims, a hung Redis and a Redis that lost its data. Each
//! test uses its own key prefix.

use std::{sync::Arc, time::Duration};

use crate::common::{
    WAIT, done_or, eventually, redis_url,
    tcp_proxy::{Mode, TcpProxy},
    unique,
};
use gewe_friend_worker::{
    command::Command,
    halt::{Halt, Interrupted, Signal},
    idempotency::{Fingerprint, Found, Idempotency, Record, Stored, claim_key},
    outcome::CallOutcome,
    redis_client::RedisClient,
};
use redis::AsyncCommands;

const WINDOW: Duration = Duration::from_secs(600);
/// Short, so lease tests end quickly: valid for `LEASE - 2 s` unrenewed.
const LEASE: Duration = Duration::from_secs(6);

fn prefix() -> String {
    unique("test")
}

/// A replica: its own owner id and local claims, the shared Redis.
fn replica_at(url: &str, prefix: &str) -> Idempotency {
    let client = Arc::new(RedisClient::new(url).expect("redis url"));
    Idempotency::in_redis(client, prefix, WINDOW, LEASE)
}

fn replica(prefix: &str) -> Idempotency {
    replica_at(&redis_url(), prefix)
}

/// A replica behind a proxy of its own, connected and with its scripts
/// loaded (it claimed and released another commandId): from here on, each
/// request the proxy counts is one look at a commandId. A replica that looks
/// again is still waiting: the positive sign a test asserts on, where
/// "not finished after a sleep" would also pass for a replica that is only
/// slow to return.
async fn polled_replica(prefix: &str) -> (Idempotency, TcpProxy) {
    let proxy = TcpProxy::redis().await;
    let replica = replica_at(&proxy.url, prefix);
    let Found::Claimed { claim, .. } = tokio::time::timeout(
        Duration::from_secs(5),
        replica.acquire("warm-up", Fingerprint::of(&cmd("w")), &Halt::never()),
    )
    .await
    .expect("in time")
    .expect("claims") else {
        panic!("claims a fresh commandId")
    };
    claim.release().await;
    (replica, proxy)
}

/// Who holds the claim on `cmd`.
async fn claim_holder(prefix: &str) -> Option<String> {
    redis()
        .await
        .get(claim_key(prefix, "cmd"))
        .await
        .expect("get")
}

fn cmd(member: &str) -> Command {
    Command {
        command_id: "cmd".into(),
        app_id: "app".into(),
        chatroom_id: "1@chatroom".into(),
        member_wxid: member.into(),
        content: "hi".into(),
    }
}

fn record(member: &str, v3: &str) -> Record {
    Record::new(
        Fingerprint::of(&cmd(member)),
        CallOutcome {
            result: Ok(v3.to_owned()),
            attempts: 1,
        },
        gewe_friend_worker::outcome::Tries::default(),
    )
}

fn v3(record: &Record) -> String {
    record.outcome().result.clone().expect("a success")
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

async fn acquire<'a>(store: &'a Idempotency, member: &str) -> Found<'a> {
    tokio::time::timeout(
        Duration::from_secs(20),
        store.acquire("cmd", Fingerprint::of(&cmd(member)), &Halt::never()),
    )
    .await
    .expect("acquired in time")
    .expect("not interrupted")
}

#[tokio::test]
async fn a_second_replica_waits_for_the_first_and_gets_its_outcome_as_a_duplicate() {
    let prefix = prefix();
    let a = replica(&prefix);
    let (b, b_redis) = polled_replica(&prefix).await;
    let Found::Claimed {
        mut claim,
        stored: None,
    } = acquire(&a, "m").await
    else {
        panic!("A claims a fresh commandId");
    };
    // B must wait while A handles the command, not call GeWe too: it looks
    // again and again (a request is sent only after the last answer).
    let looks = b_redis.requests();
    let waiting = tokio::spawn(async move {
        match acquire(&b, "m").await {
            Found::Duplicate(record) => v3(&record),
            _ => panic!("B gets A's announced outcome"),
        }
    });
    b_redis.wait_for_requests(looks, 3).await;
    assert!(
        !waiting.is_finished(),
        "B waits while A holds the commandId"
    );
    assert_eq!(claim.store(&record("m", "v3_from_a")).await, Stored::Kept);
    // The second look from now on went to Redis after the store; B answered
    // by looking a third time.
    let looks = b_redis.requests();
    b_redis.wait_for_requests(looks, 3).await;
    assert!(
        !waiting.is_finished(),
        "stored but not yet announced: B still waits for A's event"
    );
    claim.published(&Signal::new()).await;
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("B is answered once A's event is confirmed")
        .expect("join");
    assert_eq!(got, "v3_from_a");
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn when_the_first_event_is_not_published_the_next_copy_announces_the_stored_outcome() {
    let prefix = prefix();
    let (a, b) = (replica(&prefix), replica(&prefix));
    let Found::Claimed { mut claim, .. } = acquire(&a, "m").await else {
        panic!("A claims");
    };
    assert_eq!(claim.store(&record("m", "v3_a")).await, Stored::Kept);
    // A's event was not confirmed: it lets go without announcing.
    claim.release().await;
    match acquire(&b, "m").await {
        Found::Claimed {
            claim,
            stored: Some(record),
        } => {
            assert_eq!(v3(&record), "v3_a", "B publishes A's answer, no new call");
            claim.published(&Signal::new()).await;
        }
        _ => panic!("B takes over the unannounced outcome"),
    }
    assert!(matches!(acquire(&a, "m").await, Found::Duplicate(_)));
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn a_command_id_reused_for_another_member_is_a_conflict_and_the_outcome_stays() {
    let prefix = prefix();
    let (a, b) = (replica(&prefix), replica(&prefix));
    let Found::Claimed { mut claim, .. } = acquire(&a, "member_a").await else {
        panic!("A claims");
    };
    assert_eq!(
        claim.store(&record("member_a", "v3_of_a")).await,
        Stored::Kept
    );
    claim.published(&Signal::new()).await;
    assert!(matches!(acquire(&b, "member_b").await, Found::Conflict));
    match acquire(&b, "member_a").await {
        Found::Duplicate(record) => assert_eq!(v3(&record), "v3_of_a"),
        _ => panic!("the original request still gets its outcome"),
    }
    // Also before the first outcome is announced.
    let Found::Claimed { mut claim, .. } = tokio::time::timeout(
        Duration::from_secs(5),
        a.acquire("other", Fingerprint::of(&cmd("x")), &Halt::never()),
    )
    .await
    .expect("in time")
    .expect("claims") else {
        panic!("claims")
    };
    let mut conn = redis().await;
    assert_eq!(claim.store(&record("x", "v3_x")).await, Stored::Kept);
    claim.release().await;
    assert!(matches!(
        b.acquire("other", Fingerprint::of(&cmd("y")), &Halt::never())
            .await,
        Ok(Found::Conflict)
    ));
    let holder: Option<String> = conn.get(claim_key(&prefix, "other")).await.expect("get");
    assert_eq!(holder, None, "a conflict leaves no claim behind");
    delete_keys(&prefix).await;
}

/// Leaves what every earlier version left in Redis under `prefix` (its
/// one boot marker), so a replica of this one reads their keys too.
async fn an_earlier_version_ran(prefix: &str) -> redis::aio::MultiplexedConnection {
    let mut conn = redis().await;
    let _: () = conn
        .set(format!("{prefix}:boot"), "an-earlier-version")
        .await
        .expect("set");
    conn
}

#[tokio::test]
async fn an_unreadable_stored_outcome_is_neither_republished_nor_called_again() {
    let prefix = prefix();
    let mut conn = an_earlier_version_ran(&prefix).await;
    let _: () = conn
        .hset_multiple(
            format!("{prefix}:rec:cmd"),
            &[("r", "{written by another version"), ("p", "1")],
        )
        .await
        .expect("hset");
    assert!(matches!(
        acquire(&replica(&prefix), "m").await,
        Found::Unreadable(_)
    ));
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn a_claim_taken_over_while_waiting_is_seen_before_the_request() {
    let prefix = prefix();
    let store = replica(&prefix);
    let Found::Claimed { claim, .. } = acquire(&store, "m").await else {
        panic!("claims");
    };
    // Another replica holds it now, as after our lease ran out.
    let claim_key = claim_key(&prefix, "cmd");
    let mut conn = redis().await;
    let _: () = conn
        .set_ex(&claim_key, "other-replica", 60)
        .await
        .expect("set");
    // Ready for a request of 2 s means the claim is renewed and ours; the
    // loss is noticed within a renewal period.
    let ready = eventually(Duration::from_secs(15), || async {
        match claim.ready(Duration::from_secs(2), &Halt::never()).await {
            Ok(()) => Err("the claim still counts as ours".to_owned()),
            Err(e) => Ok(e),
        }
    })
    .await;
    assert_eq!(ready, Interrupted::ClaimLost);
    let holder: Option<String> = conn.get(&claim_key).await.expect("get");
    assert_eq!(
        holder.as_deref(),
        Some("other-replica"),
        "their claim stays"
    );
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn a_request_waits_for_a_renewal_and_the_claim_is_given_up_before_its_lease_ends_when_redis_hangs()
 {
    let prefix = prefix();
    let proxy = TcpProxy::redis().await;
    let store = replica_at(&proxy.url, &prefix);
    let Found::Claimed { claim, .. } = acquire(&store, "m").await else {
        panic!("claims");
    };
    claim
        .ready(Duration::from_secs(1), &Halt::never())
        .await
        .expect("a fresh claim can send");
    proxy.set(Mode::Frozen);
    // A request as long as the whole lease can never be sent.
    let started = tokio::time::Instant::now();
    let gave_up = tokio::time::timeout(Duration::from_secs(20), claim.ready(LEASE, &Halt::never()))
        .await
        .expect("the claim is given up in time");
    assert_eq!(gave_up, Err(Interrupted::ClaimLost));
    // Given up while the lease still holds in Redis: no other replica can
    // have claimed the command yet.
    let left: i64 = redis()
        .await
        .pttl(claim_key(&prefix, "cmd"))
        .await
        .expect("pttl");
    assert!(left > 500, "claim given up with {left} ms of lease left");
    assert!(started.elapsed() < LEASE);
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn after_redis_lost_its_data_no_free_command_id_is_claimed_for_a_lease_and_holders_reassert()
{
    let prefix = prefix();
    let a = replica(&prefix);
    // Both replicas have seen Redis' boot marker (B in its warm-up).
    let Found::Claimed { mut claim, .. } = acquire(&a, "m").await else {
        panic!("A claims");
    };
    let (b, b_redis) = polled_replica(&prefix).await;
    let holder_a = claim_holder(&prefix).await.expect("A's claim");
    // Redis restarts empty: A's claim on `cmd` is gone (A renews it every
    // 3 s, so the commandId is free for a while).
    delete_keys(&prefix).await;
    let looks = b_redis.requests();
    let waiting = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let found = acquire(&b, "m").await;
        (matches!(found, Found::Duplicate(_)), started.elapsed())
    });
    // B looks again and again, and claims nothing: only A, re-asserting,
    // may hold the commandId.
    b_redis.wait_for_requests(looks, 3).await;
    let holder = claim_holder(&prefix).await;
    assert!(
        holder.is_none() || holder.as_ref() == Some(&holder_a),
        "B took the commandId A may still be calling GeWe for: {holder:?}"
    );
    assert!(!waiting.is_finished(), "B waits");
    // A's renewal re-asserts the claim; A finishes as usual.
    eventually(WAIT, || async {
        let holder = claim_holder(&prefix).await;
        done_or(holder.as_ref() == Some(&holder_a), || {
            format!("A did not re-assert its claim: {holder:?}")
        })
    })
    .await;
    assert_eq!(claim.store(&record("m", "v3_a")).await, Stored::Kept);
    claim.published(&Signal::new()).await;
    let (duplicate, _) = waiting.await.expect("join");
    assert!(duplicate, "B gets A's outcome, no second call");
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn an_outcome_stored_before_the_buckets_is_still_republished() {
    // Written by an earlier version (one JSON hash per commandId): read
    // until it expires, one dedupe.window after the upgrade.
    let prefix = prefix();
    let mut conn = an_earlier_version_ran(&prefix).await;
    let stored = record("m", "v3_020b3826fd03@stranger");
    let json = serde_json::to_string(&stored).expect("encodes");
    let _: () = conn
        .hset_multiple(
            format!("{prefix}:rec:cmd"),
            &[("r", json.as_str()), ("p", "1")],
        )
        .await
        .expect("hset");
    match acquire(&replica(&prefix), "m").await {
        Found::Duplicate(found) => assert_eq!(found, stored),
        _ => panic!("the legacy outcome is a duplicate"),
    }
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn in_a_rolling_upgrade_a_claim_of_either_version_keeps_the_other_out() {
    let prefix = prefix();
    let mut conn = an_earlier_version_ran(&prefix).await;
    // A replica of an earlier version holds the commandId.
    let old_claim = format!("{prefix}:claim:cmd");
    let _: () = conn
        .set_ex(&old_claim, "earlier-replica", 60)
        .await
        .expect("set");
    let (b, b_redis) = polled_replica(&prefix).await;
    let looks = b_redis.requests();
    let waiting =
        tokio::spawn(async move { matches!(acquire(&b, "m").await, Found::Claimed { .. }) });
    b_redis.wait_for_requests(looks, 3).await;
    assert!(
        !waiting.is_finished(),
        "this version waits for the earlier one"
    );
    assert_eq!(claim_holder(&prefix).await, None);
    // It lets go; this version claims, where both versions look.
    let _: () = conn.del(&old_claim).await.expect("del");
    assert!(waiting.await.expect("join"), "claimed once free");
    let holder = claim_holder(&prefix).await.expect("claimed");
    let old: Option<String> = conn.get(&old_claim).await.expect("get");
    assert_eq!(old, Some(holder), "an earlier replica sees the claim too");
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn without_an_earlier_version_only_the_commands_own_slot_is_touched() {
    let prefix = prefix();
    let a = replica(&prefix);
    let Found::Claimed { claim, .. } = acquire(&a, "m").await else {
        panic!("claims");
    };
    let mut conn = redis().await;
    let old: Option<String> = conn.get(format!("{prefix}:claim:cmd")).await.expect("get");
    assert_eq!(old, None, "no claim where earlier versions kept it");
    assert!(claim_holder(&prefix).await.is_some());
    claim.release().await;
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn a_late_answer_of_a_holder_whose_lease_lapsed_is_the_one_kept() {
    let prefix = prefix();
    let (a, b, c) = (replica(&prefix), replica(&prefix), replica(&prefix));
    let Found::Claimed {
        claim: mut late, ..
    } = acquire(&a, "m").await
    else {
        panic!("A claims");
    };
    // A's lease lapses (its renewals stopped getting through) and B claims.
    // A renews every 3 s and would re-assert a claim it finds gone, so B
    // tries right after each removal until it holds the commandId.
    let mut conn = redis().await;
    let mut taken = None;
    let never = Halt::never();
    for _ in 0..10 {
        let _: () = conn.del(claim_key(&prefix, "cmd")).await.expect("del");
        let attempt = b.acquire("cmd", Fingerprint::of(&cmd("m")), &never);
        if let Ok(Ok(Found::Claimed { claim, stored })) =
            tokio::time::timeout(Duration::from_millis(500), attempt).await
        {
            assert!(stored.is_none(), "nothing stored yet");
            taken = Some(claim);
            break;
        }
    }
    let mut taken = taken.expect("B claims the lapsed commandId");
    // A's GeWe answer arrives after B looked: it is stored (the first
    // answer wins), though the claim is no longer A's.
    let first = record("m", "v3_a");
    assert_eq!(late.store(&first).await, Stored::Lost);
    // B's store sees it, in the buckets written since B's claim.
    assert_eq!(taken.store(&record("m", "v3_b")).await, Stored::Lost);
    taken.release().await;
    match acquire(&c, "m").await {
        Found::Claimed {
            claim,
            stored: Some(found),
        } => {
            assert_eq!(found, first);
            claim.release().await;
        }
        _ => panic!("the first answer is found, unpublished"),
    }
    delete_keys(&prefix).await;
}
