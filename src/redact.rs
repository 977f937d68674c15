//! Removal of the GeWe token from every text that leaves the process.
//!
//! GeWe echoes the token back in its "token unavailable" message, so keeping
//! the token out of our own format strings is not enough: every outgoing text
//! (log lines, event messages, metric labels) passes through [`Redactor`].

use std::{borrow::Cow, sync::Arc};

/// What the token is replaced with.
pub const MASK: &str = "***";

/// Replaces a secret with [`MASK`] in arbitrary text. Cheap to clone.
#[derive(Clone, Default)]
pub struct Redactor {
    secret: Option<Arc<str>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor(***)")
    }
}

impl Redactor {
    /// A redactor for `secret`; an empty secret redacts nothing (replacing
    /// the empty string would mangle every text).
    pub fn new(secret: &str) -> Self {
        Self {
            secret: (!secret.is_empty()).then(|| Arc::from(secret)),
        }
    }

    /// `text` with every occurrence of the secret replaced by `***`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match &self.secret {
            Some(secret) if text.contains(&**secret) => Cow::Owned(text.replace(&**secret, MASK)),
            _ => Cow::Borrowed(text),
        }
    }

    /// Byte-level variant for log writers; non-UTF-8 input is passed through
    /// lossily converted, which never happens with tracing's formatters.
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        let Some(secret) = &self.secret else {
            return Cow::Borrowed(bytes);
        };
        let needle = secret.as_bytes();
        if !bytes.windows(needle.len()).any(|w| w == needle) {
            return Cow::Borrowed(bytes);
        }
        Cow::Owned(
            String::from_utf8_lossy(bytes)
                .replace(&**secret, MASK)
                .into_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence() {
        let r = Redactor::new("tok-123");
        assert_eq!(
            r.redact("HTTP HEADER: X-GEWE-TOKEN=tok-123 不可用或已过期 tok-123"),
            "HTTP HEADER: X-GEWE-TOKEN=*** 不可用或已过期 ***"
        );
        assert!(matches!(r.redact("clean"), Cow::Borrowed(_)));
        assert_eq!(&*r.redact_bytes(b"a tok-123 b"), b"a *** b");
    }

    #[test]
    fn empty_secret_changes_nothing() {
        assert_eq!(Redactor::new("").redact("abc"), "abc");
        assert_eq!(Redactor::default().redact("abc"), "abc");
    }
}
