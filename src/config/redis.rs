//! `[redis]`: one Redis server (`redis.url`), or a master found through
//! Sentinel (`redis.sentinels`, `redis.master_name`, `redis.sentinel_password`)
//! with `redis.url` giving only the password, database and TLS (contract §2).

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, SeqAccess, Visitor},
};

use super::{
    ConfigError,
    secrets::{serialize_opt_url_redacted, serialize_secret},
};

/// `redis.master_name` when unset: Sentinel's own example name.
pub const DEFAULT_MASTER_NAME: &str = "mymaster";

/// `[redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Shared store for dedupe and pacing state; with `sentinels`, only its
    /// password, database and scheme (TLS) are used.
    #[serde(default, serialize_with = "serialize_opt_url_redacted")]
    pub url: Option<String>,
    /// Sentinel addresses (`host:port`); empty: no Sentinel.
    #[serde(default, deserialize_with = "address_list")]
    pub sentinels: Vec<String>,
    /// The master's name in Sentinel.
    #[serde(default = "default_master_name")]
    pub master_name: String,
    /// Password of the sentinels themselves; never printed.
    #[serde(default, serialize_with = "serialize_secret")]
    pub sentinel_password: Option<SecretString>,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            sentinels: Vec::new(),
            master_name: default_master_name(),
            sentinel_password: None,
        }
    }
}

fn default_master_name() -> String {
    DEFAULT_MASTER_NAME.to_owned()
}

impl RedisSettings {
    /// Whether state lives in Redis at all (`redis.url` or `redis.sentinels`).
    pub fn enabled(&self) -> bool {
        self.url.is_some() || !self.sentinels.is_empty()
    }

    /// Whether the master is found through Sentinel.
    pub fn uses_sentinel(&self) -> bool {
        !self.sentinels.is_empty()
    }

    /// The connection details `redis.url` gives: the whole server without
    /// Sentinel; the password, database and TLS of the master with it.
    pub fn url_or_default(&self) -> &str {
        self.url.as_deref().unwrap_or("redis://127.0.0.1:6379/0")
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "redis" | "rediss") => {}
                _ => {
                    return Err(ConfigError::invalid(
                        "redis.url",
                        "must be a redis:// or rediss:// URL",
                    ));
                }
            }
        }
        for (i, address) in self.sentinels.iter().enumerate() {
            if let Err(reason) = split_address(address) {
                return Err(ConfigError::invalid(
                    "redis.sentinels",
                    format!(
                        "entry {} of {} {reason} (expected host:port)",
                        i + 1,
                        self.sentinels.len()
                    ),
                ));
            }
        }
        let name = &self.master_name;
        if name.is_empty() || name.len() > 255 || name.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "redis.master_name",
                "must be 1..=255 characters without spaces",
            ));
        }
        if let Some(password) = &self.sentinel_password {
            if password.expose_secret().is_empty() {
                return Err(ConfigError::invalid(
                    "redis.sentinel_password",
                    "must not be empty",
                ));
            }
            if self.sentinels.is_empty() {
                return Err(ConfigError::invalid(
                    "redis.sentinel_password",
                    "is set but redis.sentinels is empty",
                ));
            }
        }
        Ok(())
    }
}

/// Splits `host:port` (`[v6]:port` too); the reason when it is not one.
pub fn split_address(address: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = address.rsplit_once(':').ok_or("has no port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("has no host");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("has no valid port"),
        Ok(port) => Ok((host, port)),
    }
}

/// A TOML list of addresses, or one comma-separated string (from the
/// environment); entries are trimmed, an empty string is an empty list.
fn address_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_any(AddressList)
}

struct AddressList;

impl<'de> Visitor<'de> for AddressList {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a list of host:port such as [\"s1:26379\", \"s2:26379\"], or \"s1:26379,s2:26379\"",
        )
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        Ok(text.split(',').map(|a| a.trim().to_owned()).collect())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(text) = seq.next_element::<String>()? {
            out.push(text.trim().to_owned());
        }
        Ok(out)
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
    fn sentinels_come_from_a_comma_separated_string_or_a_toml_list() {
        let s = load(&[(
            "GEWE_WORKER__REDIS__SENTINELS",
            "s1:26379, s2:26379,[::1]:26380",
        )])
        .expect("valid");
        assert_eq!(s.redis.sentinels, ["s1:26379", "s2:26379", "[::1]:26380"]);
        assert_eq!(s.redis.master_name, "mymaster");
        assert!(s.redis.enabled() && s.redis.uses_sentinel());

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "[redis]\nsentinels = [\"a:1\", \"b:2\"]\nmaster_name = \"state\"\nurl = \"redis://:pw@ignored/2\"\n",
        )
        .expect("write");
        let s = Settings::load_from(Some(&path), Some(HashMap::new())).expect("valid");
        assert_eq!(s.redis.sentinels, ["a:1", "b:2"]);
        assert_eq!(s.redis.master_name, "state");

        let s = load(&[]).expect("valid");
        assert!(s.redis.sentinels.is_empty() && !s.redis.enabled());
    }

    #[test]
    fn bad_sentinel_settings_name_their_key() {
        for (pairs, key) in [
            (
                vec![("GEWE_WORKER__REDIS__SENTINELS", "s1:26379,s2")],
                "redis.sentinels",
            ),
            (
                vec![("GEWE_WORKER__REDIS__SENTINELS", "s1:0")],
                "redis.sentinels",
            ),
            (
                vec![("GEWE_WORKER__REDIS__SENTINELS", "s1:1,,s2:2")],
                "redis.sentinels",
            ),
            (
                vec![
                    ("GEWE_WORKER__REDIS__SENTINELS", "s1:1"),
                    ("GEWE_WORKER__REDIS__MASTER_NAME", "my master"),
                ],
                "redis.master_name",
            ),
            (
                vec![("GEWE_WORKER__REDIS__SENTINEL_PASSWORD", "s3ntinel-pw")],
                "redis.sentinel_password",
            ),
        ] {
            let e = load(&pairs).expect_err("invalid");
            assert!(e.contains(key), "{e}");
            assert!(!e.contains("s3ntinel-pw"), "{e}");
        }
    }

    #[test]
    fn the_sentinel_password_is_a_secret() {
        let s = load(&[
            ("GEWE_WORKER__REDIS__SENTINELS", "s1:26379"),
            ("GEWE_WORKER__REDIS__SENTINEL_PASSWORD", "s3ntinel-pw"),
            ("GEWE_WORKER__REDIS__URL", "redis://:master-pw@x/1"),
        ])
        .expect("valid");
        let printed = s.redacted_json();
        assert!(!printed.contains("s3ntinel-pw"), "{printed}");
        assert!(
            printed.contains(r#""sentinel_password": "***""#),
            "{printed}"
        );
        assert!(!format!("{s:?}").contains("s3ntinel-pw"));
        let secrets = s.secrets();
        assert!(secrets.iter().any(|x| x == "s3ntinel-pw"), "{secrets:?}");
        assert!(secrets.iter().any(|x| x == "master-pw"), "{secrets:?}");
    }
}
