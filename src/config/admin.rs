//! `[admin]`: the operator's console and its API (contract §2 `admin.*`,
//! §8). Off unless `admin.listen` is set; then `admin.token` is required.

use std::net::SocketAddr;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{ConfigError, secrets::serialize_secret};

/// Shortest accepted `admin.token`: it is the only thing between the
/// network and pausing every account or replaying every dead letter.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Where the console and its API are served; off when unset.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Bearer token of the API and the console's sign-in; never printed.
    #[serde(default, serialize_with = "serialize_secret")]
    pub token: Option<SecretString>,
}

impl AdminSettings {
    /// The token, when the console is on (validated: present and long).
    pub fn enabled_token(&self) -> Option<&SecretString> {
        self.listen.and(self.token.as_ref())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let token = self.token.as_ref().map(|t| t.expose_secret());
        if let Some(token) = token
            && token.trim().chars().count() < MIN_ADMIN_TOKEN_CHARS
        {
            return Err(ConfigError::invalid(
                "admin.token",
                format!("must be at least {MIN_ADMIN_TOKEN_CHARS} characters"),
            ));
        }
        if self.listen.is_some() && token.is_none() {
            return Err(ConfigError::invalid(
                "admin.token",
                "is required when admin.listen is set (set GEWE_WORKER__ADMIN__TOKEN)",
            ));
        }
        Ok(())
    }
}
