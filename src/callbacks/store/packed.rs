//! A remembered command as it is kept in Redis for
//! `callbacks.match_window`: about a hundred bytes.
//!
//! Two million succeeded commands a day kept for 30 days is sixty million
//! entries, so every byte counts sixty million times. The JSON record of
//! earlier versions (field names, the correlation id that is usually the
//! commandId again, the time as text) was ~240 bytes and sat in a key of
//! its own. Here a record is: one tag byte, 6 bytes of when it was first
//! remembered, then the commandId, the group, the member, the correlation
//! id (left out when it is the commandId) and the succeeded event's
//! `completedAt`, each after its length as a varint.
//!
//! The value of an entry's field is its records (GeWe may return one `v3`
//! for several requests), each after its length in two bytes; the store's
//! script reads only that framing, the tag and the commandId's place
//! ([`identity`]), so it never parses the rest.

use super::{Fields, Phase};
use crate::varint;

/// A record of a pending command.
const PENDING: u8 = 1;
/// A record of a command whose `succeeded` event was confirmed.
const CONFIRMED: u8 = 2;
/// Added to the tag when the correlation id is the commandId.
const SAME_CORRELATION: u8 = 4;
/// 6 bytes of milliseconds: until the year 10889.
const TIME_BYTES: usize = 6;
/// Where the commandId (its length first) starts in a record.
pub const IDENTITY_AT: usize = 1 + TIME_BYTES;

/// A command as read back.
#[derive(Debug, PartialEq, Eq)]
pub struct Unpacked {
    /// The command's id.
    pub command_id: String,
    /// What the accepted event says.
    pub fields: Fields,
    /// Where it stands.
    pub phase: Phase,
    /// When it was first remembered, in ms since the epoch.
    pub at: u64,
}

/// Why stored bytes are not records this version can read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PackedError {
    /// Shorter than its framing says.
    #[error("a remembered v3's record ends early")]
    Truncated,
    /// A tag this version does not know (written by a later one).
    #[error("a remembered v3's record has the unknown format {0}")]
    UnknownTag(u8),
    /// A text that is not UTF-8.
    #[error("a remembered v3's record holds a text that is not UTF-8")]
    NotText,
}

/// What the store's script compares to find a command's record: the
/// commandId after its length, as it sits at [`IDENTITY_AT`].
pub fn identity(command_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(command_id.len() + 2);
    text(&mut out, command_id);
    out
}

/// The record of `command_id` in `phase`, first remembered at `at_ms`.
pub fn encode(command_id: &str, fields: &Fields, phase: Phase, at_ms: u64) -> Vec<u8> {
    let same = fields.correlation_id == command_id;
    let mut tag = match phase {
        Phase::Pending => PENDING,
        Phase::Confirmed => CONFIRMED,
    };
    if same {
        tag += SAME_CORRELATION;
    }
    let mut out = Vec::with_capacity(
        IDENTITY_AT
            + 5
            + command_id.len()
            + fields.chatroom_id.len()
            + fields.member_wxid.len()
            + fields.completed_at.len(),
    );
    out.push(tag);
    out.extend_from_slice(&at_ms.to_be_bytes()[8 - TIME_BYTES..]);
    text(&mut out, command_id);
    text(&mut out, &fields.chatroom_id);
    text(&mut out, &fields.member_wxid);
    if !same {
        text(&mut out, &fields.correlation_id);
    }
    text(&mut out, &fields.completed_at);
    out
}

/// Every record in a field's value.
pub fn decode_all(value: &[u8]) -> Result<Vec<Unpacked>, PackedError> {
    let mut found = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let [hi, lo, tail @ ..] = rest else {
            return Err(PackedError::Truncated);
        };
        let len = usize::from(*hi) << 8 | usize::from(*lo);
        let record = tail.get(..len).ok_or(PackedError::Truncated)?;
        found.push(decode(record)?);
        rest = &tail[len..];
    }
    Ok(found)
}

fn decode(record: &[u8]) -> Result<Unpacked, PackedError> {
    let (&tag, rest) = record.split_first().ok_or(PackedError::Truncated)?;
    let (phase, same) = match tag {
        PENDING => (Phase::Pending, false),
        CONFIRMED => (Phase::Confirmed, false),
        t if t == PENDING + SAME_CORRELATION => (Phase::Pending, true),
        t if t == CONFIRMED + SAME_CORRELATION => (Phase::Confirmed, true),
        other => return Err(PackedError::UnknownTag(other)),
    };
    let (time, rest) = rest
        .split_at_checked(TIME_BYTES)
        .ok_or(PackedError::Truncated)?;
    let mut at = [0u8; 8];
    at[8 - TIME_BYTES..].copy_from_slice(time);
    let (command_id, rest) = read_text(rest)?;
    let (chatroom_id, rest) = read_text(rest)?;
    let (member_wxid, rest) = read_text(rest)?;
    let (correlation_id, rest) = if same {
        (command_id.clone(), rest)
    } else {
        read_text(rest)?
    };
    let (completed_at, _) = read_text(rest)?;
    Ok(Unpacked {
        command_id,
        fields: Fields {
            chatroom_id,
            member_wxid,
            correlation_id,
            completed_at,
        },
        phase,
        at: u64::from_be_bytes(at),
    })
}

fn text(out: &mut Vec<u8>, s: &str) {
    // A commandId, wxid or correlation id is far below 4 GiB.
    varint::put(out, u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(s.as_bytes());
}

fn read_text(bytes: &[u8]) -> Result<(String, &[u8]), PackedError> {
    let (len, rest) = varint::read(bytes).ok_or(PackedError::Truncated)?;
    let len = usize::try_from(len).map_err(|_| PackedError::Truncated)?;
    let (s, rest) = rest.split_at_checked(len).ok_or(PackedError::Truncated)?;
    let s = std::str::from_utf8(s).map_err(|_| PackedError::NotText)?;
    Ok((s.to_owned(), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(correlation: &str) -> Fields {
        Fields {
            chatroom_id: "34757816141@chatroom".into(),
            member_wxid: "wxid_phyyedw9xap22".into(),
            correlation_id: correlation.into(),
            completed_at: "2026-12-03T19:40:00.123Z".into(),
        }
    }

    fn framed(records: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            out.extend_from_slice(&u16::try_from(r.len()).unwrap().to_be_bytes());
            out.extend_from_slice(r);
        }
        out
    }

    #[test]
    fn records_survive_the_round_trip_in_about_a_hundred_bytes() {
        let id = "crm-7f3a-2026-11-25-00000001-00001eef";
        let a = encode(id, &fields(id), Phase::Pending, 1_764_770_000_123);
        let b = encode("other", &fields("corr-9"), Phase::Confirmed, 7);
        assert!(a.len() <= 110, "{} bytes", a.len());
        assert_eq!(&a[IDENTITY_AT..IDENTITY_AT + id.len() + 1], identity(id));
        let found = decode_all(&framed(&[a, b])).expect("decodes");
        assert_eq!(
            found,
            vec![
                Unpacked {
                    command_id: id.into(),
                    fields: fields(id),
                    phase: Phase::Pending,
                    at: 1_764_770_000_123,
                },
                Unpacked {
                    command_id: "other".into(),
                    fields: fields("corr-9"),
                    phase: Phase::Confirmed,
                    at: 7,
                },
            ]
        );
        // A correlation id that is empty is not taken for the commandId.
        let c = encode("x", &fields(""), Phase::Pending, 1);
        assert_eq!(
            decode_all(&framed(&[c])).expect("decodes")[0].fields,
            fields("")
        );
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let whole = framed(&[encode("c", &fields("c"), Phase::Confirmed, 1)]);
        for cut in 1..whole.len() {
            assert!(decode_all(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut unknown = whole.clone();
        unknown[2] = 9;
        assert_eq!(decode_all(&unknown), Err(PackedError::UnknownTag(9)));
    }
}
