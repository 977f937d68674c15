//! Who may use the console (contract §8): the API takes `Authorization:
//! Bearer <admin.token>`; the console signs in with the token once and then
//! carries a session cookie, and every state change it makes carries a
//! CSRF token bound to that session.
//!
//! The session cookie is `<expiry>.<nonce>.<mac>`, the MAC an HMAC-SHA256
//! over expiry and nonce under a key derived from the token. Nothing is
//! stored: every replica with the same token accepts the same sessions
//! (the admin Service may send each request to another pod), and a new
//! token ends every session. The CSRF token is an HMAC of the session's
//! nonce under the same key, so it is worthless with another session.
//! Every comparison is in constant time.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::timestamp;

type HmacSha256 = Hmac<Sha256>;

/// The session cookie's name.
pub const COOKIE: &str = "gewe_admin_session";
/// The header the console sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a console session lasts.
pub const SESSION_SECONDS: u64 = 12 * 3600;

/// The token's digest and the key sessions are signed with.
pub struct Auth {
    token_digest: [u8; 32],
    key: [u8; 32],
}

/// A valid console session.
#[derive(Debug, Clone)]
pub struct Session {
    nonce: String,
}

impl Auth {
    /// Authentication with `token`. Only digests of it are kept.
    pub fn new(token: &SecretString) -> Self {
        let token = token.expose_secret().as_bytes();
        let mut key = HmacSha256::new_from_slice(b"gewe-friend-worker admin session v1")
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        key.update(token);
        Self {
            token_digest: Sha256::digest(token).into(),
            key: key.finalize().into_bytes().into(),
        }
    }

    /// Whether `given` is the token (constant time, whatever its length).
    pub fn token_matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        given.ct_eq(&self.token_digest).into()
    }

    /// Whether an `Authorization` header value carries the token.
    pub fn bearer_matches(&self, header: &str) -> bool {
        header
            .strip_prefix("Bearer ")
            .is_some_and(|t| self.token_matches(t.trim()))
    }

    fn mac(&self, parts: &[&str]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for part in parts {
            mac.update(part.as_bytes());
            mac.update(b"|");
        }
        mac
    }

    /// A new session's cookie value.
    pub fn new_session(&self) -> String {
        let expiry = (timestamp::now_millis() / 1000 + SESSION_SECONDS).to_string();
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mac = hex(&self
            .mac(&["session", &expiry, &nonce])
            .finalize()
            .into_bytes());
        format!("{expiry}.{nonce}.{mac}")
    }

    /// The session a cookie value names, when it is genuine and not expired.
    pub fn session(&self, cookie: &str) -> Option<Session> {
        let mut parts = cookie.splitn(3, '.');
        let (expiry, nonce, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let mac = unhex(mac)?;
        self.mac(&["session", expiry, nonce])
            .verify_slice(&mac)
            .ok()?;
        let expiry: u64 = expiry.parse().ok()?;
        (timestamp::now_millis() / 1000 < expiry).then(|| Session {
            nonce: nonce.to_owned(),
        })
    }

    /// The CSRF token of `session`.
    pub fn csrf(&self, session: &Session) -> String {
        hex(&self.mac(&["csrf", &session.nonce]).finalize().into_bytes())
    }

    /// Whether `given` is `session`'s CSRF token (constant time).
    pub fn csrf_matches(&self, session: &Session, given: &str) -> bool {
        unhex(given).is_some_and(|given| {
            self.mac(&["csrf", &session.nonce])
                .verify_slice(&given)
                .is_ok()
        })
    }
}

/// The `Set-Cookie` value that starts a session: `HttpOnly` (no script
/// reads it), `SameSite=Strict` (no other site's page sends it), `Path=/`.
/// Not `Secure`: the console is served over plain HTTP on a private
/// address, where a browser would drop a `Secure` cookie.
pub fn set_cookie(value: &str) -> String {
    format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECONDS}")
}

/// The `Set-Cookie` value that ends the session.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// The session cookie's value in a `Cookie` header.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: &str) -> Auth {
        Auth::new(&SecretString::from(token))
    }

    #[test]
    fn sessions_and_csrf_tokens_are_bound_to_the_token() {
        let a = auth("a-token-of-sixteen+");
        assert!(a.token_matches("a-token-of-sixteen+"));
        assert!(!a.token_matches("a-token-of-sixteen"));
        assert!(a.bearer_matches("Bearer a-token-of-sixteen+"));
        assert!(!a.bearer_matches("Basic a-token-of-sixteen+"));
        let cookie = a.new_session();
        let session = a.session(&cookie).expect("genuine");
        let csrf = a.csrf(&session);
        assert!(a.csrf_matches(&session, &csrf));
        assert!(!a.csrf_matches(&session, "00"));
        // Another token (a rotated one) accepts neither.
        let b = auth("another-token-of-16");
        assert!(b.session(&cookie).is_none());
        // Another session's CSRF token is refused.
        let other = a.session(&a.new_session()).expect("genuine");
        assert!(!a.csrf_matches(&other, &csrf));
        // A tampered expiry breaks the MAC.
        let (_, rest) = cookie.split_once('.').expect("dotted");
        assert!(a.session(&format!("99999999999.{rest}")).is_none());
        assert_eq!(
            cookie_value(&format!("x=1; {COOKIE}={cookie}")),
            Some(cookie.as_str())
        );
    }
}
