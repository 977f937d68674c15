//! What came of a command's GeWe call, as the result event, the
//! idempotency store and the GeWe boundary all see it: GeWe's own answer
//! ([`GeweReply`]), the `error` object of a failed event ([`EventError`])
//! and the final result of all attempts ([`CallOutcome`]).
//!
//! It sits below both `gewe`, which makes these, and `event`, which
//! writes them out, so neither reaches into the other.

use serde::{Deserialize, Serialize};

use crate::error_kind::ErrorKind;

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

/// How often a command went through the broker's delay queues before its
/// outcome: parked by `retry.park` (§4), deferred for its account (§7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tries {
    /// Times parked (`x-gewe-parked`).
    pub parked: u32,
    /// Times deferred (`x-gewe-deferred`).
    pub deferred: u32,
}

/// The final result of all attempts for one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallOutcome {
    /// The `v3` ticket, or the error of the last attempt (boxed: outcomes
    /// are kept in the dedupe store, and most of them are successes).
    pub result: Result<String, Box<EventError>>,
    /// Attempts actually made.
    pub attempts: u32,
}
