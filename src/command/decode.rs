//! Decoding a body into a [`Command`]: a fast path for well-formed
//! commands and a slow path that says exactly what is wrong.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    Command, Envelope, InvalidCommand, MAX_BODY_BYTES, MAX_COMMAND_ID_BYTES, MAX_COMMAND_ID_CHARS,
    Partial, Rejected,
};

/// Decodes a body into a [`Command`], or says why it is not one.
pub fn decode(body: &[u8], envelope: &Envelope) -> Result<Command, Box<Rejected>> {
    let reject = |reason, partial| Box::new(Rejected { reason, partial });
    let fallback = || Partial {
        command_id: resolve_command_id(envelope),
        ..Partial::default()
    };
    if body.len() > MAX_BODY_BYTES {
        return Err(reject(
            InvalidCommand::TooLarge {
                size: body.len(),
                limit: MAX_BODY_BYTES,
            },
            fallback(),
        ));
    }
    let text =
        std::str::from_utf8(body).map_err(|_| reject(InvalidCommand::NotUtf8, fallback()))?;
    match decode_valid(text, envelope) {
        Some(command) => Ok(command),
        None => decode_slow(text, envelope),
    }
}

/// The slow path: a JSON tree, inspected field by field so the rejection
/// names exactly what is wrong and keeps what could be read.
fn decode_slow(text: &str, envelope: &Envelope) -> Result<Command, Box<Rejected>> {
    let reject = |reason, partial| Box::new(Rejected { reason, partial });
    let fallback = || Partial {
        command_id: resolve_command_id(envelope),
        ..Partial::default()
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| reject(InvalidCommand::NotJson(e.to_string()), fallback()))?;
    let Value::Object(obj) = value else {
        return Err(reject(
            InvalidCommand::NotAnObject(json_type(&value)),
            fallback(),
        ));
    };

    let given = obj.get("commandId");
    let command_id = match given {
        None | Some(Value::Null) => Ok(resolve_command_id(envelope)),
        Some(Value::String(id)) if blank(id) => Err(InvalidCommand::Empty("commandId")),
        Some(Value::String(id)) if !valid_command_id(id) => Err(InvalidCommand::CommandIdTooLong),
        Some(Value::String(id)) => Ok(id.clone()),
        Some(other) => Err(InvalidCommand::NotAString {
            field: "commandId",
            got: json_type(other),
        }),
    };
    let partial = Partial {
        command_id: match (&command_id, given) {
            (Ok(id), _) => id.clone(),
            // Too long: the event carries it cut to the limit, so the
            // publisher can still match it.
            (Err(_), Some(Value::String(id))) if !blank(id) => cut_command_id(id),
            (Err(_), _) => resolve_command_id(envelope),
        },
        app_id: string_field(&obj, "appId"),
        chatroom_id: string_field(&obj, "chatroomId"),
        member_wxid: string_field(&obj, "memberWxid"),
    };
    let checked = || -> Result<Command, InvalidCommand> {
        let command_id = command_id.clone()?;
        Ok(Command {
            command_id,
            app_id: required(&obj, "appId")?,
            chatroom_id: required(&obj, "chatroomId")?,
            member_wxid: required(&obj, "memberWxid")?,
            content: required(&obj, "content")?,
        })
    };
    checked().map_err(|e| reject(e, partial))
}

/// A well-formed command, borrowed from the body. Other fields send the body
/// to the slow path: serde skips unknown values without the checks (number
/// range, surrogates, nesting depth) that make the slow path reject a body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Wire<'a> {
    #[serde(default)]
    command_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    app_id: Cow<'a, str>,
    #[serde(borrow)]
    chatroom_id: Cow<'a, str>,
    #[serde(borrow)]
    member_wxid: Cow<'a, str>,
    #[serde(borrow)]
    content: Cow<'a, str>,
}

/// The fast path for the common case: one pass over the body and one
/// allocation per field, no JSON tree. `None` for anything that is not a
/// valid command; the slow path then decides and says exactly what is
/// wrong, so the fast path must never accept what the slow path would
/// reject, nor read a field differently (tested below).
fn decode_valid(text: &str, envelope: &Envelope) -> Option<Command> {
    // serde_json also reads a struct from an array of its fields in order.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return None;
    }
    let wire: Wire = serde_json::from_str(text).ok()?;
    let fields = [
        &wire.app_id,
        &wire.chatroom_id,
        &wire.member_wxid,
        &wire.content,
    ];
    if fields.iter().any(|f| blank(f)) {
        return None;
    }
    let command_id = match wire.command_id {
        None => resolve_command_id(envelope),
        Some(id) if valid_command_id(&id) => id.into_owned(),
        Some(_) => return None,
    };
    Some(Command {
        command_id,
        app_id: wire.app_id.into_owned(),
        chatroom_id: wire.chatroom_id.into_owned(),
        member_wxid: wire.member_wxid.into_owned(),
        content: wire.content.into_owned(),
    })
}

/// For a command without `commandId`: its `message_id`, else its
/// `correlation_id`, else a fresh UUID, as the contract orders them. A
/// property that is set but cannot serve (blank, or longer than the limits)
/// is logged: the id generated instead cannot recognise a redelivery.
pub fn resolve_command_id(envelope: &Envelope) -> String {
    for (property, value) in [
        ("message_id", envelope.message_id()),
        ("correlation_id", envelope.correlation_id()),
    ] {
        let Some(value) = value else { continue };
        if valid_command_id(value) {
            return value.to_owned();
        }
        tracing::warn!(
            property,
            chars = value.chars().count(),
            bytes = value.len(),
            max_chars = MAX_COMMAND_ID_CHARS,
            max_bytes = MAX_COMMAND_ID_BYTES,
            "a command without commandId has a property that cannot serve as one (blank or too long); falling back further"
        );
    }
    uuid::Uuid::new_v4().to_string()
}

/// `id` cut to the commandId limits at a character boundary.
fn cut_command_id(id: &str) -> String {
    let mut cut = String::new();
    for c in id.chars().take(MAX_COMMAND_ID_CHARS) {
        if cut.len() + c.len_utf8() > MAX_COMMAND_ID_BYTES {
            break;
        }
        cut.push(c);
    }
    cut
}

fn valid_command_id(id: &str) -> bool {
    !blank(id)
        && id.len() <= MAX_COMMAND_ID_BYTES
        // No more bytes than the limit in characters: no count needed.
        && (id.len() <= MAX_COMMAND_ID_CHARS || id.chars().count() <= MAX_COMMAND_ID_CHARS)
}

/// Empty or only whitespace (what `trim` removes), without trimming both
/// ends of every field of every command.
fn blank(s: &str) -> bool {
    s.chars().all(char::is_whitespace)
}

fn required(obj: &Map<String, Value>, field: &'static str) -> Result<String, InvalidCommand> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(InvalidCommand::Missing(field)),
        Some(Value::String(s)) if blank(s) => Err(InvalidCommand::Empty(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(InvalidCommand::NotAString {
            field,
            got: json_type(other),
        }),
    }
}

fn string_field(obj: &Map<String, Value>, field: &str) -> Option<String> {
    obj.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// The JSON type of `v`, as messages name it ("an array").
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelope of a delivery with these ids.
    fn envelope(message_id: Option<&str>, correlation_id: Option<&str>) -> Envelope {
        let mut properties = lapin::BasicProperties::default();
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(id.into());
        }
        Envelope::from_properties(&properties, "cmds")
    }

    const GOOD: &str = r#"{"commandId":"c-1","appId":"wx_app","chatroomId":"1@chatroom","memberWxid":"wxid_a","content":"hi","extra":1}"#;

    #[test]
    fn the_fast_path_never_accepts_what_the_slow_path_would_not() {
        let env = envelope(Some("mid"), None);
        let long_id = "x".repeat(MAX_COMMAND_ID_BYTES + 1);
        let deep = format!(r#"{}1{}"#, "[".repeat(200), "]".repeat(200));
        let bodies = [
            r#"{"commandId":"c-1","appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"{"appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#.to_owned(),
            r#"{"commandId":null,"appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"{"commandId":"c","appId":"a\u00e9\n","chatroomId":"c","memberWxid":"m","content":"你好"}"#
                .to_owned(),
            r#"{"commandId":"c","appId":"a","appId":"b","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"{"commandId":"","appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"{"commandId":" ","appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            format!(
                r#"{{"commandId":"{long_id}","appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}}"#
            ),
            r#"{"commandId":7,"appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"{"commandId":"c","appId":" ","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"{"commandId":"c","appId":null,"chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"{"commandId":"c","chatroomId":"c","memberWxid":"m","content":"x"}"#.to_owned(),
            r#"{"commandId":"c","appId":"a","chatroomId":"c","memberWxid":"m","content":""}"#
                .to_owned(),
            r#"{"commandId":"c","appId":["a"],"chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            r#"["c"]"#.to_owned(),
            r#"["c","a","c","m","x"]"#.to_owned(),
            r#" [null,"a","c","m","x"]"#.to_owned(),
            GOOD.to_owned(),
            r#"{"commandId":"c","appId":"a","chatroomId":"c","memberWxid":"m","content":"x","n":1e400}"#
                .to_owned(),
            r#"{"commandId":"c","appId":"a","chatroomId":"c","memberWxid":"m","content":"x","s":"\ud800"}"#
                .to_owned(),
            r#"{"commandId":"c","appId":"\ud800","chatroomId":"c","memberWxid":"m","content":"x"}"#
                .to_owned(),
            format!(
                r#"{{"commandId":"c","appId":"a","chatroomId":"c","memberWxid":"m","content":"x","d":{deep}}}"#
            ),
            r#"{"commandId":"c"} trailing"#.to_owned(),
        ];
        for (i, body) in bodies.iter().enumerate() {
            let fast = decode_valid(body, &env);
            let slow = decode_slow(body, &env).ok();
            // The first four are ordinary commands: the fast path takes them.
            if i < 4 {
                assert!(fast.is_some(), "fast path missed {body}");
            }
            // Whatever the fast path accepts, the slow path accepts alike;
            // what it declines (a duplicate key, say) the slow path decides.
            if fast.is_some() {
                assert_eq!(fast, slow, "paths disagree on {body}");
            }
        }
    }

    #[test]
    fn decodes_a_good_command_and_ignores_unknown_fields() {
        let c = decode(GOOD.as_bytes(), &Envelope::default()).expect("valid");
        assert_eq!(c.command_id, "c-1");
        assert_eq!(c.app_id, "wx_app");
        assert_eq!(c.content, "hi");
    }

    #[test]
    fn command_id_falls_back_to_message_id_then_correlation_id() {
        let body = br#"{"appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#;
        let env = envelope(Some("mid"), Some("cid"));
        assert_eq!(decode(body, &env).expect("valid").command_id, "mid");
        let env = envelope(None, Some("cid"));
        assert_eq!(decode(body, &env).expect("valid").command_id, "cid");
        let generated = decode(body, &Envelope::default())
            .expect("valid")
            .command_id;
        assert_eq!(generated.len(), 36);
    }

    #[test]
    fn says_what_is_wrong() {
        let env = Envelope::default();
        let cases: &[(&[u8], InvalidCommand)] = &[
            (b"\xff\xfe", InvalidCommand::NotUtf8),
            (b"[1,2]", InvalidCommand::NotAnObject("an array")),
            (b"{}", InvalidCommand::Missing("appId")),
            (
                br#"{"appId":"a","chatroomId":"c","memberWxid":"m"}"#,
                InvalidCommand::Missing("content"),
            ),
            (
                br#"{"appId":" ","chatroomId":"c","memberWxid":"m","content":"x"}"#,
                InvalidCommand::Empty("appId"),
            ),
            (
                br#"{"appId":"a","chatroomId":7,"memberWxid":"m","content":"x"}"#,
                InvalidCommand::NotAString {
                    field: "chatroomId",
                    got: "a number",
                },
            ),
            (
                br#"{"commandId":"","appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}"#,
                InvalidCommand::Empty("commandId"),
            ),
        ];
        for (body, want) in cases {
            let got = decode(body, &env).expect_err("invalid").reason;
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(body));
        }
        let cjk = format!(
            r#"{{"commandId":"{}","appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}}"#,
            "好".repeat(100)
        );
        assert_eq!(
            decode(cjk.as_bytes(), &env).map_err(|r| r.reason),
            Err(InvalidCommand::CommandIdTooLong),
            "100 CJK characters are 300 bytes"
        );
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(
            decode(&big, &env).map_err(|r| r.reason),
            Err(InvalidCommand::TooLarge { .. })
        ));
    }

    #[test]
    fn a_command_id_over_the_limits_is_refused_but_kept_cut_to_them() {
        let long = "好".repeat(128);
        let body = format!(
            r#"{{"commandId":"{long}","appId":"a","chatroomId":"c","memberWxid":"m","content":"x"}}"#
        );
        let rejected = decode(body.as_bytes(), &Envelope::default()).expect_err("too long");
        assert_eq!(rejected.reason, InvalidCommand::CommandIdTooLong);
        let cut = rejected.partial.command_id;
        assert!(long.starts_with(&cut), "a prefix the publisher can match");
        assert_eq!(cut.chars().count(), 85, "255 bytes of 3-byte characters");
        let ascii = "x".repeat(200);
        assert_eq!(cut_command_id(&ascii).len(), MAX_COMMAND_ID_CHARS);
    }

    #[test]
    fn partial_keeps_what_could_be_read() {
        let body = br#"{"commandId":"c9","appId":"a","chatroomId":5,"memberWxid":"m"}"#;
        let p = decode(body, &Envelope::default())
            .expect_err("invalid")
            .partial;
        assert_eq!(p.command_id, "c9");
        assert_eq!(p.app_id.as_deref(), Some("a"));
        assert_eq!(p.chatroom_id, None);
        assert_eq!(p.member_wxid.as_deref(), Some("m"));
    }
}
