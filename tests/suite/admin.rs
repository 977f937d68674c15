//! The operator's console and its API (contract §8): who may use it, the
//! accounts it steers, and the dead letters it lists and replays after a
//! real failure.

use std::{collections::HashSet, time::Duration};

use crate::common::{admin::*, *};
use gewe_friend_worker::{accounts::AccountState, gewe::ADD_MEMBER_PATH};
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use reqwest::{StatusCode, header};
use serde_json::json;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

async fn gewe_answering(status: u16) -> MockServer {
    let gewe = MockServer::start().await;
    mount(&gewe, status).await;
    gewe
}

async fn mount(gewe: &MockServer, status: u16) {
    let response = match status {
        200 => ResponseTemplate::new(200).set_body_json(gewe_ok("v3_admin")),
        other => ResponseTemplate::new(other),
    };
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(response)
        .mount(gewe)
        .await;
}

#[tokio::test]
async fn the_console_needs_the_token_a_session_and_a_csrf_token_and_the_ops_port_serves_none_of_it()
{
    let gewe = gewe_never_called().await;
    let mut settings = test_settings(&gewe.uri());
    with_admin(&mut settings);
    let accounts = MemoryDirectory::of(&["wx_paused_later", "wx_other"]);
    let app = spawn_app_with_accounts(settings, true, Some(accounts.clone())).await;
    let admin = app.admin_addr.expect("admin.listen is bound");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let url = |p: &str| format!("http://{admin}{p}");

    // The API: 401 without the token or with a wrong one.
    for auth in [
        None,
        Some("Bearer wrong-token-of-some-length"),
        Some("Basic x"),
    ] {
        let mut request = http.get(url("/api/summary"));
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let r = request.send().await.expect("answers");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let body: serde_json::Value = r.json().await.expect("json");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("token")));
    }
    let api = Api::new(admin);
    let (status, summary) = api.get("/api/summary").await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["breaker"], "closed");
    assert_eq!(summary["deadLetters"], 0);
    // The console without a session: the sign-in page, 401.
    let r = http.get(url("/")).send().await.expect("answers");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.expect("html").contains("name=\"token\""));

    // Sign-in: a wrong token is refused; the right one sets the cookie.
    let (status, cookie) = sign_in(admin, "wrong-token-of-some-length").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(cookie.is_none());
    let (status, cookie) = sign_in(admin, ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = cookie.expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains(ADMIN_TOKEN), "the token is not the cookie");
    let session = cookie.split(';').next().expect("name=value").to_owned();
    let page = http
        .get(url("/"))
        .header(header::COOKIE, &session)
        .send()
        .await
        .expect("answers");
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = page.text().await.expect("html");
    assert!(html.contains("wx_paused_later"), "the accounts table");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from outside"
    );
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();

    // A state change with the cookie but without (or with a wrong) CSRF
    // token is refused and changes nothing.
    let pause = url("/api/accounts/wx_paused_later/pause");
    for token in [None, Some("00ff"), Some("not-hex")] {
        let mut request = http
            .post(&pause)
            .header(header::COOKIE, &session)
            .json(&json!({}));
        if let Some(token) = token {
            request = request.header("x-csrf-token", token);
        }
        let r = request.send().await.expect("answers");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{token:?}");
    }
    assert_eq!(
        accounts.state("wx_paused_later"),
        Some(AccountState::Active)
    );
    let r = http
        .post(&pause)
        .header(header::COOKIE, &session)
        .header("x-csrf-token", &csrf)
        .json(&json!({"for": "2h", "reason": "WeChat warned"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(r.status(), StatusCode::OK);
    let view: serde_json::Value = r.json().await.expect("json");
    assert_eq!(view["state"], "paused");
    assert_eq!(view["reason"], "WeChat warned");
    assert!(view["restingUntil"].is_string());
    // The API with the token needs no CSRF token (no ambient credential).
    let (status, view) = api
        .post("/api/accounts/wx_paused_later/resume", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["state"], "active");
    let (status, answer) = api.post("/api/accounts/wx_nobody/pause", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("wx_nobody"))
    );
    let (status, _) = api
        .post("/api/accounts/wx_other/pause", json!({"for": "soon"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, list) = api.get("/api/accounts").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(2));

    // Signing out clears the cookie (a state change: CSRF token needed).
    let r = http
        .post(url("/logout"))
        .header(header::COOKIE, &session)
        .send()
        .await
        .expect("answers");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(url("/logout"))
        .header(header::COOKIE, &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .expect("answers");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let cleared = r.headers()[header::SET_COOKIE].to_str().expect("ascii");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");

    // The ops port serves none of it.
    for route in [
        "/",
        "/api/summary",
        "/api/accounts",
        "/api/dead-letters",
        "/console/sections",
    ] {
        let r = http
            .get(format!("http://{}{route}", app.ops_addr))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("ops answers");
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "ops port {route}");
    }
    let r = http
        .post(format!("http://{}/login", app.ops_addr))
        .body(format!("token={ADMIN_TOKEN}"))
        .send()
        .await
        .expect("ops answers");
    assert!(
        r.status().is_client_error(),
        "ops port /login: {}",
        r.status()
    );
    app.stop().await;
}

#[tokio::test]
async fn without_a_directory_given_the_console_steers_the_worker_s_own_budgets() {
    let gewe = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(gewe_ok("v3_own")))
        .mount(&gewe)
        .await;
    let mut settings = test_settings(&gewe.uri());
    with_admin(&mut settings);
    settings.accounts.daily_limit = 5;
    let mut app = spawn_app_with_accounts(settings, true, None).await;
    let admin = app.admin_addr.expect("bound");
    let api = Api::new(admin);
    let account = unique("wx_own");
    app.publish(&command(&unique("own"), &account)).await;
    assert_eq!(app.next_event().await.status(), "succeeded");
    let (row, body) = api.account(&account).await;
    assert_eq!(
        (
            row["state"].as_str(),
            row["sentToday"].as_u64(),
            row["dailyLimit"].as_u64()
        ),
        (Some("active"), Some(1), Some(5)),
        "{body}"
    );
    let (status, _) = api
        .post(
            &format!("/api/accounts/{account}/pause"),
            json!({"reason": "checking"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Its next command is deferred, not sent.
    app.publish(&command(&unique("own"), &account)).await;
    eventually(WAIT, || async {
        let n = delay_queues::deferred_copies(&app.connection, &app.settings)
            .await
            .len();
        done_or(n == 1, || format!("{n} deferred"))
    })
    .await;
    let (_, body) = api.get("/api/accounts").await;
    assert!(body.to_string().contains("paused"), "{body}");
    app.stop().await;
}

/// Publishes `body` straight into the dead-letter exchange.
async fn dead_letter(app: &TestApp, body: &[u8], properties: BasicProperties) {
    let confirm = app
        .channel
        .basic_publish(
            app.settings.amqp.dead_letter_exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
}

/// Messages ready in `queue`.
async fn depth(app: &TestApp, queue: &str) -> u32 {
    let channel = app.connection.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = channel.close(200, "depth".into()).await;
    q.message_count()
}

#[tokio::test]
async fn listing_dead_letters_leaves_their_order_and_count_unchanged() {
    let gewe = gewe_answering(200).await;
    let mut settings = test_settings(&gewe.uri());
    with_admin(&mut settings);
    let app = spawn_app_with_accounts(settings, true, None).await;
    let api = Api::new(app.admin_addr.expect("bound"));
    let dlq = app.settings.amqp.dead_letter_queue.clone();
    // More than 32: a broker that handed messages back in hash order would
    // show it here.
    let total = 45;
    let bodies: Vec<String> = (0..total)
        .map(|i| match i % 3 {
            0 => format!("not json {i}"),
            _ => command(&format!("dl-{i}"), "wx_dl").to_string(),
        })
        .collect();
    for body in &bodies {
        dead_letter(&app, body.as_bytes(), BasicProperties::default()).await;
    }
    // A partial listing, a full one, and the full one again.
    let first = api.dead_letters(20).await;
    assert_eq!(first.len(), 20);
    let all = api.dead_letters(1000).await;
    let again = api.dead_letters(1000).await;
    let ids = |l: &[serde_json::Value]| -> Vec<String> {
        l.iter()
            .map(|d| d["id"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(all.len(), total);
    assert_eq!(ids(&all), ids(&again), "order unchanged by a listing");
    assert_eq!(
        ids(&first),
        ids(&all)[..20],
        "a partial listing is the head"
    );
    let shown: Vec<&str> = all
        .iter()
        .map(|d| d["body"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(shown, bodies.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(all[1]["commandId"] == "dl-1" && all[1]["appId"] == "wx_dl");
    assert_eq!(depth(&app, &dlq).await, total as u32, "count unchanged");
    // Replaying one from the middle keeps the others in order.
    let picked = ids(&all)[22].clone();
    let (status, done) = api
        .post(
            "/api/dead-letters/replay",
            json!({"ids": [picked, "no-such-id"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["replayed"], 1);
    assert_eq!(done["notFound"], json!(["no-such-id"]));
    let after = api.dead_letters(1000).await;
    let mut expected = ids(&all);
    expected.remove(22);
    // The replayed one (a valid command: 22 % 3 == 1) went to the worker.
    assert_eq!(ids(&after), expected);
    // A plain consumer sees the same order: the broker kept it.
    let channel = app.connection.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            dlq.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut seen = Vec::new();
    while seen.len() < total - 1 {
        let d = next_on_raw(&mut consumer).await;
        seen.push(String::from_utf8_lossy(&d).into_owned());
    }
    let mut want: Vec<String> = bodies.clone();
    want.remove(22);
    assert_eq!(seen, want);
    app.stop().await;
}

async fn next_on_raw(consumer: &mut lapin::Consumer) -> Vec<u8> {
    use futures_util::StreamExt;
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a dead letter")
        .expect("open")
        .expect("delivery");
    delivery
        .acker
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .expect("ack");
    delivery.data
}

fn traceparent(value: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), AMQPValue::LongString(value.into()));
    BasicProperties::default().with_headers(headers)
}

fn event_trace(e: &Received) -> Option<String> {
    match e
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("traceparent")?
    {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Dead letters through real causes: a command whose GeWe stays down past
/// the delivery limit (the worker is stopped twice while it waits for the
/// breaker), and a malformed body. GeWe is fixed, they are replayed, and
/// each one's event arrives.
#[tokio::test]
async fn commands_dead_lettered_by_real_causes_are_replayed_once_the_cause_is_fixed() {
    let gewe = gewe_answering(503).await;
    let mut settings = test_settings(&gewe.uri());
    settings.amqp.delivery_limit = 1;
    settings.breaker.failure_threshold = 1;
    settings.breaker.cooldown = Duration::from_secs(3600);
    with_admin(&mut settings);
    let mut app = spawn_app_with_accounts(settings.clone(), true, None).await;
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    app.publish_raw(
        command("down-1", "wx_down").to_string().as_bytes(),
        traceparent(trace),
    )
    .await;
    app.publish(&json!({"commandId": "bad-1", "chatroomId": "1@chatroom"}))
        .await;
    let invalid = app.next_event().await;
    assert_eq!(invalid.kind(), Some("invalid_command"));
    // Delivery 1 and 2 of down-1 each meet GeWe down and wait for the
    // breaker; stopping the worker hands it back, the second time past
    // the delivery limit.
    let reached = |n: usize| {
        let gewe = &gewe;
        async move {
            eventually(WAIT, || async {
                let seen = gewe.received_requests().await.map_or(0, |r| r.len());
                done_or(seen >= n, || format!("GeWe saw {seen} requests, not {n}"))
            })
            .await
        }
    };
    reached(1).await;
    app.stop_worker().await;
    let (stop, worker, _) = start_worker(&app.settings).await;
    reached(2).await;
    stop.cancel();
    worker.await.expect("join").expect("clean exit");

    // GeWe is fixed; a worker with the console runs.
    gewe.reset().await;
    mount(&gewe, 200).await;
    let settings = app.settings.clone();
    let accounts = None;
    let console = gewe_friend_worker::app::Application::build_with_accounts(settings, accounts)
        .await
        .expect("builds");
    let api = Api::new(console.admin_addr().expect("bound"));
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(console.run(stop.clone()));
    let list = eventually(WAIT, || async {
        let list = api.dead_letters(10).await;
        done_or(list.len() == 2, || format!("{list:?}")).map(|()| list)
    })
    .await;
    let by_command = |id: &str| {
        list.iter()
            .find(|d| d["commandId"] == id)
            .unwrap_or_else(|| panic!("{id} in {list:?}"))
            .clone()
    };
    let down = by_command("down-1");
    let bad = by_command("bad-1");
    assert_eq!(down["reason"], "delivery_limit", "{down}");
    assert_eq!(down["appId"], "wx_down");
    assert!(down["deadAt"].is_string());
    assert!(
        bad["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("invalid_command") && r.contains("appId")),
        "{bad}"
    );
    let (status, summary) = api.get("/api/summary").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(summary["deadLetters"], 2, "{summary}");

    // Replayed by id: it succeeds now, in the publisher's trace.
    let (status, done) = api
        .post("/api/dead-letters/replay", json!({"ids": [down["id"]]}))
        .await;
    assert_eq!(
        (status, done["replayed"].clone()),
        (StatusCode::OK, json!(1)),
        "{done}"
    );
    let event = app.next_event().await;
    assert_eq!(event.body["commandId"], "down-1");
    assert_eq!(event.status(), "succeeded", "{:?}", event.body);
    assert!(event.body.get("duplicate").is_none());
    let carried = event_trace(&event).expect("traceparent kept");
    assert!(
        carried.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{carried}"
    );
    // Replayed with `all`: the malformed one gets its event again and is
    // dead-lettered again, counted as replayed once.
    let (status, done) = api
        .post(
            "/api/dead-letters/replay",
            json!({"all": true, "limit": 10}),
        )
        .await;
    assert_eq!(
        (status, done["replayed"].clone()),
        (StatusCode::OK, json!(1)),
        "{done}"
    );
    let again = app.next_event().await;
    assert_eq!(again.body["commandId"], "bad-1");
    assert_eq!(again.kind(), Some("invalid_command"));
    let back = eventually(WAIT, || async {
        let list = api.dead_letters(10).await;
        done_or(list.len() == 1, || format!("{list:?}")).map(|()| list)
    })
    .await;
    assert_eq!(back[0]["commandId"], "bad-1");
    assert_eq!(back[0]["replayed"], 1);
    stop.cancel();
    worker.await.expect("join").expect("clean exit");
    app.stop().await;
}

/// The CLI over the API: a table, JSON, pause and resume, and clear errors
/// for a wrong token, a wrong URL and an unknown appId.
#[tokio::test]
async fn the_cli_lists_pauses_and_resumes_and_says_what_is_wrong() {
    let gewe = gewe_never_called().await;
    let mut settings = test_settings(&gewe.uri());
    with_admin(&mut settings);
    let accounts = MemoryDirectory::of(&["wx_cli"]);
    let app = spawn_app_with_accounts(settings, true, Some(accounts.clone())).await;
    let url = format!("http://{}", app.admin_addr.expect("bound"));
    let cli = |token: &str, args: &[&str]| {
        let mut cmd = process::program();
        cmd.env("GEWE_WORKER__ADMIN__TOKEN", token).args(args);
        async move { cmd.output().await.expect("runs") }
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = cli(ADMIN_TOKEN, &["accounts", "list", "--admin-url", &url]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("wx_cli") && text(&out).contains("active"),
        "{}",
        text(&out)
    );
    let out = cli(
        ADMIN_TOKEN,
        &[
            "accounts",
            "pause",
            "wx_cli",
            "--for",
            "1h",
            "--reason",
            "warned",
            "--admin-url",
            &url,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(accounts.state("wx_cli"), Some(AccountState::Paused));
    let out = cli(
        ADMIN_TOKEN,
        &["accounts", "list", "--json", "--admin-url", &url],
    )
    .await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed[0]["state"], "paused");
    assert_eq!(listed[0]["reason"], "warned");
    let out = cli(
        ADMIN_TOKEN,
        &["accounts", "resume", "wx_cli", "--admin-url", &url],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(accounts.state("wx_cli"), Some(AccountState::Active));
    let out = cli(ADMIN_TOKEN, &["dead-letters", "list", "--admin-url", &url]).await;
    assert!(
        out.status.success() && text(&out).contains("COMMAND ID"),
        "{}",
        text(&out)
    );

    let out = cli(
        "a-wrong-token-of-16+",
        &["accounts", "list", "--admin-url", &url],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("refused the admin token"),
        "{}",
        text(&out)
    );
    assert!(
        !text(&out).contains("a-wrong-token-of-16+"),
        "the token is never printed"
    );
    let out = cli(
        ADMIN_TOKEN,
        &["accounts", "list", "--admin-url", "http://127.0.0.1:1"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach the admin API"),
        "{}",
        text(&out)
    );
    let ops = format!("http://{}", app.ops_addr);
    let out = cli(ADMIN_TOKEN, &["accounts", "list", "--admin-url", &ops]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("not the ops port"), "{}", text(&out));
    let out = cli(
        ADMIN_TOKEN,
        &["accounts", "pause", "wx_unknown", "--admin-url", &url],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no account 'wx_unknown'"),
        "{}",
        text(&out)
    );
    let out = cli(
        ADMIN_TOKEN,
        &["dead-letters", "replay", "--admin-url", &url],
    )
    .await;
    assert!(!out.status.success(), "replay needs --id or --all");
    app.stop().await;
}

/// The worker is killed (SIGKILL) in the middle of a replay of many dead
/// letters: every command is afterwards in the dead letters, in the
/// command queue, or has its event; a second replay finishes the job and
/// every command gets its event.
#[tokio::test]
async fn a_worker_killed_mid_replay_loses_nothing() {
    let gewe = gewe_answering(200).await;
    let mut settings = test_settings(&gewe.uri());
    settings.redis.url = Some(redis_url());
    let mut app = spawn_listener(&settings).await;
    // Enough that the replay is still moving them when the kill lands,
    // however fast the machine is at that moment.
    let total = 1000;
    // Unique ids: Redis remembers outcomes across runs.
    let run = unique("kill");
    for i in 0..total {
        dead_letter(
            &app,
            command(&format!("{run}-{i}"), &format!("wx_kill_{}", i % 4))
                .to_string()
                .as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let dlq = settings.amqp.dead_letter_queue.clone();
    let worker_with_console = || {
        let mut cmd = process::worker_command(&settings, &gewe.uri());
        cmd.env("GEWE_WORKER__REDIS__URL", redis_url())
            .env("GEWE_WORKER__ADMIN__LISTEN", "127.0.0.1:0")
            .env("GEWE_WORKER__ADMIN__TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "warn,gewe_friend_worker::app=info");
        cmd
    };
    let mut first = process::spawn_worker(worker_with_console()).await;
    let admin = first
        .logs
        .reported("operator's console listening", "addr")
        .await;
    // Its answer never comes: the worker dies first.
    let replay = tokio::spawn(
        reqwest::Client::new()
            .post(format!("http://{admin}/api/dead-letters/replay"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"all": true}))
            .send(),
    );
    // Killed once part of the dead letters moved.
    eventually(WAIT, || async {
        let left = depth(&app, &dlq).await;
        done_or(left < total - 20, || format!("{left} dead letters left"))
    })
    .await;
    first.child.start_kill().expect("kill");
    first.child.wait().await.expect("killed");
    let _ = replay.await;
    let mut seen: HashSet<String> = HashSet::new();
    // Unmarked events per commandId: exactly one each, in the end.
    let mut unmarked: std::collections::HashMap<String, u32> = Default::default();
    let mut events = 0;
    while let Some(e) = app.try_next_event(Duration::from_millis(300)).await {
        events += 1;
        let id = e.body["commandId"].as_str().unwrap_or("").to_owned();
        if e.body.get("duplicate").is_none() {
            *unmarked.entry(id.clone()).or_default() += 1;
        }
        seen.insert(id);
    }
    // The deliveries the killed worker held go back to the queue once the
    // broker notices the dead connection: every command is somewhere then.
    let (left_dead, queued) = eventually(WAIT, || async {
        let left_dead = depth(&app, &dlq).await;
        let queued = depth(&app, &settings.amqp.command_queue).await;
        let somewhere = left_dead as usize + queued as usize + seen.len();
        done_or(somewhere >= total as usize, || {
            format!(
                "{left_dead} dead, {queued} queued, {} with events: not every command is somewhere",
                seen.len()
            )
        })
        .map(|()| (left_dead, queued))
    })
    .await;
    eprintln!(
        "killed mid-replay: {left_dead} dead letters left, {queued} in the command queue, {} commands had events ({events} events)",
        seen.len()
    );
    let published_before_kill = seen.clone();
    assert!(left_dead > 0, "the kill came before the replay ended");
    // A new worker replays the rest; every command gets its event.
    let mut second = process::spawn_worker(worker_with_console()).await;
    let admin = second
        .logs
        .reported("operator's console listening", "addr")
        .await;
    let (status, done) = Api::new(admin)
        .post("/api/dead-letters/replay", json!({"all": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut duplicates = 0;
    while seen.len() < total as usize || unmarked.len() < total as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {total} commands had their event",
            seen.len()
        );
        if let Some(e) = app.try_next_event(Duration::from_millis(500)).await {
            if e.body.get("duplicate").is_some() {
                duplicates += 1;
            } else {
                *unmarked
                    .entry(e.body["commandId"].as_str().unwrap_or("").to_owned())
                    .or_default() += 1;
            }
            seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
        }
    }
    eprintln!(
        "after the second replay: all {total} commands had their event; {duplicates} duplicates marked, {} published twice unmarked",
        unmarked.values().filter(|n| **n > 1).count()
    );
    // A worker killed between an event's confirm and its published mark in
    // Redis leaves a command whose redelivery cannot tell that the event is
    // out: it is published again, unmarked (README, Guarantees). Only the
    // commands the killed worker held can be in that window: at most its
    // prefetch, and never more than two events.
    let twice: Vec<_> = unmarked.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.len() <= settings.amqp.prefetch as usize && twice.iter().all(|(_, n)| **n == 2),
        "at most one unmarked event per command but for those in flight at the kill: {twice:?}"
    );
    assert!(
        twice
            .iter()
            .all(|(id, _)| published_before_kill.contains(*id)),
        "a second unmarked event only for a command the killed worker had published: {twice:?}"
    );
    assert_eq!(depth(&app, &dlq).await, 0, "no dead letter left");
    second.child.start_kill().expect("kill");
    let _ = second.child.wait().await;
    app.stop().await;
}
