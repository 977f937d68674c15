//! The worker's Redis layout is ready for Redis Cluster: every script and
//! every transaction touches one hash slot. Run against a one-node Cluster
//! holding every slot, where anything that spans two slots fails with
//! `CROSSSLOT` (and the worker would hold its commands, calling nobody):
//! a command, its duplicate, a claim renewed during a slow call, a
//! callback's accepted event, and the console's pause, resume and list
//! all work.

use std::time::Duration;

use crate::common::{
    admin::{Api, with_admin},
    callbacks::{accepted_callback, callback_settings, post, slow_gewe, v3_for, with_secret},
    tcp_proxy::RedisServer,
    *,
};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_node_commands_duplicates_callbacks_and_the_console_work() {
    let node = RedisServer::start_cluster_node().await;
    // Slower than a claim's renewal period (3 s): the renewal runs too.
    let gewe = slow_gewe(Duration::from_millis(3500)).await;
    let mut settings = callback_settings(&gewe.uri());
    settings.redis.url = Some(node.url.clone());
    settings.gewe.timeout = Duration::from_secs(8);
    settings.accounts.daily_limit = 5;
    with_admin(&mut settings);
    let mut app = spawn_app(settings).await;
    let api = Api::new(app.admin_addr.expect("console bound"));
    let (id, account) = (unique("cluster"), unique("wx_cluster"));

    app.publish(&command(&id, &account)).await;
    let sent = app.next_event().await;
    assert_eq!(sent.status(), "succeeded", "{}", sent.body);
    assert_eq!(sent.body["v3"], v3_for(&id));
    app.publish(&command(&id, &account)).await;
    let again = app.next_event().await;
    assert_eq!(
        (again.status(), &again.body["duplicate"]),
        ("succeeded", &json!(true)),
        "{}",
        again.body
    );

    let status = post(
        app.callback_addr.expect("callback endpoint"),
        &with_secret(),
        accepted_callback(&account, &id).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let accepted = app.next_event().await;
    assert_eq!(accepted.status(), "accepted", "{}", accepted.body);
    assert_eq!(accepted.body["commandId"], id);

    let (status, body) = api
        .post(
            &format!("/api/accounts/{account}/pause"),
            json!({"for": "1h", "reason": "cluster"}),
        )
        .await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("paused")));
    let (status, body) = api
        .post(&format!("/api/accounts/{account}/resume"), json!({}))
        .await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("active")));
    let (row, body) = api.account(&account).await;
    assert_eq!(row["sentToday"], 1, "{body}");
    app.stop().await;
}
