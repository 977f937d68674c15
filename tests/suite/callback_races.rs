//! Callbacks that race GeWe's answer, and `v3`s GeWe gives more than one
//! request (contract §6), against the real broker and Redis: a member who
//! needs no verification accepts at once, so the callback reaches the
//! worker before GeWe's answer, with it, or just after; every succeeded
//! command still gets exactly one accepted event, never before its
//! `succeeded`. A reused `v3` accepts every command that got it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, routing};
use gewe_friend_worker::{gewe::ADD_MEMBER_PATH, simulator};
use lapin::{
    BasicProperties,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{FieldTable, ShortString},
};
use secrecy::SecretString;
use serde_json::Value;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use crate::common::{callbacks::*, *};

/// When the member's acceptance reaches the worker, against GeWe's answer.
#[derive(Debug, Clone, Copy)]
enum When {
    /// Posted and confirmed before GeWe answers.
    Before,
    /// Posted while GeWe answers.
    Together,
    /// Posted a moment after GeWe answered.
    After,
}

struct Member {
    when: When,
    /// The worker's callback endpoint, known once it runs.
    endpoint: OnceLock<SocketAddr>,
    client: reqwest::Client,
    /// Callbacks the endpoint did not answer 200.
    refused: AtomicUsize,
}

/// A GeWe whose members accept at once: each success answers
/// `v3_<memberWxid>@stranger` and posts that member's `ModContacts`
/// callback to the worker at `when`.
struct AcceptingGewe {
    member: Arc<Member>,
    url: String,
}

impl AcceptingGewe {
    async fn start(when: When) -> Self {
        let member = Arc::new(Member {
            when,
            endpoint: OnceLock::new(),
            client: reqwest::Client::new(),
            refused: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route(ADD_MEMBER_PATH, routing::post(answer))
            .with_state(member.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { member, url }
    }

    fn post_to(&self, endpoint: SocketAddr) {
        self.member.endpoint.set(endpoint).expect("set once");
    }

    fn refused(&self) -> usize {
        self.member.refused.load(Ordering::SeqCst)
    }
}

async fn answer(State(member): State<Arc<Member>>, body: axum::body::Bytes) -> Json<Value> {
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let wxid = request["memberWxid"].as_str().unwrap_or("").to_owned();
    let app_id = request["appId"].as_str().unwrap_or("").to_owned();
    let v3 = format!("v3_{wxid}@stranger");
    let callback = simulator::mod_contacts(&app_id, &wxid, &v3).to_string();
    let accept = {
        let member = member.clone();
        async move {
            let Some(endpoint) = member.endpoint.get() else {
                member.refused.fetch_add(1, Ordering::SeqCst);
                return;
            };
            let status = member
                .client
                .post(format!("http://{endpoint}/gewe/callback{}", with_secret()))
                .body(callback)
                .send()
                .await
                .map(|r| r.status().as_u16());
            if status.ok() != Some(200) {
                member.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    match member.when {
        When::Before => accept.await,
        When::Together => {
            tokio::spawn(accept);
        }
        When::After => {
            tokio::spawn(async move {
                // The member taps "accept" a moment after GeWe answered.
                tokio::time::sleep(Duration::from_millis(2)).await;
                accept.await;
            });
        }
    }
    Json(gewe_ok(&v3))
}

/// How long the stream of events may pause before the rest counts as lost:
/// far longer than a round of the early delay queue, and than a replica
/// starting up on a loaded machine takes to reach Redis.
const QUIET: Duration = WAIT;

/// Takes the events of `ids` until each has its two or none comes for
/// [`QUIET`], then checks that each command has exactly one `succeeded`
/// and then exactly one `accepted`, and nothing more comes. A lost event
/// is reported with the callbacks `gewe`'s endpoint refused: a refused
/// callback is never sent again by this GeWe, so it is lost too.
async fn one_accepted_after_each_succeeded(
    app: &mut TestApp,
    ids: &[String],
    gewe: &AcceptingGewe,
) {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut taken = 0;
    while taken < ids.len() * 2 {
        let Some(event) = app.try_next_event(QUIET).await else {
            break;
        };
        taken += 1;
        let id = event.body["commandId"].as_str().unwrap_or("").to_owned();
        seen.entry(id).or_default().push(event.status().to_owned());
    }
    let extra = app.try_next_event(Duration::from_secs(1)).await;
    assert!(extra.is_none(), "an extra event: {extra:?}");
    let statuses = |id: &String| -> Vec<&str> {
        seen.get(id)
            .map(|s| s.iter().map(String::as_str).collect())
            .unwrap_or_default()
    };
    let lost = ids
        .iter()
        .filter(|id| statuses(id) == ["succeeded"])
        .count();
    let wrong: Vec<_> = ids
        .iter()
        .map(|id| (id, statuses(id)))
        .filter(|(_, s)| *s != ["succeeded", "accepted"])
        .collect();
    assert!(
        wrong.is_empty(),
        "{lost} of {} accepted events lost ({} callbacks refused by the endpoint); {} commands without exactly one accepted after one succeeded: {wrong:?}",
        ids.len(),
        gewe.refused(),
        wrong.len()
    );
}

/// `n` commands of one account whose members accept `when`; with Redis
/// when `redis`, and `replicas` workers.
async fn no_accepted_event_is_lost(when: When, redis: bool, replicas: usize, n: usize) {
    let gewe = AcceptingGewe::start(when).await;
    let mut settings = callback_settings(&gewe.url);
    if redis {
        settings.redis.url = Some(redis_url());
    }
    let mut app = spawn_app(settings.clone()).await;
    gewe.post_to(app.callback_addr.expect("endpoint"));
    let mut others = Vec::new();
    for _ in 1..replicas {
        let (stop, worker, _) = start_worker(&settings).await;
        others.push((stop, worker));
    }
    // GeWe's callbacks reach only a ready replica (readiness-gated
    // routing); until its session is up the endpoint answers 503 and this
    // GeWe does not send again. Another replica may take commands first,
    // so wait for the one GeWe posts to. The others start while the
    // commands and callbacks flow.
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    let app_id = unique("app");
    let ids: Vec<String> = (0..n).map(|i| unique(&format!("race{i}"))).collect();
    for id in &ids {
        app.publish(&command(id, &app_id)).await;
    }
    one_accepted_after_each_succeeded(&mut app, &ids, &gewe).await;
    assert_eq!(gewe.refused(), 0, "callbacks the endpoint refused");
    wait_until_drained(&settings.callbacks.queue).await;
    for (stop, worker) in others {
        stop.cancel();
        worker.await.expect("join").expect("clean exit");
    }
    app.stop().await;
}

/// An operator deleted `<callbacks.queue>.early`: the first early callback
/// finds it missing, declares it again and goes round it, so every command
/// still gets its accepted event and the queue is back.
#[tokio::test]
async fn a_deleted_early_queue_is_declared_again() {
    let gewe = AcceptingGewe::start(When::Before).await;
    let settings = callback_settings(&gewe.url);
    let mut app = spawn_app(settings.clone()).await;
    gewe.post_to(app.callback_addr.expect("endpoint"));
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    let early = gewe_friend_worker::broker::topology::early_queue_name(&settings.callbacks.queue);
    app.channel
        .queue_delete(early.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the early queue");

    let app_id = unique("app");
    let ids: Vec<String> = (0..10).map(|i| unique(&format!("early{i}"))).collect();
    for id in &ids {
        app.publish(&command(id, &app_id)).await;
    }
    one_accepted_after_each_succeeded(&mut app, &ids, &gewe).await;
    assert_eq!(gewe.refused(), 0, "callbacks the endpoint refused");

    let (connection, channel) = confirm_channel(&amqp_url()).await;
    let declared = channel
        .queue_declare(
            early.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_ok(), "the early queue is back: {declared:?}");
    let _ = connection.close(200, "checked".into()).await;
    app.stop().await;
}

#[tokio::test]
async fn callbacks_before_gewes_answer_lose_no_accepted_event_in_memory() {
    no_accepted_event_is_lost(When::Before, false, 1, 100).await;
}

#[tokio::test]
async fn callbacks_before_gewes_answer_lose_no_accepted_event_with_redis() {
    no_accepted_event_is_lost(When::Before, true, 1, 100).await;
}

#[tokio::test]
async fn callbacks_with_gewes_answer_lose_no_accepted_event_in_memory() {
    no_accepted_event_is_lost(When::Together, false, 1, 100).await;
}

#[tokio::test]
async fn callbacks_with_gewes_answer_lose_no_accepted_event_with_redis() {
    no_accepted_event_is_lost(When::Together, true, 1, 100).await;
}

#[tokio::test]
async fn callbacks_just_after_gewes_answer_lose_no_accepted_event_in_memory() {
    no_accepted_event_is_lost(When::After, false, 1, 100).await;
}

#[tokio::test]
async fn callbacks_just_after_gewes_answer_lose_no_accepted_event_with_redis() {
    no_accepted_event_is_lost(When::After, true, 1, 100).await;
}

#[tokio::test]
async fn early_callbacks_across_two_replicas_with_redis_lose_no_accepted_event() {
    no_accepted_event_is_lost(When::Before, true, 2, 100).await;
}

/// GeWe answering every request with the same `v3`, as it does for later
/// requests by one account to one member.
async fn gewe_reusing(v3: &str) -> MockServer {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok(v3)))
        .mount(&gewe)
        .await;
    gewe
}

/// Publishes `id` with its own correlation id; waits for its succeeded event.
async fn succeeded_with_correlation(app: &mut TestApp, id: &str, app_id: &str) {
    app.publish_raw(
        command(id, app_id).to_string().as_bytes(),
        BasicProperties::default().with_correlation_id(ShortString::from(format!("corr-{id}"))),
    )
    .await;
    let event = app.next_event().await;
    assert_eq!(event.status(), "succeeded", "{}", event.body);
}

/// The accepted events that arrive: (commandId, correlation_id), sorted.
async fn accepted(app: &mut TestApp, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let event = app.next_event().await;
        assert_eq!(event.status(), "accepted", "{}", event.body);
        let correlation = event
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string());
        got.push((
            event.body["commandId"].as_str().unwrap_or("").to_owned(),
            correlation.unwrap_or_default(),
        ));
    }
    let extra = app.try_next_event(Duration::from_secs(1)).await;
    assert!(extra.is_none(), "an extra event: {extra:?}");
    got.sort();
    got
}

async fn a_reused_v3_accepts_every_command_that_got_it(redis: bool) {
    let v3 = format!("v3_{}@stranger", unique("reused"));
    let gewe = gewe_reusing(&v3).await;
    let mut settings = callback_settings(&gewe.uri());
    if redis {
        settings.redis.url = Some(redis_url());
    }
    let mut app = spawn_app(settings).await;
    let endpoint = app.callback_addr.expect("endpoint");
    let app_id = unique("app");
    let callback = simulator::mod_contacts(&app_id, "wxid_member", &v3).to_string();
    let pair = |id: &String| (id.clone(), format!("corr-{id}"));

    // Two requests to the member before it accepts: both are accepted.
    let (a, b) = (unique("first"), unique("second"));
    succeeded_with_correlation(&mut app, &a, &app_id).await;
    succeeded_with_correlation(&mut app, &b, &app_id).await;
    assert_eq!(post(endpoint, &with_secret(), callback.clone()).await, 200);
    let mut want = vec![pair(&a), pair(&b)];
    want.sort();
    assert_eq!(accepted(&mut app, 2).await, want);

    // A third request later (the member removed the friend, say): its
    // acceptance is its own, the first two are not announced again.
    let c = unique("third");
    succeeded_with_correlation(&mut app, &c, &app_id).await;
    assert_eq!(post(endpoint, &with_secret(), callback.clone()).await, 200);
    assert_eq!(accepted(&mut app, 1).await, vec![pair(&c)]);
    assert_eq!(post(endpoint, &with_secret(), callback).await, 200);
    assert!(
        app.try_next_event(Duration::from_secs(1)).await.is_none(),
        "a repeated callback made an event"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_reused_v3_accepts_every_command_that_got_it_in_memory() {
    a_reused_v3_accepts_every_command_that_got_it(false).await;
}

#[tokio::test]
async fn a_reused_v3_accepts_every_command_that_got_it_with_redis() {
    a_reused_v3_accepts_every_command_that_got_it(true).await;
}

#[tokio::test]
async fn a_secret_with_a_plus_is_compared_as_sent_not_as_a_space() {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.callbacks.enabled = false;
    // Configuration refuses a `+` now (check-config below); an endpoint
    // built without validation shows the comparison itself.
    let secret = "plus+secret-0123456789";
    settings.callbacks.secret = Some(SecretString::from(secret));
    let app = spawn_app(settings).await;
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    let addr = app.callback_addr.expect("endpoint");
    let body = serde_json::json!({"TypeName": "AddMsg", "Data": {}}).to_string();
    for (query, want) in [
        (format!("?secret={secret}"), 200),
        ("?secret=plus%2Bsecret-0123456789".to_owned(), 200),
        ("?secret=plus%20secret-0123456789".to_owned(), 401),
    ] {
        assert_eq!(post(addr, &query, body.clone()).await, want, "{query}");
    }
    app.stop().await;
}

#[tokio::test]
async fn check_config_refuses_an_open_endpoint_weak_secrets_and_a_short_dedupe_window() {
    use crate::common::process::program;
    let cases: [(&[(&str, &str)], &str); 6] = [
        (
            &[("GEWE_WORKER__CALLBACKS__LISTEN", "0.0.0.0:8081")],
            "callbacks.secret",
        ),
        (
            &[
                ("GEWE_WORKER__CALLBACKS__LISTEN", "127.0.0.1:8081"),
                ("GEWE_WORKER__CALLBACKS__SECRET", "too-short"),
            ],
            "callbacks.secret",
        ),
        (
            &[("GEWE_WORKER__CALLBACKS__SECRET", "plus+secret-0123456789")],
            "callbacks.secret",
        ),
        (&[("GEWE_WORKER__DEDUPE__WINDOW", "0s")], "dedupe.window"),
        (&[("GEWE_WORKER__DEDUPE__WINDOW", "30m")], "dedupe.window"),
        (
            &[("GEWE_WORKER__CALLBACKS__EARLY_GRACE", "0s")],
            "callbacks.early_grace",
        ),
    ];
    for (env, key) in cases {
        let mut cmd = program();
        cmd.arg("check-config").envs(env.iter().copied());
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .expect("in time")
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} must be refused");
        assert!(stderr.contains(key), "{env:?}: {stderr} must name {key}");
    }
    let mut loopback = program();
    loopback
        .arg("check-config")
        .env("GEWE_WORKER__CALLBACKS__LISTEN", "127.0.0.1:8081");
    let out = loopback.output().await.expect("runs");
    assert!(
        out.status.success(),
        "a loopback endpoint needs no secret: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn with_redis_a_v3_remembered_by_the_previous_version_still_matches() {
    use redis::AsyncCommands;
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.redis.url = Some(redis_url());
    let mut app = spawn_app(settings).await;
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    let (id, app_id) = (unique("legacy"), unique("app"));
    let v3 = v3_for(&id);
    // As the version before the (appId, v3) entries wrote it.
    let legacy = serde_json::json!({
        "commandId": id, "appId": app_id, "chatroomId": "34757816141@chatroom",
        "memberWxid": format!("wxid_{id}"), "v3": v3,
        "correlationId": format!("corr-{id}"), "completedAt": "2026-12-01T08:00:00.000Z"
    });
    let mut redis = redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("gewe-friend-worker:v3:{}:{app_id}:{v3}", app_id.len());
    let _: () = redis
        .pset_ex(&key, legacy.to_string(), 600_000)
        .await
        .expect("SET");
    let endpoint = app.callback_addr.expect("endpoint");
    let callback = accepted_callback(&app_id, &id).to_string();
    assert_eq!(post(endpoint, &with_secret(), callback).await, 200);
    let event = app.next_event().await;
    assert_eq!(event.status(), "accepted", "{}", event.body);
    assert_eq!(event.body["commandId"], id);
    assert_eq!(
        event
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some(format!("corr-{id}").as_str())
    );
    app.stop().await;
}
