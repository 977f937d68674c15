//! `POST /gewe/callback` (`callbacks.listen`, contract §6): GeWe's callback
//! body is published unchanged to `callbacks.exchange` with routing key =
//! its `TypeName` and a publisher confirm, and only then answered 200.
//!
//! Answers: 401 without the right `secret` query parameter (when one is
//! configured; the raw query value, percent-decoded but with `+` left as
//! it is, compared in constant time, checked before the body is read), 413
//! for a body over 1 MiB (as declared, or as sent), 400 for a body that is
//! not a JSON object or has no `TypeName`, 503 when the broker did not
//! confirm, the worker had no broker session within [`SESSION_WAIT`] (a
//! reconnecting session is waited for), or there was no room for the body
//! within [`ROOM_WAIT`], 408 when the whole request took longer than
//! 30 s. The URI (which carries the secret) is never logged; refusals are
//! logged at most once a second per status, with a count (`refusals`).
//!
//! Pace: bodies are taken at [`RATE_KIB_PER_SECOND`] at most, after their
//! room and before they are read, so a flood waits in TCP, not in the
//! broker that carries the commands too.
//!
//! Memory: at most [`MAX_HELD_BYTES`] of request bodies are held at once. A
//! request takes room for its declared `Content-Length` (or for the
//! largest body, when it declares none) before its body is read, and gives
//! it back when answered; one that finds no room within [`ROOM_WAIT`] gets
//! 503, so GeWe sends it again later. 256 connections of 1 MiB bodies then
//! hold 16 MiB, not 256.
//!
//! The endpoint publishes on its own channel, on a connection of its own
//! opened with each broker session of the worker (the session's connection
//! when that one is gone) ([`IngressLink`]): a missing exchange breaks only
//! that channel, reopened on the next request, and a flood of callbacks
//! does not hold up the session's result events.

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use lapin::{
    BasicProperties, Connection,
    types::{AMQPValue, FieldTable, ShortString},
};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{callback, consume::RECEIVED_AT_HEADER, refusals::Refusals};
use crate::{
    broker::{PublishError, Publisher},
    http_server::Limits,
    meters::meters,
    timestamp,
};

/// The path GeWe posts to.
pub const CALLBACK_PATH: &str = "/gewe/callback";
/// Largest body accepted (contract §6: bodies over 1 MiB are refused).
pub const MAX_CALLBACK_BYTES: usize = 1024 * 1024;
/// The listener's limits: GeWe sends small bodies over a few connections;
/// anything slower or wider is not GeWe.
pub const LIMITS: Limits = Limits {
    max_connections: 256,
    header_read_timeout: Duration::from_secs(10),
    max_connection_age: Duration::from_secs(120),
    max_body_bytes: MAX_CALLBACK_BYTES,
    max_head_bytes: 16 * 1024,
};
/// Most bytes of request bodies held at once (contract §6).
pub const MAX_HELD_BYTES: usize = 16 * 1024 * 1024;
/// How long a request waits for room for its body before it gets 503.
pub const ROOM_WAIT: Duration = Duration::from_secs(10);
/// Callback bytes taken per second, in KiB: far above what GeWe sends
/// (callbacks are a few KiB; a thousand a second is a few MiB), far below
/// what makes the broker, which carries the commands too, fall behind (an
/// unpaced flood of 1 MiB bodies reached 800 MiB/s and command p99 grew
/// 25–65×; BENCHMARKS.md).
const RATE_KIB_PER_SECOND: u32 = 16 * 1024;
/// KiB taken at once before the pace applies: one largest body.
const BURST_KIB: u32 = 1024;
/// How long the broker gets to confirm a callback.
const CONFIRM_LIMIT: Duration = Duration::from_secs(10);
/// How long a callback waits for a broker session before 503: a session
/// that is reconnecting (a broker restart, a dropped connection) is usually
/// back within it, and GeWe's retries of a refused callback are not
/// something to count on.
pub const SESSION_WAIT: Duration = Duration::from_secs(5);
/// How long one request may take, body upload included.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// Why a callback was not published.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The worker is not connected to the broker.
    #[error("no broker session within {SESSION_WAIT:?}")]
    NoSession,
    /// A publishing channel could not be opened.
    #[error("could not open a publishing channel: {0}")]
    Channel(#[source] lapin::Error),
    /// The broker did not confirm.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// No confirm within [`CONFIRM_LIMIT`].
    #[error("the broker did not confirm within {CONFIRM_LIMIT:?}")]
    Timeout,
}

/// The worker's current broker session, as the endpoint sees it: set while
/// a session is up, cleared when it ends.
#[derive(Default)]
pub struct IngressLink {
    current: tokio::sync::Mutex<Option<Link>>,
    /// Whether `current` holds a session, readable without waiting: the
    /// worker is ready only while it does, since without one every
    /// callback is refused with 503 (see [`crate::worker::Readiness`]).
    attached: AtomicBool,
    /// Woken when a session is attached, for callbacks waiting for one.
    arrived: tokio::sync::Notify,
}

struct Link {
    /// The session's connection: used when the endpoint's own is gone.
    session: Arc<Connection>,
    /// A connection of the endpoint's own, so a flood of large callbacks
    /// does not queue the session's result events behind it (RabbitMQ's
    /// flow control blocks a whole connection).
    own: Option<Arc<Connection>>,
    publisher: Option<Publisher>,
}

impl IngressLink {
    /// A link without a session.
    pub fn new() -> Self {
        Self::default()
    }

    /// A session is up on `session`; the endpoint publishes on `own` while
    /// it is connected.
    pub async fn attach(&self, session: Arc<Connection>, own: Option<Connection>) {
        let mut current = self.current.lock().await;
        *current = Some(Link {
            session,
            own: own.map(Arc::new),
            publisher: None,
        });
        self.attached.store(true, Ordering::Release);
        drop(current);
        self.arrived.notify_waiters();
    }

    /// The session is gone; the endpoint's own connection is closed.
    pub async fn detach(&self) {
        // First: closing the connection may take up to CONFIRM_LIMIT, and
        // meanwhile the endpoint refuses every callback.
        self.attached.store(false, Ordering::Release);
        let link = self.current.lock().await.take();
        if let Some(own) = link.and_then(|l| l.own) {
            let closing = own.close(200, "session ended".into());
            let _ = tokio::time::timeout(CONFIRM_LIMIT, closing).await;
        }
    }

    /// Whether a session is attached, so callbacks can be published.
    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// The endpoint's confirm-mode channel, opened when there is none or
    /// the last one was closed (by the broker, e.g. for a missing
    /// exchange: only a new channel can publish again).
    async fn publisher(&self) -> Result<Publisher, IngressError> {
        let deadline = tokio::time::Instant::now() + SESSION_WAIT;
        let mut current = loop {
            // Registered before looking, so an attach in between wakes it.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let current = self.current.lock().await;
            if current.is_some() {
                break current;
            }
            drop(current);
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Err(IngressError::NoSession);
            }
        };
        let link = current.as_mut().ok_or(IngressError::NoSession)?;
        if let Some(publisher) = link.publisher.as_ref().filter(|p| p.is_open()) {
            return Ok(publisher.clone());
        }
        let connection = link
            .own
            .as_ref()
            .filter(|c| c.status().connected())
            .unwrap_or(&link.session);
        let publisher = Publisher::open(connection)
            .await
            .map_err(IngressError::Channel)?;
        link.publisher = Some(publisher.clone());
        Ok(publisher)
    }
}

/// The endpoint's state.
pub struct Ingress {
    link: Arc<IngressLink>,
    exchange: String,
    /// SHA-256 of `callbacks.secret`: compared in constant time whatever
    /// the length of what was sent, and the secret itself is not kept.
    secret: Option<[u8; 32]>,
    /// Room for request bodies, in bytes ([`MAX_HELD_BYTES`]).
    room: Arc<Semaphore>,
    /// Body bytes taken per second ([`RATE_KIB_PER_SECOND`]).
    rate: governor::DefaultDirectRateLimiter,
    /// Rate-limited log lines about refusals.
    refusals: Refusals,
}

impl Ingress {
    /// Publishes to `exchange` through `link`; requires `secret` if given.
    pub fn new(link: Arc<IngressLink>, exchange: String, secret: Option<&SecretString>) -> Self {
        Self {
            link,
            exchange,
            secret: secret.map(|s| Sha256::digest(s.expose_secret().as_bytes()).into()),
            room: Arc::new(Semaphore::new(MAX_HELD_BYTES)),
            rate: governor::RateLimiter::direct(byte_rate()),
            refusals: Refusals::default(),
        }
    }

    /// The link the worker keeps current.
    pub fn link(&self) -> Arc<IngressLink> {
        self.link.clone()
    }

    fn authorised(&self, query: Option<&str>) -> bool {
        let Some(expected) = &self.secret else {
            return true;
        };
        // Not form decoding: that would turn a `+` into a space.
        let given = query.and_then(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| *k == "secret")
                .map(|(_, v)| percent_encoding::percent_decode_str(v).collect::<Vec<u8>>())
        });
        let Some(given) = given else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(&given).into();
        given.ct_eq(expected).into()
    }

    /// Room for a body of `declared` bytes (the largest when unknown),
    /// waited for up to [`ROOM_WAIT`].
    async fn room_for(&self, declared: Option<usize>) -> Option<OwnedSemaphorePermit> {
        let bytes = declared
            .unwrap_or(MAX_CALLBACK_BYTES)
            .min(MAX_CALLBACK_BYTES);
        // At most 1 MiB: it fits a u32.
        let bytes = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        let kib = NonZeroU32::new(bytes.div_ceil(1024).max(1)).unwrap_or(NonZeroU32::MIN);
        let wait = async {
            let permit = self.room.clone().acquire_many_owned(bytes).await.ok()?;
            // At most 1 MiB, within the burst: the wait always ends.
            self.rate.until_n_ready(kib).await.ok()?;
            Some(permit)
        };
        // A timeout is the flood; the semaphore is never closed.
        tokio::time::timeout(ROOM_WAIT, wait).await.ok().flatten()
    }

    async fn publish(&self, type_name: &str, body: &[u8]) -> Result<(), IngressError> {
        let publisher = self.link.publisher().await?;
        let mut headers = FieldTable::default();
        headers.insert(
            RECEIVED_AT_HEADER.into(),
            AMQPValue::LongString(timestamp::now().into()),
        );
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_headers(headers);
        if let Ok(kind) = ShortString::try_new(type_name) {
            properties = properties.with_type(kind);
        }
        // Not mandatory: a type nobody bound a queue for is dropped by the
        // broker, as intended, not refused to GeWe.
        Ok(publisher
            .publish(&self.exchange, type_name, false, body, properties)
            .await?)
    }
}

/// [`RATE_KIB_PER_SECOND`] with a burst of [`BURST_KIB`], in KiB cells.
fn byte_rate() -> governor::Quota {
    let per_second = NonZeroU32::new(RATE_KIB_PER_SECOND).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(BURST_KIB).unwrap_or(NonZeroU32::MIN);
    governor::Quota::per_second(per_second).allow_burst(burst)
}

/// The endpoint's router (the body limit is [`LIMITS`]' own).
pub fn router(ingress: Arc<Ingress>) -> Router {
    Router::new()
        .route(CALLBACK_PATH, post(receive))
        .route_layer(middleware::from_fn_with_state(ingress.clone(), guard))
        .with_state(ingress)
}

/// Runs before the body is read: the secret, room for the body, the
/// request deadline, the count of every answer (413 included) and the
/// rate-limited log of refusals.
async fn guard(State(ingress): State<Arc<Ingress>>, request: Request, next: Next) -> Response {
    let response = if !ingress.authorised(request.uri().query()) {
        (StatusCode::UNAUTHORIZED, "missing or wrong secret\n").into_response()
    } else {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_CALLBACK_BYTES) {
            (StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB\n").into_response()
        } else {
            match ingress.room_for(declared).await {
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many callbacks at once; try again\n",
                )
                    .into_response(),
                Some(_room) => match tokio::time::timeout(REQUEST_LIMIT, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => {
                        (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response()
                    }
                },
            }
        }
    };
    let status = response.status();
    if let Some(counter) = meters().callback_request(status.as_u16()) {
        counter.increment(1);
    }
    if !status.is_success() {
        ingress.refusals.log(status.as_u16(), refusal(status));
    }
    response
}

/// Why a request got `status`, for the log.
fn refusal(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "missing or wrong secret",
        StatusCode::BAD_REQUEST => "body is not a JSON object with a TypeName",
        StatusCode::PAYLOAD_TOO_LARGE => "body over 1 MiB",
        StatusCode::REQUEST_TIMEOUT => "request took longer than 30s",
        StatusCode::SERVICE_UNAVAILABLE => {
            "not confirmed by the broker, no broker session, or no room for the body within 10s; GeWe sends it again"
        }
        _ => "refused",
    }
}

async fn receive(State(ingress): State<Arc<Ingress>>, body: Bytes) -> (StatusCode, &'static str) {
    let callback = match callback::parse(&body) {
        Ok(callback) => callback,
        Err(invalid) => {
            tracing::debug!(reason = %invalid, "callback refused");
            return (StatusCode::BAD_REQUEST, "body is not a JSON object\n");
        }
    };
    let Some(type_name) = callback::type_name(&callback).filter(|t| t.len() <= 255) else {
        tracing::debug!("callback refused: no TypeName to route it by");
        return (
            StatusCode::BAD_REQUEST,
            "TypeName must be a non-empty string of at most 255 bytes\n",
        );
    };
    let published = tokio::time::timeout(CONFIRM_LIMIT, ingress.publish(type_name, &body))
        .await
        .unwrap_or(Err(IngressError::Timeout));
    match published {
        Ok(()) => {
            tracing::debug!(type_name, "callback published");
            (StatusCode::OK, "ok\n")
        }
        Err(e) => {
            // The guard's rate-limited line counts it.
            tracing::debug!(type_name, error = %e, "callback not confirmed by the broker; answered 503 so GeWe sends it again");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "callback not accepted by the broker; try again\n",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(secret: &str) -> Ingress {
        Ingress::new(
            Arc::new(IngressLink::new()),
            "gewe.callbacks".into(),
            Some(&SecretString::from(secret)),
        )
    }

    #[test]
    fn the_secret_is_the_raw_query_value_with_plus_kept() {
        let i = ingress("a+b_0123456789-.~");
        assert!(i.authorised(Some("secret=a+b_0123456789-.~")));
        assert!(i.authorised(Some("x=1&secret=a%2Bb_0123456789-.~")));
        assert!(!i.authorised(Some("secret=a b_0123456789-.~")));
        assert!(!i.authorised(Some("secret=a%20b_0123456789-.~")));
        assert!(!i.authorised(Some("secret=a+b_0123456789-.~x")));
        assert!(!i.authorised(Some("xsecret=a+b_0123456789-.~")));
        assert!(!i.authorised(None));
    }
}
