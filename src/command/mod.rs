//! Command messages as they arrive (contract §3): the AMQP properties the
//! worker honours and the try counters it keeps in headers ([`Envelope`])
//! and the body ([`decode`]).
//!
//! Decoding never fails without telling what is wrong: every rejection is an
//! [`InvalidCommand`] whose text ends up in the `invalid_command` event, and
//! whatever could be read (ids, fields) is kept so the event can carry it.

mod decode;
mod envelope;

pub(crate) use decode::json_type;
pub use decode::{decode, resolve_command_id};
pub use envelope::{
    ATTEMPTS_HEADER, DEFERRED_HEADER, Envelope, FIRST_RECEIVED_HEADER, NextTry, PARKED_HEADER,
    with_tries,
};

/// Bodies above this size are refused before parsing: no real greeting comes
/// close, and parsing megabytes per message would let one publisher stall
/// the worker.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest accepted `commandId`, in characters.
pub const MAX_COMMAND_ID_CHARS: usize = 128;
/// Longest accepted `commandId` in UTF-8 bytes: it becomes the event's
/// `correlation_id`, an AMQP short string of at most 255 bytes.
pub const MAX_COMMAND_ID_BYTES: usize = 255;

/// A valid command, ready to be sent to GeWe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Idempotency key of the command.
    pub command_id: String,
    /// GeWe device id of the WeChat account.
    pub app_id: String,
    /// Group the member is in.
    pub chatroom_id: String,
    /// Member to add.
    pub member_wxid: String,
    /// Greeting sent with the request.
    pub content: String,
}

/// Why a message is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCommand {
    /// Body above [`MAX_BODY_BYTES`].
    #[error("body is {size} bytes, more than the {limit} allowed")]
    TooLarge {
        /// Body size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// Body is not UTF-8.
    #[error("body is not valid UTF-8")]
    NotUtf8,
    /// Body is not JSON.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// Body is JSON but not an object.
    #[error("body is JSON {0}, not an object")]
    NotAnObject(&'static str),
    /// A required field is absent (or null).
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    /// A field is present but not a string.
    #[error("field `{field}` must be a string, got {got}")]
    NotAString {
        /// Field name.
        field: &'static str,
        /// JSON type found.
        got: &'static str,
    },
    /// A required field is an empty or blank string.
    #[error("field `{0}` must not be empty")]
    Empty(&'static str),
    /// `commandId` longer than [`MAX_COMMAND_ID_CHARS`] characters or
    /// [`MAX_COMMAND_ID_BYTES`] bytes.
    #[error(
        "field `commandId` is longer than {MAX_COMMAND_ID_CHARS} characters or {MAX_COMMAND_ID_BYTES} bytes of UTF-8 (it becomes the event's AMQP correlation_id); this event carries it cut to that length"
    )]
    CommandIdTooLong,
}

impl Command {
    /// Its ids and request fields as an event carries them.
    pub fn partial(&self) -> Partial {
        Partial {
            command_id: self.command_id.clone(),
            app_id: Some(self.app_id.clone()),
            chatroom_id: Some(self.chatroom_id.clone()),
            member_wxid: Some(self.member_wxid.clone()),
        }
    }
}

/// What could be read from a rejected message, for its error event.
#[derive(Debug, Clone, Default)]
pub struct Partial {
    /// Best available id: the body's (cut to the limits when too long),
    /// else the envelope's (see [`resolve_command_id`]).
    pub command_id: String,
    /// `appId`, when it was a string.
    pub app_id: Option<String>,
    /// `chatroomId`, when it was a string.
    pub chatroom_id: Option<String>,
    /// `memberWxid`, when it was a string.
    pub member_wxid: Option<String>,
}

/// A message that is not a command: why, and what could be read of it.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Why it is not a command.
    pub reason: InvalidCommand,
    /// What could be read, for the error event.
    pub partial: Partial,
}
