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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::Settings;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, String> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, Some(env)).map_err(|e| e.to_string())
    }

    #[test]
    fn the_console_is_off_by_default_and_needs_a_long_token_when_on() {
        let off = load(&[]).expect("defaults are valid");
        assert!(off.admin.listen.is_none() && off.admin.enabled_token().is_none());
        let listen = ("GEWE_WORKER__ADMIN__LISTEN", "127.0.0.1:8090");
        let missing = load(&[listen]).expect_err("a token is required");
        assert!(
            missing.contains("admin.token") && missing.contains("required"),
            "{missing}"
        );
        let short = load(&[listen, ("GEWE_WORKER__ADMIN__TOKEN", "fifteen-chars-x")])
            .expect_err("too short");
        assert!(short.contains("at least 16"), "{short}");
        let token = "sixteen-chars-ok";
        let on = load(&[listen, ("GEWE_WORKER__ADMIN__TOKEN", token)]).expect("valid");
        assert!(on.admin.enabled_token().is_some());
        let printed = on.redacted_json();
        assert!(!printed.contains(token), "{printed}");
        assert!(
            on.secrets().iter().any(|s| s == token),
            "masked in every log line"
        );
    }
}
