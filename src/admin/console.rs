//! The console's pages (contract §8): server-rendered with maud, one
//! stylesheet and one small script embedded in the binary and inlined in
//! the page, nothing loaded from anywhere else (its CSP says so). The page's sections are rendered again every few
//! seconds (`/console/sections`), so the page refreshes by itself without
//! a second copy of the markup in JavaScript.

use std::sync::Arc;

use axum::{
    Extension,
    body::Bytes,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{
    Access, Admin,
    api::DEFAULT_LIST,
    auth,
    dead_letters::DeadLetter,
    summary::{self, DelayQueue, Summary},
};
use crate::accounts::AccountView;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
/// Nothing from anywhere else, no framing by other sites; the one inline
/// script runs by its per-response nonce.
fn policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
}

fn html_response(status: StatusCode, nonce: &str, markup: Markup) -> Response {
    let mut response = (status, Html(markup.into_string())).into_response();
    let headers = response.headers_mut();
    if let Ok(policy) = HeaderValue::from_str(&policy(nonce)) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        title { (title) }
        style { (PreEscaped(CSS)) }
    }
}

/// The sign-in page, with `problem` shown when the last try failed.
pub fn sign_in_page(status: StatusCode, problem: Option<&str>) -> Response {
    html_response(
        status,
        "",
        html! {
            (DOCTYPE)
            html lang="en" {
                head { (head("Sign in · gewe-friend-worker")) }
                body {
                    main.signin { section {
                        h2 { "gewe-friend-worker console" }
                        form method="post" action="/login" {
                            label for="token" { "Admin token" }
                            input #token type="password" name="token" autocomplete="current-password" autofocus required;
                            @if let Some(problem) = problem { p.error #problem { (problem) } }
                            button.primary #sign-in type="submit" { "Sign in" }
                        }
                        p.muted { "The token is admin.token (GEWE_WORKER__ADMIN__TOKEN)." }
                    } }
                }
            }
        },
    )
}

/// `POST /login`: the token from the form; a session cookie and the
/// console, or the sign-in page again.
pub async fn sign_in(State(admin): State<Arc<Admin>>, body: Bytes) -> Response {
    let token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if !admin.auth.token_matches(&token) {
        if let Some(count) = admin.refusals.due() {
            tracing::warn!(
                action = "sign_in",
                count,
                "admin console sign-in refused: wrong token (count: refusals since the last such line)"
            );
        }
        return sign_in_page(StatusCode::UNAUTHORIZED, Some("Wrong token."));
    }
    tracing::info!(action = "sign_in", "admin console signed in");
    let cookie = auth::set_cookie(&admin.auth.new_session());
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /logout`.
pub async fn sign_out(Extension(access): Extension<Access>) -> Response {
    tracing::info!(
        action = "sign_out",
        via = access.via(),
        "admin console signed out"
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = HeaderValue::from_str(&auth::clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /`: the console.
pub async fn page(
    State(admin): State<Arc<Admin>>,
    Extension(access): Extension<Access>,
) -> Response {
    let csrf = match &access {
        Access::Console(session) => admin.auth.csrf(session),
        // A bearer client sees the page but cannot act through it.
        Access::Bearer => String::new(),
    };
    let sections = render_sections(&admin).await;
    let nonce = nonce();
    html_response(
        StatusCode::OK,
        &nonce,
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    (head("gewe-friend-worker console"))
                    meta name="csrf-token" content=(csrf);
                }
                body {
                    header {
                        h1 { "gewe-friend-worker " small { "operator's console" } }
                        button #sign-out data-action="sign-out" { "Sign out" }
                    }
                    main {
                        div #status {}
                        section.controls-box {
                            div.controls {
                                label for="pause-for" { "Pause for" }
                                input #pause-for placeholder="until resumed (e.g. 6h)" size="18";
                                label for="pause-reason" { "reason" }
                                input #pause-reason placeholder="optional" size="24";
                            }
                            p.muted { "Used by the Pause buttons below. The page refreshes every 5 s." }
                        }
                        div #sections { (sections) }
                    }
                    script nonce=(nonce) { (PreEscaped(JS)) }
                }
            }
        },
    )
}

/// `GET /console/sections`: the part of the page that refreshes.
pub async fn sections(State(admin): State<Arc<Admin>>) -> Response {
    html_response(StatusCode::OK, "", render_sections(&admin).await)
}

async fn render_sections(admin: &Admin) -> Markup {
    let summary = summary::read(&admin.sources, &admin.dead_letters).await;
    let accounts = match &admin.accounts {
        None => Err(
            "Account state is not available in this worker (no account budgets are kept)."
                .to_owned(),
        ),
        Some(directory) => directory.list().await.map_err(|e| e.to_string()),
    };
    let dead = admin
        .dead_letters
        .list(DEFAULT_LIST)
        .await
        .map_err(|e| e.to_string());
    html! {
        (summary_section(&summary))
        (accounts_section(&accounts))
        (dead_letters_section(&dead, summary.dead_letters))
        (delay_section(&summary))
    }
}

fn tile(value: impl maud::Render, label: &str) -> Markup {
    html! { div.tile { b { (value) } span { (label) } } }
}

fn badge(text: &str) -> Markup {
    html! { span class={ "badge " (text) } { (text.replace('_', " ")) } }
}

/// An RFC 3339 time as `2026-12-03 16:28` (UTC), the full time on hover.
fn time(at: Option<&str>) -> Markup {
    match at {
        None => html! {},
        Some(at) => {
            let short = at
                .get(..16)
                .map_or_else(|| at.to_owned(), |t| t.replace('T', " "));
            html! { time.t datetime=(at) title=(at) { (short) } }
        }
    }
}

fn count(n: Option<u32>) -> String {
    n.map_or_else(|| "–".to_owned(), |n| n.to_string())
}

fn summary_section(s: &Summary) -> Markup {
    let outcome = |k: &str| s.outcomes.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let failed: u64 = s
        .outcomes
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "succeeded" | "accepted"))
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    let sum = |queues: &[DelayQueue]| queues.iter().filter_map(|q| q.messages).sum::<u32>();
    html! {
        section #summary {
            h2 { "Summary" }
            div.tiles {
                div.tile { b { (badge(s.broker)) } span { "broker" } }
                div.tile { b { (badge(s.redis)) } span { "redis" } }
                div.tile { b { (badge(s.breaker)) } span { "circuit breaker" } }
                (tile(outcome("succeeded"), "succeeded since start"))
                (tile(failed, "failed since start"))
                (tile(outcome("accepted"), "accepted since start"))
                (tile(s.in_flight, "in flight"))
                (tile(sum(&s.deferred), "deferred"))
                (tile(sum(&s.parked), "parked"))
                div.tile #dead-letter-count { b { (count(s.dead_letters)) } span { "dead letters" } }
            }
            @if let Some(reason) = &s.not_ready { p.muted { "Not ready: " (reason) } }
            @if let Some(e) = &s.broker_error { p.error { (e) } }
        }
    }
}

fn accounts_section(accounts: &Result<Vec<AccountView>, String>) -> Markup {
    html! {
        section #accounts {
            h2 { "Accounts" }
            @match accounts {
                Err(why) => p.muted #accounts-unavailable { (why) },
                Ok(list) if list.is_empty() => p.muted { "No account was seen in the last 7 days." },
                Ok(list) => div.scroll { table {
                    thead { tr {
                        th { "appId" } th { "state" } th { "sent today" } th { "resting until (UTC)" }
                        th { "reason" } th { "last sent (UTC)" } th { "last outcome" } th {}
                    } }
                    tbody { @for a in list {
                        tr data-app=(a.app_id) {
                            td { code { (a.app_id) } }
                            td.state { (badge(a.state.as_str())) }
                            td { (a.sent_today) " / " (a.daily_limit.map_or_else(|| "∞".to_owned(), |l| l.to_string())) }
                            td { (time(a.resting_until.as_deref())) }
                            td { (a.reason.as_deref().unwrap_or("")) }
                            td { (time(a.last_sent_at.as_deref())) }
                            td { (a.last_outcome.as_deref().unwrap_or("")) }
                            td { @if a.state.as_str() == "paused" {
                                button data-action="resume" data-app=(a.app_id) { "Resume" }
                            } @else {
                                button data-action="pause" data-app=(a.app_id) { "Pause" }
                            } }
                        }
                    } }
                } }
            }
        }
    }
}

fn dead_letters_section(dead: &Result<Vec<DeadLetter>, String>, total: Option<u32>) -> Markup {
    html! {
        section #dead-letters {
            h2 { "Dead letters " span.muted { "(" (count(total)) ")" } }
            @match dead {
                Err(why) => p.error { (why) },
                Ok(list) if list.is_empty() => p.muted { "No dead letters." },
                Ok(list) => {
                    div.controls {
                        button.primary data-action="replay-all" { "Replay all" }
                        @if total.is_some_and(|t| t as usize > list.len()) {
                            span.muted { "showing the first " (list.len()) }
                        }
                    }
                    div.scroll { table {
                        thead { tr {
                            th { "commandId" } th { "appId" } th { "reason" } th { "dead since (UTC)" }
                            th { "body" } th {}
                        } }
                        tbody { @for d in list {
                            tr data-id=(d.id) {
                                td { code { (d.command_id) } }
                                td { (d.app_id.as_deref().unwrap_or("")) }
                                td.reason { (d.reason) @if d.replayed > 0 { " " span.muted { "(replayed " (d.replayed) "×)" } } }
                                td { (time(d.dead_at.as_deref())) }
                                td.body { (d.body.chars().take(300).collect::<String>()) }
                                td { button data-action="replay" data-id=(d.id) { "Replay" } }
                            }
                        } }
                    } }
                }
            }
        }
    }
}

fn delay_section(s: &Summary) -> Markup {
    html! {
        section #delay-queues {
            h2 { "Parked and deferred" }
            div.scroll { table {
                thead { tr { th { "queue" } th { "kind" } th { "delay" } th { "messages" } } }
                tbody {
                    @for q in &s.parked { tr { td { code { (q.queue) } } td { "parked" } td { (q.delay) } td { (count(q.messages)) } } }
                    @for q in &s.deferred { tr { td { code { (q.queue) } } td { "deferred" } td { (q.delay) } td { (count(q.messages)) } } }
                }
            } }
        }
    }
}
