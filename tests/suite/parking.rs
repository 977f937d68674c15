//! `retry.park`: commands whose account is offline or whose GeWe is down are
//! parked in delay queues of the real broker and tried again later; the
//! event comes with the last try and counts every attempt.

use std::time::{Duration, Instant};

use crate::common::{fake_gewe::FakeGewe, *};
use lapin::BasicProperties;
use serde_json::{Value, json};

fn offline(_: &str, _: usize) -> (axum::http::StatusCode, Value) {
    (
        axum::http::StatusCode::OK,
        json!({"ret": 500, "msg": "发送消息失败", "data": {"code": "-1", "msg": "微信已离线"}}),
    )
}

fn offline_once(member: &str, nth: usize) -> (axum::http::StatusCode, Value) {
    if nth == 1 {
        offline(member, nth)
    } else {
        fake_gewe::success(member, nth)
    }
}

fn parking(gewe: &FakeGewe, delays: &[u64]) -> gewe_friend_worker::config::Settings {
    let mut settings = test_settings(&gewe.url);
    settings.retry.park = delays.iter().map(|s| Duration::from_secs(*s)).collect();
    settings
}

/// Arrival times of the calls for `member`, in order.
fn calls_of(gewe: &FakeGewe, member: &str) -> Vec<Instant> {
    gewe.calls()
        .into_iter()
        .filter(|(m, _)| m == member)
        .map(|(_, at)| at)
        .collect()
}

#[tokio::test]
async fn offline_once_then_back_succeeds_after_one_park_with_its_properties_kept() {
    // Alone: the parks counted are this worker's.
    alone(async {
        let gewe = FakeGewe::start(Duration::ZERO, offline_once).await;
        let mut app = spawn_app(parking(&gewe, &[1, 5])).await;
        let parked_before = metric(app.ops_addr, "commands_parked_total", "").await;
        let id = unique("park-once");
        let correlation = unique("corr");
        app.publish_raw(
            command(&id, "app-p").to_string().as_bytes(),
            BasicProperties::default().with_correlation_id(correlation.as_str().into()),
        )
        .await;
        let e = app.next_event().await;
        assert_eq!(e.status(), "succeeded", "{}", e.body);
        assert_eq!(e.body["parked"], 1);
        assert_eq!(e.attempts(), 2, "one attempt per try");
        assert_eq!(
            e.properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some(correlation.as_str()),
            "the parked copy kept the command's properties"
        );
        let calls = calls_of(&gewe, &format!("wxid_{id}"));
        assert_eq!(calls.len(), 2);
        assert!(
            calls[1] - calls[0] >= Duration::from_secs(1),
            "tried again after {:?}, before the 1 s delay",
            calls[1] - calls[0]
        );
        let parked = metric(app.ops_addr, "commands_parked_total", "").await - parked_before;
        assert!(parked >= 1.0, "parks counted: {parked}");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn always_offline_fails_after_every_delay_with_the_attempts_summed() {
    let gewe = FakeGewe::start(Duration::ZERO, offline).await;
    let mut app = spawn_app(parking(&gewe, &[1, 2])).await;
    let id = unique("park-offline");
    app.publish(&command(&id, "app-off")).await;
    let e = app.next_event().await;
    assert_eq!(e.kind(), Some("app_offline"), "{}", e.body);
    assert_eq!(e.body["parked"], 2);
    assert_eq!(e.attempts(), 3);
    let calls = calls_of(&gewe, &format!("wxid_{id}"));
    assert_eq!(calls.len(), 3);
    assert!(
        calls[1] - calls[0] >= Duration::from_secs(1),
        "first delay honoured"
    );
    assert!(
        calls[2] - calls[1] >= Duration::from_secs(2),
        "second delay honoured"
    );
    app.stop().await;
}

#[tokio::test]
async fn gewe_down_throughout_fails_upstream_unavailable_after_every_delay() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::unavailable).await;
    let mut settings = parking(&gewe, &[1, 1]);
    settings.retry.max_attempts = 2;
    let mut app = spawn_app(settings).await;
    let id = unique("park-down");
    app.publish(&command(&id, "app-down")).await;
    let e = app.next_event().await;
    assert_eq!(e.kind(), Some("upstream_unavailable"), "{}", e.body);
    assert_eq!(e.body["parked"], 2);
    assert_eq!(e.attempts(), 6, "three tries of two attempts");
    assert_eq!(calls_of(&gewe, &format!("wxid_{id}")).len(), 6);
    app.stop().await;
}

#[tokio::test]
async fn a_restart_while_commands_are_parked_loses_nothing() {
    let gewe = FakeGewe::start(Duration::ZERO, offline_once).await;
    let settings = parking(&gewe, &[2]);
    let mut app = spawn_app(settings.clone()).await;
    let ids: Vec<String> = (0..5)
        .map(|i| unique(&format!("park-restart-{i}")))
        .collect();
    for id in &ids {
        app.publish(&command(id, &unique("app"))).await;
    }
    // Every command was tried once and parked: stop the worker now.
    eventually(WAIT, || async {
        let tried = gewe.calls().len();
        done_or(tried >= ids.len(), || format!("{tried} first tries"))
    })
    .await;
    app.stop_worker().await;
    // A new worker picks the commands up when their delay is over.
    let (stop, again, _) = start_worker(&settings).await;
    let mut done = std::collections::HashSet::new();
    for e in app.events(ids.len()).await {
        assert_eq!(e.status(), "succeeded", "{}", e.body);
        assert_eq!(e.body["parked"], 1);
        done.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(done.len(), ids.len(), "every parked command came back");
    stop.cancel();
    again.await.expect("join").expect("clean exit");
    app.stop().await;
}

#[tokio::test]
async fn a_deleted_park_queue_is_declared_again_and_gewe_is_not_called_again() {
    let gewe = FakeGewe::start(Duration::ZERO, offline).await;
    let settings = parking(&gewe, &[60]);
    let mut app = spawn_app(settings.clone()).await;
    // Consuming, so the worker has declared its topology already.
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    // An operator deletes the delay queue: the parked copy must not be lost,
    // and the command must not go back to GeWe for it.
    let delay_queue = gewe_friend_worker::config::delay_queue_name(
        &settings.amqp.command_queue,
        Duration::from_secs(60),
    );
    app.channel
        .queue_delete(delay_queue.as_str().into(), Default::default())
        .await
        .expect("delete the delay queue");
    let id = unique("park-lost");
    app.publish(&command(&id, "app-lost")).await;
    let copies = eventually(WAIT, || async {
        let copies = delay_queues::peek(&app.connection, &delay_queue).await;
        if copies.len() == 1 {
            Ok(copies)
        } else {
            Err(format!(
                "{} copies in the redeclared park queue",
                copies.len()
            ))
        }
    })
    .await;
    assert_eq!(copies[0].body["commandId"], id.as_str());
    assert_eq!(copies[0].count("x-gewe-parked"), Some(1));
    assert_eq!(
        gewe.calls().len(),
        1,
        "one attempt (app_offline is not retried), and no call again for the lost queue"
    );
    assert!(
        app.try_next_event(Duration::from_millis(200))
            .await
            .is_none(),
        "no event"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_delay_queue_declared_with_another_delay_is_named_in_the_error() {
    let gewe = FakeGewe::start(Duration::ZERO, offline).await;
    let settings = parking(&gewe, &[60]);
    let app = spawn_listener(&settings).await;
    let delay_queue = gewe_friend_worker::config::delay_queue_name(
        &settings.amqp.command_queue,
        Duration::from_secs(60),
    );
    app.channel
        .queue_delete(delay_queue.as_str().into(), Default::default())
        .await
        .expect("delete");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongLongInt(1000),
    );
    app.channel
        .queue_declare(
            delay_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare with another delay");
    let _in_process = in_process().await;
    let built = gewe_friend_worker::app::Application::build(settings.clone())
        .await
        .expect("builds");
    let err = built
        .run(tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("a mismatched delay queue stops the worker at start-up")
        .to_string();
    assert!(err.contains(&delay_queue), "{err}");
    assert!(
        err.contains("x-message-ttl") || err.contains("x-queue-type"),
        "{err}"
    );
    app.stop().await;
}
