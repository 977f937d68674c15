//! GeWe's friend-accepted callbacks (contract §6, `callbacks.*`).
//!
//! Three parts:
//! - remembering: once GeWe's answer is stored, before its `succeeded`
//!   event is published, the processor hands it to [`Matcher::expect`]
//!   (pending), and once that event is confirmed to [`Matcher::confirm`];
//!   the `v3` is kept for `callbacks.match_window` ([`store`]);
//! - matching: the worker consumes `callbacks.queue` in the same broker
//!   session as the commands (its own channel and prefetch), and
//!   [`Matcher::handle`] turns a `ModContacts` callback carrying a
//!   remembered `v3` of the same account into one `add_friend.accepted`
//!   event for each confirmed command with that `v3` ([`consume`],
//!   [`accepted`], [`callback`]); a callback whose `v3` is unknown or
//!   whose command is still pending goes through a delay queue and is
//!   tried again for `callbacks.early_grace` (`early`);
//! - receiving: with `callbacks.listen`, `POST /gewe/callback` publishes
//!   GeWe's callbacks to `callbacks.exchange` ([`ingress`], served by
//!   [`crate::http_server`] within [`ingress::LIMITS`]).

pub mod accepted;
pub mod callback;
mod consume;
mod early;
pub mod ingress;
mod refusals;
pub mod store;

use std::time::Duration;

pub use accepted::{AcceptedEvent, ROUTING_ACCEPTED};
pub use early::Early;
pub use ingress::{Ingress, IngressLink};
pub use store::{MAX_REMEMBERED, Phase, Sent, Store};

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
    /// Callbacks tried again while their `v3` is not known yet.
    early: Early,
    /// Raised when shutdown begins.
    shutdown: Signal,
}

impl Matcher {
    /// Matching against `store`, publishing to `result_exchange`, trying
    /// early callbacks again through `early`.
    pub fn new(store: Store, result_exchange: String, early: Early, shutdown: Signal) -> Self {
        Self {
            store,
            result_exchange,
            early,
            shutdown,
        }
    }

    /// GeWe's answer for `event`'s command is stored and its `succeeded`
    /// event is about to be published: a callback for its `v3` from now
    /// on waits for the confirm instead of counting as unmatched. Other
    /// events are ignored. A Redis outage is waited out until `halt`.
    pub async fn expect(&self, event: &ResultEvent<'_>, envelope: &Envelope, halt: &Halt) {
        self.remember(event, envelope, halt, Phase::Pending).await;
    }

    /// `event` was confirmed: its `v3` may now produce an accepted event.
    /// Called before the command is acked: a Redis outage is waited out
    /// until `halt` fires; then the command stays pending (a callback for
    /// it counts as unmatched after `callbacks.early_grace`), but a
    /// redelivery (after a lost session) confirms it when it republishes.
    pub async fn confirm(&self, event: &ResultEvent<'_>, envelope: &Envelope, halt: &Halt) {
        self.remember(event, envelope, halt, Phase::Confirmed).await;
    }

    async fn remember(
        &self,
        event: &ResultEvent<'_>,
        envelope: &Envelope,
        halt: &Halt,
        phase: Phase,
    ) {
        let Some(sent) = Sent::of(event, envelope) else {
            return;
        };
        let remembered = retry_while_unavailable(
            REDIS_BACKOFF,
            halt,
            "could not remember the v3 in Redis yet",
            || self.store.remember(&sent, phase),
        )
        .await;
        if let Err(interrupted) = remembered {
            tracing::warn!(reason = %interrupted, ?phase, "gave up remembering the v3: a callback for it may match nothing");
        }
    }
}
