//! The JSON API (contract §8): accounts, dead letters, summary. Every
//! state change is logged with what it did and to what, and how the
//! operator came in (`api` or `console`).

use std::{collections::HashSet, sync::Arc, time::Duration};

use axum::{
    Extension, Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::{
    Access, Admin, ApiError,
    dead_letters::{MAX_LIST, Selection},
    error, summary,
};
use crate::accounts::{AccountDirectory, AccountError};

/// Longest `appId` accepted in a path.
const MAX_APP_ID: usize = 128;
/// Dead letters listed when no `limit` is given.
pub const DEFAULT_LIST: usize = 50;

/// The directory, or the 503 that says there is none.
fn directory(admin: &Admin) -> Result<&Arc<dyn AccountDirectory>, ApiError> {
    admin.accounts.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "account state is not available in this worker (no account budgets are kept)",
        )
    })
}

fn unavailable(e: AccountError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// `GET /api/accounts`.
pub async fn accounts(State(admin): State<Arc<Admin>>) -> Result<Response, ApiError> {
    let accounts = directory(&admin)?.list().await.map_err(unavailable)?;
    Ok(Json(accounts).into_response())
}

/// Body of `POST /api/accounts/<appId>/pause`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// How long, e.g. `6h`; until resumed when absent.
    #[serde(default, rename = "for")]
    pub duration: Option<String>,
    /// Why, shown in the accounts table.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Checks `app_id` and that the account is known.
async fn known(directory: &Arc<dyn AccountDirectory>, app_id: &str) -> Result<(), ApiError> {
    if app_id.trim().is_empty() || app_id.chars().count() > MAX_APP_ID {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("appId must be 1..={MAX_APP_ID} characters"),
        ));
    }
    let accounts = directory.list().await.map_err(unavailable)?;
    if accounts.iter().any(|a| a.app_id == app_id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no account '{app_id}' was seen in the last 7 days"),
        ))
    }
}

/// The account's view after a change, as the answer.
async fn view_of(
    directory: &Arc<dyn AccountDirectory>,
    app_id: &str,
) -> Result<Response, ApiError> {
    let accounts = directory.list().await.map_err(unavailable)?;
    Ok(match accounts.into_iter().find(|a| a.app_id == app_id) {
        Some(view) => Json(view).into_response(),
        None => Json(serde_json::json!({ "appId": app_id })).into_response(),
    })
}

/// `POST /api/accounts/<appId>/pause`.
pub async fn pause(
    State(admin): State<Arc<Admin>>,
    Extension(access): Extension<Access>,
    Path(app_id): Path<String>,
    body: Option<Json<PauseRequest>>,
) -> Result<Response, ApiError> {
    let directory = directory(&admin)?;
    let request = body.map(|Json(b)| b).unwrap_or_default();
    let duration = match request.duration.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() && d <= Duration::from_secs(366 * 24 * 3600) => Some(d),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "`for` must be a duration such as 30m or 6h, at most a year (got '{text}')"
                    ),
                ));
            }
        },
    };
    let reason = request
        .reason
        .map(|r| r.trim().chars().take(200).collect::<String>())
        .filter(|r| !r.is_empty());
    known(directory, &app_id).await?;
    directory
        .pause(&app_id, duration, reason.as_deref())
        .await
        .map_err(unavailable)?;
    tracing::info!(
        action = "pause",
        app_id = %app_id,
        duration = duration.map(|d| humantime::format_duration(d).to_string()),
        reason = reason.as_deref(),
        via = access.via(),
        "admin: account paused"
    );
    view_of(directory, &app_id).await
}

/// `POST /api/accounts/<appId>/resume`.
pub async fn resume(
    State(admin): State<Arc<Admin>>,
    Extension(access): Extension<Access>,
    Path(app_id): Path<String>,
) -> Result<Response, ApiError> {
    let directory = directory(&admin)?;
    known(directory, &app_id).await?;
    directory.resume(&app_id).await.map_err(unavailable)?;
    tracing::info!(action = "resume", app_id = %app_id, via = access.via(), "admin: account resumed");
    view_of(directory, &app_id).await
}

/// Query of `GET /api/dead-letters`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// How many, at most [`MAX_LIST`].
    pub limit: Option<usize>,
}

/// `GET /api/dead-letters?limit=N`.
pub async fn dead_letters(
    State(admin): State<Arc<Admin>>,
    Query(query): Query<ListQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST);
    match admin.dead_letters.list(limit).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Body of `POST /api/dead-letters/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// These dead letters.
    #[serde(default)]
    pub ids: Option<Vec<String>>,
    /// Or the first `limit` of them.
    #[serde(default)]
    pub all: bool,
    /// With `all`: how many at most (all of them up to 10,000 when absent).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `POST /api/dead-letters/replay`.
pub async fn replay(
    State(admin): State<Arc<Admin>>,
    Extension(access): Extension<Access>,
    Json(request): Json<ReplayRequest>,
) -> Result<Response, ApiError> {
    let selection = match (request.ids, request.all) {
        (Some(ids), false) if !ids.is_empty() => {
            Selection::Ids(ids.into_iter().collect::<HashSet<_>>())
        }
        (None, true) => Selection::All {
            limit: request
                .limit
                .unwrap_or(super::dead_letters::MAX_SCAN)
                .min(super::dead_letters::MAX_SCAN),
        },
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "give either {\"ids\": [...]} (not empty) or {\"all\": true, \"limit\": N}",
            ));
        }
    };
    tracing::info!(action = "replay", selection = ?selection, via = access.via(), "admin: replaying dead letters");
    match admin.dead_letters.replay(&selection).await {
        Ok(done) => {
            tracing::info!(
                action = "replay",
                replayed = done.replayed,
                not_found = done.not_found.len(),
                via = access.via(),
                "admin: dead letters replayed"
            );
            Ok(Json(done).into_response())
        }
        Err(e) => {
            tracing::warn!(action = "replay", error = %e, via = access.via(), "admin: replay stopped");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
            ))
        }
    }
}

/// `GET /api/summary`.
pub async fn summary(State(admin): State<Arc<Admin>>) -> Response {
    Json(summary::read(&admin.sources, &admin.dead_letters).await).into_response()
}
