//! End-to-end behaviour of the worker against the real RabbitMQ, with GeWe
//! mocked over real HTTP. Each test has its own queues and exchanges.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::common::*;
use gewe_friend_worker::gewe::ADD_MEMBER_PATH;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{body_partial_json, header, method, path},
};

fn for_app(app_id: &str) -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .and(header("X-GEWE-TOKEN", TOKEN))
        .and(body_partial_json(json!({ "appId": app_id })))
}

#[tokio::test]
async fn success_event_carries_the_v3_and_the_contract_properties() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .and(header("X-GEWE-TOKEN", TOKEN))
        .and(header("content-type", "application/json"))
        .and(body_partial_json(json!({
            "appId": "app-ok", "chatroomId": "34757816141@chatroom",
            "memberWxid": "wxid_ok-1", "content": "hello from the group"
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_abc@stranger")))
        .expect(1)
        .mount(&gewe)
        .await;
    let mut app = spawn_app(test_settings(&gewe.uri())).await;
    app.publish(&command("ok-1", "app-ok")).await;

    let e = app.next_event().await;
    assert_eq!(e.routing_key, "add_friend.succeeded");
    assert_eq!(e.body["status"], "succeeded");
    assert_eq!(e.body["commandId"], "ok-1");
    assert_eq!(e.body["v3"], "v3_abc@stranger");
    assert_eq!(e.body["attempts"], 1);
    assert_eq!(e.body["appId"], "app-ok");
    assert_eq!(e.body["chatroomId"], "34757816141@chatroom");
    assert_eq!(e.body["memberWxid"], "wxid_ok-1");
    assert!(e.body.get("error").is_none());
    for t in ["receivedAt", "completedAt"] {
        let ts = e.body[t].as_str().expect("timestamp");
        humantime::parse_rfc3339(ts).unwrap_or_else(|_| panic!("{t} is RFC 3339: {ts}"));
    }
    let p = &e.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.as_str()),
        Some("ok-1")
    );
    assert_eq!(
        p.kind().as_ref().map(|s| s.as_str()),
        Some("add_friend.succeeded")
    );
    assert!(p.message_id().is_some());
    assert!(p.timestamp().is_some());
    app.stop().await;
}

#[tokio::test]
async fn every_error_kind_with_its_exact_attempt_count() {
    let gewe = MockServer::start().await;
    let body = |v: Value| ResponseTemplate::new(200).set_body_json(v);
    // (appId, response, expected GeWe calls, expected kind)
    let cases: Vec<(&str, ResponseTemplate, u64, &str)> = vec![
        (
            "token",
            body(
                json!({"ret":500,"msg":format!("HTTP HEADER: X-GEWE-TOKEN={TOKEN} 不可用或已过期")}),
            ),
            1,
            "unauthorized",
        ),
        ("http401", ResponseTemplate::new(401), 1, "unauthorized"),
        (
            "http403",
            ResponseTemplate::new(403).set_body_string("forbidden"),
            1,
            "unauthorized",
        ),
        (
            "offline",
            body(json!({"ret":500,"msg":"发送消息失败","data":{"code":"-1","msg":"微信已离线"}})),
            1,
            "app_offline",
        ),
        (
            "nodevice",
            body(json!({"ret":500,"msg":"获取失败","data":{"code":"-1","msg":"[wx_x]设备不存在"}})),
            1,
            "app_offline",
        ),
        (
            "ticket",
            body(
                json!({"ret":500,"msg":"添加好友失败","data":{"code":"-2","msg":"user ticket invalid"}}),
            ),
            1,
            "rejected",
        ),
        (
            "nullmsg",
            body(json!({"ret":500,"msg":null})),
            1,
            "rejected",
        ),
        (
            "nov3",
            body(json!({"ret":200,"msg":"操作成功","data":{}})),
            1,
            "unexpected_response",
        ),
        (
            "html",
            ResponseTemplate::new(200).set_body_string("<html>proxy</html>"),
            1,
            "unexpected_response",
        ),
        (
            "http404",
            ResponseTemplate::new(404),
            1,
            "unexpected_response",
        ),
        (
            "http503",
            ResponseTemplate::new(503),
            3,
            "upstream_unavailable",
        ),
        (
            "http500",
            ResponseTemplate::new(500).set_body_string("boom"),
            3,
            "upstream_unavailable",
        ),
        (
            "slow",
            ResponseTemplate::new(200)
                .set_body_json(gewe_ok("late"))
                .set_delay(Duration::from_secs(2)),
            3,
            "upstream_unavailable",
        ),
    ];
    for (app_id, response, calls, _) in &cases {
        for_app(app_id)
            .respond_with(response.clone())
            .expect(*calls)
            .mount(&gewe)
            .await;
    }
    let mut settings = test_settings(&gewe.uri());
    settings.gewe.timeout = Duration::from_millis(300);
    let mut app = spawn_app(settings).await;
    for (app_id, ..) in &cases {
        app.publish(&command(&format!("kind-{app_id}"), app_id))
            .await;
    }
    let events: HashMap<String, Received> = app
        .events(cases.len())
        .await
        .into_iter()
        .map(|e| (e.body["commandId"].as_str().unwrap_or("").to_owned(), e))
        .collect();
    for (app_id, _, calls, kind) in &cases {
        let e = &events[&format!("kind-{app_id}")];
        assert_eq!(e.routing_key, "add_friend.failed", "{app_id}");
        assert_eq!(e.kind(), Some(*kind), "{app_id}: {}", e.body);
        assert_eq!(e.attempts(), *calls, "{app_id}: attempts");
        assert_eq!(
            e.body["error"]["retryable"],
            *kind == "upstream_unavailable",
            "{app_id}"
        );
        assert!(!e.body["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let offline = &events["kind-offline"].body["error"]["gewe"];
    assert_eq!(offline["ret"], 500);
    assert_eq!(offline["data"]["code"], "-1");
    assert_eq!(offline["data"]["msg"], "微信已离线");
    app.stop().await;
    // wiremock verifies every `.expect(n)` when `gewe` drops.
}

/// A responder that records when each request arrived.
struct Timed {
    times: Arc<Mutex<Vec<Instant>>>,
    response: ResponseTemplate,
}

impl Respond for Timed {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.times.lock().expect("lock").push(Instant::now());
        self.response.clone()
    }
}

#[tokio::test]
async fn transient_failures_back_off_and_then_succeed() {
    let gewe = MockServer::start().await;
    for status in [502, 503, 429] {
        for_app("flaky")
            .respond_with(ResponseTemplate::new(status))
            .up_to_n_times(1)
            .expect(1)
            .mount(&gewe)
            .await;
    }
    for_app("flaky")
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_flaky")))
        .expect(1)
        .mount(&gewe)
        .await;
    for_app("timeout")
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(gewe_ok("too-late"))
                .set_delay(Duration::from_secs(2)),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&gewe)
        .await;
    for_app("timeout")
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_in_time")))
        .expect(1)
        .mount(&gewe)
        .await;

    let mut settings = test_settings(&gewe.uri());
    settings.retry.max_attempts = 5;
    settings.gewe.timeout = Duration::from_millis(300);
    let mut app = spawn_app(settings).await;
    app.publish(&command("flaky-1", "flaky")).await;
    app.publish(&command("timeout-1", "timeout")).await;
    let mut by_id: HashMap<String, Received> = app
        .events(2)
        .await
        .into_iter()
        .map(|e| (e.body["commandId"].as_str().unwrap_or("").to_owned(), e))
        .collect();
    let flaky = by_id.remove("flaky-1").expect("flaky event");
    assert_eq!(flaky.status(), "succeeded");
    assert_eq!(flaky.body["v3"], "v3_flaky");
    assert_eq!(flaky.attempts(), 4);
    let timeout = by_id.remove("timeout-1").expect("timeout event");
    assert_eq!(timeout.status(), "succeeded");
    assert_eq!(timeout.body["v3"], "v3_in_time");
    assert_eq!(timeout.attempts(), 2);
    app.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured_and_clamped_to_max_delay() {
    let gewe = MockServer::start().await;
    let times = Arc::new(Mutex::new(Vec::new()));
    let timed = |response: ResponseTemplate| Timed {
        times: times.clone(),
        response,
    };
    for_app("polite")
        .respond_with(timed(
            ResponseTemplate::new(429).insert_header("Retry-After", "1"),
        ))
        .up_to_n_times(1)
        .mount(&gewe)
        .await;
    for_app("polite")
        .respond_with(timed(
            ResponseTemplate::new(200).set_body_json(gewe_ok("v3_p")),
        ))
        .mount(&gewe)
        .await;
    let clamped = Arc::new(Mutex::new(Vec::new()));
    for_app("greedy")
        .respond_with(Timed {
            times: clamped.clone(),
            response: ResponseTemplate::new(503).insert_header("Retry-After", "3600"),
        })
        .up_to_n_times(1)
        .mount(&gewe)
        .await;
    for_app("greedy")
        .respond_with(Timed {
            times: clamped.clone(),
            response: ResponseTemplate::new(200).set_body_json(gewe_ok("v3_g")),
        })
        .mount(&gewe)
        .await;

    let mut settings = test_settings(&gewe.uri());
    settings.retry.initial_delay = Duration::from_millis(1);
    settings.retry.max_delay = Duration::from_millis(1500);
    let mut app = spawn_app(settings).await;
    app.publish(&command("polite-1", "polite")).await;
    app.publish(&command("greedy-1", "greedy")).await;
    for e in app.events(2).await {
        assert_eq!(e.status(), "succeeded", "{}", e.body);
        assert_eq!(e.attempts(), 2);
    }
    let t = times.lock().expect("lock").clone();
    assert!(
        t[1] - t[0] >= Duration::from_millis(950),
        "Retry-After: 1 honoured, waited {:?}",
        t[1] - t[0]
    );
    let c = clamped.lock().expect("lock").clone();
    let waited = c[1] - c[0];
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(10),
        "clamped to max_delay: {waited:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn reply_to_gets_a_copy_and_correlation_ids_follow_the_contract() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_r")))
        .expect(3)
        .mount(&gewe)
        .await;
    let mut app = spawn_app(test_settings(&gewe.uri())).await;
    let reply = app
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply queue");
    let mut replies = app
        .channel
        .basic_consume(
            reply.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume replies");

    // 1: reply_to and an explicit correlation_id
    app.publish_raw(
        command("rt-1", "app-r").to_string().as_bytes(),
        BasicProperties::default()
            .with_reply_to(reply.name().clone())
            .with_correlation_id("corr-A".into()),
    )
    .await;
    // 2: no correlation_id: it is the commandId
    app.publish(&command("rt-2", "app-r")).await;
    // 3: no commandId in the body: message_id stands in
    let mut body = command("ignored", "app-r");
    body.as_object_mut().expect("object").remove("commandId");
    app.publish_raw(
        body.to_string().as_bytes(),
        BasicProperties::default().with_message_id("mid-C".into()),
    )
    .await;

    let copy = next_on(&mut replies).await;
    assert_eq!(copy.body["commandId"], "rt-1");
    assert_eq!(
        copy.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("corr-A")
    );
    let mut events: HashMap<String, Received> = app
        .events(3)
        .await
        .into_iter()
        .map(|e| (e.body["commandId"].as_str().unwrap_or("").to_owned(), e))
        .collect();
    let main = events.remove("rt-1").expect("rt-1");
    assert_eq!(main.body, copy.body, "the reply copy is the same event");
    assert_eq!(main.properties.message_id(), copy.properties.message_id());
    let corr = |e: &Received| {
        e.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
    };
    assert_eq!(corr(&main).as_deref(), Some("corr-A"));
    assert_eq!(corr(&events["rt-2"]).as_deref(), Some("rt-2"));
    assert_eq!(events["mid-C"].status(), "succeeded");
    assert_eq!(corr(&events["mid-C"]).as_deref(), Some("mid-C"));
    let ids: std::collections::HashSet<_> = [&main, &events["rt-2"], &events["mid-C"]]
        .iter()
        .map(|e| e.properties.message_id().clone())
        .collect();
    assert_eq!(ids.len(), 3, "message_id is unique per event");
    app.stop().await;
}

#[tokio::test]
async fn the_same_command_id_twice_calls_gewe_once() {
    let gewe = MockServer::start().await;
    for_app("dup")
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_once")))
        .expect(1)
        .mount(&gewe)
        .await;
    let mut app = spawn_app(test_settings(&gewe.uri())).await;
    app.publish(&command("dup-1", "dup")).await;
    let first = app.next_event().await;
    app.publish(&command("dup-1", "dup")).await;
    let second = app.next_event().await;
    assert_eq!(first.body["v3"], "v3_once");
    assert!(first.body.get("duplicate").is_none());
    assert_eq!(second.body["v3"], "v3_once");
    assert_eq!(second.body["duplicate"], true);
    app.stop().await;
}

fn malformed_bodies() -> Vec<Vec<u8>> {
    let good = command("x", "app-bad");
    let with = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = good.clone();
        f(v.as_object_mut().expect("object"));
        v.to_string().into_bytes()
    };
    let mut bodies: Vec<Vec<u8>> = [
        "",
        "not json",
        "{",
        "}",
        "[]",
        "[1,2,3]",
        "null",
        "true",
        "42",
        "\"a string\"",
        "{}",
        "{\"appId\":\"a\"} trailing",
        "\0\0\0",
        r#"{"appId":"a","appId":5,"chatroomId":"c","memberWxid":"m","content":"x"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    for field in ["appId", "chatroomId", "memberWxid", "content"] {
        bodies.push(with(&|m| {
            m.remove(field);
        }));
        bodies.push(with(&|m| {
            m.insert(field.into(), json!(""));
        }));
        bodies.push(with(&|m| {
            m.insert(field.into(), json!(null));
        }));
    }
    bodies.push(with(&|m| {
        m.insert("appId".into(), json!("   "));
    }));
    bodies.push(with(&|m| {
        m.insert("appId".into(), json!(17));
    }));
    bodies.push(with(&|m| {
        m.insert("chatroomId".into(), json!({"id": 1}));
    }));
    bodies.push(with(&|m| {
        m.insert("memberWxid".into(), json!(["a"]));
    }));
    bodies.push(with(&|m| {
        m.insert("content".into(), json!(true));
    }));
    bodies.push(with(&|m| {
        m.insert("commandId".into(), json!(12));
    }));
    bodies.push(with(&|m| {
        m.insert("commandId".into(), json!(""));
    }));
    bodies.push(with(&|m| {
        m.insert("commandId".into(), json!("c".repeat(129)));
    }));
    bodies.push(with(&|m| {
        m.insert("content".into(), json!("x".repeat(100_000)));
    }));
    bodies.push(vec![0xff, 0xfe, 0xfd]);
    let mut bom = vec![0xef, 0xbb, 0xbf];
    bom.extend_from_slice(&good.to_string().into_bytes());
    bodies.push(bom);
    bodies.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    bodies
}

#[tokio::test]
async fn malformed_commands_are_dead_lettered_and_good_ones_still_succeed() {
    let gewe = MockServer::start().await;
    let bad = malformed_bodies();
    assert!(bad.len() >= 30, "battery has {} inputs", bad.len());
    for_app("app-good")
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_good")))
        .expect(bad.len() as u64 + 1)
        .mount(&gewe)
        .await;
    let mut app = spawn_app(test_settings(&gewe.uri())).await;
    for (i, body) in bad.iter().enumerate() {
        app.publish_raw(body, BasicProperties::default()).await;
        app.publish(&command(&format!("good-{i}"), "app-good"))
            .await;
    }
    let events = app.events(bad.len() * 2).await;
    let (failed, succeeded): (Vec<_>, Vec<_>) = events.iter().partition(|e| e.status() == "failed");
    assert_eq!(succeeded.len(), bad.len());
    assert_eq!(failed.len(), bad.len());
    for e in &failed {
        assert_eq!(e.kind(), Some("invalid_command"), "{}", e.body);
        assert_eq!(e.attempts(), 0);
        assert_eq!(e.routing_key, "add_friend.failed");
        assert!(!e.body["commandId"].as_str().unwrap_or("").is_empty());
    }
    let mut dead = app.dead_letters(bad.len()).await;
    let mut expected = bad.clone();
    dead.sort();
    expected.sort();
    assert!(
        dead == expected,
        "every malformed original is dead-lettered unchanged"
    );

    // still alive and consuming
    app.publish(&command("after", "app-good")).await;
    let last = app.next_event().await;
    assert_eq!(last.body["commandId"], "after");
    assert_eq!(last.status(), "succeeded");
    app.stop().await;
}

#[tokio::test]
async fn an_unroutable_result_is_never_a_silent_success() {
    let gewe = MockServer::start().await;
    for_app("lonely")
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_l")))
        .expect(1)
        .mount(&gewe)
        .await;
    let mut settings = test_settings(&gewe.uri());
    settings.amqp.delivery_limit = 1;
    // Nothing is bound to the result exchange: every event is returned.
    let app = spawn_app_with(settings, false).await;
    let body = command("lonely-1", "lonely").to_string();
    app.publish_raw(body.as_bytes(), BasicProperties::default())
        .await;
    // Not acked: redelivered until the quorum delivery limit dead-letters it,
    // and GeWe is called once thanks to the stored outcome.
    let dead = app.dead_letters(1).await;
    assert_eq!(dead, vec![body.into_bytes()]);
    app.stop().await;
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_is_named_in_the_error() {
    let gewe = MockServer::start().await;
    let settings = test_settings(&gewe.uri());
    let queue = settings.amqp.command_queue.clone();
    let text = start_up_error_with_a_classic(&settings, &queue).await;
    assert!(text.contains(&queue), "{text}");
    assert!(text.contains("argument 'x-"), "{text}");
}

#[tokio::test]
async fn an_overlong_command_id_is_refused_with_an_event_the_publisher_can_match() {
    let gewe = gewe_never_called().await;
    let mut app = spawn_app(test_settings(&gewe.uri())).await;
    // 128 characters, as the README allows, but 384 bytes of UTF-8: more
    // than the 255 an AMQP correlation_id can carry.
    let id = format!("{}{}", uuid::Uuid::new_v4().simple(), "好".repeat(96));
    assert_eq!(id.chars().count(), 128);
    app.publish(&command(&id, "app-long")).await;
    let e = app.next_event().await;
    assert_eq!(e.kind(), Some("invalid_command"));
    let carried = e.body["commandId"].as_str().expect("commandId");
    assert!(
        carried.len() > 32 && id.starts_with(carried),
        "the event carries the id cut to the limit: {carried}"
    );
    assert!(carried.len() <= 255);
    let message = e.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("255 bytes"), "{message}");
    app.dead_letters(1).await;
    app.stop().await;
}
