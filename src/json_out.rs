//! Writing the small JSON documents every command produces (its GeWe
//! request, its result event, the command entry of its log lines)
//! straight into a byte buffer.
//!
//! serde_json writes every key and string through a byte-at-a-time escape
//! loop; for these documents that loop was about 5,000 of the worker's
//! instructions per command (BENCHMARKS.md). Here keys are the fixed ASCII
//! names the contract gives, written as they are, and a string that needs
//! no escape (nearly all of them) is checked in one branch-free pass and
//! copied. Whatever is written is byte for byte what serde_json writes;
//! the tests compare the two.

/// Appends `s` as a JSON string, escaped exactly as serde_json does:
/// `"`, `\` and control characters only, never non-ASCII.
pub fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if needs_escape(bytes) {
        escaped(out, bytes);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// Whether `bytes` holds a `"`, a `\\` or a control character, sixteen
/// bytes at a time (the "has a zero byte" and "has a byte less than n" word
/// tricks), the last few padded with a byte that needs no escape. A false
/// positive would only take the escaping path, which writes a plain string
/// unchanged; there are no false negatives.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u128 = u128::from_ne_bytes([1; 16]);
    const HIGH: u128 = ONES << 7;
    let any_zero = |v: u128| v.wrapping_sub(ONES) & !v & HIGH;
    let special = |x: u128| {
        (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | any_zero(x ^ (ONES * u128::from(b'"')))
            | any_zero(x ^ (ONES * u128::from(b'\\')))
    };
    let mut chunks = bytes.chunks_exact(16);
    let mut found = 0;
    for chunk in &mut chunks {
        let mut word = [0; 16];
        word.copy_from_slice(chunk);
        found |= special(u128::from_ne_bytes(word));
    }
    let rest = chunks.remainder();
    let mut word = [b'a'; 16];
    word[..rest.len()].copy_from_slice(rest);
    found |= special(u128::from_ne_bytes(word));
    found != 0
}

fn escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        // Escaped bytes are ASCII, so `start..i` never splits a character.
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// A JSON object being appended to a buffer, one member at a time.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    /// Starts an object at the end of `out`.
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// Writes `"key":` and returns the buffer for the value. `key` is one
    /// of the contract's field names: ASCII letters, digits and `_`, so it
    /// is written unescaped.
    pub fn key(&mut self, key: &str) -> &mut Vec<u8> {
        debug_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// `"key":"value"`.
    pub fn str(&mut self, key: &str, value: &str) {
        string(self.key(key), value);
    }

    /// `"key":"value"` when there is a value; nothing otherwise.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    /// `"key":n`.
    pub fn u64(&mut self, key: &str, value: u64) {
        let mut digits = itoa::Buffer::new();
        let text = digits.format(value);
        self.key(key).extend_from_slice(text.as_bytes());
    }

    /// `"key":true` or `"key":false`.
    pub fn bool(&mut self, key: &str, value: bool) {
        let text: &[u8] = if value { b"true" } else { b"false" };
        self.key(key).extend_from_slice(text);
    }

    /// Ends the object.
    pub fn close(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(s: &str) -> String {
        let mut out = Vec::new();
        string(&mut out, s);
        String::from_utf8(out).expect("UTF-8 in, UTF-8 out")
    }

    #[test]
    fn every_ascii_character_is_written_as_serde_json_writes_it() {
        for c in (0u8..=0x7f).map(char::from) {
            let s = format!("a{c}b{c}");
            assert_eq!(
                ours(&s),
                serde_json::to_string(&s).expect("a string"),
                "{c:?}"
            );
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "wxid_abc123",
            "34757816141@chatroom",
            "v3_020b3826fd03010000000000@stranger",
            "你好，我是群里的小王",
            "微信已离线\n\"quoted\" \\ back\tslash \u{1}\u{1f}\u{7f} é 🦀",
            "\"",
            "\\\\",
            "end\n",
        ] {
            assert_eq!(
                ours(s),
                serde_json::to_string(s).expect("a string"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn an_object_is_what_serde_json_writes_for_the_same_members() {
        let mut out = Vec::new();
        let mut object = Object::open(&mut out);
        object.str("commandId", "c-1 \"x\"");
        object.opt_str("absent", None);
        object.opt_str("appId", Some("wx_app"));
        object.u64("attempts", 3);
        object.u64("big", u64::MAX);
        object.bool("duplicate", true);
        object.bool("retryable", false);
        object.close();
        let expected = serde_json::json!({
            "commandId": "c-1 \"x\"",
            "appId": "wx_app",
            "attempts": 3,
            "big": u64::MAX,
            "duplicate": true,
            "retryable": false,
        });
        assert_eq!(
            String::from_utf8(out).expect("UTF-8"),
            serde_json::to_string(&expected).expect("serialises")
        );
        let mut empty = Vec::new();
        Object::open(&mut empty).close();
        assert_eq!(empty, b"{}");
    }
}
