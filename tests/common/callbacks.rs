//! Helpers for the callback tests: a GeWe whose `v3` is predictable, GeWe's
//! callback bodies, posting to the endpoint, publishing to the callbacks
//! exchange, and how many messages a queue still holds.

use std::{net::SocketAddr, time::Duration};

use gewe_friend_worker::{config::Settings, gewe::ADD_MEMBER_PATH, simulator};
use lapin::{BasicProperties, options::BasicPublishOptions};
use secrecy::SecretString;
use serde_json::Value;
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{method, path},
};

use super::{TestApp, WAIT, broker::rabbitmqctl, done_or, eventually, gewe_ok, test_settings};

/// The callback secret of the tests.
pub const SECRET: &str = "cb-secret-4e1d-97ab";

/// The `v3` GeWe gives the command `id` (whose member is `wxid_<id>`).
pub fn v3_for(id: &str) -> String {
    format!("v3_wxid_{id}@stranger")
}

/// GeWe answering every request with `v3_<memberWxid>@stranger`, after
/// a delay.
struct V3PerMember(Duration);

impl Respond for V3PerMember {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let member = body["memberWxid"].as_str().unwrap_or("");
        ResponseTemplate::new(200)
            .set_body_json(gewe_ok(&format!("v3_{member}@stranger")))
            .set_delay(self.0)
    }
}

/// A GeWe mock whose `v3` for command `id` is [`v3_for`]`(id)`.
pub async fn gewe() -> MockServer {
    slow_gewe(Duration::ZERO).await
}

/// Like [`gewe`], answering each request after `delay`.
pub async fn slow_gewe(delay: Duration) -> MockServer {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(V3PerMember(delay))
        .mount(&gewe)
        .await;
    gewe
}

/// Test settings with callbacks on, an ephemeral callback endpoint and
/// [`SECRET`].
pub fn callback_settings(gewe: &str) -> Settings {
    let mut s = test_settings(gewe);
    s.callbacks.enabled = true;
    s.callbacks.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    s.callbacks.secret = Some(SecretString::from(SECRET));
    s
}

/// GeWe's callback saying that the member of command `id` (sent by
/// `app_id`) accepted: the body the simulator posts.
pub fn accepted_callback(app_id: &str, id: &str) -> Value {
    simulator::mod_contacts(app_id, &format!("wxid_{id}"), &v3_for(id))
}

/// POSTs `body` to the endpoint at `addr` with `query`; returns the status.
pub async fn post(addr: SocketAddr, query: &str, body: impl Into<reqwest::Body>) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{addr}/gewe/callback{query}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the endpoint answers")
        .status()
        .as_u16()
}

/// The query that carries the right secret.
pub fn with_secret() -> String {
    format!("?secret={SECRET}")
}

impl TestApp {
    /// Publishes `body` to the callbacks exchange with `routing_key`,
    /// confirmed, as the endpoint (or another service) would.
    pub async fn publish_callback(&self, routing_key: &str, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                self.settings.callbacks.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "callback confirmed");
    }
}

/// Messages in `queue`, ready and unacknowledged together.
pub async fn messages_in(queue: &str) -> u64 {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        rabbitmqctl(&["list_queues", "-q", "name", "messages"])
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or(u64::MAX)
    })
    .await
    .expect("rabbitmqctl")
}

/// Waits until `queue` holds nothing, acked deliveries gone.
pub async fn wait_until_drained(queue: &str) {
    eventually(WAIT, || async {
        let left = messages_in(queue).await;
        done_or(left == 0, || format!("{queue} still holds {left} messages"))
    })
    .await;
}
