//! Printing configuration without its secrets.

use secrecy::SecretString;
use serde::Serializer;

use super::AmqpSettings;

pub(super) fn serialize_secret<S: Serializer>(
    v: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

pub(super) fn serialize_url_redacted<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url_password(v))
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

/// The environment variables that point another process at the same broker
/// and topology as `a` (used to start worker processes in tests and the
/// benchmark).
pub fn amqp_env(a: &AmqpSettings) -> [(&'static str, String); 5] {
    [
        ("GEWE_WORKER__AMQP__URL", a.url.clone()),
        ("GEWE_WORKER__AMQP__COMMAND_QUEUE", a.command_queue.clone()),
        (
            "GEWE_WORKER__AMQP__RESULT_EXCHANGE",
            a.result_exchange.clone(),
        ),
        (
            "GEWE_WORKER__AMQP__DEAD_LETTER_EXCHANGE",
            a.dead_letter_exchange.clone(),
        ),
        (
            "GEWE_WORKER__AMQP__DEAD_LETTER_QUEUE",
            a.dead_letter_queue.clone(),
        ),
    ]
}

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
