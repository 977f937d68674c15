//! The one place that decides what a GeWe attempt means.
//!
//! Every outcome of an attempt (transport error or any HTTP answer) maps to
//! exactly one [`Verdict`]; `retry` only looks at the verdict. Keeping the
//! decision in one exhaustive function is what makes "permanent failures
//! are never retried" checkable.

use std::time::Duration;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::client::{Answer, TransportError};
use crate::{
    error_kind::ErrorKind,
    outcome::{EventError, GeweReply, GeweReplyData},
    redact::Redactor,
};

/// What one attempt means for the command.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// GeWe accepted: here is the ticket.
    Success {
        /// `data.v3`.
        v3: String,
    },
    /// A final failure: retrying cannot help.
    Permanent(EventError),
    /// The request never left this machine (out of file descriptors): not
    /// GeWe's failure, so it neither counts for the breaker nor uses up an
    /// attempt; the command tries again after a backoff.
    Local {
        /// What ran out, for the log.
        message: String,
    },
    /// A transient failure: try again after backoff (or `retry_after`).
    Transient {
        /// The error to report if no attempt is left.
        error: EventError,
        /// Server-requested delay, if any.
        retry_after: Option<Duration>,
        /// Whether WeChat may have seen the request (a timeout: it may
        /// have; a refused connection or an HTTP 5xx: it did not).
        reached_wechat: bool,
    },
}

impl Verdict {
    /// The error kind of a failed attempt; `None` for a success or a
    /// local failure (GeWe said nothing).
    pub fn failure(&self) -> Option<ErrorKind> {
        match self {
            Verdict::Success { .. } | Verdict::Local { .. } => None,
            Verdict::Permanent(e) | Verdict::Transient { error: e, .. } => Some(e.kind),
        }
    }

    /// Whether the request may have reached WeChat, so it counts against
    /// the account's daily limit (contract §7): not when it never left this
    /// process, GeWe refused the token or found the account offline, or
    /// GeWe could not be reached or answered 5xx. A timeout counts.
    pub fn reached_wechat(&self) -> bool {
        match self {
            Verdict::Success { .. } => true,
            Verdict::Local { .. } => false,
            Verdict::Transient { reached_wechat, .. } => *reached_wechat,
            Verdict::Permanent(e) => match e.kind {
                ErrorKind::Unauthorized | ErrorKind::AppOffline => false,
                ErrorKind::Rejected
                | ErrorKind::UnexpectedResponse
                | ErrorKind::UpstreamUnavailable
                | ErrorKind::InvalidCommand
                | ErrorKind::Expired => true,
            },
        }
    }

    /// GeWe's `msg` and `data.msg` of a failed answer, where WeChat's
    /// "too often" shows.
    pub fn failure_texts(&self) -> Option<impl Iterator<Item = &str>> {
        let reply = match self {
            Verdict::Permanent(e) | Verdict::Transient { error: e, .. } => e.gewe.as_ref()?,
            Verdict::Success { .. } | Verdict::Local { .. } => return None,
        };
        let data = reply.data.as_ref().and_then(|d| d.msg.as_deref());
        Some(reply.msg.as_deref().into_iter().chain(data))
    }
}

/// Classifies the result of one attempt. Texts are redacted with `redactor`
/// because GeWe echoes the token in its token error.
pub fn classify(result: &Result<Answer, TransportError>, redactor: &Redactor) -> Verdict {
    let answer = match result {
        Ok(answer) => answer,
        Err(e @ TransportError::LocalResources(_)) => {
            return Verdict::Local {
                message: redactor.redact(&e.to_string()).into_owned(),
            };
        }
        Err(
            e @ (TransportError::Timeout(_) | TransportError::Connect(_) | TransportError::Body(_)),
        ) => {
            return Verdict::Transient {
                error: EventError::new(
                    ErrorKind::UpstreamUnavailable,
                    redactor.redact(&e.to_string()),
                    None,
                ),
                retry_after: None,
                reached_wechat: !matches!(e, TransportError::Connect(_)),
            };
        }
    };
    let status = answer.status;
    if (200..=299).contains(&status)
        && let Some(v3) = accepted_v3(&answer.body)
    {
        return Verdict::Success { v3 };
    }
    let body = parse_body(&answer.body, redactor);
    let reply = body.as_ref().map(|b| b.reply.clone());
    match status {
        401 | 403 => Verdict::Permanent(EventError::new(
            ErrorKind::Unauthorized,
            format!("GeWe refused the token (HTTP {status})"),
            reply,
        )),
        408 | 429 | 500..=599 => Verdict::Transient {
            error: EventError::new(
                ErrorKind::UpstreamUnavailable,
                format!("GeWe answered HTTP {status}"),
                reply,
            ),
            retry_after: answer.retry_after,
            reached_wechat: !(500..=599).contains(&status),
        },
        200..=299 => match body {
            Some(body) => classify_body(body),
            None => unexpected(format!(
                "GeWe answered HTTP {status} with a body that is not GeWe's JSON shape"
            )),
        },
        _ => match body {
            // Some gateways answer a business failure with a 4xx but GeWe's body.
            Some(body) if body.reply.ret != 200 => classify_body(body),
            Some(_) | None => unexpected(format!("GeWe answered HTTP {status}")),
        },
    }
}

struct Body {
    reply: GeweReply,
    v3: Option<String>,
}

fn classify_body(body: Body) -> Verdict {
    let Body { reply, v3 } = body;
    if reply.ret == 200 {
        return match v3 {
            Some(v3) => Verdict::Success { v3 },
            None => Verdict::Permanent(EventError::new(
                ErrorKind::UnexpectedResponse,
                "GeWe answered ret 200 without a usable data.v3",
                Some(reply),
            )),
        };
    }
    let msg = reply.msg.as_deref().unwrap_or("");
    let data_msg = reply
        .data
        .as_ref()
        .and_then(|d| d.msg.as_deref())
        .unwrap_or("");
    let detail = match (msg, data_msg) {
        ("", "") => format!("ret {}", reply.ret),
        (m, "") | ("", m) => m.to_owned(),
        (m, d) => format!("{m} ({d})"),
    };
    let kind = if is_token_error(msg) || is_token_error(data_msg) {
        ErrorKind::Unauthorized
    } else if is_offline(msg) || is_offline(data_msg) {
        ErrorKind::AppOffline
    } else {
        ErrorKind::Rejected
    };
    let message = match kind {
        ErrorKind::Unauthorized => format!("GeWe refused the token: {detail}"),
        ErrorKind::AppOffline => format!("the WeChat account is offline or unknown: {detail}"),
        _ => format!("GeWe refused the request: {detail}"),
    };
    Verdict::Permanent(EventError::new(kind, message, Some(reply)))
}

fn unexpected(message: String) -> Verdict {
    Verdict::Permanent(EventError::new(
        ErrorKind::UnexpectedResponse,
        message,
        None,
    ))
}

fn is_token_error(text: &str) -> bool {
    let lower = text.to_lowercase();
    lower.contains("x-gewe-token")
        || (lower.contains("token")
            && [
                "不可用",
                "过期",
                "为空",
                "无效",
                "expired",
                "invalid",
                "empty",
                "unavailable",
            ]
            .iter()
            .any(|w| lower.contains(w)))
}

fn is_offline(text: &str) -> bool {
    let lower = text.to_lowercase();
    ["离线", "设备不存在", "不在线", "offline"]
        .iter()
        .any(|w| lower.contains(w))
}

/// The usual answer, `{"ret":200,..,"data":{"v3":"..",..}}`, read in one
/// pass without building a JSON tree: the `v3` when `ret` is 200 and
/// `data.v3` a plain string that is not blank. Anything else (another
/// shape, escapes, a body this cannot read) is `None` and goes through
/// [`parse_body`], which reaches the same success the same way: this only
/// saves work, it never changes a verdict (tested below).
fn accepted_v3(bytes: &[u8]) -> Option<String> {
    // Checked as UTF-8 in one pass rather than string by string.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let (ret, v3) = de.deserialize_map(Objects::Top).ok()?;
    de.end().ok()?;
    let v3 = v3?;
    (ret == Some(200) && !v3.trim().is_empty()).then(|| v3.to_owned())
}

/// Visits GeWe's body (`Top`: `ret` and `data`) or its `data` (`Data`:
/// `v3`) as JSON objects only, since serde would also read a struct from an
/// array; a repeated key keeps its last value, as a JSON tree would.
#[derive(Clone, Copy)]
enum Objects {
    Top,
    Data,
}

impl<'de> Visitor<'de> for Objects {
    /// `ret` (top level only) and `v3`.
    type Value = (Option<i64>, Option<&'de str>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut ret, mut v3) = (None, None);
        while let Some(key) = map.next_key::<&'de str>()? {
            match (self, key) {
                (Objects::Top, "ret") => ret = Some(map.next_value::<i64>()?),
                (Objects::Top, "data") => v3 = map.next_value_seed(Objects::Data)?.1,
                (Objects::Data, "v3") => v3 = Some(map.next_value::<&'de str>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((ret, v3))
    }
}

impl<'de> DeserializeSeed<'de> for Objects {
    type Value = (Option<i64>, Option<&'de str>);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// Reads GeWe's `{ret, msg, data}`; `None` when the body is not that shape.
fn parse_body(bytes: &[u8], redactor: &Redactor) -> Option<Body> {
    let Value::Object(obj) = serde_json::from_slice::<Value>(bytes).ok()? else {
        return None;
    };
    let ret = obj.get("ret")?.as_i64()?;
    let text = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) => Some(redactor.redact(s).into_owned()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let data = obj.get("data").and_then(Value::as_object);
    let v3 = data
        .and_then(|d| d.get("v3"))
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_owned);
    let reply_data = data.and_then(|d| {
        let code = text(d.get("code"));
        let msg = text(d.get("msg"));
        (code.is_some() || msg.is_some()).then_some(GeweReplyData { code, msg })
    });
    Some(Body {
        reply: GeweReply {
            ret,
            msg: text(obj.get("msg")),
            data: reply_data,
        },
        v3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn answer(status: u16, body: &str) -> Result<Answer, TransportError> {
        Ok(Answer {
            status,
            retry_after: None,
            body: Bytes::from(body.to_owned()),
        })
    }

    fn kind(v: &Verdict) -> Option<ErrorKind> {
        v.failure()
    }

    #[test]
    fn success_needs_ret_200_and_a_v3() {
        let r = Redactor::default();
        assert_eq!(
            classify(
                &answer(
                    200,
                    r#"{"ret":200,"msg":"操作成功","data":{"v3":"v3_x@stranger"}}"#
                ),
                &r
            ),
            Verdict::Success {
                v3: "v3_x@stranger".into()
            }
        );
        // success text varies: only ret matters
        assert!(matches!(
            classify(
                &answer(200, r#"{"ret":200,"msg":"ok","data":{"v3":"v3_y"}}"#),
                &r
            ),
            Verdict::Success { .. }
        ));
        for body in [
            r#"{"ret":200,"msg":"操作成功","data":{"v3":""}}"#,
            r#"{"ret":200,"msg":"操作成功","data":null}"#,
            r#"{"ret":200,"msg":"操作成功"}"#,
            r#"{"ret":200,"data":{"v3":17}}"#,
            "<html>gateway</html>",
            r#"{"code":0}"#,
            "[]",
        ] {
            assert_eq!(
                kind(&classify(&answer(200, body), &r)),
                Some(ErrorKind::UnexpectedResponse),
                "{body}"
            );
        }
    }

    #[test]
    fn the_contracts_failure_bodies() {
        let r = Redactor::new(["tok-secret"]).expect("redactor");
        let cases = [
            (
                r#"{"ret":500,"msg":"HTTP HEADER: X-GEWE-TOKEN=tok-secret 不可用或已过期"}"#,
                ErrorKind::Unauthorized,
            ),
            (
                r#"{"ret":500,"msg":"发送消息失败","data":{"code":"-1","msg":"微信已离线"}}"#,
                ErrorKind::AppOffline,
            ),
            (
                r#"{"ret":500,"msg":"获取失败","data":{"code":"-1","msg":"[wx_abc]设备不存在"}}"#,
                ErrorKind::AppOffline,
            ),
            (
                r#"{"ret":500,"msg":"添加好友失败","data":{"code":"-2","msg":"user ticket invalid"}}"#,
                ErrorKind::Rejected,
            ),
            (r#"{"ret":500,"msg":null}"#, ErrorKind::Rejected),
            (r#"{"ret":500}"#, ErrorKind::Rejected),
            (
                r#"{"ret":-1,"msg":"对方已关闭群聊加好友","data":null}"#,
                ErrorKind::Rejected,
            ),
        ];
        for (body, want) in cases {
            let v = classify(&answer(200, body), &r);
            assert_eq!(kind(&v), Some(want), "{body}");
            let Verdict::Permanent(e) = &v else {
                panic!("{body} must be permanent")
            };
            assert!(!e.message.contains("tok-secret"));
            assert!(
                !serde_json::to_string(e)
                    .expect("json")
                    .contains("tok-secret")
            );
            assert!(e.gewe.is_some(), "{body} keeps GeWe's reply");
        }
    }

    #[test]
    fn gewe_reply_carries_ret_msg_and_data() {
        let v = classify(
            &answer(
                200,
                r#"{"ret":500,"msg":"添加好友失败","data":{"code":-2,"msg":"user ticket invalid"}}"#,
            ),
            &Redactor::default(),
        );
        let Verdict::Permanent(e) = v else {
            panic!("permanent")
        };
        let g = e.gewe.expect("gewe");
        assert_eq!(g.ret, 500);
        assert_eq!(g.msg.as_deref(), Some("添加好友失败"));
        let d = g.data.expect("data");
        assert_eq!(d.code.as_deref(), Some("-2"));
        assert_eq!(d.msg.as_deref(), Some("user ticket invalid"));
    }

    #[test]
    fn http_statuses() {
        let r = Redactor::default();
        for s in [401, 403] {
            assert_eq!(
                kind(&classify(&answer(s, ""), &r)),
                Some(ErrorKind::Unauthorized)
            );
        }
        for s in [408, 429, 500, 502, 503, 504] {
            let v = classify(&answer(s, "busy"), &r);
            assert!(matches!(v, Verdict::Transient { .. }), "{s}");
        }
        assert_eq!(
            kind(&classify(&answer(404, "nope"), &r)),
            Some(ErrorKind::UnexpectedResponse)
        );
        assert_eq!(
            kind(&classify(
                &answer(400, r#"{"ret":500,"msg":"参数错误"}"#),
                &r
            )),
            Some(ErrorKind::Rejected)
        );
    }

    #[test]
    fn transport_errors_are_transient() {
        let r = Redactor::default();
        for e in [
            TransportError::Timeout(Duration::from_secs(1)),
            TransportError::Connect("refused".into()),
            TransportError::Body("reset".into()),
        ] {
            assert!(matches!(classify(&Err(e), &r), Verdict::Transient { .. }));
        }
        let local = TransportError::LocalResources("Too many open files (os error 24)".into());
        assert!(matches!(classify(&Err(local), &r), Verdict::Local { .. }));
    }

    #[test]
    fn retry_after_is_passed_on() {
        let v = classify(
            &Ok(Answer {
                status: 429,
                retry_after: Some(Duration::from_secs(3)),
                body: Bytes::new(),
            }),
            &Redactor::default(),
        );
        assert!(
            matches!(v, Verdict::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(3))
        );
    }

    /// The one-pass reader accepts exactly the successes the JSON tree
    /// does, with the same `v3`, and leaves everything else to it.
    #[test]
    fn the_fast_success_path_agrees_with_the_json_tree() {
        let r = Redactor::default();
        let bodies = [
            (
                r#"{"ret":200,"msg":"操作成功","data":{"v3":"v3_a@stranger","v4":"x"}}"#,
                true,
            ),
            (r#" {"data":{"v3":"v3_b"},"ret":200} "#, true),
            (
                r#"{"ret":200,"ret":200,"data":{"v3":"old","v3":"v3_c"}}"#,
                true,
            ),
            (r#"{"ret":200,"data":{"v3":"v3_\u0064"}}"#, false),
            (r#"[200,{"v3":"v3_x"}]"#, false),
            (r#"{"ret":200,"data":["v3_x"]}"#, false),
            (r#"{"ret":200,"data":{"v3":"  "}}"#, false),
            (r#"{"ret":200,"data":{"v3":7}}"#, false),
            (r#"{"ret":200,"data":{"v3":null}}"#, false),
            (r#"{"ret":200,"data":null}"#, false),
            (r#"{"ret":200.0,"data":{"v3":"v3_x"}}"#, false),
            (r#"{"ret":"200","data":{"v3":"v3_x"}}"#, false),
            (r#"{"ret":500,"data":{"v3":"v3_x"}}"#, false),
            (r#"{"ret":200,"data":{"v3":"v3_x"},"data":{}}"#, false),
            (r#"{"ret":200,"data":{"v3":"v3_x"}} trailing"#, false),
            (r#"{"ret":200,"data":{"v3":"v3_x"}"#, false),
        ];
        for (body, fast) in bodies {
            let quick = accepted_v3(body.as_bytes());
            assert_eq!(quick.is_some(), fast, "{body}");
            let slow = parse_body(body.as_bytes(), &r).map(classify_body);
            if let Some(v3) = quick {
                assert_eq!(slow, Some(Verdict::Success { v3 }), "{body}");
            }
        }
        // The escaped one is still a success, by the slow path.
        assert_eq!(
            classify(&answer(200, r#"{"ret":200,"data":{"v3":"v3_\u0064"}}"#), &r),
            Verdict::Success { v3: "v3_d".into() }
        );
    }
}
