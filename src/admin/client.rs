//! The CLI's `accounts` and `dead-letters` commands (contract §8): a client
//! of the admin API, with errors that say what to fix (a wrong token, a
//! wrong URL, an unknown appId).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::{accounts::AccountView, config::Settings};

/// Most ids one replay request carries: the admin port takes bodies of at
/// most 1 KiB, as the ops port does.
const IDS_PER_REQUEST: usize = 32;
/// The admin API's URL: `url` when given, else `admin.listen` (a wildcard
/// address reached on loopback).
pub fn base_url(settings: &Settings, url: Option<&str>) -> String {
    if let Some(url) = url {
        return url.to_owned();
    }
    match settings.admin.listen {
        Some(addr) if addr.ip().is_unspecified() => format!("http://127.0.0.1:{}", addr.port()),
        Some(addr) => format!("http://{addr}"),
        None => "http://127.0.0.1:8090".to_owned(),
    }
}

/// Bound on one request (a replay of thousands of dead letters included).
const REQUEST_LIMIT: Duration = Duration::from_secs(120);

/// Why a console request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No token was configured.
    #[error("no admin token: set GEWE_WORKER__ADMIN__TOKEN or admin.token in --config")]
    NoToken,
    /// The URL is not one.
    #[error("--admin-url '{0}' is not an http(s) URL")]
    BadUrl(String),
    /// The worker could not be reached.
    #[error(
        "cannot reach the admin API at {url}: {source} (is admin.listen set on the worker, and is --admin-url its address?)"
    )]
    Unreachable {
        /// The URL.
        url: String,
        /// reqwest's error.
        #[source]
        source: reqwest::Error,
    },
    /// 401.
    #[error("the worker refused the admin token (401): use the worker's admin.token")]
    Unauthorized,
    /// 404 for an account.
    #[error("{0}")]
    NotFound(String),
    /// Any other refusal.
    #[error("the admin API answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// Its error text.
        message: String,
    },
    /// An answer that is not the API's.
    #[error(
        "unexpected answer from {url}: {detail} (is --admin-url the worker's admin.listen address, not the ops port?)"
    )]
    Unexpected {
        /// The URL.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

/// A client of one worker's admin API.
pub struct AdminClient {
    base: reqwest::Url,
    token: SecretString,
    http: reqwest::Client,
}

impl AdminClient {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:8090`).
    pub fn new(base: &str, token: Option<&SecretString>) -> Result<Self, ClientError> {
        let token = token.ok_or(ClientError::NoToken)?.clone();
        let base = reqwest::Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| ClientError::BadUrl(base.to_owned()))?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_LIMIT)
            .build()
            .map_err(|source| ClientError::Unreachable {
                url: base.to_string(),
                source,
            })?;
        Ok(Self { base, token, http })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = self
            .base
            .join(path)
            .map_err(|_| ClientError::BadUrl(format!("{}{path}", self.base)))?;
        let mut request = self
            .http
            .request(method, url.clone())
            .bearer_auth(self.token.expose_secret());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let shown = url.to_string();
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: shown.clone(),
                source,
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: shown.clone(),
                source,
            })?;
        let parsed: Result<Value, _> = serde_json::from_str(&text);
        let message = || {
            parsed
                .as_ref()
                .ok()
                .and_then(|v| v["error"].as_str())
                .map(str::to_owned)
        };
        match status {
            s if s.is_success() => parsed.map_err(|e| ClientError::Unexpected {
                url: shown,
                detail: format!("not JSON ({e})"),
            }),
            StatusCode::UNAUTHORIZED => Err(ClientError::Unauthorized),
            StatusCode::NOT_FOUND => Err(match message() {
                Some(m) => ClientError::NotFound(m),
                None => ClientError::Unexpected {
                    url: shown,
                    detail: "404 Not Found".to_owned(),
                },
            }),
            status => Err(ClientError::Refused {
                status,
                message: message().unwrap_or_else(|| text.chars().take(200).collect()),
            }),
        }
    }

    /// `GET /api/accounts`.
    pub async fn accounts(&self) -> Result<Vec<AccountView>, ClientError> {
        let value = self.call(Method::GET, "/api/accounts", None).await?;
        serde_json::from_value(value).map_err(|e| ClientError::Unexpected {
            url: self.base.to_string(),
            detail: e.to_string(),
        })
    }

    /// `POST /api/accounts/<appId>/pause`.
    pub async fn pause(
        &self,
        app_id: &str,
        duration: Option<&str>,
        reason: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut body = json!({});
        if let Some(d) = duration {
            body["for"] = d.into();
        }
        if let Some(r) = reason {
            body["reason"] = r.into();
        }
        self.call(
            Method::POST,
            &format!("/api/accounts/{}/pause", segment(app_id)),
            Some(body),
        )
        .await
    }

    /// `POST /api/accounts/<appId>/resume`.
    pub async fn resume(&self, app_id: &str) -> Result<Value, ClientError> {
        self.call(
            Method::POST,
            &format!("/api/accounts/{}/resume", segment(app_id)),
            None,
        )
        .await
    }

    /// `GET /api/dead-letters?limit=N`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Value, ClientError> {
        self.call(
            Method::GET,
            &format!("/api/dead-letters?limit={limit}"),
            None,
        )
        .await
    }

    /// `POST /api/dead-letters/replay` by ids (in requests small enough
    /// for the port's body limit): how many moved, and the ids not found.
    pub async fn replay_ids(&self, ids: &[String]) -> Result<(u64, Vec<String>), ClientError> {
        let (mut moved, mut missing) = (0, Vec::new());
        for chunk in ids.chunks(IDS_PER_REQUEST) {
            let done = self
                .call(
                    Method::POST,
                    "/api/dead-letters/replay",
                    Some(json!({ "ids": chunk })),
                )
                .await?;
            moved += done["replayed"].as_u64().unwrap_or(0);
            if let Some(list) = done["notFound"].as_array() {
                missing.extend(list.iter().filter_map(|v| v.as_str().map(str::to_owned)));
            }
        }
        Ok((moved, missing))
    }

    /// `POST /api/dead-letters/replay` with `all`.
    pub async fn replay_all(&self, limit: Option<usize>) -> Result<u64, ClientError> {
        let mut body = json!({ "all": true });
        if let Some(limit) = limit {
            body["limit"] = limit.into();
        }
        let done = self
            .call(Method::POST, "/api/dead-letters/replay", Some(body))
            .await?;
        Ok(done["replayed"].as_u64().unwrap_or(0))
    }
}

/// `app_id` as one path segment.
fn segment(app_id: &str) -> String {
    percent_encoding::utf8_percent_encode(app_id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The accounts as a table for a terminal.
pub fn accounts_table(accounts: &[AccountView]) -> String {
    let mut out = format!(
        "{:<24} {:<13} {:>11} {:<25} {}\n",
        "APP ID", "STATE", "SENT/LIMIT", "RESTING UNTIL", "REASON"
    );
    for a in accounts {
        let limit = a
            .daily_limit
            .map_or_else(|| "-".to_owned(), |l| l.to_string());
        out.push_str(&format!(
            "{:<24} {:<13} {:>11} {:<25} {}\n",
            a.app_id,
            a.state.as_str(),
            format!("{}/{limit}", a.sent_today),
            a.resting_until.as_deref().unwrap_or("-"),
            a.reason.as_deref().unwrap_or(""),
        ));
    }
    out
}

/// The dead letters as a table for a terminal.
pub fn dead_letters_table(list: &Value) -> String {
    let mut out = format!(
        "{:<16} {:<36} {:<20} {:<25} {}\n",
        "ID", "COMMAND ID", "APP ID", "DEAD SINCE", "REASON"
    );
    for d in list.as_array().into_iter().flatten() {
        let s = |k: &str| d[k].as_str().unwrap_or("-").to_owned();
        out.push_str(&format!(
            "{:<16} {:<36} {:<20} {:<25} {}\n",
            s("id"),
            s("commandId"),
            s("appId"),
            s("deadAt"),
            s("reason"),
        ));
    }
    out
}
