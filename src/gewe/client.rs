//! One HTTP attempt against GeWe, no interpretation.
//!
//! The client is built once and shared: reqwest pools connections, so a
//! per-message client would pay a TCP (and TLS) handshake per command.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};

use super::{ADD_MEMBER_PATH, TOKEN_HEADER};
use crate::{command::Command, json_out, resources};

/// Could not build the client from configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// The token contains characters that cannot go in an HTTP header.
    #[error("`gewe.token` contains characters not allowed in an HTTP header")]
    BadToken,
    /// The base URL cannot be joined with the endpoint path.
    #[error("`gewe.base_url` is not a usable base URL: {0}")]
    BadUrl(#[from] url::ParseError),
    /// reqwest could not set up TLS or the connection pool.
    #[error("could not build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// GeWe did not answer with an HTTP response.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The attempt took longer than `gewe.timeout`.
    #[error("GeWe did not answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, DNS failure, TLS failure...
    #[error("could not reach GeWe: {0}")]
    Connect(String),
    /// The response started but its body could not be read.
    #[error("GeWe's response was cut off: {0}")]
    Body(String),
    /// This process (or the system) is out of file descriptors: the request
    /// never left, and GeWe is not to blame.
    #[error("no file descriptor left to reach GeWe (a local shortage, not GeWe's): {0}")]
    LocalResources(String),
}

/// An HTTP response from GeWe, not yet interpreted.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// `Retry-After`, when given as delay-seconds or an HTTP-date (a date
    /// already past is no wait).
    pub retry_after: Option<Duration>,
    /// Raw body.
    pub body: Bytes,
}

/// The request body: `{"appId","chatroomId","memberWxid","content"}`,
/// written as serde_json would write it (see [`crate::json_out`]).
fn request_body(command: &Command) -> Vec<u8> {
    let mut body = Vec::with_capacity(
        64 + command.app_id.len()
            + command.chatroom_id.len()
            + command.member_wxid.len()
            + command.content.len(),
    );
    let mut object = json_out::Object::open(&mut body);
    object.str("appId", &command.app_id);
    object.str("chatroomId", &command.chatroom_id);
    object.str("memberWxid", &command.member_wxid);
    object.str("content", &command.content);
    object.close();
    body
}

/// Calls `POST /gewe/v2/api/group/addGroupMemberAsFriend`.
#[derive(Debug, Clone)]
pub struct GeweClient {
    http: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
}

impl GeweClient {
    /// Builds the shared client; the token goes into default headers marked
    /// sensitive so reqwest never prints it.
    pub fn new(
        base_url: &str,
        token: &SecretString,
        timeout: Duration,
        max_idle: usize,
    ) -> Result<Self, ClientBuildError> {
        let mut token_value =
            HeaderValue::from_str(token.expose_secret()).map_err(|_| ClientBuildError::BadToken)?;
        token_value.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(TOKEN_HEADER, token_value);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("gewe-friend-worker/", env!("CARGO_PKG_VERSION")))
            // The whole attempt is bounded in `add_group_member_as_friend`.
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            // Calls in flight are bounded by the prefetch already; idle
            // connections are bounded here, each one a descriptor.
            .pool_max_idle_per_host(max_idle)
            // reqwest strips only Authorization/Cookie on cross-host
            // redirects: following one would hand X-GEWE-TOKEN to that host.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base = if base_url.ends_with('/') {
            base_url.to_owned()
        } else {
            format!("{base_url}/")
        };
        let url = reqwest::Url::parse(&base)?.join(ADD_MEMBER_PATH.trim_start_matches('/'))?;
        Ok(Self { http, url, timeout })
    }

    /// `gewe.timeout`: the longest one attempt can take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The full endpoint URL (no secret in it).
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Makes one attempt for `command`, bounded by `gewe.timeout` from the
    /// request to the last byte of the answer.
    pub async fn add_group_member_as_friend(
        &self,
        command: &Command,
    ) -> Result<Answer, TransportError> {
        // One timer for the whole attempt: reqwest's own total timeout
        // boxes a timer for the request and another for the body.
        tokio::time::timeout(self.timeout, self.attempt(command))
            .await
            .unwrap_or(Err(TransportError::Timeout(self.timeout)))
    }

    async fn attempt(&self, command: &Command) -> Result<Answer, TransportError> {
        // Content-Type is a default header.
        let body = request_body(command);
        let response = self
            .http
            .post(self.url.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e, false))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e, true))?;
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }

    fn transport_error(&self, e: reqwest::Error, reading_body: bool) -> TransportError {
        // reqwest's Display includes the URL, never the headers, so no token.
        let text = error_chain(&e);
        if resources::is_fd_exhaustion(&e) {
            TransportError::LocalResources(text)
        } else if e.is_timeout() {
            TransportError::Timeout(self.timeout)
        } else if reading_body {
            TransportError::Body(text)
        } else {
            TransportError::Connect(text)
        }
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(60);
        let d = parse_retry_after(&httpdate::fmt_http_date(in_a_minute)).expect("date");
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn the_request_body_is_the_json_object_gewe_expects() {
        let command = Command {
            command_id: "c1".into(),
            app_id: "wx_app".into(),
            chatroom_id: "34757816141@chatroom".into(),
            member_wxid: "wxid_\"q\"".into(),
            content: "你好\n我是群里的小王".into(),
        };
        let expected = serde_json::json!({
            "appId": "wx_app",
            "chatroomId": "34757816141@chatroom",
            "memberWxid": "wxid_\"q\"",
            "content": "你好\n我是群里的小王",
        });
        assert_eq!(
            request_body(&command),
            serde_json::to_vec(&expected).expect("serialises")
        );
    }
}
