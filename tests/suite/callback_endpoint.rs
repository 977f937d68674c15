//! `POST /gewe/callback` (contract §6) against the real broker: what it
//! publishes, what it refuses (401, 400, 413), 503 when the broker does not
//! confirm or there is no session, and its limits as a listener that faces
//! the internet.

use std::time::Duration;

use crate::common::{
    callbacks::*,
    tcp_proxy::{Mode, TcpProxy},
    *,
};
use futures_util::StreamExt;
use gewe_friend_worker::{app::Application, broker::topology};
use lapin::{
    Consumer,
    options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A private queue bound to the callbacks exchange with `key`.
async fn bound_queue(app: &TestApp, key: &str, arguments: FieldTable) -> lapin::Queue {
    let queue = app
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("observer queue");
    app.channel
        .queue_bind(
            queue.name().clone(),
            app.settings.callbacks.exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    queue
}

/// A consumer of everything published to the callbacks exchange.
async fn observe(app: &TestApp) -> Consumer {
    let queue = bound_queue(app, "#", FieldTable::default()).await;
    app.channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

#[tokio::test]
async fn it_publishes_every_type_unchanged_and_refuses_without_the_secret_non_objects_and_large_bodies()
 {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    // Only the endpoint: nothing consumes the callbacks queue.
    settings.callbacks.enabled = false;
    let app = spawn_app(settings).await;
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    let mut seen = observe(&app).await;
    let addr = app.callback_addr.expect("endpoint");
    let ok =
        json!({"TypeName": "AddMsg", "Appid": "wx_a", "Data": {"Content": "你好"}}).to_string();

    let refused = [
        ("", ok.clone(), 401, "no secret"),
        ("?secret=wrong", ok.clone(), 401, "a wrong secret"),
        (
            &format!("?secret={SECRET}x") as &str,
            ok.clone(),
            401,
            "a longer secret",
        ),
        ("?other=1", ok.clone(), 401, "no secret parameter"),
        (&with_secret(), "{not json".to_owned(), 400, "not JSON"),
        (&with_secret(), "[1, 2]".to_owned(), 400, "an array"),
        (&with_secret(), "{}".to_owned(), 400, "no TypeName"),
        (
            &with_secret(),
            r#"{"TypeName": ""}"#.to_owned(),
            400,
            "an empty TypeName",
        ),
        (
            &with_secret(),
            r#"{"TypeName": 7}"#.to_owned(),
            400,
            "a TypeName that is not a string",
        ),
        (
            &with_secret(),
            format!(
                r#"{{"TypeName": "AddMsg", "pad": "{}"}}"#,
                "x".repeat(1024 * 1024)
            ),
            413,
            "a body over 1 MiB",
        ),
    ];
    for (query, body, want, why) in &refused {
        let got = post(addr, query, body.clone()).await;
        assert_eq!(got, *want, "{why}");
    }
    // The secret may be URL-encoded like any query value; other
    // parameters are ignored.
    let encoded: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
    let just_under = format!(
        r#"{{"TypeName": "ModContacts", "pad": "{}"}}"#,
        "y".repeat(1024 * 1024 - 64)
    );
    let accepted = [
        (format!("?a=b&secret={encoded}"), ok.clone()),
        (with_secret(), just_under.clone()),
    ];
    for (query, body) in &accepted {
        assert_eq!(post(addr, query, body.clone()).await, 200);
    }
    // Exactly what was answered 200 was published, unchanged, routed by
    // TypeName, persistent, with the time it arrived.
    for (want_key, want_body) in [("AddMsg", &ok), ("ModContacts", &just_under)] {
        let delivery = tokio::time::timeout(WAIT, seen.next())
            .await
            .expect("published")
            .expect("consumer open")
            .expect("delivery");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        assert_eq!(delivery.routing_key.as_str(), want_key);
        assert!(
            delivery.data == want_body.as_bytes(),
            "the body is unchanged"
        );
        let p = &delivery.properties;
        assert_eq!(p.kind().as_ref().map(|k| k.as_str()), Some(want_key));
        assert_eq!(*p.delivery_mode(), Some(2));
        let received = p
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-gewe-received-at").cloned());
        let Some(AMQPValue::LongString(at)) = received else {
            panic!("no x-gewe-received-at header: {p:?}");
        };
        humantime::parse_rfc3339(&String::from_utf8_lossy(at.as_bytes())).expect("RFC 3339");
    }
    let more = tokio::time::timeout(Duration::from_millis(500), seen.next()).await;
    assert!(more.is_err(), "a refused callback was published");
    app.stop().await;
}

/// An endpoint-only worker (no callbacks consumed) whose broker connection
/// goes through a proxy that starts cut off: the harness talks to the
/// broker directly, the worker has no session until the proxy opens.
struct EndpointCutOff {
    app: TestApp,
    proxy: TcpProxy,
    settings: gewe_friend_worker::config::Settings,
    addr: std::net::SocketAddr,
    ops: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
    _in_process: Option<InProcess>,
}

impl EndpointCutOff {
    async fn start(gewe: &str) -> Self {
        let mut settings = callback_settings(gewe);
        settings.callbacks.enabled = false;
        let app = spawn_listener(&settings).await;
        let proxy = TcpProxy::to(&amqp_url()).await;
        proxy.set(Mode::Cut);
        let mut worker_settings = settings.clone();
        worker_settings.amqp.url = proxy.url.clone();
        let in_process = in_process().await;
        let worker = Application::build(worker_settings).await.expect("builds");
        let (addr, ops) = (worker.callback_addr().expect("endpoint"), worker.ops_addr());
        let stop = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn(worker.run(stop.clone()));
        Self {
            app,
            proxy,
            settings,
            addr,
            ops,
            stop,
            running,
            _in_process: in_process,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.running
            .await
            .expect("join")
            .expect("the worker exits cleanly");
        self.app.stop().await;
    }
}

#[tokio::test]
async fn it_answers_503_without_a_broker_session_or_a_confirm_and_200_again_after() {
    let gewe = gewe().await;
    let cut = EndpointCutOff::start(&gewe.uri()).await;
    let (app, proxy, settings) = (&cut.app, &cut.proxy, &cut.settings);
    let (addr, ops) = (cut.addr, cut.ops);
    let callback = json!({"TypeName": "ModContacts", "Appid": "wx_a", "Data": {}}).to_string();

    assert_eq!(
        post(addr, &with_secret(), callback.clone()).await,
        503,
        "no broker session"
    );
    proxy.set(Mode::Open);
    wait_for_readyz(ops, 200, "ready").await;
    assert_eq!(post(addr, &with_secret(), callback.clone()).await, 200);

    // The broker refuses the message: a queue that takes nothing (and has
    // no consumer, which would take it past the limit).
    let mut full = FieldTable::default();
    full.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    full.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    bound_queue(app, "Refused", full).await;
    let refused = json!({"TypeName": "Refused", "Data": {}}).to_string();
    assert_eq!(
        post(addr, &with_secret(), refused).await,
        503,
        "the broker nacked"
    );

    // The exchange is gone: the channel breaks, and the next request after
    // it is back publishes on a new one, in the same session.
    app.channel
        .exchange_delete(
            settings.callbacks.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .expect("delete the exchange");
    assert_eq!(post(addr, &with_secret(), callback.clone()).await, 503);
    topology::declare_callbacks(&app.channel, &settings.amqp, &settings.callbacks)
        .await
        .expect("declare again");
    assert_eq!(post(addr, &with_secret(), callback).await, 200);
    let (status, _) = broker::get(ops, "/readyz").await;
    assert_eq!(status, 200, "the worker's session was not disturbed");

    cut.stop().await;
}

/// A callback that arrives while the worker's broker session is down (a
/// broker restart, a dropped connection) waits for the session to come
/// back (up to `SESSION_WAIT`) and is published, instead of a 503 that
/// loses it unless GeWe sends it again.
#[tokio::test]
async fn a_callback_during_a_reconnect_waits_for_the_session() {
    let gewe = gewe().await;
    let cut = EndpointCutOff::start(&gewe.uri()).await;
    let (addr, ops) = (cut.addr, cut.ops);
    let mut seen = observe(&cut.app).await;
    let callback = json!({"TypeName": "ModContacts", "Appid": "wx_a", "Data": {}}).to_string();

    let (status, _) = broker::get(ops, "/readyz").await;
    assert_eq!(status, 503, "no session while the broker is cut off");
    let posting = tokio::spawn({
        let (query, body) = (with_secret(), callback.clone());
        async move { post(addr, &query, body).await }
    });
    cut.proxy.set(Mode::Open);
    assert_eq!(
        posting.await.expect("join"),
        200,
        "published once the session was back"
    );
    let delivery = tokio::time::timeout(WAIT, seen.next())
        .await
        .expect("the callback reached the exchange")
        .expect("consumer open")
        .expect("delivery");
    assert_eq!(delivery.data, callback.as_bytes());

    cut.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.callbacks.enabled = false;
    let app = spawn_app(settings).await;
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    let addr = app.callback_addr.expect("endpoint");
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /gewe/callback HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 256];
    // Closed (or answered) by the server, not by this deadline.
    let read = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut buf))
        .await
        .expect("the server closes a connection whose headers never end");
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).contains("408"),
        "{read:?}"
    );
    assert!(waited >= Duration::from_secs(9), "closed after {waited:?}");
    // Meanwhile and after, GeWe is served.
    let ok = json!({"TypeName": "ModContacts", "Data": {}}).to_string();
    assert_eq!(post(addr, &with_secret(), ok).await, 200);
    app.stop().await;
}
