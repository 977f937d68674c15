//! A GeWe stand-in that records every call: which member of which account,
//! when it arrived, and how many requests were in flight at once (wiremock
//! answers synchronously, so it cannot count concurrency).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use gewe_friend_worker::gewe::ADD_MEMBER_PATH;
use serde_json::{Value, json};

/// How much later than its start a call may arrive, for
/// [`FakeGewe::assert_paced`].
pub const ARRIVAL_SLACK: Duration = Duration::from_millis(50);

/// How the fake answers the `nth` call (1-based) for a member.
pub type Answer = fn(member: &str, nth: usize) -> (StatusCode, Value);

/// GeWe's success, with a v3 naming the member (so a test can tell whose it is).
pub fn success(member: &str, _: usize) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"ret": 200, "msg": "操作成功", "data": {"v3": format!("v3_{member}@stranger")}}),
    )
}

/// HTTP 503 for every call.
pub fn unavailable(_: &str, _: usize) -> (StatusCode, Value) {
    (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "busy"}))
}

struct Inner {
    latency: Mutex<Duration>,
    answer: Mutex<Answer>,
    /// (memberWxid, appId, arrival), in order of arrival.
    calls: Mutex<Vec<(String, String, Instant)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running fake GeWe.
#[derive(Clone)]
pub struct FakeGewe {
    inner: Arc<Inner>,
    /// Its base URL, for `gewe.base_url`.
    pub url: String,
}

impl FakeGewe {
    /// Starts a fake answering with `answer` after `latency`.
    pub async fn start(latency: Duration, answer: Answer) -> Self {
        let inner = Arc::new(Inner {
            latency: Mutex::new(latency),
            answer: Mutex::new(answer),
            calls: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route(ADD_MEMBER_PATH, post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { inner, url }
    }

    /// Answers from now on with `answer`.
    pub fn answer_with(&self, answer: Answer) {
        *self.inner.answer.lock().expect("lock") = answer;
    }

    /// Changes the latency of later calls.
    pub fn set_latency(&self, latency: Duration) {
        *self.inner.latency.lock().expect("lock") = latency;
    }

    /// Every call so far: (memberWxid, arrival).
    pub fn calls(&self) -> Vec<(String, Instant)> {
        let calls = self.inner.calls.lock().expect("lock");
        calls.iter().map(|(m, _, at)| (m.clone(), *at)).collect()
    }

    /// When the calls for `app_id` arrived, in order.
    pub fn arrivals(&self, app_id: &str) -> Vec<Instant> {
        let calls = self.inner.calls.lock().expect("lock");
        calls
            .iter()
            .filter(|(_, app, _)| app == app_id)
            .map(|(_, _, at)| *at)
            .collect()
    }

    /// Asserts that GeWe saw `n` calls for `app_id`, their starts paced
    /// `interval` apart, as far as arrivals can tell. The worker spaces the
    /// *starts* of its calls (src/pacing.rs proves that to the millisecond
    /// on a paused clock); a request then takes a moment to arrive, more
    /// under load, so one gap can look short by the lateness of the call
    /// before it. Calls that are not paced arrive together, so every gap is
    /// at least half the interval; and the span of all of them is exact up
    /// to the lateness of the first, which [`ARRIVAL_SLACK`] allows.
    pub fn assert_paced(&self, app_id: &str, n: usize, interval: Duration) {
        let arrivals = self.arrivals(app_id);
        assert_eq!(arrivals.len(), n, "calls for {app_id}");
        let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|gap| *gap >= interval / 2),
            "calls for {app_id} arrived {gaps:?} apart, paced {interval:?}"
        );
        let span = arrivals[n - 1] - arrivals[0];
        let paced = interval * u32::try_from(n - 1).expect("a few calls");
        assert!(
            span + ARRIVAL_SLACK >= paced,
            "{n} calls for {app_id} within {span:?}, paced {interval:?}: gaps {gaps:?}"
        );
    }

    /// Calls per member.
    pub fn calls_per_member(&self) -> HashMap<String, usize> {
        let mut per = HashMap::new();
        for (member, _) in self.calls() {
            *per.entry(member).or_insert(0) += 1;
        }
        per
    }

    /// Members called more than once.
    pub fn called_twice(&self) -> Vec<(String, usize)> {
        let mut twice: Vec<_> = self
            .calls_per_member()
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .collect();
        twice.sort();
        twice
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let member = request["memberWxid"].as_str().unwrap_or("").to_owned();
    let app_id = request["appId"].as_str().unwrap_or("").to_owned();
    let nth = {
        let mut calls = inner.calls.lock().expect("lock");
        calls.push((member.clone(), app_id, Instant::now()));
        calls.iter().filter(|(m, _, _)| *m == member).count()
    };
    let latency = *inner.latency.lock().expect("lock");
    let answer = *inner.answer.lock().expect("lock");
    tokio::time::sleep(latency).await;
    inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    let (status, body) = answer(&member, nth);
    (status, Json(body))
}
