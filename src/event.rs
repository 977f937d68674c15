//! Result events (contract §4): the one thing downstream systems see.

use serde::{Deserialize, Serialize};

use crate::{
    command::{Command, Partial},
    gewe::CallOutcome,
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

/// The stable error kinds of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message is not a valid command.
    InvalidCommand,
    /// GeWe refused the token.
    Unauthorized,
    /// The account behind `appId` is offline or unknown.
    AppOffline,
    /// Any other business refusal by GeWe.
    Rejected,
    /// GeWe could not be reached or kept failing transiently.
    UpstreamUnavailable,
    /// GeWe answered something the worker cannot use.
    UnexpectedResponse,
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

impl ErrorKind {
    /// Every kind, in [`ErrorKind::index`] order.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::InvalidCommand,
        ErrorKind::Unauthorized,
        ErrorKind::AppOffline,
        ErrorKind::Rejected,
        ErrorKind::UpstreamUnavailable,
        ErrorKind::UnexpectedResponse,
    ];

    /// Position in [`ErrorKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            ErrorKind::InvalidCommand => 0,
            ErrorKind::Unauthorized => 1,
            ErrorKind::AppOffline => 2,
            ErrorKind::Rejected => 3,
            ErrorKind::UpstreamUnavailable => 4,
            ErrorKind::UnexpectedResponse => 5,
        }
    }

    /// Whether the worker retries this kind (with backoff).
    pub fn retryable(self) -> bool {
        match self {
            ErrorKind::UpstreamUnavailable => true,
            ErrorKind::InvalidCommand
            | ErrorKind::Unauthorized
            | ErrorKind::AppOffline
            | ErrorKind::Rejected
            | ErrorKind::UnexpectedResponse => false,
        }
    }

    /// The snake_case name used in events, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidCommand => "invalid_command",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::AppOffline => "app_offline",
            ErrorKind::Rejected => "rejected",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
            ErrorKind::UnexpectedResponse => "unexpected_response",
        }
    }
}

/// What GeWe itself said, when it answered with a GeWe-shaped body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeweReply {
    /// GeWe's `ret`.
    pub ret: i64,
    /// GeWe's `msg` (null when absent), token redacted.
    pub msg: Option<String>,
    /// `data.code` / `data.msg` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<GeweReplyData>,
}

/// The failure detail GeWe puts in `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeweReplyData {
    /// `data.code`, e.g. `"-1"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `data.msg`, e.g. `微信已离线`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
}

/// The `error` object of a failed event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventError {
    /// Stable classification.
    pub kind: ErrorKind,
    /// Human-readable explanation, token redacted.
    pub message: String,
    /// `kind.retryable()`, spelled out for consumers.
    pub retryable: bool,
    /// GeWe's answer, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gewe: Option<GeweReply>,
}

impl EventError {
    /// An error of `kind` with `retryable` derived from it.
    pub fn new(kind: ErrorKind, message: impl Into<String>, gewe: Option<GeweReply>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: kind.retryable(),
            gewe,
        }
    }
}

/// A result event, exactly as serialised on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultEvent {
    /// The command's id (given or derived).
    pub command_id: String,
    /// Final status.
    pub status: Status,
    /// Present whenever the command carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// Present whenever the command carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chatroom_id: Option<String>,
    /// Present whenever the command carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_wxid: Option<String>,
    /// The ticket GeWe returns on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v3: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    /// GeWe HTTP attempts made for this outcome (0 when GeWe was not called).
    pub attempts: u32,
    /// When the worker received the command (RFC 3339).
    pub received_at: String,
    /// When the outcome was known (RFC 3339).
    pub completed_at: String,
    /// Set when this republishes an outcome already known for the commandId.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Times the command was parked before this outcome (`retry.park`);
    /// absent when it never was.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parked: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ResultEvent {
    /// The event for `cmd`'s GeWe outcome, known at `completed_at` after
    /// `parked` earlier tries; `duplicate` when it republishes an outcome
    /// already announced.
    pub fn of_outcome(
        cmd: &Command,
        outcome: &CallOutcome,
        parked: u32,
        received_at: String,
        completed_at: String,
        duplicate: bool,
    ) -> Self {
        let (status, v3, error) = match &outcome.result {
            Ok(v3) => (Status::Succeeded, Some(v3.clone()), None),
            Err(e) => (Status::Failed, None, Some((**e).clone())),
        };
        Self {
            command_id: cmd.command_id.clone(),
            status,
            app_id: Some(cmd.app_id.clone()),
            chatroom_id: Some(cmd.chatroom_id.clone()),
            member_wxid: Some(cmd.member_wxid.clone()),
            v3,
            error,
            attempts: outcome.attempts,
            received_at,
            completed_at,
            duplicate,
            parked,
        }
    }

    /// The `invalid_command` event of a message that was not carried out:
    /// what could be read of it, and why (`message`, already redacted).
    pub fn invalid(read: Partial, message: String, received_at: String) -> Self {
        Self {
            command_id: read.command_id,
            status: Status::Failed,
            app_id: read.app_id,
            chatroom_id: read.chatroom_id,
            member_wxid: read.member_wxid,
            v3: None,
            error: Some(EventError::new(ErrorKind::InvalidCommand, message, None)),
            attempts: 0,
            received_at,
            completed_at: now_rfc3339(),
            duplicate: false,
            parked: 0,
        }
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

/// Current time as RFC 3339 with millisecond precision, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_event_has_the_contract_shape() {
        let e = ResultEvent {
            command_id: "c1".into(),
            status: Status::Failed,
            app_id: Some("a".into()),
            chatroom_id: None,
            member_wxid: Some("m".into()),
            v3: None,
            error: Some(EventError::new(
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
            )),
            attempts: 1,
            received_at: "t0".into(),
            completed_at: "t1".into(),
            duplicate: false,
            parked: 0,
        };
        let v = serde_json::to_value(&e).expect("serialises");
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

    #[test]
    fn only_upstream_unavailable_is_retryable() {
        use ErrorKind::*;
        for k in [
            InvalidCommand,
            Unauthorized,
            AppOffline,
            Rejected,
            UnexpectedResponse,
        ] {
            assert!(!k.retryable(), "{k:?}");
        }
        assert!(UpstreamUnavailable.retryable());
    }
}
