//! The operator's console in tests: an account directory kept in memory
//! (the trait's contract, without the budget keeper), and an HTTP client
//! that signs in like a browser.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use gewe_friend_worker::accounts::{AccountDirectory, AccountFuture, AccountState, AccountView};
use reqwest::{StatusCode, header};
use secrecy::SecretString;

/// The admin token of test workers.
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-7f1c";

/// Accounts kept in a `Mutex<Vec<_>>`.
#[derive(Default)]
pub struct MemoryDirectory {
    pub accounts: Mutex<Vec<AccountView>>,
}

impl MemoryDirectory {
    /// A directory of `app_ids`, all active.
    pub fn of(app_ids: &[&str]) -> Arc<Self> {
        let accounts = app_ids
            .iter()
            .map(|id| AccountView {
                app_id: (*id).to_owned(),
                state: AccountState::Active,
                sent_today: 3,
                daily_limit: Some(40),
                resting_until: None,
                reason: None,
                last_sent_at: Some("2026-12-03T08:00:00.000Z".to_owned()),
                last_outcome: Some("succeeded".to_owned()),
            })
            .collect();
        Arc::new(Self {
            accounts: Mutex::new(accounts),
        })
    }

    /// The state of `app_id`.
    pub fn state(&self, app_id: &str) -> Option<AccountState> {
        self.accounts
            .lock()
            .expect("lock")
            .iter()
            .find(|a| a.app_id == app_id)
            .map(|a| a.state)
    }
}

impl AccountDirectory for MemoryDirectory {
    fn list(&self) -> AccountFuture<'_, Vec<AccountView>> {
        let list = self.accounts.lock().expect("lock").clone();
        Box::pin(async move { Ok(list) })
    }

    fn pause<'a>(
        &'a self,
        app_id: &'a str,
        duration: Option<Duration>,
        reason: Option<&'a str>,
    ) -> AccountFuture<'a, ()> {
        let mut accounts = self.accounts.lock().expect("lock");
        if let Some(a) = accounts.iter_mut().find(|a| a.app_id == app_id) {
            a.state = AccountState::Paused;
            a.reason = reason.map(str::to_owned);
            a.resting_until = duration
                .map(|d| gewe_friend_worker::timestamp::format(std::time::SystemTime::now() + d));
        }
        Box::pin(async { Ok(()) })
    }

    fn resume<'a>(&'a self, app_id: &'a str) -> AccountFuture<'a, ()> {
        let mut accounts = self.accounts.lock().expect("lock");
        if let Some(a) = accounts.iter_mut().find(|a| a.app_id == app_id) {
            a.state = AccountState::Active;
            a.reason = None;
            a.resting_until = None;
        }
        Box::pin(async { Ok(()) })
    }
}

/// Turns the console on for `settings` (an ephemeral port).
pub fn with_admin(settings: &mut gewe_friend_worker::config::Settings) {
    settings.admin.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    settings.admin.token = Some(SecretString::from(ADMIN_TOKEN));
}

/// A client of the admin API with the token.
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// GET with the token; status and JSON body.
    pub async fn get(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin answers");
        let status = r.status();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POST JSON with the token; status and JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin answers");
        let status = r.status();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// The row of `app_id` in `GET /api/accounts` (`Null` when it is not
    /// listed), and the whole list.
    pub async fn account(&self, app_id: &str) -> (serde_json::Value, serde_json::Value) {
        let (status, list) = self.get("/api/accounts").await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let row = list
            .as_array()
            .and_then(|all| all.iter().find(|a| a["appId"] == app_id))
            .cloned()
            .unwrap_or_default();
        (row, list)
    }

    /// The dead letters' ids and reasons, in queue order.
    pub async fn dead_letters(&self, limit: usize) -> Vec<serde_json::Value> {
        let (status, list) = self.get(&format!("/api/dead-letters?limit={limit}")).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list.as_array().cloned().unwrap_or_default()
    }
}

/// Signs in at `addr` with `token`; the `Set-Cookie` header on success.
pub async fn sign_in(addr: SocketAddr, token: &str) -> (StatusCode, Option<String>) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http
        .post(format!("http://{addr}/login"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .expect("sign-in answers");
    let cookie = r
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (r.status(), cookie)
}
