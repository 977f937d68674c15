//! Idempotency as a downstream system relies on it: a commandId is bound to
//! its request, and each commandId gets exactly one event not marked
//! `duplicate`, also when copies arrive together or across replicas.

use std::time::Duration;

use crate::common::{fake_gewe::FakeGewe, *};
use lapin::BasicProperties;
use serde_json::{Value, json};

fn for_member(id: &str, member: &str) -> Value {
    json!({
        "commandId": id,
        "appId": "app-g",
        "chatroomId": "34757816141@chatroom",
        "memberWxid": member,
        "content": "hello from the group"
    })
}

/// Command X for member A, then X for member B, then X for A again.
async fn a_reused_command_id(redis: bool) {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    if redis {
        settings.redis.url = Some(redis_url());
    }
    let mut app = spawn_app(settings).await;
    let id = unique("reused");
    let (a, b) = (unique("wxid_a"), unique("wxid_b"));

    app.publish(&for_member(&id, &a)).await;
    let first = app.next_event().await;
    assert_eq!(first.status(), "succeeded");
    assert_eq!(first.body["v3"], format!("v3_{a}@stranger"));

    app.publish(&for_member(&id, &b)).await;
    let refused = app.next_event().await;
    assert_eq!(refused.kind(), Some("invalid_command"), "{}", refused.body);
    assert_eq!(refused.attempts(), 0);
    assert_eq!(refused.body["commandId"], id.as_str());
    assert_eq!(refused.body["memberWxid"], b.as_str());
    assert!(
        refused.body.get("v3").is_none(),
        "A's v3 is not handed to B"
    );
    let message = refused.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("already used for another request"),
        "{message}"
    );
    let dead = app.dead_letters(1).await;
    let dead: Value = serde_json::from_slice(&dead[0]).expect("json");
    assert_eq!(
        dead["memberWxid"],
        b.as_str(),
        "B's command is dead-lettered"
    );

    app.publish(&for_member(&id, &a)).await;
    let again = app.next_event().await;
    assert_eq!(
        again.body["v3"], first.body["v3"],
        "the stored outcome stays"
    );
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(gewe.calls_per_member().get(&b), None, "B was never sent");
    assert_eq!(gewe.calls().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_command_id_reused_for_another_member_is_refused_and_its_outcome_kept() {
    a_reused_command_id(false).await;
}

#[tokio::test]
async fn a_command_id_reused_for_another_member_is_refused_with_redis_too() {
    a_reused_command_id(true).await;
}

/// Five commands without commandId whose fallback id is the same.
async fn five_requests_sharing_a_fallback_id(properties: BasicProperties) {
    let gewe = FakeGewe::start(Duration::from_millis(50), fake_gewe::success).await;
    let mut app = spawn_app(test_settings(&gewe.url)).await;
    for i in 0..5 {
        let mut body = for_member("unused", &format!("wxid_shared_{i}"));
        body.as_object_mut().expect("object").remove("commandId");
        app.publish_raw(body.to_string().as_bytes(), properties.clone())
            .await;
    }
    let events = app.events(5).await;
    let succeeded: Vec<_> = events
        .iter()
        .filter(|e| e.status() == "succeeded")
        .collect();
    assert_eq!(succeeded.len(), 1, "one request went to GeWe");
    let member = succeeded[0].body["memberWxid"].as_str().expect("member");
    assert_eq!(succeeded[0].body["v3"], format!("v3_{member}@stranger"));
    for e in events.iter().filter(|e| e.status() != "succeeded") {
        assert_eq!(e.kind(), Some("invalid_command"), "{}", e.body);
        assert_ne!(e.body["memberWxid"], member, "nobody gets another's v3");
    }
    assert_eq!(gewe.calls().len(), 1);
    app.dead_letters(4).await;
    app.stop().await;
}

#[tokio::test]
async fn commands_sharing_a_correlation_id_do_not_get_each_others_outcome() {
    let shared = unique("corr");
    five_requests_sharing_a_fallback_id(
        BasicProperties::default().with_correlation_id(shared.as_str().into()),
    )
    .await;
}

#[tokio::test]
async fn commands_sharing_a_message_id_do_not_get_each_others_outcome() {
    let shared = unique("mid");
    five_requests_sharing_a_fallback_id(
        BasicProperties::default().with_message_id(shared.as_str().into()),
    )
    .await;
}

/// Events by commandId: (unmarked, duplicates).
fn marks(events: &[Received]) -> std::collections::HashMap<String, (usize, usize)> {
    let mut by_id = std::collections::HashMap::new();
    for e in events {
        let id = e.body["commandId"].as_str().unwrap_or("").to_owned();
        let entry = by_id.entry(id).or_insert((0, 0));
        if e.body["duplicate"] == true {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    by_id
}

#[tokio::test]
async fn copies_delivered_together_make_one_call_and_one_unmarked_event() {
    let gewe = FakeGewe::start(Duration::from_millis(300), fake_gewe::success).await;
    let mut app = spawn_app(test_settings(&gewe.url)).await;
    let id = unique("together");
    let copies = 5;
    for _ in 0..copies {
        app.publish(&command(&id, "app-together")).await;
    }
    let events = app.events(copies).await;
    assert_eq!(marks(&events)[&id], (1, copies - 1), "one unmarked event");
    assert!(events.iter().all(|e| e.body["v3"] == events[0].body["v3"]));
    assert_eq!(gewe.calls().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn copies_across_two_replicas_with_redis_make_one_call_and_one_unmarked_event() {
    let gewe = FakeGewe::start(Duration::from_millis(300), fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.redis.url = Some(redis_url());
    let mut app = spawn_app(settings.clone()).await;
    let (stop, second, _) = start_worker(&settings).await;
    let ids: Vec<String> = (0..10).map(|i| unique(&format!("across-{i}"))).collect();
    // Each command twice, back to back: the broker hands them to both replicas.
    for id in &ids {
        app.publish(&command(id, "app-across")).await;
        app.publish(&command(id, "app-across")).await;
    }
    let events = app.events(ids.len() * 2).await;
    let marks = marks(&events);
    for id in &ids {
        assert_eq!(marks[id], (1, 1), "{id}: one unmarked, one duplicate");
    }
    assert!(gewe.called_twice().is_empty(), "{:?}", gewe.called_twice());
    stop.cancel();
    second.await.expect("join").expect("clean exit");
    app.stop().await;
}

#[tokio::test]
async fn when_the_first_event_could_not_be_published_the_next_one_is_unmarked() {
    // Alone: the requeue counted is this worker's.
    alone(async {
        let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
        // Nothing is bound to the result exchange yet: the event is unroutable,
        // so the command is requeued (after GeWe answered and it was stored).
        let mut app = spawn_app_with(test_settings(&gewe.url), false).await;
        let before = metric(app.ops_addr, "commands_requeued_total", "publish_failed").await;
        let id = unique("unpublished");
        app.publish(&command(&id, "app-u")).await;
        wait_for_metric(
            app.ops_addr,
            "commands_requeued_total",
            "publish_failed",
            before + 1.0,
            "the requeue is counted",
        )
        .await;
        let queue = app.events.queue();
        bind_to_results(&app.channel, queue.as_str(), &app.settings).await;
        let first = app.next_event().await;
        assert!(first.body.get("duplicate").is_none(), "{}", first.body);
        assert_eq!(first.body["commandId"], id.as_str());
        app.publish(&command(&id, "app-u")).await;
        let second = app.next_event().await;
        assert_eq!(second.body["duplicate"], true);
        assert_eq!(second.body["v3"], first.body["v3"]);
        assert_eq!(gewe.calls().len(), 1, "GeWe was called once");
        app.stop().await;
    })
    .await;
}
