//! GeWe's friend-accepted callbacks (contract §6, `callbacks.*`).
//!
//! Three parts:
//! - remembering: once a `succeeded` event is confirmed, the processor
//!   hands it to [`Matcher::remember`], which keeps its `v3` for
//!   `callbacks.match_window` ([`store`]);
//! - matching: the worker consumes `callbacks.queue` in the same broker
//!   session as the commands (its own channel and prefetch), and
//!   [`Matcher::handle`] turns a `ModContacts` callback carrying a
//!   remembered `v3` of the same account into one `add_friend.accepted`
//!   event ([`consume`], [`accepted`], [`callback`]);
//! - receiving: with `callbacks.listen`, `POST /gewe/callback` publishes
//!   GeWe's callbacks to `callbacks.exchange` ([`ingress`], served by
//!   [`crate::http_server`] within [`ingress::LIMITS`]).

pub mod accepted;
pub mod callback;
mod consume;
pub mod ingress;
pub mod store;

use std::time::Duration;

pub use accepted::{AcceptedEvent, ROUTING_ACCEPTED};
pub use ingress::{Ingress, IngressLink};
pub use store::{MAX_REMEMBERED, Sent, Store};

use crate::{
    backoff::Backoff,
    command::Envelope,
    event::ResultEvent,
    halt::{Halt, Signal},
    redis_client::retry_while_unavailable,
};

/// Waits while Redis is unavailable.
const REDIS_BACKOFF: Backoff =
    Backoff::doubling(Duration::from_millis(100), Duration::from_secs(2));

/// Remembers the `v3` of succeeded commands and matches callbacks to
/// them, publishing an accepted event for each match.
pub struct Matcher {
    store: Store,
    result_exchange: String,
    /// Raised when shutdown begins.
    shutdown: Signal,
}

impl Matcher {
    /// Matching against `store`, publishing to `result_exchange`.
    pub fn new(store: Store, result_exchange: String, shutdown: Signal) -> Self {
        Self {
            store,
            result_exchange,
            shutdown,
        }
    }

    /// Remembers the `v3` of a confirmed `succeeded` event (other events are
    /// ignored). Called before the command is acked: a Redis outage is
    /// waited out until `halt` fires; then the `v3` is not remembered, but
    /// a redelivery (after a lost session) remembers it when it republishes.
    pub async fn remember(&self, event: &ResultEvent<'_>, envelope: &Envelope, halt: &Halt) {
        let Some(sent) = Sent::of(event, envelope) else {
            return;
        };
        let remembered = retry_while_unavailable(
            REDIS_BACKOFF,
            halt,
            "could not remember the v3 in Redis yet",
            || self.store.remember(&sent),
        )
        .await;
        if let Err(interrupted) = remembered {
            tracing::warn!(reason = %interrupted, "gave up remembering the v3: a callback for it will match nothing");
        }
    }
}
