//! The operator's console and its API (`admin.listen`, contract §8): the
//! accounts with pause and resume, the dead letters with replay, and a
//! summary, as JSON under `/api/` and as a page at `/`; the CLI's
//! `accounts` and `dead-letters` commands are clients of the same API
//! ([`client`]).
//!
//! Served on a listener of its own with the ops port's limits; the ops port
//! serves none of it. Every request is authenticated ([`auth`]); every
//! action is logged with what it did and to what, never with the token.

pub mod api;
pub mod auth;
pub mod client;
pub mod console;
pub mod dead_letters;
pub mod summary;

use std::sync::Arc;

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use secrecy::SecretString;

use crate::{accounts::AccountDirectory, http_server::Limits, ops};
use auth::{Auth, Session};
use dead_letters::DeadLetters;
use summary::Sources;

/// Everything the console reads and steers.
pub struct Admin {
    auth: Auth,
    /// Refusals, logged at most once a second: a scan or a guessing
    /// script must not flood the log.
    refusals: Refusals,
    /// The accounts (the budget keeper); `None` while none is wired in:
    /// the accounts API then answers 503.
    accounts: Option<Arc<dyn AccountDirectory>>,
    dead_letters: DeadLetters,
    sources: Sources,
}

impl Admin {
    /// The console for `token`, over `accounts` (when account state is
    /// kept), the dead letters and the summary's `sources`.
    pub fn new(
        token: &SecretString,
        accounts: Option<Arc<dyn AccountDirectory>>,
        dead_letters: DeadLetters,
        sources: Sources,
    ) -> Self {
        Self {
            auth: Auth::new(token),
            refusals: Refusals::default(),
            accounts,
            dead_letters,
            sources,
        }
    }
}

/// How a request was let in.
#[derive(Debug, Clone)]
pub enum Access {
    /// `Authorization: Bearer` with the token (the API's clients).
    Bearer,
    /// The console's session cookie.
    Console(Session),
}

impl Access {
    /// For log lines: who acted.
    pub fn via(&self) -> &'static str {
        match self {
            Access::Bearer => "api",
            Access::Console(_) => "console",
        }
    }
}

/// The listener's limits: the ops port's (contract §8).
pub fn limits(fd_limit: Option<u64>) -> Limits {
    ops::limits(fd_limit)
}

/// The console's router.
pub fn router(admin: Arc<Admin>) -> Router {
    let guarded = Router::new()
        .route("/", get(console::page))
        .route("/console/sections", get(console::sections))
        .route("/logout", post(console::sign_out))
        .route("/api/accounts", get(api::accounts))
        .route("/api/accounts/{app_id}/pause", post(api::pause))
        .route("/api/accounts/{app_id}/resume", post(api::resume))
        .route("/api/dead-letters", get(api::dead_letters))
        .route("/api/dead-letters/replay", post(api::replay))
        .route("/api/summary", get(api::summary))
        .route_layer(middleware::from_fn_with_state(admin.clone(), guard));
    Router::new()
        .route("/login", post(console::sign_in))
        .merge(guarded)
        .with_state(admin)
}

/// A JSON error body: `{"error": "…"}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).into_response()
}

/// A refusal of the API, answered as `{"error": "…"}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// A refusal with `status` saying `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Lets a request in with the token or a session (and, for a state change
/// from the console, its CSRF token); 401 otherwise, 403 without the CSRF
/// token.
async fn guard(State(admin): State<Arc<Admin>>, mut request: Request, next: Next) -> Response {
    let access = match access(&admin.auth, request.headers()) {
        Ok(access) => access,
        Err(refusal) => {
            if let Some(count) = admin.refusals.due() {
                tracing::warn!(method = %request.method(), path = request.uri().path(), reason = refusal, count, "admin request refused: missing or wrong token (count: refusals since the last such line)");
            }
            if request.method() == Method::GET && request.uri().path() == "/" {
                return console::sign_in_page(StatusCode::UNAUTHORIZED, None);
            }
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    };
    if let Access::Console(session) = &access {
        let changes_state = !matches!(*request.method(), Method::GET | Method::HEAD);
        let csrf = request
            .headers()
            .get(auth::CSRF_HEADER)
            .and_then(|v| v.to_str().ok());
        if changes_state && !csrf.is_some_and(|c| admin.auth.csrf_matches(session, c)) {
            if let Some(count) = admin.refusals.due() {
                tracing::warn!(method = %request.method(), path = request.uri().path(), count, "admin request refused: missing or wrong CSRF token (count: refusals since the last such line)");
            }
            return error(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
        }
    }
    request.extensions_mut().insert(access);
    next.run(request).await
}

/// Counts refused requests; says when one may be logged again.
#[derive(Default)]
struct Refusals {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Refusals {
    /// Counts a refusal; the count since the last logged one when a second
    /// has passed since it.
    fn due(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, count) = &mut *state;
        *count += 1;
        let now = std::time::Instant::now();
        if last.is_some_and(|l| now.duration_since(l) < std::time::Duration::from_secs(1)) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

fn access(auth: &Auth, headers: &HeaderMap) -> Result<Access, &'static str> {
    if let Some(authorization) = headers.get(header::AUTHORIZATION) {
        return match authorization.to_str() {
            Ok(value) if auth.bearer_matches(value) => Ok(Access::Bearer),
            _ => Err("wrong bearer token"),
        };
    }
    let session = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(auth::cookie_value)
        .find_map(|value| auth.session(value));
    match session {
        Some(session) => Ok(Access::Console(session)),
        None => Err("no token and no valid session"),
    }
}
