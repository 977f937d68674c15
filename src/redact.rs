//! Removal of secrets from every text that leaves the process.
//!
//! GeWe echoes the token back in its "token unavailable" message, and
//! lapin, redis and rustls format URLs and errors of their own, so keeping
//! secrets out of our own format strings is not enough: every outgoing text
//! (log lines, whoever wrote them, event messages, metric labels) passes
//! through [`Redactor`], which masks every configured secret
//! ([`crate::config::Settings::secrets`]).
//!
//! The filter fails closed: when it cannot be built, [`Redactor::new`]
//! says so and the program refuses to start, rather than run with
//! nothing masked.

use std::{borrow::Cow, fmt::Display, sync::Arc};

use aho_corasick::{AhoCorasick, MatchKind};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// The filter could not be built, so no secret could be masked. Says how
/// many texts it was to mask, never which.
#[derive(Debug, thiserror::Error)]
#[error(
    "could not build the filter that masks the {secrets} configured secret texts in logs and events ({reason}); refusing to run with secrets unmasked"
)]
pub struct RedactorError {
    secrets: usize,
    reason: String,
}

/// Replaces any of a set of secrets with [`MASK`] in arbitrary text. Cheap
/// to clone.
#[derive(Clone, Default)]
pub struct Redactor {
    /// `None` when there is nothing to mask.
    secrets: Option<Arc<AhoCorasick>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor(***)")
    }
}

impl Redactor {
    /// A redactor for `secrets`. Empty secrets are skipped (replacing the
    /// empty string would mangle every text). Each secret is also masked as
    /// JSON and Rust's `{:?}` escape it, so a quote or backslash in a
    /// password cannot carry it past the mask in a JSON log line.
    pub fn new<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) -> Result<Self, RedactorError> {
        let mut needles: Vec<String> = Vec::new();
        for secret in secrets {
            let secret = secret.as_ref();
            if secret.is_empty() {
                continue;
            }
            let json = serde_json::to_string(secret).unwrap_or_default();
            let debug = format!("{secret:?}");
            for form in [secret, unquote(&json), unquote(&debug)] {
                if !form.is_empty() && !needles.iter().any(|n| n == form) {
                    needles.push(form.to_owned());
                }
            }
        }
        Self::built_with(needles, |needles| {
            // Leftmost-longest: a secret that contains another is masked whole.
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(needles)
        })
    }

    /// A redactor for `needles`, matched by what `build` makes of them.
    fn built_with<E: Display>(
        needles: Vec<String>,
        build: impl FnOnce(&[String]) -> Result<AhoCorasick, E>,
    ) -> Result<Self, RedactorError> {
        if needles.is_empty() {
            return Ok(Self::default());
        }
        match build(&needles) {
            Ok(matcher) => Ok(Self {
                secrets: Some(Arc::new(matcher)),
            }),
            Err(e) => Err(RedactorError {
                secrets: needles.len(),
                reason: e.to_string(),
            }),
        }
    }

    /// `text` with every occurrence of a secret replaced by `***`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match &self.secrets {
            Some(secrets) if secrets.is_match(text) => {
                Cow::Owned(secrets.replace_all(text, &vec![MASK; secrets.patterns_len()]))
            }
            _ => Cow::Borrowed(text),
        }
    }

    /// Byte-level variant for log writers.
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        match &self.secrets {
            Some(secrets) if secrets.is_match(bytes) => Cow::Owned(
                secrets.replace_all_bytes(bytes, &vec![MASK.as_bytes(); secrets.patterns_len()]),
            ),
            _ => Cow::Borrowed(bytes),
        }
    }
}

fn unquote(quoted: &str) -> &str {
    quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(quoted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(secrets: &[&str]) -> Redactor {
        Redactor::new(secrets).expect("a filter for a few short secrets")
    }

    #[test]
    fn masks_every_occurrence() {
        let r = redactor(&["tok-123"]);
        assert_eq!(
            r.redact("HTTP HEADER: X-GEWE-TOKEN=tok-123 不可用或已过期 tok-123"),
            "HTTP HEADER: X-GEWE-TOKEN=*** 不可用或已过期 ***"
        );
        assert!(matches!(r.redact("clean"), Cow::Borrowed(_)));
        assert_eq!(&*r.redact_bytes(b"a tok-123 b"), b"a *** b");
    }

    #[test]
    fn masks_each_of_several_secrets_whole() {
        let r = redactor(&["pw-one", "pw-one-longer", "pw-two"]);
        assert_eq!(
            r.redact("amqp://u:pw-one-longer@h1 amqp://u:pw-two@h2 pw-one"),
            "amqp://u:***@h1 amqp://u:***@h2 ***"
        );
    }

    #[test]
    fn masks_secrets_as_json_escapes_them() {
        let r = redactor(&[r#"p"w\d"#]);
        let line = serde_json::json!({ "error": r#"auth p"w\d refused"# }).to_string();
        assert_eq!(r.redact(&line), r#"{"error":"auth *** refused"}"#);
    }

    #[test]
    fn empty_secrets_change_nothing() {
        assert_eq!(redactor(&[""]).redact("abc"), "abc");
        assert_eq!(Redactor::default().redact("abc"), "abc");
    }

    #[test]
    fn a_filter_that_cannot_be_built_is_an_error_that_names_no_secret() {
        let built = Redactor::built_with(vec!["tok-s3cret-value".to_owned()], |_| {
            Err("the automaton is too large")
        });
        let error = built.expect_err("no redactor without its filter");
        let text = error.to_string();
        assert!(text.contains("refusing to run"), "{text}");
        assert!(text.contains("the automaton is too large"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
