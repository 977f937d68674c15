//! Nothing lost, nothing doubled: circuit breaker, shared state in Redis
//! across replicas and restarts, and what happens when Redis is gone.

use std::time::Duration;

use crate::common::{fake_gewe::FakeGewe, *};
use gewe_friend_worker::gewe::ADD_MEMBER_PATH;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

#[tokio::test]
async fn the_breaker_keeps_the_backlog_in_the_queue_until_gewe_is_back() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&gewe)
        .await;
    let mut settings = test_settings(&gewe.uri());
    settings.amqp.prefetch = 2;
    settings.retry.max_attempts = 1;
    settings.breaker.failure_threshold = 2;
    settings.breaker.cooldown = Duration::from_secs(3);
    let mut app = spawn_app(settings).await;
    let total = 10;
    for i in 0..total {
        app.publish(&command(&format!("br-{i}"), &format!("app-{i}")))
            .await;
    }
    let mut failed = 0;
    for e in app.events(2).await {
        assert_eq!(e.kind(), Some("upstream_unavailable"));
        failed += 1;
    }
    // Open: readiness says so, and GeWe is back before the cooldown ends.
    wait_for_readyz(app.ops_addr, 503, "circuit breaker").await;
    gewe.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_back")))
        .mount(&gewe)
        .await;
    let mut succeeded = 0;
    while failed + succeeded < total {
        let e = app.next_event().await;
        match e.status() {
            "succeeded" => succeeded += 1,
            _ => {
                assert_eq!(e.kind(), Some("upstream_unavailable"));
                failed += 1;
            }
        }
    }
    // At most threshold + (prefetch - 1) commands failed before it opened;
    // the rest of the backlog waited and drained with successes.
    assert!(failed <= 3, "{failed} failed events");
    assert!(succeeded >= total - 3);
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    app.stop().await;
}

#[tokio::test]
async fn while_gewe_is_down_retries_wait_at_the_breaker_and_at_most_threshold_plus_prefetch_fail() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::unavailable).await;
    let mut settings = test_settings(&gewe.url);
    settings.amqp.prefetch = 4;
    settings.retry.max_attempts = 2;
    settings.breaker.failure_threshold = 3;
    settings.breaker.cooldown = Duration::from_millis(300);
    let mut app = spawn_app(settings).await;
    let total = 20;
    for i in 0..total {
        app.publish(&command(&unique(&format!("gate-{i}")), &format!("app-{i}")))
            .await;
    }
    // GeWe stays down for many cooldowns: each one lets a probe through,
    // and a probe that fails must not fail its command.
    eventually(WAIT, || async {
        let calls = gewe.calls().len();
        done_or(calls >= 20, || {
            format!("probes stopped after {calls} calls")
        })
    })
    .await;
    gewe.answer_with(fake_gewe::success);
    let events = app.events(total).await;
    let failed = events.iter().filter(|e| e.status() == "failed").count();
    for e in events.iter().filter(|e| e.status() == "failed") {
        assert_eq!(e.kind(), Some("upstream_unavailable"), "{}", e.body);
    }
    // threshold 3 + prefetch 4: commands admitted before the breaker opened
    // may fail; every later attempt, retries included, waited.
    assert!(
        failed <= 3 + 4,
        "{failed} of {total} failed while GeWe was down"
    );
    assert_eq!(
        total - failed,
        events.iter().filter(|e| e.status() == "succeeded").count()
    );
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    app.stop().await;
}

#[tokio::test]
async fn with_redis_a_second_replica_and_a_restart_do_not_call_gewe_again() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_shared")))
        .expect(1)
        .mount(&gewe)
        .await;
    let mut settings = test_settings(&gewe.uri());
    settings.redis.url = Some(redis_url());
    let id = unique("redis-dup");
    let mut app = spawn_app(settings.clone()).await;
    app.publish(&command(&id, "app-r")).await;
    let first = app.next_event().await;
    assert_eq!(first.body["v3"], "v3_shared");
    assert!(first.body.get("duplicate").is_none());

    // The first worker stops (a restart); a fresh one with empty memory
    // takes over the queue and sees the same commandId again.
    let first_worker = app.worker.take().expect("worker");
    app.stop.cancel();
    first_worker.await.expect("join").expect("clean exit");
    let (stop, second, _) = start_worker(&settings).await;
    app.publish(&command(&id, "app-r")).await;
    let again = app.next_event().await;
    assert_eq!(again.body["v3"], "v3_shared");
    assert_eq!(again.body["duplicate"], true);
    stop.cancel();
    second.await.expect("join").expect("clean exit");
    app.stop().await;
}

#[tokio::test]
async fn two_replicas_with_redis_keep_one_interval_per_account() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.redis.url = Some(redis_url());
    settings.pacing.per_app_min_interval = Duration::from_millis(300);
    let account = unique("shared-account");
    let mut app = spawn_app(settings.clone()).await;
    let (stop, second, _) = start_worker(&settings).await;
    let n = 6;
    for i in 0..n {
        app.publish(&command(&unique(&format!("p{i}")), &account))
            .await;
    }
    app.events(n).await;
    // Reservations are 300 ms apart on Redis' clock; each replica then
    // waits on its own. Without shared pacing the two replicas would call
    // together.
    gewe.assert_paced(&account, n, Duration::from_millis(300));
    stop.cancel();
    second.await.expect("join").expect("clean exit");
    app.stop().await;
}

#[tokio::test]
async fn without_redis_no_gewe_call_is_made_and_the_command_waits_in_the_queue() {
    // Alone: the Redis errors counted are this worker's.
    alone(async {
        let gewe = gewe_never_called().await;
        let mut settings = test_settings(&gewe.uri());
        settings.redis.url = Some("redis://127.0.0.1:1/0".to_owned());
        let mut app = spawn_app(settings).await;
        let before = metric(app.ops_addr, "redis_errors_total", "").await;
        let id = unique("no-redis");
        app.publish(&command(&id, "app-x")).await;
        // The worker holds the command (unacked) while Redis is down: requeues
        // would count towards the delivery limit and end in the dead-letter queue.
        wait_for_metric(
            app.ops_addr,
            "redis_errors_total",
            "",
            before + 2.0,
            "the worker reports Redis as unavailable, again and again",
        )
        .await;
        app.stop_worker().await;
        // Still in the queue, unacknowledged and unanswered.
        let body = app.command_left_in_queue().await;
        assert_eq!(body["commandId"], id.as_str());
        app.stop().await;
    })
    .await;
}
