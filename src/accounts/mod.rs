//! Account budgets (contract §7): what each WeChat account may still send,
//! and the operator's view of it (§8).

pub mod view;

pub use view::{AccountState, AccountView};

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Why an operator's request about accounts could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The state store (Redis) did not answer; nothing was changed.
    #[error("account state is unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so the trait stays object-safe for the admin API.
pub type AccountFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, AccountError>> + Send + 'a>>;

/// The accounts as an operator steers them (contract §8). Implemented by the
/// budget keeper; the admin API and console hold it as `Arc<dyn …>`.
pub trait AccountDirectory: Send + Sync {
    /// Every account seen in the last 7 days, sorted by appId.
    fn list(&self) -> AccountFuture<'_, Vec<AccountView>>;
    /// Pauses `app_id` for `duration` (until resumed when `None`); its
    /// commands are deferred with reason `paused`.
    fn pause<'a>(
        &'a self,
        app_id: &'a str,
        duration: Option<Duration>,
        reason: Option<&'a str>,
    ) -> AccountFuture<'a, ()>;
    /// Ends a pause of `app_id` (a no-op when it is not paused).
    fn resume<'a>(&'a self, app_id: &'a str) -> AccountFuture<'a, ()>;
}
