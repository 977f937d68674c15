//! Every secret stays in the process, whoever would print it: the password
//! of each URL in `amqp.url`, the Redis password and the GeWe token never
//! appear in a log line (the worker's or lapin's, redis' and rustls' own, at
//! `trace`), an error message or `check-config`.
//!
//! The real binary runs against a list of nodes with distinct passwords:
//! one that closes every connection, one that refuses them, one with a
//! wrong password, one that accepts and never speaks, and finally the real
//! broker.

use std::{process::Stdio, time::Duration};

use crate::common::{
    fake_gewe::{self, FakeGewe},
    process::*,
    tcp_proxy::RedisServer,
    *,
};
use tokio::net::{TcpListener, TcpSocket};

/// The passwords that must never show, as written in the URLs.
const CLOSING: &str = "pw-closing-7c1a";
const REFUSING: &str = "pw-refusing-8d2b";
const WRONG: &str = "pw-wrong-9e3c";
/// Percent-encoded in the URL; lapin holds it decoded.
const SILENT: &str = "pw%21silent-0f4d";
const SILENT_DECODED: &str = "pw!silent-0f4d";
const REDIS: &str = "redis-pw-5a6e";

fn assert_clean(text: &str, what: &str) {
    for secret in [
        CLOSING,
        REFUSING,
        WRONG,
        SILENT,
        SILENT_DECODED,
        REDIS,
        TOKEN,
    ] {
        assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
    }
}

/// A port that accepts connections and closes them at once.
async fn closing_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    port
}

/// A port that accepts connections and never sends a byte.
async fn silent_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

/// A port that refuses connections: bound, so no other process can take
/// it while the test runs, but not listening.
fn refusing_port() -> (TcpSocket, u16) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let port = socket.local_addr().expect("addr").port();
    (socket, port)
}

/// The broker's nodes: four that fail in different ways, then the real
/// one; and the socket that keeps the refusing node's port.
async fn node_list() -> (String, [u16; 3], TcpSocket) {
    let closing = closing_listener().await;
    let (held, refusing) = refusing_port();
    let silent = silent_listener().await;
    let real = url::Url::parse(&amqp_url()).expect("broker URL");
    let real_port = real.port().unwrap_or(5672);
    let list = [
        format!("amqp://guest:{CLOSING}@127.0.0.1:{closing}/%2f"),
        format!("amqp://guest:{REFUSING}@127.0.0.1:{refusing}/%2f"),
        format!("amqp://guest:{WRONG}@127.0.0.1:{real_port}/%2f"),
        format!("amqp://guest:{SILENT}@127.0.0.1:{silent}/%2f"),
        amqp_url(),
    ]
    .join(",");
    (list, [closing, refusing, silent], held)
}

#[tokio::test]
async fn check_config_and_config_errors_show_no_password_of_a_url_list() {
    let (list, _, _held) = node_list().await;
    let mut check = program();
    check
        .arg("check-config")
        .env("GEWE_WORKER__AMQP__URL", &list)
        .env(
            "GEWE_WORKER__REDIS__URL",
            format!("redis://:{REDIS}@127.0.0.1:6379/0"),
        )
        .env("GEWE_WORKER__GEWE__TOKEN", TOKEN);
    let out = check.output().await.expect("check-config runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let shown = printed["amqp"]["url"].as_str().expect("url");
    assert_eq!(shown.split(',').count(), 5, "{shown}");
    assert_eq!(shown.matches(":***@").count(), 5, "{shown}");
    assert_clean(&stdout, "check-config");

    // An entry that does not parse is named by position, not shown.
    let mut bad = program();
    bad.arg("check-config").env(
        "GEWE_WORKER__AMQP__URL",
        format!("{list},amqp:guest:{WRONG}@nowhere"),
    );
    let out = bad.output().await.expect("check-config runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("amqp.url") && stderr.contains("entry 6 of 6"),
        "{stderr}"
    );
    assert_clean(&stderr, "the config error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_of_any_node_nor_of_redis_reaches_the_logs() {
    let gewe = FakeGewe::start(Duration::from_millis(5), fake_gewe::success).await;
    let mut redis = RedisServer::start_with_password(REDIS).await;
    let settings = test_settings(&gewe.url);
    let mut listener = spawn_listener(&settings).await;
    let (list, [closing, refusing, silent], _held) = node_list().await;
    let mut through_list = settings.clone();
    through_list.amqp.url = list;

    let mut cmd = worker_command(&through_list, &gewe.url);
    cmd.env("GEWE_WORKER__REDIS__URL", &redis.url)
        .env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0")
        .env("GEWE_WORKER__LOG__FORMAT", "json")
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("worker starts");
    let logs = Logs::capture(&mut child);

    // One round: the four failing nodes (the silent one costs the connect
    // timeout), then the real broker.
    for port in [closing, refusing, silent] {
        logs.wait_for(&["broker node unavailable", &format!("127.0.0.1:{port}")])
            .await;
    }
    logs.wait_for(&["broker node unavailable", "ACCESS_REFUSED"])
        .await;
    logs.wait_for(&["did not answer within"]).await;
    logs.wait_for(&["consuming commands"]).await;
    let id = format!("secrets-{}", uuid::Uuid::new_v4().simple());
    listener.publish(&command(&id, "app-secrets")).await;
    let event = listener.next_event().await;
    assert_eq!(event.status(), "succeeded", "{}", event.body);

    // Redis goes away: the client's own errors are logged too.
    redis.kill();
    logs.wait_for(&["Redis at redis://", "is unavailable"])
        .await;

    assert!(terminate(&mut child).await.success());
    let log = logs.finish().await;
    assert!(log.contains(":***@"), "node URLs are logged, masked");
    assert_clean(&log, "the log");
    listener.stop().await;
}
