//! Result events (contract §4): the one thing downstream systems see.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::{
    command::{Command, Partial},
    error_kind::ErrorKind,
    json_out,
    outcome::{CallOutcome, EventError, Tries},
    timestamp,
};

/// Routing key of a success event.
pub const ROUTING_SUCCEEDED: &str = "add_friend.succeeded";
/// Routing key of a failure event.
pub const ROUTING_FAILED: &str = "add_friend.failed";

/// Final status of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// GeWe accepted the request and returned a `v3` ticket.
    Succeeded,
    /// See [`EventError::kind`].
    Failed,
}

impl Status {
    /// `succeeded` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

/// A result event, exactly as serialised on the wire. It borrows what it
/// can from the command and its stored outcome: built for every command,
/// it is only read to be written out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultEvent<'a> {
    /// The command's id (given or derived).
    pub command_id: Cow<'a, str>,
    /// Final status.
    pub status: Status,
    /// Present whenever the command carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<Cow<'a, str>>,
    /// Present whenever the command carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chatroom_id: Option<Cow<'a, str>>,
    /// Present whenever the command carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_wxid: Option<Cow<'a, str>>,
    /// The ticket GeWe returns on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v3: Option<Cow<'a, str>>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Cow<'a, EventError>>,
    /// GeWe HTTP attempts made for this outcome (0 when GeWe was not called).
    pub attempts: u32,
    /// When the worker received the command (RFC 3339).
    pub received_at: Cow<'a, str>,
    /// When the outcome was known (RFC 3339).
    pub completed_at: Cow<'a, str>,
    /// Set when this republishes an outcome already known for the commandId.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Times the command was parked before this outcome (`retry.park`);
    /// absent when it never was.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parked: u32,
    /// Times the command was deferred for its account before this outcome
    /// (§7); absent when it never was.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deferred: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl<'a> ResultEvent<'a> {
    /// The event for `cmd`'s GeWe outcome, known at `completed_at` after
    /// `parked` earlier tries; `duplicate` when it republishes an outcome
    /// already announced.
    pub fn of_outcome(
        cmd: &'a Command,
        outcome: &'a CallOutcome,
        tries: Tries,
        received_at: &'a str,
        completed_at: String,
        duplicate: bool,
    ) -> Self {
        let (status, v3, error) = match &outcome.result {
            Ok(v3) => (Status::Succeeded, Some(Cow::Borrowed(v3.as_str())), None),
            Err(e) => (Status::Failed, None, Some(Cow::Borrowed(&**e))),
        };
        Self {
            command_id: Cow::Borrowed(&cmd.command_id),
            status,
            app_id: Some(Cow::Borrowed(&cmd.app_id)),
            chatroom_id: Some(Cow::Borrowed(&cmd.chatroom_id)),
            member_wxid: Some(Cow::Borrowed(&cmd.member_wxid)),
            v3,
            error,
            attempts: outcome.attempts,
            received_at: Cow::Borrowed(received_at),
            completed_at: Cow::Owned(completed_at),
            duplicate,
            parked: tries.parked,
            deferred: tries.deferred,
        }
    }

    /// The `invalid_command` event of a message that was not carried out:
    /// what could be read of it, and why (`message`, already redacted).
    pub fn invalid(read: Partial, message: String, received_at: &'a str) -> Self {
        Self {
            command_id: Cow::Owned(read.command_id),
            status: Status::Failed,
            app_id: read.app_id.map(Cow::Owned),
            chatroom_id: read.chatroom_id.map(Cow::Owned),
            member_wxid: read.member_wxid.map(Cow::Owned),
            v3: None,
            error: Some(Cow::Owned(EventError::new(
                ErrorKind::InvalidCommand,
                message,
                None,
            ))),
            attempts: 0,
            received_at: Cow::Borrowed(received_at),
            completed_at: Cow::Owned(timestamp::now()),
            duplicate: false,
            parked: 0,
            deferred: 0,
        }
    }

    /// Appends the event's JSON to `out`: what serde_json writes for it
    /// (tested below), without its per-byte escape loop on every key and
    /// value (see [`crate::json_out`]).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let mut object = json_out::Object::open(out);
        object.str("commandId", &self.command_id);
        object.str("status", self.status.as_str());
        object.opt_str("appId", self.app_id.as_deref());
        object.opt_str("chatroomId", self.chatroom_id.as_deref());
        object.opt_str("memberWxid", self.member_wxid.as_deref());
        object.opt_str("v3", self.v3.as_deref());
        if let Some(error) = &self.error {
            // Failures are the rare case: serde_json writes them.
            serde_json::to_writer(object.key("error"), error)?;
        }
        object.u64("attempts", u64::from(self.attempts));
        object.str("receivedAt", &self.received_at);
        object.str("completedAt", &self.completed_at);
        if self.duplicate {
            object.bool("duplicate", true);
        }
        if self.parked != 0 {
            object.u64("parked", u64::from(self.parked));
        }
        if self.deferred != 0 {
            object.u64("deferred", u64::from(self.deferred));
        }
        object.close();
        Ok(())
    }

    /// `add_friend.succeeded` or `add_friend.failed`.
    pub fn routing_key(&self) -> &'static str {
        match self.status {
            Status::Succeeded => ROUTING_SUCCEEDED,
            Status::Failed => ROUTING_FAILED,
        }
    }

    /// The error kind, if failed.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        self.error.as_ref().map(|e| e.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{GeweReply, GeweReplyData};

    #[test]
    fn failed_event_has_the_contract_shape() {
        let e = ResultEvent {
            command_id: "c1".into(),
            status: Status::Failed,
            app_id: Some("a".into()),
            chatroom_id: None,
            member_wxid: Some("m".into()),
            v3: None,
            error: Some(Cow::Owned(EventError::new(
                ErrorKind::AppOffline,
                "offline",
                Some(GeweReply {
                    ret: 500,
                    msg: Some("发送消息失败".into()),
                    data: Some(GeweReplyData {
                        code: Some("-1".into()),
                        msg: Some("微信已离线".into()),
                    }),
                }),
            ))),
            attempts: 1,
            received_at: "t0".into(),
            completed_at: "t1".into(),
            duplicate: false,
            parked: 0,
            deferred: 0,
        };
        let v = serde_json::to_value(&e).expect("serialises");
        assert_eq!(written(&e), serde_json::to_vec(&e).expect("serialises"));
        assert_eq!(v["status"], "failed");
        assert_eq!(v["commandId"], "c1");
        assert_eq!(v["error"]["kind"], "app_offline");
        assert_eq!(v["error"]["retryable"], false);
        assert_eq!(v["error"]["gewe"]["ret"], 500);
        assert_eq!(v["error"]["gewe"]["data"]["msg"], "微信已离线");
        assert!(v.get("chatroomId").is_none());
        assert!(v.get("duplicate").is_none());
        assert_eq!(e.routing_key(), "add_friend.failed");
    }

    fn written(e: &ResultEvent<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        e.write_json(&mut out).expect("writes");
        out
    }

    #[test]
    fn write_json_writes_what_serde_json_writes() {
        let cmd = Command {
            command_id: "cmd \"1\"\n\u{1}".into(),
            app_id: "wx_app".into(),
            chatroom_id: "34757816141@chatroom".into(),
            member_wxid: "wxid_张三\\".into(),
            content: "hello".into(),
        };
        let succeeded = CallOutcome {
            result: Ok("v3_abc@stranger".into()),
            attempts: 2,
        };
        let failed = CallOutcome {
            result: Err(Box::new(EventError::new(
                ErrorKind::UpstreamUnavailable,
                "GeWe answered 503 \"busy\"",
                Some(GeweReply {
                    ret: 503,
                    msg: None,
                    data: Some(GeweReplyData {
                        code: None,
                        msg: Some("繁忙".into()),
                    }),
                }),
            ))),
            attempts: 5,
        };
        let at = "2026-11-27T19:24:31.123Z";
        let mut events = Vec::new();
        for outcome in [&succeeded, &failed] {
            for (parked, deferred, duplicate) in [(0, 0, false), (3, 2, true), (1, 0, false)] {
                events.push(ResultEvent::of_outcome(
                    &cmd,
                    outcome,
                    Tries { parked, deferred },
                    at,
                    at.to_owned(),
                    duplicate,
                ));
            }
        }
        events.push(ResultEvent::invalid(
            Partial {
                command_id: "derived".into(),
                app_id: None,
                chatroom_id: Some("x".into()),
                member_wxid: None,
            },
            "field 'appId' is missing\t!".into(),
            at,
        ));
        for e in &events {
            assert_eq!(
                String::from_utf8(written(e)).expect("UTF-8"),
                serde_json::to_string(e).expect("serialises")
            );
        }
    }
}
