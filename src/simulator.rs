//! A GeWe stand-in for `demo`, `simulate-gewe`, docker-compose and load tests.
//!
//! It speaks the real endpoint's shape and GeWe's known failure bodies, so
//! the worker cannot tell it from GeWe. Failures on demand, per request:
//! a `memberWxid` containing `reject` is refused ("user ticket invalid"), an
//! `appId` containing `offline` is offline, one containing `nodevice` is
//! unknown; `--fail-with` forces one failure for every request and
//! `--fail-rate` answers that share of requests with HTTP 503.
//! `--daily-limit N` plays WeChat's limit: after N successes for an `appId`
//! in a day it answers WeChat's "too often" (contract §7).
//!
//! With an [`AcceptPlan`] (`--callback-url`, `--accept-after`) it also plays
//! the member: some time after each success it posts GeWe's `ModContacts`
//! callback carrying that success's `v3`, as GeWe does when the member
//! accepts the friend request.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gewe::{ADD_MEMBER_PATH, TOKEN_HEADER};

/// A failure the simulator can be told to give for every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Failure {
    /// `ret` 500 with the token message (echoing the token, as GeWe does).
    Token,
    /// `微信已离线`.
    Offline,
    /// `设备不存在`.
    NoDevice,
    /// `user ticket invalid`.
    Rejected,
    /// `{"ret":500,"msg":null}`.
    NullMsg,
    /// `ret` 200 without `v3`.
    NoV3,
    /// HTTP 503.
    Unavailable,
    /// HTTP 429 with `Retry-After: 1`.
    RateLimited,
    /// WeChat's `操作过于频繁，请稍后再试`.
    TooOften,
}

/// Where and when the simulated members accept.
#[derive(Clone)]
pub struct AcceptPlan {
    /// The callback URL (it may carry a secret in its query).
    pub url: url::Url,
    /// Time from a success to its callback.
    pub accept_after: Duration,
}

impl std::fmt::Debug for AcceptPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptPlan")
            .field("url", &without_query(&self.url))
            .field("accept_after", &self.accept_after)
            .finish()
    }
}

/// `url` without its query, which may carry the callback secret.
pub fn without_query(url: &url::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.to_string()
}

/// Posts attempted per callback, and the pause between them.
const CALLBACK_TRIES: u32 = 5;
const CALLBACK_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Simulator behaviour.
#[derive(Debug, Clone)]
pub struct Options {
    /// Token the simulator accepts; `None` accepts any non-empty token.
    pub token: Option<String>,
    /// Added to every response.
    pub latency: Duration,
    /// Share (0..=1) of requests answered with HTTP 503.
    pub fail_rate: f64,
    /// Forced failure for every request.
    pub fail_with: Option<Failure>,
    /// Successes per `appId` per day before "too often".
    pub daily_limit: Option<u32>,
    /// Members accept, and GeWe's callback is posted.
    pub accept: Option<AcceptPlan>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token: None,
            latency: Duration::ZERO,
            fail_rate: 0.0,
            fail_with: None,
            daily_limit: None,
            accept: None,
        }
    }
}

struct Sim {
    options: Options,
    /// Posts callbacks.
    client: reqwest::Client,
    /// Ends pending callbacks too.
    shutdown: CancellationToken,
    /// Successes per (appId, day) for `daily_limit`.
    successes: std::sync::Mutex<std::collections::HashMap<(String, u64), u32>>,
}

/// The simulator's HTTP app; pending callbacks stop on `shutdown`.
pub fn router(options: Options, shutdown: CancellationToken) -> Router {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    Router::new()
        .route(ADD_MEMBER_PATH, post(add_member))
        .with_state(Arc::new(Sim {
            options,
            client,
            shutdown,
            successes: Default::default(),
        }))
}

/// Binds `addr` and serves until `shutdown`; returns the bound address and
/// the server task.
pub async fn spawn(
    addr: SocketAddr,
    options: Options,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, serve(listener, options, shutdown)))
}

/// Serves on a bound `listener` until `shutdown` (the demo binds first, to
/// tell the worker where GeWe is before the worker tells GeWe where to
/// post callbacks).
pub fn serve(
    listener: TcpListener,
    options: Options,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let app = router(options, shutdown.clone());
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    })
}

/// GeWe's `ModContacts` callback for a member who accepted the request
/// that got `v3` (contract §6).
pub fn mod_contacts(app_id: &str, member_wxid: &str, v3: &str) -> Value {
    json!({
        "TypeName": "ModContacts",
        "Appid": app_id,
        "Wxid": format!("wxid_sim_{app_id}"),
        "Data": {
            "UserName": {"string": member_wxid},
            "NickName": {"string": member_wxid.trim_start_matches("wxid_")},
            "EncryptUserName": v3,
            "Sex": 0,
            "ContactType": 0,
            "Alias": ""
        }
    })
}

/// After the plan's delay, posts the member's acceptance; retried a few
/// times when the URL does not answer 2xx.
fn accept_later(sim: Arc<Sim>, callback: Value) {
    let Some(plan) = sim.options.accept.clone() else {
        return;
    };
    tokio::spawn(async move {
        let wait = |d| {
            let stop = sim.shutdown.clone();
            async move {
                tokio::select! {
                    () = stop.cancelled() => false,
                    () = tokio::time::sleep(d) => true,
                }
            }
        };
        if !wait(plan.accept_after).await {
            return;
        }
        let shown = without_query(&plan.url);
        for attempt in 1..=CALLBACK_TRIES {
            match sim
                .client
                .post(plan.url.clone())
                .json(&callback)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => {
                    tracing::warn!(url = %shown, status = r.status().as_u16(), attempt, "callback refused")
                }
                // The error's own text would name the URL, secret and all.
                Err(e) => {
                    tracing::warn!(url = %shown, error = %e.without_url(), attempt, "callback not delivered")
                }
            }
            if !wait(CALLBACK_RETRY_PAUSE).await {
                return;
            }
        }
        tracing::warn!(url = %shown, "gave up posting a callback");
    });
}

async fn add_member(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let options = &sim.options;
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }
    let given = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let token_ok = match &options.token {
        Some(expected) => given == expected,
        None => !given.is_empty(),
    };
    if !token_ok || options.fail_with == Some(Failure::Token) {
        return gewe(
            json!({"ret": 500, "msg": format!("HTTP HEADER: X-GEWE-TOKEN={given} 不可用或已过期")}),
        );
    }
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&body) else {
        return gewe(json!({"ret": 500, "msg": "参数错误"}));
    };
    let field = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("");
    let (app_id, member) = (field("appId"), field("memberWxid"));
    if app_id.is_empty() || member.is_empty() || field("chatroomId").is_empty() {
        return gewe(json!({"ret": 500, "msg": "参数错误"}));
    }
    let failure = options.fail_with.or_else(|| {
        if app_id.contains("nodevice") {
            Some(Failure::NoDevice)
        } else if app_id.contains("offline") {
            Some(Failure::Offline)
        } else if member.contains("reject") {
            Some(Failure::Rejected)
        } else if options.fail_rate > 0.0 && rand::random::<f64>() < options.fail_rate {
            Some(Failure::Unavailable)
        } else if !sim.within_daily_limit(app_id) {
            Some(Failure::TooOften)
        } else {
            None
        }
    });
    match failure {
        None => {
            let v3 = stranger_ticket();
            accept_later(sim.clone(), mod_contacts(app_id, member, &v3));
            gewe(json!({"ret": 200, "msg": "操作成功", "data": {"v3": v3}}))
        }
        Some(Failure::Token) => {
            gewe(json!({"ret": 500, "msg": "HTTP HEADER: X-GEWE-TOKEN= 不可用或已过期"}))
        }
        Some(Failure::Offline) => gewe(
            json!({"ret": 500, "msg": "发送消息失败", "data": {"code": "-1", "msg": "微信已离线"}}),
        ),
        Some(Failure::NoDevice) => gewe(
            json!({"ret": 500, "msg": "获取失败", "data": {"code": "-1", "msg": format!("[{app_id}]设备不存在")}}),
        ),
        Some(Failure::Rejected) => gewe(
            json!({"ret": 500, "msg": "添加好友失败", "data": {"code": "-2", "msg": "user ticket invalid"}}),
        ),
        Some(Failure::NullMsg) => gewe(json!({"ret": 500, "msg": null})),
        Some(Failure::TooOften) => gewe(
            json!({"ret": 500, "msg": "添加好友失败", "data": {"code": "-1", "msg": "操作过于频繁，请稍后再试"}}),
        ),
        Some(Failure::NoV3) => gewe(json!({"ret": 200, "msg": "操作成功", "data": {}})),
        Some(Failure::Unavailable) => {
            (StatusCode::SERVICE_UNAVAILABLE, "upstream busy").into_response()
        }
        Some(Failure::RateLimited) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response(),
    }
}

impl Sim {
    /// Counts a success for `app_id` today (Asia/Shanghai, UTC+8 all year)
    /// unless the day's limit is reached.
    fn within_daily_limit(&self, app_id: &str) -> bool {
        let Some(limit) = self.options.daily_limit else {
            return true;
        };
        let day = (crate::timestamp::now_millis() + 8 * 3_600_000) / 86_400_000;
        let mut successes = self
            .successes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = successes.entry((app_id.to_owned(), day)).or_insert(0);
        if *count >= limit {
            return false;
        }
        *count += 1;
        true
    }
}

fn gewe(body: Value) -> Response {
    (StatusCode::OK, Json(body)).into_response()
}

/// A fresh `v3` of GeWe's length: `v3_`, 198 hex digits, `@stranger`
/// (210 characters, as the seed's example), so what the worker stores per
/// command (BENCHMARKS.md, Redis memory) is measured at its real size.
fn stranger_ticket() -> String {
    let mut v3 = String::with_capacity(210);
    v3.push_str("v3_");
    while v3.len() < 3 + 198 {
        v3.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    v3.truncate(3 + 198);
    v3.push_str("@stranger");
    v3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_has_the_length_and_shape_of_gewes() {
        let (a, b) = (stranger_ticket(), stranger_ticket());
        assert_eq!(a.len(), 210);
        let hex = a
            .strip_prefix("v3_")
            .and_then(|t| t.strip_suffix("@stranger"))
            .expect("v3_…@stranger");
        assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b, "one ticket per request");
    }
}
