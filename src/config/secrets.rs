//! The configuration's secrets: which texts are secret (the list every
//! outgoing text is cleaned of), and printing the configuration and its
//! errors without them.

use secrecy::{ExposeSecret, SecretString};
use serde::Serializer;

use super::{Settings, broker_urls, url_password};

pub(super) fn serialize_secret<S: Serializer>(
    v: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

pub(super) fn serialize_url_list_redacted<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url_list(v))
}

pub(super) fn serialize_opt_url_redacted<S: Serializer>(
    v: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(url) => s.serialize_str(&redact_url_password(url)),
        None => s.serialize_none(),
    }
}

/// `amqp.url` with the password of every URL in the list replaced by `***`.
pub fn redact_url_list(list: &str) -> String {
    broker_urls(list)
        .map(redact_url_password)
        .collect::<Vec<_>>()
        .join(",")
}

impl Settings {
    /// Every secret of the configuration, as the log writer and the event
    /// texts must mask it: the GeWe token, the password of each broker URL
    /// and of the Redis URL (as written and percent-decoded, since clients
    /// print either), the callback and sentinel passwords, and the lines of
    /// the TLS client key.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let Some(token) = &self.gewe.token {
            secrets.push(token.expose_secret().to_owned());
        }
        let urls = broker_urls(&self.amqp.url)
            .chain(self.redis.url.as_deref())
            .chain(self.telemetry.otlp_endpoint.as_deref());
        for password in urls.filter_map(url_password) {
            secrets.push(password.to_owned());
            if let Ok(decoded) = percent_encoding::percent_decode_str(password).decode_utf8() {
                secrets.push(decoded.into_owned());
            }
        }
        for secret in [&self.callbacks.secret, &self.redis.sentinel_password]
            .into_iter()
            .flatten()
        {
            secrets.push(secret.expose_secret().to_owned());
        }
        if let Some(token) = &self.admin.token {
            secrets.push(token.expose_secret().to_owned());
        }
        secrets.extend(self.amqp.tls.key_secrets());
        secrets.retain(|s| !s.is_empty());
        secrets.sort();
        secrets.dedup();
        secrets
    }
}

impl Settings {
    /// The keys whose secret is short enough to be masked inside unrelated
    /// text (`guest` in a username, a word in a log line): every text
    /// leaving the worker has each secret masked wherever it appears.
    pub fn short_secrets(&self) -> Vec<&'static str> {
        let short = |s: &str| !s.is_empty() && s.chars().count() < SHORT_SECRET;
        let mut keys = Vec::new();
        if broker_urls(&self.amqp.url)
            .filter_map(url_password)
            .any(short)
        {
            keys.push("amqp.url (a password)");
        }
        if self
            .redis
            .url
            .as_deref()
            .and_then(url_password)
            .is_some_and(short)
        {
            keys.push("redis.url (its password)");
        }
        for (key, secret) in [
            ("callbacks.secret", &self.callbacks.secret),
            ("redis.sentinel_password", &self.redis.sentinel_password),
        ] {
            if secret.as_ref().is_some_and(|s| short(s.expose_secret())) {
                keys.push(key);
            }
        }
        keys
    }
}

/// Secrets shorter than this are masked, but warned about.
const SHORT_SECRET: usize = 8;

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Configuration keys whose values are secrets.
const SECRET_KEYS: &[&str] = &[
    "gewe.token",
    "callbacks.secret",
    "redis.sentinel_password",
    "admin.token",
];
/// Configuration keys whose values are URLs (lists of them) with passwords.
const URL_KEYS: &[&str] = &["amqp.url", "redis.url", "telemetry.otlp_endpoint"];
/// Shorter secrets are not masked in error texts: masking them would mangle
/// unrelated words (and the token must be longer anyway).
const MIN_MASKED: usize = 4;

/// Every secret value the layers hold, as far as they can be read: the
/// secret keys' values and the passwords of URL keys.
pub(super) fn secret_values(layers: &config::Config) -> Vec<String> {
    let mut secrets: Vec<String> = SECRET_KEYS
        .iter()
        .filter_map(|key| layers.get_string(key).ok())
        .collect();
    for key in URL_KEYS {
        let Ok(urls) = layers.get_string(key) else {
            continue;
        };
        for url in urls.split(',') {
            if let Ok(parsed) = url::Url::parse(url.trim())
                && let Some(password) = parsed.password()
            {
                secrets.push(password.to_owned());
                if let Ok(decoded) = percent_encoding::percent_decode_str(password).decode_utf8() {
                    secrets.push(decoded.into_owned());
                }
            }
        }
    }
    secrets.retain(|s| s.len() >= MIN_MASKED);
    secrets
}

/// The text of a configuration error without the source lines TOML errors
/// quote (`2 | url = "amqp://user:password@…"`) and with `secrets` masked.
pub(super) fn error_text(error: &dyn std::fmt::Display, secrets: &[String]) -> String {
    let text = error.to_string();
    let mut kept: Vec<&str> = text
        .lines()
        .filter(|line| !is_quoted_source(line))
        .collect();
    kept.dedup_by(|a, b| a.trim().is_empty() && b.trim().is_empty());
    let mut text = kept.join("\n");
    for secret in secrets {
        text = text.replace(secret.as_str(), "***");
    }
    text
}

/// `  |`, `2 | url = …`, `  |     ^`: a line of a TOML error's excerpt.
fn is_quoted_source(line: &str) -> bool {
    let rest = line
        .trim_start()
        .trim_start_matches(|c: char| c.is_ascii_digit());
    rest.trim_start().starts_with('|')
}
