//! Account safety: GeWe calls are paced per appId (in-process pacing; the
//! Redis variant is in resilience.rs).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{fake_gewe::FakeGewe, *};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
use serde_json::Value;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::method};

type Calls = Arc<Mutex<Vec<(String, Instant)>>>;

/// Records (memberWxid, arrival) and answers by how often that member was
/// asked for before (1 for the first call).
struct Recorder {
    calls: Calls,
    respond: fn(usize) -> ResponseTemplate,
}

impl Respond for Recorder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let member = body["memberWxid"].as_str().unwrap_or("").to_owned();
        let mut calls = self.calls.lock().expect("lock");
        calls.push((member.clone(), Instant::now()));
        let nth = calls.iter().filter(|(m, _)| *m == member).count();
        (self.respond)(nth)
    }
}

async fn recording_gewe(respond: fn(usize) -> ResponseTemplate) -> (MockServer, Calls) {
    let gewe = MockServer::start().await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .respond_with(Recorder {
            calls: calls.clone(),
            respond,
        })
        .mount(&gewe)
        .await;
    (gewe, calls)
}

fn ok(_: usize) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(gewe_ok("v3_paced"))
}

#[tokio::test]
async fn calls_for_one_account_are_spaced_by_the_interval() {
    let (gewe, _) = recording_gewe(ok).await;
    let mut settings = test_settings(&gewe.uri());
    settings.pacing.per_app_concurrency = 1;
    settings.pacing.per_app_min_interval = Duration::from_millis(200);
    let mut app = spawn_app(settings).await;
    let account = unique("busy-account");
    for i in 0..10 {
        app.publish(&command(&unique(&format!("one-{i}")), &account))
            .await;
    }
    app.events(10).await;
    // When the worker started each call, as it logs it: what pacing
    // controls, free of the mock's arrival jitter.
    let starts = logs::call_starts(&account);
    assert_eq!(starts.len(), 10);
    for pair in starts.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(200),
            "calls started {:?} apart",
            pair[1] - pair[0]
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_busy_account_does_not_hold_up_the_others() {
    let (gewe, _) = recording_gewe(ok).await;
    let mut settings = test_settings(&gewe.uri());
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
