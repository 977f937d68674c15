//! A [`Record`] as it is kept in Redis: a few dozen bytes plus the v3.
//!
//! Millions of outcomes sit in Redis for `dedupe.window`, and the JSON
//! form (field names, a hex fingerprint, the v3 as text) was ~330 bytes for
//! a GeWe-length v3. Here: one tag byte, the fingerprint's 16 bytes, the
//! completion time in 6 bytes, attempts, parks and deferrals as varints
//! (parks and deferrals left out, and [`UNTRIED`] added to the tag, when
//! both are 0, as they mostly are: that byte keeps a GeWe-length record
//! within jemalloc's 128-byte size class), then the result. A v3 of GeWe's shape (`v3_<hex>@stranger`) is kept as the bytes
//! its hex spells, half its length; any other v3 as its text; a failure as
//! the JSON of its error (failures are few, and their texts vary). Tags
//! stay below 128: the store adds 128 to mark a record published.

use super::{Fingerprint, Record};
use crate::{
    outcome::{CallOutcome, EventError, Tries},
    varint,
};

const V3_HEX: u8 = 1;
const V3_TEXT: u8 = 2;
const FAILURE: u8 = 3;
/// Added to the tag of a record never parked or deferred.
const UNTRIED: u8 = 16;
const V3_PREFIX: &str = "v3_";
const V3_SUFFIX: &str = "@stranger";
/// 6 bytes of milliseconds: until the year 10889.
const TIME_BYTES: usize = 6;

/// Why stored bytes are not a record this version can read.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// Shorter than its header says.
    #[error("a stored record ends early")]
    Truncated,
    /// A tag this version does not know (written by a later one).
    #[error("a stored record has the unknown format {0}")]
    UnknownTag(u8),
    /// The v3 or the error inside is damaged.
    #[error("a stored record's result is unreadable: {0}")]
    Result(String),
}

/// The bytes of `record`.
pub fn encode(record: &Record) -> Result<Vec<u8>, serde_json::Error> {
    let outcome = record.outcome();
    let (tag, payload) = match &outcome.result {
        Ok(v3) => match packed_v3(v3) {
            Some(bytes) => (V3_HEX, bytes),
            None => (V3_TEXT, v3.as_bytes().to_vec()),
        },
        Err(error) => (FAILURE, serde_json::to_vec(error)?),
    };
    let mut out = Vec::with_capacity(1 + 16 + TIME_BYTES + 2 + payload.len());
    let tries = record.tries();
    let untried = tries.parked == 0 && tries.deferred == 0;
    out.push(if untried { tag + UNTRIED } else { tag });
    out.extend_from_slice(&record.fingerprint().to_bytes());
    out.extend_from_slice(&record.completed_at_ms().to_be_bytes()[8 - TIME_BYTES..]);
    varint::put(&mut out, outcome.attempts);
    if !untried {
        varint::put(&mut out, tries.parked);
        varint::put(&mut out, tries.deferred);
    }
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The record `bytes` hold.
pub fn decode(bytes: &[u8]) -> Result<Record, CompactError> {
    let (&stored_tag, rest) = bytes.split_first().ok_or(CompactError::Truncated)?;
    let (tag, untried) = match stored_tag {
        V3_HEX | V3_TEXT | FAILURE => (stored_tag, false),
        t if matches!(t.wrapping_sub(UNTRIED), V3_HEX | V3_TEXT | FAILURE) => (t - UNTRIED, true),
        other => return Err(CompactError::UnknownTag(other)),
    };
    let (fingerprint, rest) = rest.split_at_checked(16).ok_or(CompactError::Truncated)?;
    let mut fp = [0u8; 16];
    fp.copy_from_slice(fingerprint);
    let (time, rest) = rest
        .split_at_checked(TIME_BYTES)
        .ok_or(CompactError::Truncated)?;
    let mut ms = [0u8; 8];
    ms[8 - TIME_BYTES..].copy_from_slice(time);
    let (attempts, rest) = varint::read(rest).ok_or(CompactError::Truncated)?;
    let (parked, deferred, payload) = if untried {
        (0, 0, rest)
    } else {
        let (parked, rest) = varint::read(rest).ok_or(CompactError::Truncated)?;
        let (deferred, payload) = varint::read(rest).ok_or(CompactError::Truncated)?;
        (parked, deferred, payload)
    };
    let result =
        match tag {
            // Never written empty: an empty one was cut short.
            V3_HEX if payload.is_empty() => return Err(CompactError::Truncated),
            V3_HEX => Ok(format!("{V3_PREFIX}{}{V3_SUFFIX}", hex(payload))),
            V3_TEXT => Ok(String::from_utf8(payload.to_vec())
                .map_err(|e| CompactError::Result(e.to_string()))?),
            _ => Err(Box::new(
                serde_json::from_slice::<EventError>(payload)
                    .map_err(|e| CompactError::Result(e.to_string()))?,
            )),
        };
    Ok(Record::from_parts(
        Fingerprint::from_bytes(fp),
        CallOutcome { result, attempts },
        u64::from_be_bytes(ms),
        Tries { parked, deferred },
    ))
}

/// The bytes of a v3 of GeWe's shape (lower-case hex between `v3_` and
/// `@stranger`), so that decoding gives exactly the same text back.
fn packed_v3(v3: &str) -> Option<Vec<u8>> {
    let hex = v3.strip_prefix(V3_PREFIX)?.strip_suffix(V3_SUFFIX)?;
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    hex.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{error_kind::ErrorKind, outcome::GeweReply};

    /// The v3 of the seed's example answer: GeWe's real length.
    const GEWE_V3: &str = "v3_020b3826fd030100000000003a070e7757675c000000501ea9a3dba12f95f6b60a0536a1adb690dcccc9bf58cc80765e6eb16bffa5996420bb1b2577634516ff82090419d8bdcd5689df8dfb21d40af93d286f72c3a0e8cfa6dcb68afed39226f008c6@stranger";

    fn record(result: Result<String, Box<EventError>>, attempts: u32, parked: u32) -> Record {
        Record::from_parts(
            Fingerprint::from_bytes([7; 16]),
            CallOutcome { result, attempts },
            1_764_770_000_123,
            Tries {
                parked,
                deferred: parked / 2,
            },
        )
    }

    #[test]
    fn records_survive_the_round_trip() {
        let failure = EventError::new(
            ErrorKind::Rejected,
            "GeWe refused the request: 添加好友失败",
            Some(GeweReply {
                ret: 500,
                msg: Some("添加好友失败".into()),
                data: None,
            }),
        );
        for r in [
            record(Ok(GEWE_V3.into()), 1, 0),
            record(Ok("v3_ABCD@stranger".into()), 300, 20),
            record(Ok("v3_abc@stranger".into()), 2, 1),
            record(Ok("plain".into()), 1, 0),
            record(Err(Box::new(failure)), 5, 3),
        ] {
            let bytes = encode(&r).expect("encodes");
            assert_eq!(decode(&bytes).expect("decodes"), r);
        }
    }

    #[test]
    fn a_gewe_v3_is_kept_in_half_its_length() {
        let bytes = encode(&record(Ok(GEWE_V3.into()), 1, 0)).expect("encodes");
        assert_eq!(bytes.len(), 1 + 16 + 6 + 1 + (GEWE_V3.len() - 12) / 2);
        // With Redis' 3-byte string header and its NUL: jemalloc's 128 bin.
        assert!(bytes.len() <= 124, "{}", bytes.len());
    }

    #[test]
    fn a_record_with_its_parks_and_deferrals_written_out_is_still_read() {
        // As versions before the untried tag wrote every record.
        let r = record(Ok(GEWE_V3.into()), 2, 0);
        let short = encode(&r).expect("encodes");
        let mut long = vec![V3_HEX];
        long.extend_from_slice(&short[1..24]);
        long.extend_from_slice(&[0, 0]);
        long.extend_from_slice(&short[24..]);
        assert_eq!(short[0], V3_HEX + UNTRIED);
        assert_eq!(decode(&long).expect("decodes"), r);
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let bytes = encode(&record(Ok(GEWE_V3.into()), 1, 0)).expect("encodes");
        for cut in 0..25 {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut unknown = bytes.clone();
        unknown[0] = 9;
        assert!(matches!(decode(&unknown), Err(CompactError::UnknownTag(9))));
        assert!(decode(&[V3_TEXT, 0xff]).is_err());
    }
}
