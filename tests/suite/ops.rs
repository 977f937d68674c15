//! What operators see: the ops endpoints, and the worker riding out a lost
//! broker connection.

use std::{collections::HashSet, time::Duration};

use crate::common::broker::*;

use crate::common::*;
use gewe_friend_worker::gewe::ADD_MEMBER_PATH;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

#[tokio::test]
async fn readyz_is_503_while_the_broker_is_unreachable_and_healthz_stays_200() {
    let gewe = MockServer::start().await;
    let mut settings = test_settings(&gewe.uri());
    // Nothing listens on port 1: the worker keeps retrying, it does not exit.
    settings.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let _in_process = in_process().await;
    let app = gewe_friend_worker::app::Application::build(settings)
        .await
        .expect("builds");
    let addr = app.ops_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(app.run(stop.clone()));
    let (health, _) = get(addr, "/healthz").await;
    assert_eq!(health, 200);
    let (ready, reason) = get(addr, "/readyz").await;
    assert_eq!(ready, 503);
    assert!(reason.contains("broker"), "{reason}");
    assert!(
        !worker.is_finished(),
        "an unreachable broker does not stop the worker"
    );
    stop.cancel();
    tokio::time::timeout(WAIT, worker)
        .await
        .expect("stops")
        .expect("join")
        .expect("clean exit");
}

#[tokio::test]
async fn a_closed_connection_is_reopened_with_prefetch_and_nothing_is_lost() {
    // Alone: the reconnects counted are this worker's.
    alone(async {
        let gewe = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(ADD_MEMBER_PATH))
            .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_r")))
            .mount(&gewe)
            .await;
        let mut app = spawn_app(test_settings(&gewe.uri())).await;
        let queue = app.settings.amqp.command_queue.clone();
        wait_for_status(app.ops_addr, "/readyz", 200).await;
        let reconnects_before = metric(app.ops_addr, "broker_reconnects_total", "").await;

        let total = 500;
        let mut seen = HashSet::new();
        for round in 0..2 {
            for i in 0..total / 2 {
                app.publish(&command(
                    &format!("r{round}-{i}"),
                    &format!("app-{}", i % 5),
                ))
                .await;
            }
            // Let part of the batch through, then cut the worker's connection.
            for e in app.events(5).await {
                seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
            }
            assert_eq!(
                close_worker_connection(&queue).await,
                1,
                "the worker's connection was found and closed"
            );
        }
        while seen.len() < total {
            let e = app.next_event().await;
            assert_eq!(e.status(), "succeeded", "{}", e.body);
            seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
        }
        wait_for_status(app.ops_addr, "/readyz", 200).await;
        assert_eq!(
            consumer_prefetch(&queue),
            vec!["16".to_owned()],
            "one consumer, prefetch re-applied"
        );

        let reconnects =
            metric(app.ops_addr, "broker_reconnects_total", "").await - reconnects_before;
        assert!(reconnects >= 2.0, "reconnects counted: {reconnects}");
        let (_, metrics) = get(app.ops_addr, "/metrics").await;
        for name in [
            "commands_received_total",
            "results_published_total",
            "gewe_requests_total",
            "gewe_request_duration_seconds",
        ] {
            assert!(metrics.contains(name), "/metrics exposes {name}");
        }
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_finishes_or_returns_every_in_flight_command() {
    let gewe = MockServer::start().await;
    // Fast for two accounts, slower than the grace period for the third.
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .and(wiremock::matchers::body_partial_json(
            serde_json::json!({"appId": "slow"}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(gewe_ok("v3_slow"))
                .set_delay(Duration::from_secs(5)),
        )
        .mount(&gewe)
        .await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(gewe_ok("v3_fast"))
                .set_delay(Duration::from_millis(200)),
        )
        .mount(&gewe)
        .await;
    let mut settings = test_settings(&gewe.uri());
    settings.shutdown.grace = Duration::from_secs(1);
    settings.gewe.timeout = Duration::from_secs(10);
    let mut app = spawn_app(settings).await;
    wait_for_status(app.ops_addr, "/readyz", 200).await;
    let ids: Vec<String> = (0..6).map(|i| format!("sd-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let account = if i < 3 { "slow" } else { "fast" };
        app.publish(&command(id, account)).await;
    }
    // Wait until every command reached GeWe, i.e. all are in flight.
    eventually(WAIT, || async {
        let reached = gewe.received_requests().await.map_or(0, |r| r.len());
        done_or(reached >= ids.len(), || {
            format!("{reached} of {} commands reached GeWe", ids.len())
        })
    })
    .await;
    let started = tokio::time::Instant::now();
    app.stop.cancel();
    let worker = app.worker.take().expect("worker");
    tokio::time::timeout(WAIT, worker)
        .await
        .expect("stops")
        .expect("join")
        .expect("exits cleanly");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "stopped within grace, not after the slow calls: {took:?}"
    );

    let mut results = HashSet::new();
    for _ in 0..3 {
        let e = app.next_event().await;
        assert_eq!(e.body["v3"], "v3_fast");
        results.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }
    // The slow ones are back in the queue (the broker requeues them when the
    // worker's connection closes): consume them to prove it.
    let channel = app.connection.create_channel().await.expect("channel");
    let mut requeued = channel
        .basic_consume(
            app.settings.amqp.command_queue.as_str().into(),
            "".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume the command queue");
    for _ in 0..3 {
        let back = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut requeued))
            .await
            .expect("a requeued command arrives")
            .expect("open")
            .expect("delivery");
        let body: serde_json::Value = serde_json::from_slice(&back.data).expect("json");
        assert_eq!(body["appId"], "slow");
        results.insert(body["commandId"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(
        results.len(),
        ids.len(),
        "every command has its result or is back in the queue"
    );
    app.stop().await;
}

#[tokio::test]
async fn traceparent_is_continued_on_the_result_event() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_t")))
        .mount(&gewe)
        .await;
    let mut app = spawn_app(test_settings(&gewe.uri())).await;
    let header = |value: &str| {
        let mut h = lapin::types::FieldTable::default();
        h.insert(
            "traceparent".into(),
            lapin::types::AMQPValue::LongString(value.into()),
        );
        lapin::BasicProperties::default().with_headers(h)
    };
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    app.publish_raw(
        command("traced", "app-t").to_string().as_bytes(),
        header(incoming),
    )
    .await;
    let e = app.next_event().await;
    let carried = e
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent").cloned())
        .and_then(|v| match v {
            lapin::types::AMQPValue::LongString(s) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        })
        .expect("the event carries traceparent");
    let parts: Vec<&str> = carried.split('-').collect();
    assert_eq!(parts.len(), 4, "{carried}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the worker's span is the new parent"
    );
    assert_eq!(parts[2].len(), 16);
    assert_eq!(parts[3], "01");

    app.publish_raw(
        command("untraced", "app-t").to_string().as_bytes(),
        header("garbage"),
    )
    .await;
    let e = app.next_event().await;
    assert!(
        e.properties
            .headers()
            .as_ref()
            .is_none_or(|h| !h.inner().contains_key("traceparent")),
        "a malformed traceparent is dropped, not propagated"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_keep_answering_under_idle_and_slow_header_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gewe = MockServer::start().await;
    let app = spawn_app(test_settings(&gewe.uri())).await;
    wait_for_status(app.ops_addr, "/readyz", 200).await;
    // 500 connections that say nothing, 200 that send a header byte by byte.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(
            tokio::net::TcpStream::connect(app.ops_addr)
                .await
                .expect("connect"),
        );
    }
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(app.ops_addr)
            .await
            .expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            .await
            .expect("write");
        slow.push(s);
    }
    for route in ["/healthz", "/readyz"] {
        let started = std::time::Instant::now();
        let (status, _) = tokio::time::timeout(Duration::from_secs(2), get(app.ops_addr, route))
            .await
            .unwrap_or_else(|_| panic!("{route} answers within 2 s under 700 open connections"));
        assert_eq!(status, 200, "{route}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Connections that never finish their request head are closed.
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(15), slow[0].read(&mut buf))
        .await
        .expect("a slow-header connection is closed after the header-read timeout");
    assert!(
        matches!(closed, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).contains("408"),
        "closed: {closed:?}"
    );
    // A head over the limit is refused.
    let mut big = tokio::net::TcpStream::connect(app.ops_addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = big.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "an oversized head is refused, not served: {answer:?}"
    );
    drop(idle);
    drop(slow);
    app.stop().await;
}
