//! Lost broker sessions release their work: the deliveries of a dead
//! session stop waiting (the broker has them back), calls already sent
//! finish and are not repeated, and no more than `amqp.prefetch` commands
//! are ever in flight, however often the connection drops. Each test closes
//! only its own worker's connection.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::common::{broker::*, fake_gewe::FakeGewe, process::*, tcp_proxy::TcpProxy, *};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_connection_drops_in_ten_seconds_keep_calls_within_prefetch_and_repeat_none() {
    // Alone: the commands in flight and the publish failures are this worker's.
    alone(async {
        let gewe = FakeGewe::start(Duration::from_secs(1), fake_gewe::success).await;
        let mut settings = test_settings(&gewe.url);
        settings.amqp.prefetch = 8;
        settings.gewe.timeout = Duration::from_secs(10);
        let mut listener = spawn_listener(&settings).await;
        // The worker reaches the broker through a proxy that drops its
        // connection at will, as a flapping network would.
        let proxy = TcpProxy::to(&settings.amqp.url).await;
        let mut through_proxy = settings.clone();
        through_proxy.amqp.url = proxy.url.clone();
        let unconfirmed_before = publish_failures();
        let (stop, worker, ops) = start_worker(&through_proxy).await;
        // The worker's own count of commands in flight, sampled all along (no
        // other in-process worker runs meanwhile: [`alone`]).
        let most = Arc::new(Mutex::new(0.0f64));
        let done = CancellationToken::new();
        let sampling = tokio::spawn({
            let (most, done) = (most.clone(), done.clone());
            async move {
                while !done.is_cancelled() {
                    let now = metric(ops, "commands_in_flight", "").await;
                    {
                        let mut most = most.lock().expect("lock");
                        *most = most.max(now);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        let ids: Vec<String> = (0..80).map(|i| unique(&format!("flap-{i}"))).collect();
        for (i, id) in ids.iter().enumerate() {
            listener
                .publish(&command(id, &format!("app-{}", i % 8)))
                .await;
        }
        let mut unmarked: HashMap<String, usize> = HashMap::new();
        let count = |unmarked: &mut HashMap<String, usize>, e: Received| {
            assert_eq!(e.status(), "succeeded", "{}", e.body);
            if e.body["duplicate"] != true {
                *unmarked
                    .entry(e.body["commandId"].as_str().unwrap_or("").to_owned())
                    .or_default() += 1;
            }
        };
        // Ten drops, one a second, while the commands are being handled.
        let first = listener.next_event().await;
        count(&mut unmarked, first);
        for _ in 0..10 {
            proxy.reset();
            let until = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Some(e) = listener
                .try_next_event(until.saturating_duration_since(tokio::time::Instant::now()))
                .await
            {
                count(&mut unmarked, e);
            }
        }
        let all = tokio::time::timeout(Duration::from_secs(60), async {
            while unmarked.len() < ids.len() {
                if let Some(e) = listener.try_next_event(Duration::from_millis(500)).await {
                    count(&mut unmarked, e);
                }
            }
        })
        .await;
        assert!(
            all.is_ok(),
            "only {} of {} commands got their event",
            unmarked.len(),
            ids.len()
        );
        done.cancel();
        sampling.await.expect("sampling");
        // Stop the worker and take whatever else it published.
        stop.cancel();
        worker.await.expect("join").expect("clean exit");
        while let Some(e) = listener.try_next_event(Duration::from_millis(500)).await {
            count(&mut unmarked, e);
        }
        assert_eq!(
            unmarked.len(),
            ids.len(),
            "every command has an unmarked event"
        );
        // Events whose confirm was lost with a dropped connection: the broker
        // may have taken them, but the worker cannot know, so it lets the
        // redelivery publish unmarked (contract §4: the first *confirmed* event
        // is the unmarked one). Read from this process's recorder: the worker's
        // ops endpoint is gone with it.
        let unconfirmed = publish_failures() - unconfirmed_before;
        let extra: usize = unmarked.values().map(|n| n - 1).sum();
        assert!(
            extra as f64 <= unconfirmed,
            "{extra} extra unmarked events, but only {unconfirmed} events went unconfirmed"
        );
        assert!(
            gewe.called_twice().is_empty(),
            "called twice: {:?}",
            gewe.called_twice()
        );
        assert!(
            gewe.max_in_flight() <= 8,
            "{} GeWe calls in flight at once with prefetch 8",
            gewe.max_in_flight()
        );
        let most = *most.lock().expect("lock");
        assert!(
            most <= 8.0,
            "{most} commands in flight at once with prefetch 8"
        );
        listener.stop().await;
    })
    .await;
}

/// `results_publish_failures_total` as this process's recorder has it.
fn publish_failures() -> f64 {
    gewe_friend_worker::meters::recorder()
        .expect("recorder")
        .render()
        .lines()
        .filter(|l| l.starts_with("results_publish_failures_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn deliveries_of_a_lost_session_stop_waiting_at_the_breaker() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::unavailable).await;
    let mut settings = test_settings(&gewe.url);
    settings.amqp.prefetch = 4;
    let mut listener = spawn_listener(&settings).await;
    let mut cmd = worker_command(&settings, &gewe.url);
    cmd.env("GEWE_WORKER__RETRY__MAX_ATTEMPTS", "1")
        .env("GEWE_WORKER__BREAKER__FAILURE_THRESHOLD", "1")
        .env("GEWE_WORKER__BREAKER__COOLDOWN", "6s");
    let mut worker = spawn_worker(cmd).await;
    let ops = worker.ops;
    let total = 12;
    for i in 0..total {
        listener
            .publish(&command(&unique(&format!("held-{i}")), &format!("app-{i}")))
            .await;
    }
    // The first failure opens the breaker; the next commands wait at it.
    let first = listener.next_event().await;
    assert_eq!(first.kind(), Some("upstream_unavailable"));
    let queue = settings.amqp.command_queue.clone();
    let mut most = 0.0f64;
    for round in 1..=3 {
        assert_eq!(close_worker_connection(&queue).await, 1);
        wait_for_metric(
            ops,
            "broker_reconnects_total",
            "",
            f64::from(round),
            "the worker reconnects",
        )
        .await;
        for _ in 0..10 {
            most = most.max(metric(ops, "commands_in_flight", "").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        most <= 4.0,
        "{most} commands in flight with prefetch 4: a lost session's waits did not end"
    );
    // GeWe is back: the probe after the cooldown closes the breaker and the
    // rest drain as successes.
    gewe.answer_with(fake_gewe::success);
    let mut seen = std::collections::HashSet::new();
    seen.insert(first.body["commandId"].as_str().unwrap_or("").to_owned());
    while seen.len() < total {
        let e = listener.next_event().await;
        seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }
    worker.child.start_kill().expect("kill");
    let _ = worker.child.wait().await;
    listener.stop().await;
}
