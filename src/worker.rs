//! The consume loop and its supervisor.
//!
//! [`run`] keeps one [`Session`] alive at a time: it opens it, hands every
//! delivery to a task of the [`Processor`] (the broker's prefetch bounds how
//! many run at once), and when the session dies opens a new one after a
//! capped backoff. Shutdown is a [`CancellationToken`] passed in: on cancel
//! the consumer is cancelled, in-flight commands get `shutdown.grace` to
//! finish, and closing the connection hands whatever is left back to the
//! queue.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    broker::{Session, SessionError},
    config::Settings,
    processor::Processor,
};

/// First and largest pause between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Shared view of the worker's state, read by `/readyz`.
#[derive(Debug, Default)]
pub struct Readiness {
    consuming: AtomicBool,
}

impl Readiness {
    /// True while a session is open and consuming.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    fn set(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }
}

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The first session failed in a way reconnecting cannot fix.
    #[error(transparent)]
    Startup(SessionError),
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Runs the worker until `shutdown` is cancelled.
pub async fn run(
    settings: &Settings,
    processor: Arc<Processor>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let consumer_tag = format!("gewe-friend-worker-{}", uuid::Uuid::new_v4());
    let mut pause = RECONNECT_MIN;
    let mut started = false;
    while !shutdown.is_cancelled() {
        let opened = tokio::select! {
            () = shutdown.cancelled() => break,
            s = Session::open(&settings.amqp, &consumer_tag) => s,
        };
        match opened {
            Ok(session) => {
                if started {
                    metrics::counter!("broker_reconnects_total").increment(1);
                }
                started = true;
                pause = RECONNECT_MIN;
                tracing::info!(queue = %settings.amqp.command_queue, prefetch = settings.amqp.prefetch, "consuming commands");
                readiness.set(true);
                let end = consume(session, &processor, settings.shutdown.grace, &shutdown).await;
                readiness.set(false);
                match end {
                    SessionEnd::Shutdown => break,
                    SessionEnd::Lost(reason) => {
                        tracing::warn!(%reason, "broker session lost; reconnecting");
                    }
                }
            }
            Err(e) if !started && e.needs_operator() => return Err(WorkerError::Startup(e)),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "broker unavailable; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RECONNECT_MAX);
            }
        }
    }
    tracing::info!("worker stopped");
    Ok(())
}

async fn consume(
    mut session: Session,
    processor: &Arc<Processor>,
    grace: Duration,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let tasks = TaskTracker::new();
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => break SessionEnd::Shutdown,
            next = session.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(processor.clone().handle(delivery, session.publisher.clone()));
                }
                Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                None => break SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
            },
        }
    };
    tasks.close();
    if let SessionEnd::Shutdown = end {
        tracing::info!(
            in_flight = tasks.len(),
            grace_ms = grace.as_millis() as u64,
            "shutting down: no new commands, finishing in-flight ones"
        );
        if let Err(e) = session
            .consume_channel
            .basic_cancel(session.consumer.tag(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(error = %e, "could not cancel the consumer");
        }
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "grace period over; unfinished commands go back to the queue"
            );
        }
    }
    // Closing the connection returns every unacked delivery to the queue.
    if let Err(e) = session
        .connection
        .close(200, "worker session closed".into())
        .await
    {
        tracing::debug!(error = %e, "connection close");
    }
    end
}
