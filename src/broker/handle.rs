//! A broker session as its deliveries see it ([`SessionHandle`]), and as
//! the consume loop that owns it does ([`SessionControl`]).
//!
//! A delivery may publish on the session's channel and, when that channel
//! broke, say so (only a new session can publish again). Declaring the
//! session lost, which ends the waits of every delivery in it, is the
//! consume loop's alone: it knows when the broker has taken the
//! deliveries back.

use std::sync::Arc;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::Publisher;
use crate::halt::{Halt, Signal};

/// The broker session a delivery belongs to; one per session, shared by
/// its deliveries (an `Arc` clone each, not a channel's and two tokens').
pub struct SessionHandle {
    /// Confirm-mode publishing channel.
    publisher: Publisher,
    /// Cancelled by a delivery that finds the publishing channel broken.
    broken: CancellationToken,
    /// Raised by the consume loop when the session is gone: the broker has
    /// already put its deliveries back.
    lost: Signal,
}

impl SessionHandle {
    /// The session's confirm-mode publishing channel.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The publishing channel failed in a way that closes it: the session
    /// ends, and the consume loop opens a new one.
    pub fn publishing_channel_broke(&self) {
        self.broken.cancel();
    }

    /// What ends a delivery's waits: `shutdown`, or this session being lost.
    pub fn halt(&self, shutdown: Signal) -> Halt {
        Halt::new(shutdown, self.lost.clone())
    }
}

/// The consume loop's side of a session: hands out [`SessionHandle`]s,
/// hears of a broken channel, and declares the session lost.
pub struct SessionControl {
    handle: Arc<SessionHandle>,
}

impl SessionControl {
    /// Control of a session publishing on `publisher`.
    pub fn new(publisher: Publisher) -> Self {
        Self {
            handle: Arc::new(SessionHandle {
                publisher,
                broken: CancellationToken::new(),
                lost: Signal::new(),
            }),
        }
    }

    /// The handle a delivery of this session gets.
    pub fn handle(&self) -> Arc<SessionHandle> {
        self.handle.clone()
    }

    /// Resolves once a delivery reported the publishing channel broken.
    pub fn broken(&self) -> WaitForCancellationFuture<'_> {
        self.handle.broken.cancelled()
    }

    /// The session is gone: every wait of its deliveries ends now.
    pub fn lose(&self) {
        self.handle.lost.raise();
    }
}
