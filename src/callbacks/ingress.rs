//! `POST /gewe/callback` (`callbacks.listen`, contract §6): GeWe's callback
//! body is published unchanged to `callbacks.exchange` with routing key =
//! its `TypeName` and a publisher confirm, and only then answered 200.
//!
//! Answers: 401 without the right `secret` query parameter (when one is
//! configured; compared in constant time, checked before the body is
//! read), 413 for a body over 1 MiB (as declared, or as sent), 400 for a body that is not a JSON
//! object or has no `TypeName`, 503 when the broker did not confirm or the
//! worker has no broker session, 408 when the whole request took longer
//! than 30 s. The URI (which carries the secret) is never logged.
//!
//! The endpoint publishes on its own channel of the worker's current broker
//! session ([`IngressLink`]), so a missing exchange breaks only that
//! channel; it is reopened on the next request.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::StatusCode,
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

use super::{callback, consume::RECEIVED_AT_HEADER};
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
/// How long the broker gets to confirm a callback.
const CONFIRM_LIMIT: Duration = Duration::from_secs(10);
/// How long one request may take, body upload included.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// Why a callback was not published.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The worker is not connected to the broker.
    #[error("no broker session")]
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
}

struct Link {
    connection: Arc<Connection>,
    publisher: Option<Publisher>,
}

impl IngressLink {
    /// A link without a session.
    pub fn new() -> Self {
        Self::default()
    }

    /// A session is up on `connection`.
    pub async fn attach(&self, connection: Arc<Connection>) {
        *self.current.lock().await = Some(Link {
            connection,
            publisher: None,
        });
    }

    /// The session is gone.
    pub async fn detach(&self) {
        *self.current.lock().await = None;
    }

    /// The endpoint's confirm-mode channel, opened when there is none or
    /// the last one was closed (by the broker, e.g. for a missing
    /// exchange: only a new channel can publish again).
    async fn publisher(&self) -> Result<Publisher, IngressError> {
        let mut current = self.current.lock().await;
        let link = current.as_mut().ok_or(IngressError::NoSession)?;
        if let Some(publisher) = link.publisher.as_ref().filter(|p| p.is_open()) {
            return Ok(publisher.clone());
        }
        let publisher = Publisher::open(&link.connection)
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
}

impl Ingress {
    /// Publishes to `exchange` through `link`; requires `secret` if given.
    pub fn new(link: Arc<IngressLink>, exchange: String, secret: Option<&SecretString>) -> Self {
        Self {
            link,
            exchange,
            secret: secret.map(|s| Sha256::digest(s.expose_secret().as_bytes()).into()),
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
        let given = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "secret")
                .map(|(_, v)| v)
        });
        let Some(given) = given else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        given.ct_eq(expected).into()
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

/// The endpoint's router (the body limit is [`LIMITS`]' own).
pub fn router(ingress: Arc<Ingress>) -> Router {
    Router::new()
        .route(CALLBACK_PATH, post(receive))
        .route_layer(middleware::from_fn_with_state(ingress.clone(), guard))
        .with_state(ingress)
}

/// Runs before the body is read: the secret, the request deadline, and
/// the count of every answer (413 included).
async fn guard(State(ingress): State<Arc<Ingress>>, request: Request, next: Next) -> Response {
    let response = if !ingress.authorised(request.uri().query()) {
        tracing::warn!("callback refused: missing or wrong secret");
        (StatusCode::UNAUTHORIZED, "missing or wrong secret\n").into_response()
    } else {
        match tokio::time::timeout(REQUEST_LIMIT, next.run(request)).await {
            Ok(response) => response,
            Err(_) => {
                tracing::warn!("callback request took longer than {REQUEST_LIMIT:?}");
                (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response()
            }
        }
    };
    if let Some(counter) = meters().callback_request(response.status().as_u16()) {
        counter.increment(1);
    }
    response
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
            tracing::warn!(type_name, error = %e, "callback not confirmed by the broker; answered 503 so GeWe sends it again");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "callback not accepted by the broker; try again\n",
            )
        }
    }
}
