//! GeWe's callback bodies (contract §6): what makes one a candidate for a
//! match, and why the others are not.
//!
//! GeWe posts every contact change of an account as a callback; the one
//! that says a member accepted a friend request is a `ModContacts` whose
//! `Data.EncryptUserName` is the `v3` `addGroupMemberAsFriend` returned.
//! Everything else (profile changes, chatrooms, other types) is expected
//! traffic, not an error.

use serde_json::{Map, Value};

use crate::{broker::topology::MOD_CONTACTS, command::json_type};

/// Why a callback body is not usable at all (it is dead-lettered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not JSON.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("body is JSON {0}, not an object")]
    NotAnObject(&'static str),
}

/// Parses a callback body; only a JSON object is a callback.
pub fn parse(body: &[u8]) -> Result<Map<String, Value>, Invalid> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(Invalid::NotAnObject(json_type(&other))),
        Err(e) => Err(Invalid::NotJson(e.to_string())),
    }
}

/// The callback's `TypeName`, when it is a non-empty string.
pub fn type_name(callback: &Map<String, Value>) -> Option<&str> {
    callback
        .get("TypeName")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
}

/// A `ModContacts` callback that may report an accepted friend request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// `Appid`: the account.
    pub app_id: &'a str,
    /// `Data.EncryptUserName`: the `v3` of the request.
    pub v3: &'a str,
    /// `Data.UserName.string`: the new friend's wxid, when present.
    pub friend_wxid: Option<&'a str>,
}

/// Why a callback cannot report an accepted friend request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotACandidate {
    /// Another `TypeName` (messages, group changes, …).
    #[error("not a ModContacts callback")]
    OtherType,
    /// No `Appid`: the account is unknown.
    #[error("no Appid")]
    NoAppid,
    /// A change of a chatroom, not of a person.
    #[error("a chatroom's contact change")]
    Chatroom,
    /// No `Data.EncryptUserName`: a profile change of an existing contact.
    #[error("no Data.EncryptUserName (a profile change)")]
    NoEncryptUserName,
}

/// The candidate in `callback`, or why there is none.
pub fn candidate(callback: &Map<String, Value>) -> Result<Candidate<'_>, NotACandidate> {
    if type_name(callback) != Some(MOD_CONTACTS) {
        return Err(NotACandidate::OtherType);
    }
    let app_id = non_empty(callback.get("Appid")).ok_or(NotACandidate::NoAppid)?;
    let data = callback.get("Data");
    let field = |name: &str| data.and_then(|d| d.get(name));
    let friend_wxid = non_empty(field("UserName").and_then(|u| u.get("string")));
    if friend_wxid.is_some_and(|w| w.ends_with("@chatroom")) {
        return Err(NotACandidate::Chatroom);
    }
    let v3 = non_empty(field("EncryptUserName")).ok_or(NotACandidate::NoEncryptUserName)?;
    Ok(Candidate {
        app_id,
        v3,
        friend_wxid,
    })
}

/// `v` when it is a string with more than blanks, trimmed.
fn non_empty(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn an_accepted_friend_request_is_a_candidate() {
        let cb = object(json!({
            "TypeName": "ModContacts", "Appid": "wx_app", "Wxid": "wxid_account",
            "Data": {"UserName": {"string": "wxid_friend"}, "EncryptUserName": "v3_x@stranger",
                     "NickName": {"string": "Alice"}}
        }));
        assert_eq!(
            candidate(&cb),
            Ok(Candidate {
                app_id: "wx_app",
                v3: "v3_x@stranger",
                friend_wxid: Some("wxid_friend"),
            })
        );
    }

    #[test]
    fn other_callbacks_say_why_they_are_not_candidates() {
        let cases = [
            (
                json!({"TypeName": "AddMsg", "Appid": "a", "Data": {"EncryptUserName": "v3"}}),
                NotACandidate::OtherType,
            ),
            (
                json!({"Appid": "a", "Data": {"EncryptUserName": "v3"}}),
                NotACandidate::OtherType,
            ),
            (
                json!({"TypeName": "ModContacts", "Data": {"EncryptUserName": "v3"}}),
                NotACandidate::NoAppid,
            ),
            (
                json!({"TypeName": "ModContacts", "Appid": "a",
                       "Data": {"UserName": {"string": "123@chatroom"}, "EncryptUserName": "v3"}}),
                NotACandidate::Chatroom,
            ),
            (
                json!({"TypeName": "ModContacts", "Appid": "a",
                       "Data": {"UserName": {"string": "wxid_f"}, "NickName": {"string": "new"}}}),
                NotACandidate::NoEncryptUserName,
            ),
            (
                json!({"TypeName": "ModContacts", "Appid": "a", "Data": {"EncryptUserName": ""}}),
                NotACandidate::NoEncryptUserName,
            ),
            (
                json!({"TypeName": "ModContacts", "Appid": "a", "Data": "text"}),
                NotACandidate::NoEncryptUserName,
            ),
        ];
        for (body, why) in cases {
            assert_eq!(candidate(&object(body.clone())), Err(why), "{body}");
        }
    }

    #[test]
    fn only_a_json_object_is_a_callback() {
        assert!(parse(br#"{"TypeName":"X"}"#).is_ok());
        assert_eq!(parse(b"[1]"), Err(Invalid::NotAnObject("an array")));
        assert!(matches!(parse(b"{oops"), Err(Invalid::NotJson(_))));
        assert!(matches!(parse(b""), Err(Invalid::NotJson(_))));
    }
}
