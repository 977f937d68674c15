//! Nothing is held past `amqp.max_hold`, tested the way production fails:
//! RabbitMQ's `consumer_timeout` is lowered at run time to 20 s (it is
//! 30 min by default, and checked once a minute), then a paced backlog for
//! one account and a GeWe outage each outlast it by more than a minute.
//! Held in memory, their deliveries would stay unacknowledged past the
//! timeout and the broker would close the worker's channel; deferred
//! through the broker, every command gets its one event and the channel
//! stays open.
//!
//! Changing the broker's setting affects every channel opened meanwhile,
//! so this is the only test in its binary and it holds the machine-wide
//! broker lock exclusively; the setting is restored even when it fails.

mod common;

use std::{collections::HashSet, time::Duration};

use axum::http::StatusCode;
use common::{delay_queues::shorten_ladder, fake_gewe::FakeGewe, *};
use serde_json::{Value, json};

/// The broker's `consumer_timeout` during the test.
const CONSUMER_TIMEOUT_MS: u64 = 20_000;

/// Restores the broker's `consumer_timeout` as it was.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let expr = match self.0.trim() {
            undefined if undefined.contains("undefined") => {
                "application:unset_env(rabbit, consumer_timeout).".to_owned()
            }
            before => {
                let value: String = before.chars().filter(char::is_ascii_digit).collect();
                format!("application:set_env(rabbit, consumer_timeout, {value}).")
            }
        };
        // Not the asserting helper: a panic while unwinding would abort.
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["eval", &expr])
            .status();
    }
}

fn lower_consumer_timeout() -> Restore {
    let before = broker::rabbitmqctl(&["eval", "application:get_env(rabbit, consumer_timeout)."]);
    let restore = Restore(before);
    broker::rabbitmqctl(&[
        "eval",
        &format!("application:set_env(rabbit, consumer_timeout, {CONSUMER_TIMEOUT_MS})."),
    ]);
    restore
}

/// GeWe down while the flag says so.
static DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn down_then_up(member: &str, nth: usize) -> (StatusCode, Value) {
    if DOWN.load(std::sync::atomic::Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "down"}))
    } else {
        fake_gewe::success(member, nth)
    }
}

async fn every_event(app: &mut TestApp, ids: &HashSet<String>, within: Duration) -> Vec<Received> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while events.len() < ids.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match app.try_next_event(left).await {
            Some(e) => events.push(e),
            None => panic!("{} of {} events within {within:?}", events.len(), ids.len()),
        }
    }
    let seen: HashSet<String> = events
        .iter()
        .map(|e| e.body["commandId"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(&seen, ids, "one event per command");
    events
}

#[tokio::test]
async fn a_paced_backlog_and_a_gewe_outage_longer_than_consumer_timeout_lose_no_channel() {
    common::lock::broker_exclusive();
    let _restore = lower_consumer_timeout();

    // A paced backlog: 6 commands for one account, 15 s apart (75 s).
    let paced_gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut paced = test_settings(&paced_gewe.url);
    paced.pacing.per_app_min_interval = Duration::from_secs(15);
    paced.amqp.max_hold = Duration::from_secs(10);
    // GeWe down for 80 s under 12 commands: the breaker opens.
    let down_gewe = FakeGewe::start(Duration::ZERO, down_then_up).await;
    let mut outage = test_settings(&down_gewe.url);
    outage.amqp.max_hold = Duration::from_secs(10);
    outage.breaker.failure_threshold = 3;
    outage.breaker.cooldown = Duration::from_secs(5);
    outage.retry.max_attempts = 2;

    let mut paced_app = spawn_app(paced.clone()).await;
    let mut outage_app = spawn_app(outage.clone()).await;
    for (app, settings) in [(&paced_app, &paced), (&outage_app, &outage)] {
        wait_for_readyz(app.ops_addr, 200, "ready").await;
        // Deferred commands come back after 5 s instead of a minute.
        shorten_ladder(&app.channel, settings, Duration::from_secs(5)).await;
    }
    let account = unique("wx-backlog");
    let paced_ids: HashSet<String> = (0..6).map(|i| format!("{account}-{i}")).collect();
    for id in &paced_ids {
        paced_app.publish(&command(id, &account)).await;
    }
    let outage_ids: HashSet<String> = (0..12).map(|i| unique(&format!("outage-{i}"))).collect();
    for id in &outage_ids {
        outage_app.publish(&command(id, &unique("wx-outage"))).await;
    }
    let recover = tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(80)).await;
        DOWN.store(false, std::sync::atomic::Ordering::SeqCst);
    });

    let within = Duration::from_secs(240);
    let (paced_events, outage_events) = tokio::join!(
        every_event(&mut paced_app, &paced_ids, within),
        every_event(&mut outage_app, &outage_ids, within),
    );
    recover.await.expect("join");
    assert!(paced_events.iter().all(|e| e.status() == "succeeded"));
    paced_gewe.assert_paced(&account, 6, Duration::from_secs(15));
    assert!(
        outage_events
            .iter()
            .any(|e| e.body["deferred"].as_u64().unwrap_or(0) > 0),
        "commands waited out the outage in the deferral ladder"
    );
    for app in [&paced_app, &outage_app] {
        assert_eq!(
            metric(app.ops_addr, "broker_reconnects_total", "").await,
            0.0,
            "the broker never closed the worker's channel"
        );
        assert_eq!(
            metric(app.ops_addr, "commands_requeued_total", "").await,
            0.0
        );
        assert!(metric(app.ops_addr, "commands_deferred_total", "").await > 0.0);
    }
    assert!(metric(outage_app.ops_addr, "commands_deferred_total", "breaker").await > 0.0);
    assert!(metric(paced_app.ops_addr, "commands_deferred_total", "pacing").await > 0.0);
    for app in [&paced_app, &outage_app] {
        let dead = delay_queues::peek(&app.connection, &app.settings.amqp.dead_letter_queue).await;
        assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    }
    paced_app.stop().await;
    outage_app.stop().await;
}
