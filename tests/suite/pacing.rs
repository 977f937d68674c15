//! Account safety: GeWe calls are paced per appId (in-process pacing; the
//! Redis variant is in resilience.rs), as GeWe sees them arrive.

use std::time::Duration;

use crate::common::{fake_gewe::FakeGewe, *};
use serde_json::Value;

#[tokio::test]
async fn calls_for_one_account_are_spaced_by_the_interval() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.pacing.per_app_concurrency = 1;
    settings.pacing.per_app_min_interval = Duration::from_millis(200);
    let mut app = spawn_app(settings).await;
    let account = unique("busy-account");
    for i in 0..10 {
        app.publish(&command(&unique(&format!("one-{i}")), &account))
            .await;
    }
    app.events(10).await;
    gewe.assert_paced(&account, 10, Duration::from_millis(200));
    app.stop().await;
}

#[tokio::test]
async fn a_busy_account_does_not_hold_up_the_others() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.pacing.per_app_concurrency = 1;
    settings.pacing.per_app_min_interval = Duration::from_millis(300);
    let mut app = spawn_app(settings).await;
    // The busy account's backlog is published first, the others after it.
    for i in 0..6 {
        app.publish(&command(&unique(&format!("busy-{i}")), "busy"))
            .await;
    }
    for other in ["a", "b", "c", "d"] {
        app.publish(&command(&unique(&format!("other-{other}")), other))
            .await;
    }
    let order: Vec<String> = app
        .events(10)
        .await
        .iter()
        .map(|e| e.body["appId"].as_str().unwrap_or("").to_owned())
        .collect();
    let last_other = order.iter().rposition(|a| a != "busy").expect("others");
    let busy_before = order[..last_other].iter().filter(|a| *a == "busy").count();
    assert!(
        busy_before <= 2,
        "the other accounts finished while the busy one waited: {order:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn concurrency_one_holds_under_retries() {
    // Each command's first call fails with 503; each answer takes 100 ms.
    fn flaky(member: &str, nth: usize) -> (axum::http::StatusCode, Value) {
        if nth == 1 {
            fake_gewe::unavailable(member, nth)
        } else {
            fake_gewe::success(member, nth)
        }
    }
    let gewe = FakeGewe::start(Duration::from_millis(100), flaky).await;
    let mut settings = test_settings(&gewe.url);
    settings.pacing.per_app_concurrency = 1;
    settings.pacing.per_app_min_interval = Duration::ZERO;
    settings.retry.initial_delay = Duration::from_millis(1);
    settings.retry.max_delay = Duration::from_millis(1);
    let mut app = spawn_app(settings).await;
    let account = unique("single");
    for i in 0..4 {
        app.publish(&command(&unique(&format!("conc-{i}")), &account))
            .await;
    }
    let events = app.events(4).await;
    assert!(events.iter().all(|e| e.status() == "succeeded"));
    assert_eq!(
        events.iter().map(|e| e.attempts()).sum::<u64>(),
        8,
        "each needed a retry"
    );
    assert_eq!(gewe.calls().len(), 8);
    assert_eq!(
        gewe.max_in_flight(),
        1,
        "never two calls of one account at once"
    );
    app.stop().await;
}
