//! Friend-accepted callbacks (contract §6) against the real broker and
//! Redis: GeWe's `ModContacts` callback for a succeeded command becomes one
//! `add_friend.accepted` event, over HTTP or through the callbacks queue;
//! repeats, other accounts, chatrooms, profile changes and unknown `v3`s
//! are acknowledged without an event; non-objects are dead-lettered.

use std::{net::SocketAddr, time::Duration};

use crate::common::{callbacks::*, process::*, *};
use lapin::{BasicProperties, types::ShortString};
use serde_json::{Value, json};

/// Publishes command `id` of `app_id` and returns its succeeded event.
async fn succeeded(app: &mut TestApp, id: &str, app_id: &str) -> Received {
    app.publish(&command(id, app_id)).await;
    let event = app.next_event().await;
    assert_eq!(event.status(), "succeeded", "{}", event.body);
    assert_eq!(event.body["v3"], v3_for(id));
    event
}

#[tokio::test]
async fn a_callback_posted_over_http_is_one_accepted_event_with_the_original_correlation_id() {
    let gewe = gewe().await;
    let mut app = spawn_app(callback_settings(&gewe.uri())).await;
    let (id, app_id) = (unique("http"), unique("app"));
    let correlation = unique("corr");
    app.publish_raw(
        command(&id, &app_id).to_string().as_bytes(),
        BasicProperties::default().with_correlation_id(ShortString::from(correlation.clone())),
    )
    .await;
    let sent = app.next_event().await;
    assert_eq!(sent.status(), "succeeded", "{}", sent.body);

    let addr = app.callback_addr.expect("callback endpoint");
    let status = post(
        addr,
        &with_secret(),
        accepted_callback(&app_id, &id).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let accepted = app.next_event().await;
    assert_eq!(accepted.routing_key, "add_friend.accepted");
    let body = &accepted.body;
    for (field, want) in [
        ("commandId", json!(id)),
        ("status", json!("accepted")),
        ("appId", json!(app_id)),
        ("chatroomId", json!("34757816141@chatroom")),
        ("memberWxid", json!(format!("wxid_{id}"))),
        ("v3", json!(v3_for(&id))),
        ("friendWxid", json!(format!("wxid_{id}"))),
    ] {
        assert_eq!(body[field], want, "{field} in {body}");
    }
    let time = |v: &Value| humantime::parse_rfc3339(v.as_str().expect("a time")).expect("RFC 3339");
    let (completed, received, accepted_at) = (
        time(&sent.body["completedAt"]),
        time(&body["receivedAt"]),
        time(&body["acceptedAt"]),
    );
    assert!(completed <= received && received <= accepted_at, "{body}");
    let p = &accepted.properties;
    assert_eq!(
        p.correlation_id().as_ref().map(|c| c.as_str()),
        Some(correlation.as_str()),
        "the original command's correlation_id"
    );
    assert_eq!(
        p.kind().as_ref().map(|t| t.as_str()),
        Some("add_friend.accepted")
    );
    assert_eq!(
        p.content_type().as_ref().map(|t| t.as_str()),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert!(p.timestamp().is_some());
    assert!(p.message_id().is_some());
    assert_ne!(p.message_id(), sent.properties.message_id());
    app.stop().await;
}

#[tokio::test]
async fn copies_of_a_callback_across_two_replicas_with_redis_make_one_accepted_event() {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.redis.url = Some(redis_url());
    let mut app = spawn_app(settings.clone()).await;
    let (stop_b, b, _) = start_worker(&settings).await;
    let (id, app_id) = (unique("copies"), unique("app"));
    succeeded(&mut app, &id, &app_id).await;

    // Straight to the exchange, as GeWe's callbacks arrive through any
    // replica's endpoint; both replicas consume the queue.
    let body = accepted_callback(&app_id, &id).to_string();
    for _ in 0..8 {
        app.publish_callback("ModContacts", body.as_bytes()).await;
    }
    let accepted = app.next_event().await;
    assert_eq!(accepted.status(), "accepted", "{}", accepted.body);
    assert_eq!(accepted.body["commandId"], id);
    // Every copy acknowledged: a copy that published would have done so
    // before its ack.
    wait_until_drained(&settings.callbacks.queue).await;
    let extra = app.try_next_event(Duration::from_secs(1)).await;
    assert!(extra.is_none(), "a second accepted event: {extra:?}");
    stop_b.cancel();
    b.await.expect("join").expect("clean exit");
    app.stop().await;
}

#[tokio::test]
async fn with_redis_a_callback_matches_after_a_restart() {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.redis.url = Some(redis_url());
    settings.callbacks.listen = None;
    let mut app = spawn_app(settings.clone()).await;
    let (id, app_id) = (unique("restart"), unique("app"));
    succeeded(&mut app, &id, &app_id).await;

    // The worker that sent the request stops; a fresh one, with nothing
    // in memory, gets the callback.
    app.stop.cancel();
    let first = app.worker.take().expect("worker");
    first.await.expect("join").expect("clean exit");
    let (stop, second, _) = start_worker(&settings).await;
    app.publish_callback(
        "ModContacts",
        accepted_callback(&app_id, &id).to_string().as_bytes(),
    )
    .await;
    let accepted = app.next_event().await;
    assert_eq!(accepted.status(), "accepted", "{}", accepted.body);
    assert_eq!(accepted.body["commandId"], id);
    assert_eq!(accepted.body["memberWxid"], format!("wxid_{id}"));
    stop.cancel();
    second.await.expect("join").expect("clean exit");
    app.stop().await;
}

#[tokio::test]
async fn a_callback_that_is_not_a_json_object_is_dead_lettered() {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.callbacks.listen = None;
    let mut app = spawn_app(settings).await;
    let bodies: [&[u8]; 3] = [b"{not json", b"[1, 2]", b"\"ModContacts\""];
    for body in bodies {
        app.publish_callback("ModContacts", body).await;
    }
    let mut dead = app.dead_letters(bodies.len()).await;
    dead.sort();
    let mut want: Vec<Vec<u8>> = bodies.iter().map(|b| b.to_vec()).collect();
    want.sort();
    assert_eq!(dead, want);
    assert!(
        app.try_next_event(Duration::from_millis(500))
            .await
            .is_none()
    );
    app.stop().await;
}

/// Reads `callbacks_total{outcome}` and the other callback series of a
/// worker process.
async fn outcomes(ops: SocketAddr) -> [f64; 6] {
    [
        metric(ops, "callbacks_total", "\"matched\"").await,
        metric(ops, "callbacks_total", "\"unmatched\"").await,
        metric(ops, "callbacks_total", "\"repeated\"").await,
        metric(ops, "callbacks_total", "\"invalid\"").await,
        metric(ops, "callbacks_accept_delay_seconds_count", "").await,
        metric(ops, "results_published_total", "\"accepted\"").await,
    ]
}

#[tokio::test]
async fn callbacks_that_match_nothing_are_acked_and_every_outcome_is_counted() {
    let gewe = gewe().await;
    let settings = callback_settings(&gewe.uri());
    let mut listener = spawn_listener(&settings).await;
    // A process of its own: its /metrics count this test's callbacks only.
    let mut cmd = worker_command(&settings, &gewe.uri());
    let c = &settings.callbacks;
    cmd.env("GEWE_WORKER__CALLBACKS__ENABLED", "true")
        .env("GEWE_WORKER__CALLBACKS__EXCHANGE", &c.exchange)
        .env("GEWE_WORKER__CALLBACKS__QUEUE", &c.queue)
        .env("GEWE_WORKER__CALLBACKS__LISTEN", "127.0.0.1:0")
        .env("GEWE_WORKER__CALLBACKS__SECRET", SECRET)
        // Unknown v3s go round the early delay queue this long first.
        .env("GEWE_WORKER__CALLBACKS__EARLY_GRACE", "10s")
        .env("GEWE_WORKER__LOG__FORMAT", "json")
        .env("RUST_LOG", "trace");
    let Worker {
        mut child,
        logs,
        ops,
        callbacks,
    } = spawn_worker(cmd).await;
    let endpoint = callbacks.expect("the callback endpoint is reported");
    wait_for_readyz(ops, 200, "ready").await;

    let (id, app_id) = (unique("count"), unique("app"));
    listener.publish(&command(&id, &app_id)).await;
    assert_eq!(listener.next_event().await.status(), "succeeded");
    let v3 = v3_for(&id);
    let friend = format!("wxid_{id}");
    let unmatched = [
        // A chatroom's contact change.
        json!({"TypeName": "ModContacts", "Appid": app_id, "Wxid": "wxid_acct",
               "Data": {"UserName": {"string": "34757816141@chatroom"}, "EncryptUserName": v3}}),
        // A contact's profile change: no EncryptUserName.
        json!({"TypeName": "ModContacts", "Appid": app_id, "Wxid": "wxid_acct",
               "Data": {"UserName": {"string": friend}, "NickName": {"string": "new name"}}}),
        // Another account with the same v3.
        accepted_callback(&unique("other-app"), &id),
        // An unknown v3.
        json!({"TypeName": "ModContacts", "Appid": app_id, "Wxid": "wxid_acct",
               "Data": {"UserName": {"string": "wxid_stranger"}, "EncryptUserName": "v3_unknown@stranger"}}),
        // Another type, bound with ModContacts by mistake.
        json!({"TypeName": "AddMsg", "Appid": app_id, "Data": {"EncryptUserName": v3}}),
    ];
    for body in &unmatched {
        listener
            .publish_callback("ModContacts", body.to_string().as_bytes())
            .await;
    }
    listener.publish_callback("ModContacts", b"not json").await;
    // Every type is published by the endpoint; only ModContacts reaches
    // the queue.
    let other_type = json!({"TypeName": "AddMsg", "Appid": app_id, "Data": {"Content": "hi"}});
    assert_eq!(
        post(endpoint, &with_secret(), other_type.to_string()).await,
        200
    );
    let accept = accepted_callback(&app_id, &id).to_string();
    assert_eq!(post(endpoint, &with_secret(), accept.clone()).await, 200);
    let accepted = listener.next_event().await;
    assert_eq!(accepted.status(), "accepted", "{}", accepted.body);
    assert_eq!(post(endpoint, &with_secret(), accept).await, 200);

    let want = [1.0, 5.0, 1.0, 1.0, 1.0, 1.0];
    eventually(WAIT, || async {
        let got = outcomes(ops).await;
        done_or(got == want, || {
            format!("matched, unmatched, repeated, invalid, accept delays, accepted events: {got:?}, want {want:?}")
        })
    })
    .await;
    assert_eq!(metric(ops, "callback_requests_total", "\"200\"").await, 3.0);
    assert!(
        listener
            .try_next_event(Duration::from_millis(500))
            .await
            .is_none()
    );
    assert_eq!(listener.dead_letters(1).await, vec![b"not json".to_vec()]);

    let status = terminate(&mut child).await;
    let logs = logs.finish().await;
    assert!(status.success(), "SIGTERM exits 0");
    // Nothing was left unacked: it would be back in the queue now.
    assert_eq!(messages_in(&settings.callbacks.queue).await, 0);
    assert!(
        logs.contains("friend request accepted"),
        "the match is logged"
    );
    assert!(!logs.contains(SECRET), "logs leak the callback secret");
    listener.stop().await;
}

#[tokio::test]
async fn a_callbacks_queue_declared_with_other_arguments_is_named_in_the_error() {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.callbacks.listen = None;
    let queue = settings.callbacks.queue.clone();
    let text = start_up_error_with_a_classic(&settings, &queue).await;
    assert!(text.contains(&queue), "{text}");
    assert!(text.contains("argument 'x-"), "{text}");
}
