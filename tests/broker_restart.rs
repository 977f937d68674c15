//! RabbitMQ stopped and started under a running worker.
//!
//! This disturbs the whole broker, so it is the only test in this binary,
//! and it holds the machine-wide broker lock exclusively
//! ([`common::lock::broker_exclusive`]): it waits until no other test process
//! on the machine uses the broker (another binary, another worktree, nextest)
//! and keeps new ones waiting until the broker is back. The broker is always
//! restarted, even when the test fails.

mod common;

use std::collections::HashSet;

use common::{broker::consumer_prefetch, *};
use gewe_friend_worker::{broker::topology, gewe::ADD_MEMBER_PATH};
use lapin::{
    Connection,
    options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

/// Starts the broker app again if the test stops half-way.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .status();
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("await_startup")
            .status();
    }
}

async fn observe(
    settings: &gewe_friend_worker::config::Settings,
    queue: &str,
) -> (Connection, lapin::Consumer) {
    let (conn, ch) = confirm_channel(&settings.amqp.url).await;
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    (conn, consumer)
}

#[tokio::test]
async fn rabbitmq_stop_app_and_start_app_mid_run_loses_nothing() {
    common::lock::broker_exclusive();
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_restart")))
        .mount(&gewe)
        .await;
    let settings = test_settings(&gewe.uri());
    let observed = format!("{}.observed", settings.amqp.command_queue);

    // A durable queue bound to the results survives the restart, like a
    // real downstream consumer's queue.
    // Held to the end: the channel lives on this connection.
    let (_conn, ch) = confirm_channel(&settings.amqp.url).await;
    topology::declare(&ch, &settings.amqp)
        .await
        .expect("topology");
    ch.queue_declare(
        observed.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("observer queue");
    bind_to_results(&ch, &observed, &settings).await;
    let (stop, worker, ops) = start_worker(&settings).await;
    wait_for_readyz(ops, 200, "ready").await;

    let total = 300;
    for i in 0..total {
        let body = command(&format!("rs-{i}"), &format!("app-{}", i % 7)).to_string();
        ch.basic_publish(
            "".into(),
            settings.amqp.command_queue.as_str().into(),
            Default::default(),
            body.as_bytes(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let mut seen = HashSet::new();
    let (_observer_conn, mut events) = observe(&settings, &observed).await;
    while seen.len() < 30 {
        let e = next_on(&mut events).await;
        seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }

    let restart = RestartOnDrop;
    broker::rabbitmqctl(&["stop_app"]);
    wait_for_readyz(ops, 503, "broker").await;
    broker::rabbitmqctl(&["start_app"]);
    broker::rabbitmqctl(&["await_startup"]);
    drop(restart);
    wait_for_readyz(ops, 200, "ready").await;

    let (conn2, mut events) = observe(&settings, &observed).await;
    while seen.len() < total {
        let e = next_on(&mut events).await;
        assert_eq!(e.status(), "succeeded", "{}", e.body);
        seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }
    assert!(!worker.is_finished(), "the worker rode out the restart");
    assert_eq!(
        consumer_prefetch(&settings.amqp.command_queue),
        vec!["16".to_owned()],
        "prefetch re-applied after the restart"
    );

    stop.cancel();
    worker.await.expect("join").expect("clean exit");
    let ch = conn2.create_channel().await.expect("channel");
    let _ = ch
        .queue_delete(observed.as_str().into(), QueueDeleteOptions::default())
        .await;
    topology::remove(&ch, &settings.amqp).await;
}
