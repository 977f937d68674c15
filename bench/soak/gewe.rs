//! The soak's GeWe: answers success after a short latency, and on command
//! turns to HTTP 503 for every call (a 5xx burst) or to slow answers. It
//! records every call, so repeated calls can be counted and set against the
//! faults.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use gewe_friend_worker::gewe::ADD_MEMBER_PATH;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Latency of a normal answer.
const NORMAL: Duration = Duration::from_millis(50);
/// Latency of a slow answer (below the worker's `gewe.timeout` of 10 s).
pub const SLOW: Duration = Duration::from_secs(2);

/// How GeWe answers right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Success after [`NORMAL`].
    Normal = 0,
    /// HTTP 503 at once.
    Failing = 1,
    /// Success after [`SLOW`].
    Slow = 2,
}

/// One call as GeWe saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The member the friend request was for (unique per command).
    pub member: String,
    /// When the request arrived.
    pub at: Instant,
    /// Whether it was answered with success (not a 503).
    pub succeeded: bool,
}

struct Inner {
    mode: AtomicU8,
    calls: Mutex<Vec<Call>>,
}

/// A running fake GeWe.
#[derive(Clone)]
pub struct FakeGewe {
    inner: Arc<Inner>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl FakeGewe {
    /// Starts it on a free local port until `stop`.
    pub async fn start(stop: CancellationToken) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner {
            mode: AtomicU8::new(Mode::Normal as u8),
            calls: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route(ADD_MEMBER_PATH, post(answer))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Self { inner, addr })
    }

    /// Answers from now on as `mode` says.
    pub fn set(&self, mode: Mode) {
        self.inner.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

async fn answer(
    State(inner): State<Arc<Inner>>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let at = Instant::now();
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let member = request["memberWxid"].as_str().unwrap_or("").to_owned();
    let mode = match inner.mode.load(Ordering::SeqCst) {
        1 => Mode::Failing,
        2 => Mode::Slow,
        _ => Mode::Normal,
    };
    let (latency, answer) = match mode {
        Mode::Failing => (
            Duration::ZERO,
            (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "busy"})),
        ),
        Mode::Normal | Mode::Slow => (
            if mode == Mode::Slow { SLOW } else { NORMAL },
            (
                StatusCode::OK,
                json!({"ret": 200, "msg": "操作成功", "data": {"v3": format!("v3_{member}@stranger")}}),
            ),
        ),
    };
    inner
        .calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Call {
            member,
            at,
            succeeded: answer.0.is_success(),
        });
    tokio::time::sleep(latency).await;
    (answer.0, Json(answer.1))
}
