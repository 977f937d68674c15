//! deploy/asyncapi.yaml cannot drift: real command bodies and the events the
//! worker actually publishes are validated against its message schemas.

use crate::common::{callbacks, *};
use gewe_friend_worker::gewe::ADD_MEMBER_PATH;
use lapin::BasicProperties;
use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{body_partial_json, method, path},
};

fn schema(name: &str) -> jsonschema::Validator {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/asyncapi.yaml"))
            .expect("deploy/asyncapi.yaml exists");
    let doc: Value = serde_yaml::from_str(&text).expect("AsyncAPI document is YAML");
    assert_eq!(doc["asyncapi"], "3.0.0");
    let schema = doc["components"]["schemas"][name].clone();
    assert!(schema.is_object(), "components.schemas.{name} exists");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{name} is a valid JSON Schema: {e}"))
}

fn assert_valid(validator: &jsonschema::Validator, body: &Value) {
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{body} does not match the AsyncAPI schema: {errors:?}"
    );
}

#[tokio::test]
async fn published_events_and_commands_match_the_asyncapi_schemas() {
    let commands = schema("Command");
    let events = schema("ResultEvent");
    let gewe = MockServer::start().await;
    let reply = |app: &str, r: ResponseTemplate| {
        Mock::given(method("POST"))
            .and(path(ADD_MEMBER_PATH))
            .and(body_partial_json(json!({ "appId": app })))
            .respond_with(r)
    };
    let body = |v: Value| ResponseTemplate::new(200).set_body_json(v);
    reply("ok", body(gewe_ok("v3_schema@stranger")))
        .mount(&gewe)
        .await;
    reply(
        "token",
        body(json!({"ret":500,"msg":format!("HTTP HEADER: X-GEWE-TOKEN={TOKEN} 不可用或已过期")})),
    )
    .mount(&gewe)
    .await;
    reply(
        "offline",
        body(json!({"ret":500,"msg":"发送消息失败","data":{"code":"-1","msg":"微信已离线"}})),
    )
    .mount(&gewe)
    .await;
    reply("ticket", body(json!({"ret":500,"msg":"添加好友失败","data":{"code":"-2","msg":"user ticket invalid"}}))).mount(&gewe).await;
    reply("nullmsg", body(json!({"ret":500,"msg":null})))
        .mount(&gewe)
        .await;
    reply("nov3", body(json!({"ret":200,"msg":"操作成功","data":{}})))
        .mount(&gewe)
        .await;
    reply("down", ResponseTemplate::new(503)).mount(&gewe).await;
    let mut app = spawn_app(test_settings(&gewe.uri())).await;

    let apps = [
        "ok", "token", "offline", "ticket", "nullmsg", "nov3", "down",
    ];
    for app_id in apps {
        let cmd = command(&format!("schema-{app_id}"), app_id);
        assert_valid(&commands, &cmd);
        app.publish(&cmd).await;
    }
    app.publish_raw(b"{\"appId\": 5}", BasicProperties::default())
        .await;
    let mut seen = Vec::new();
    for e in app.events(apps.len() + 1).await {
        assert_valid(&events, &e.body);
        seen.push(e.kind().unwrap_or("none").to_owned());
    }
    // And a duplicate, which adds `duplicate: true`.
    app.publish(&command("schema-ok", "ok")).await;
    let dup = app.next_event().await;
    assert_eq!(dup.body["duplicate"], true);
    assert_valid(&events, &dup.body);
    seen.sort();
    assert_eq!(
        seen,
        [
            "app_offline",
            "invalid_command",
            "none",
            "rejected",
            "rejected",
            "unauthorized",
            "unexpected_response",
            "upstream_unavailable"
        ]
    );

    // The schemas are strict enough to notice drift.
    let mut drifted = dup.body.clone();
    drifted.as_object_mut().expect("object").remove("status");
    assert!(
        !events.is_valid(&drifted),
        "an event without status is rejected"
    );
    let mut renamed = dup.body.clone();
    renamed["status"] = json!("ok");
    assert!(!events.is_valid(&renamed), "an unknown status is rejected");
    assert!(
        !commands.is_valid(&json!({"appId": "a"})),
        "a command without its fields is rejected"
    );
    app.stop().await;
}

#[tokio::test]
async fn accepted_events_and_gewe_callbacks_match_the_asyncapi_schemas() {
    let accepted = schema("AcceptedEvent");
    let results = schema("ResultEvent");
    let callbacks = schema("ModContactsCallback");
    let gewe = callbacks::gewe().await;
    let mut app = spawn_app(callbacks::callback_settings(&gewe.uri())).await;
    let id = format!("schema-accepted-{}", uuid::Uuid::new_v4().simple());
    app.publish(&command(&id, "wx_schema")).await;
    let succeeded = app.next_event().await;
    assert_valid(&results, &succeeded.body);

    // The body the simulator posts, as GeWe would.
    let callback = callbacks::accepted_callback("wx_schema", &id);
    assert_valid(&callbacks, &callback);
    let addr = app.callback_addr.expect("endpoint");
    let status = callbacks::post(addr, &callbacks::with_secret(), callback.to_string()).await;
    assert_eq!(status, 200);
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "add_friend.accepted");
    assert_valid(&accepted, &event.body);

    // Strict enough to notice drift, and kept apart from the other events.
    assert!(
        !results.is_valid(&event.body),
        "an accepted event is not a ResultEvent"
    );
    let mut drifted = event.body.clone();
    drifted
        .as_object_mut()
        .expect("object")
        .remove("acceptedAt");
    assert!(!accepted.is_valid(&drifted), "acceptedAt is required");
    let mut other = callback.clone();
    other["TypeName"] = json!("AddMsg");
    assert!(!callbacks.is_valid(&other), "another TypeName is rejected");
    app.stop().await;
}
