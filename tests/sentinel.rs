//! Redis run for availability with Sentinel: the master is killed with
//! `kill -9` while two worker replicas have friend requests in flight, and
//! the workers follow the failover to the promoted replica; an account's
//! daily budget, spent partly before the kill, holds after it.
//!
//! Its own binary: it starts a master, two replicas and three sentinels on
//! fixed ports (27311-27330, held under `/tmp/gewe-sentinel.lock`) and
//! takes them down at the end, also when it fails
//! ([`common::sentinel::SentinelSet`]). Two replicas, not one: every write
//! that guards a friend request waits for a replica's acknowledgement
//! (`WAIT 1`), so after the failover the new master needs a replica of its
//! own, as a production set of three Redis servers has.

mod common;

use std::time::Duration;

use common::{fake_gewe::FakeGewe, sentinel::SentinelSet, *};

/// Per-account pacing during the test.
const INTERVAL: Duration = Duration::from_millis(300);
const APPS: usize = 6;
const PER_APP: usize = 8;
/// The daily limit of the one account whose budget must survive the
/// failover: it spends part of it on the old master, the rest after.
const LIMIT: usize = 3;
/// Its commands sent before the kill (each spends a unit)...
const LIMITED_BEFORE: usize = 2;
/// ...and after the failover (only `LIMIT - LIMITED_BEFORE` may go out).
const LIMITED_AFTER: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_run_is_followed_and_nobody_is_called_twice() {
    let mut set = SentinelSet::start(2).await;
    let gewe = FakeGewe::start(Duration::from_millis(150), fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.redis.sentinels = set
        .sentinel_addresses()
        .split(',')
        .map(str::to_owned)
        .collect();
    settings.pacing.per_app_min_interval = INTERVAL;
    settings.pacing.per_app_concurrency = 1;
    let limited = unique("limited");
    settings.accounts.overrides.insert(
        limited.clone(),
        gewe_friend_worker::config::AccountOverride {
            daily_limit: Some(LIMIT as u32),
            ..Default::default()
        },
    );
    let mut listener = spawn_listener(&settings).await;
    let (stop_a, a, ops_a) = start_worker(&settings).await;
    let (stop_b, b, ops_b) = start_worker(&settings).await;
    for ops in [ops_a, ops_b] {
        wait_for_readyz(ops, 200, "ready").await;
    }

    // The limited account spends part of its day on the old master.
    let mut limited_ids = Vec::new();
    for n in 0..LIMITED_BEFORE {
        let id = unique(&format!("limited-{n}"));
        listener.publish(&command(&id, &limited)).await;
        limited_ids.push(id);
    }
    let apps: Vec<String> = (0..APPS).map(|_| unique("app")).collect();
    let mut ids = Vec::new();
    for n in 0..PER_APP {
        for app in &apps {
            let id = unique(&format!("failover-{n}"));
            let body = command(&id, app);
            // Every command twice: the copies meet on the claims in Redis.
            listener.publish(&body).await;
            listener.publish(&body).await;
            ids.push(id);
        }
    }
    eventually(WAIT, || async {
        let calls = gewe.calls().len();
        let spent = gewe.arrivals(&limited).len();
        done_or(calls >= 12 && spent == LIMITED_BEFORE, || {
            format!("only {calls} calls started, {spent} of the limited account")
        })
    })
    .await;

    let old = set.master_port().await.expect("a master");
    set.kill_server(old);
    let killed = std::time::Instant::now();
    for ops in [ops_a, ops_b] {
        wait_for_readyz(ops, 503, "redis unavailable").await;
    }
    let calls_at_outage = gewe.calls().len();
    eventually(Duration::from_secs(30), || async {
        let now = set.master_port().await?;
        done_or(now != old, || format!("the sentinels still name {old}"))
    })
    .await;
    let promoted = killed.elapsed();
    for ops in [ops_a, ops_b] {
        wait_for_readyz(ops, 200, "ready").await;
    }
    for n in 0..LIMITED_AFTER {
        let id = unique(&format!("limited-after-{n}"));
        listener.publish(&command(&id, &limited)).await;
        limited_ids.push(id);
    }
    // For BENCHMARKS.md (`-- --nocapture`).
    eprintln!(
        "sentinel failover: the sentinels named a new master {promoted:?} after the kill, both workers were ready {:?} after it",
        killed.elapsed()
    );

    succeeded_once_each(
        &mut listener,
        &ids,
        (&limited_ids, LIMIT),
        Duration::from_secs(90),
    )
    .await;
    let extra = listener.try_next_event(Duration::from_secs(1)).await;
    assert!(extra.is_none(), "an extra event: {extra:?}");
    // The day's count lived through the failover: the new master knew the
    // units spent on the old one, so only the rest of the limit went out,
    // and every other command of that account waits in the deferral ladder.
    eventually(WAIT, || async {
        let waiting = delay_queues::deferred_copies(&listener.connection, &settings).await;
        let want = LIMITED_BEFORE + LIMITED_AFTER - LIMIT;
        done_or(waiting.len() == want, || {
            format!("{} of {want} copies deferred", waiting.len())
        })
    })
    .await;
    assert_eq!(
        gewe.arrivals(&limited).len(),
        LIMIT,
        "the daily limit held across the failover"
    );
    assert!(
        gewe.called_twice().is_empty(),
        "called twice: {:?}",
        gewe.called_twice()
    );
    assert_eq!(
        gewe.calls().len(),
        ids.len() + LIMIT,
        "one call per command, within the limit"
    );
    assert!(
        calls_at_outage < ids.len(),
        "the failover happened while commands were in flight ({calls_at_outage} calls made by then)"
    );
    for app in &apps {
        gewe.assert_paced(app, PER_APP, INTERVAL);
    }

    stop_a.cancel();
    stop_b.cancel();
    a.await.expect("join").expect("clean exit");
    b.await.expect("join").expect("clean exit");
    listener.stop().await;
    drop(set);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_no_replica_acknowledged_is_not_relied_on() {
    use gewe_friend_worker::{
        config::RedisSettings,
        redis_client::{Durable, RedisClient, RedisError},
    };
    use redis::Script;

    // A master without replicas: nothing can acknowledge a write.
    let set = SentinelSet::start(0).await;
    let settings = RedisSettings {
        sentinels: set
            .sentinel_addresses()
            .split(',')
            .map(str::to_owned)
            .collect(),
        ..Default::default()
    };
    let client = RedisClient::from_settings(&settings)
        .expect("valid")
        .expect("configured");
    let key = unique("durable");
    let incr = Script::new("return redis.call('INCR', KEYS[1])");
    let count = async || -> i64 {
        let port = set.master_port().await.expect("a master");
        let value = common::sentinel::query(port, redis::cmd("GET").arg(&key))
            .await
            .expect("get");
        redis::from_redis_value::<Option<i64>>(&value)
            .expect("a number")
            .unwrap_or(0)
    };

    let first = client
        .run_durable::<i64>(Durable::new(&incr).key(&key))
        .await;
    assert!(
        matches!(first, Err(RedisError::NotReplicated { .. })),
        "{first:?}"
    );
    assert_eq!(
        count().await,
        1,
        "the script ran; only its durability is in doubt"
    );
    assert!(
        client.unhealthy_reason().is_some(),
        "not relied on: not ready"
    );

    // A server that does not know the script (as a promoted replica): it is
    // loaded and sent again, and runs once.
    let port = set.master_port().await.expect("a master");
    common::sentinel::query(port, &redis::cmd("SCRIPT").arg("FLUSH").to_owned())
        .await
        .expect("script flush");
    let again = client
        .run_durable::<i64>(Durable::new(&incr).key(&key))
        .await;
    assert!(
        matches!(again, Err(RedisError::NotReplicated { .. })),
        "{again:?}"
    );
    assert_eq!(count().await, 2);

    // The health check says why the worker holds its commands.
    let client = std::sync::Arc::new(client);
    let stop = tokio_util::sync::CancellationToken::new();
    let probe = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move { client.probe(stop).await }
    });
    eventually(WAIT, || async {
        let reason = client.unhealthy_reason();
        match &reason {
            Some(r) if r.contains("no replica connected") => Ok(()),
            _ => Err(format!("unhealthy_reason {reason:?}")),
        }
    })
    .await;
    stop.cancel();
    probe.await.expect("probe ends");
    drop(set);
}
