//! What is remembered per commandId: the outcome, and which request it
//! answered.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::{
    command::Command,
    outcome::{CallOutcome, Tries},
};

/// Identifies one request: `appId`, `chatroomId`, `memberWxid` and
/// `content` (contract §3). A commandId is bound to the fingerprint of the
/// request that first produced its outcome, so reusing the id for another
/// request can never be answered with that outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(u128);

impl Fingerprint {
    /// The fingerprint of `cmd`'s request fields. Each field is length-
    /// prefixed, so `("ab","c")` and `("a","bc")` differ; SHA-256 keeps it
    /// stable across versions and hosts, and 128 bits of it are plenty to
    /// tell requests apart.
    pub fn of(cmd: &Command) -> Self {
        let mut hash = Sha256::new();
        for field in [
            &cmd.app_id,
            &cmd.chatroom_id,
            &cmd.member_wxid,
            &cmd.content,
        ] {
            hash.update((field.len() as u64).to_le_bytes());
            hash.update(field.as_bytes());
        }
        let digest = hash.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(u128::from_be_bytes(first))
    }
}

impl Fingerprint {
    /// Its 16 bytes, as the compact record keeps them.
    pub(super) fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The fingerprint of [`Fingerprint::to_bytes`].
    pub(super) fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text.len() != 32 {
            return Err(serde::de::Error::custom("a fingerprint is 32 hex digits"));
        }
        u128::from_str_radix(&text, 16)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// A GeWe outcome as stored for its commandId.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Record {
    /// The request this outcome answered.
    fingerprint: Fingerprint,
    /// What GeWe said, after all attempts.
    outcome: CallOutcome,
    /// When the outcome was known, in milliseconds since the Unix epoch.
    completed_at_ms: u64,
    /// Times the command was parked before this outcome (`retry.park`).
    #[serde(default, skip_serializing_if = "is_zero")]
    parked: u32,
    /// Times the command was deferred for its account before this outcome.
    #[serde(default, skip_serializing_if = "is_zero")]
    deferred: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Record {
    /// An outcome known now, after the earlier `tries` through delay queues.
    pub fn new(fingerprint: Fingerprint, outcome: CallOutcome, tries: Tries) -> Self {
        let completed_at_ms = crate::timestamp::now_millis();
        Self {
            fingerprint,
            outcome,
            completed_at_ms,
            parked: tries.parked,
            deferred: tries.deferred,
        }
    }

    /// A record read back from its stored parts.
    pub(super) fn from_parts(
        fingerprint: Fingerprint,
        outcome: CallOutcome,
        completed_at_ms: u64,
        tries: Tries,
    ) -> Self {
        Self {
            fingerprint,
            outcome,
            completed_at_ms,
            parked: tries.parked,
            deferred: tries.deferred,
        }
    }

    /// When the outcome was known, in milliseconds since the Unix epoch.
    pub(super) fn completed_at_ms(&self) -> u64 {
        self.completed_at_ms
    }

    /// The request this outcome answered.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// What GeWe said, after all attempts.
    pub fn outcome(&self) -> &CallOutcome {
        &self.outcome
    }

    /// Times the command was parked and deferred before this outcome.
    pub fn tries(&self) -> Tries {
        Tries {
            parked: self.parked,
            deferred: self.deferred,
        }
    }

    /// `completedAt` of its events (RFC 3339, milliseconds).
    pub fn completed_at(&self) -> String {
        crate::timestamp::format_millis(self.completed_at_ms)
    }

    /// Whether GeWe may have acted on the request: a success, or a failure
    /// of a [definitive](crate::error_kind::ErrorKind::definitive) kind.
    /// Only these are stored.
    pub fn is_definitive(&self) -> bool {
        match &self.outcome.result {
            Ok(_) => true,
            Err(e) => e.kind.definitive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(member: &str, content: &str) -> Command {
        Command {
            command_id: "c".into(),
            app_id: "a".into(),
            chatroom_id: "r@chatroom".into(),
            member_wxid: member.into(),
            content: content.into(),
        }
    }

    #[test]
    fn fingerprints_tell_requests_apart_and_survive_a_round_trip() {
        let a = Fingerprint::of(&cmd("m1", "hi"));
        assert_eq!(a, Fingerprint::of(&cmd("m1", "hi")));
        assert_ne!(a, Fingerprint::of(&cmd("m2", "hi")));
        assert_ne!(a, Fingerprint::of(&cmd("m1", "hello")));
        assert_ne!(
            Fingerprint::of(&cmd("ab", "c")),
            Fingerprint::of(&cmd("a", "bc"))
        );
        let record = Record::new(
            a,
            CallOutcome {
                result: Ok("v3".into()),
                attempts: 2,
            },
            Tries {
                parked: 1,
                deferred: 2,
            },
        );
        let json = serde_json::to_string(&record).expect("encodes");
        let back: Record = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, record);
        assert!(back.completed_at().ends_with('Z'));
        assert!(
            serde_json::from_str::<Record>(&json.replace(&format!("{:032x}", a.0), "zz")).is_err()
        );
    }

    #[test]
    fn a_stored_completion_time_far_in_the_future_is_written_not_a_panic() {
        // Records come back from Redis; a damaged one must not take the
        // worker down when its event is built.
        let mut record = Record::new(
            Fingerprint::of(&cmd("m", "hi")),
            CallOutcome {
                result: Ok("v3".into()),
                attempts: 1,
            },
            Tries::default(),
        );
        record.completed_at_ms = u64::MAX;
        assert!(record.completed_at().ends_with('Z'));
    }
}
