//! The consume loop and its supervisor.
//!
//! [`run`] keeps one [`Session`] alive at a time: it opens it, hands every
//! delivery to a task of the [`Processor`] (the broker's prefetch bounds how
//! many are delivered at once), every callback (with `callbacks.enabled`)
//! to a task of [`Matcher`], lends the session to the callback endpoint,
//! and when the session dies (declaring it lost to its deliveries through
//! [`SessionControl`]) opens a new one after a capped backoff. Shutdown is
//! a [`CancellationToken`] passed in: on cancel the consumer is cancelled,
//! in-flight commands get `shutdown.grace` to finish, and closing the
//! connection hands whatever is left back to the queue.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    backoff::Backoff,
    breaker::{self, Breaker},
    broker::{
        Connector, Session, SessionControl, SessionError,
        session::{CALLBACK_PREFETCH, Next},
    },
    callbacks::{IngressLink, Matcher},
    config::Settings,
    meters::meters,
    processor::Processor,
    redis_client::RedisClient,
};

/// Pauses between rounds of reconnection attempts: 200 ms, doubling up
/// to 10 s.
const RECONNECT_BACKOFF: Backoff =
    Backoff::doubling(Duration::from_millis(200), Duration::from_secs(10));
/// A session that lived this long resets the reconnect backoff; one that
/// died sooner keeps it growing, so a flapping broker is not hammered.
const HEALTHY_SESSION: Duration = Duration::from_secs(5);
/// Bound on broker calls during shutdown, so a blocked broker cannot hold
/// the process past its termination grace period.
const BROKER_CALL_LIMIT: Duration = Duration::from_secs(5);

/// Shared view of the worker's state, read by `/readyz`.
pub struct Readiness {
    consuming: AtomicBool,
    stopping: AtomicBool,
    breaker: Arc<Breaker>,
    redis: Option<Arc<RedisClient>>,
    /// The callback endpoint's link (`callbacks.listen`).
    ingress: Option<Arc<IngressLink>>,
}

impl Readiness {
    /// Readiness that also reflects `breaker`, when configured Redis
    /// (without it every command is held) and, with `callbacks.listen`,
    /// the callback endpoint's link: a replica whose endpoint has no
    /// session refuses every callback, so nothing may route GeWe to it.
    pub fn new(
        breaker: Arc<Breaker>,
        redis: Option<Arc<RedisClient>>,
        ingress: Option<Arc<IngressLink>>,
    ) -> Self {
        Self {
            consuming: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            breaker,
            redis,
            ingress,
        }
    }

    /// `None` when ready; otherwise a short reason.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.stopping.load(Ordering::Relaxed) {
            return Some("shutting down".to_owned());
        }
        if !self.consuming.load(Ordering::Relaxed) {
            return Some("not consuming: broker unavailable".to_owned());
        }
        // Consuming is set before `consume` hands the session to the
        // endpoint: without this check a worker whose endpoint still
        // answers 503 "no broker session" would report itself ready.
        if self
            .ingress
            .as_ref()
            .is_some_and(|link| !link.is_attached())
        {
            return Some("callback endpoint has no broker session yet".to_owned());
        }
        if let Some(reason) = self.redis.as_ref().and_then(|r| r.unhealthy_reason()) {
            return Some(format!("redis unavailable, commands are held: {reason}"));
        }
        match self.breaker.state() {
            breaker::State::Closed => None,
            breaker::State::Open | breaker::State::HalfOpen => {
                Some("circuit breaker open: GeWe keeps failing".to_owned())
            }
        }
    }

    /// Whether a broker session is up and consuming (the console's broker
    /// state).
    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    fn set_consuming(&self, consuming: bool) {
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

/// The callbacks side of every session.
#[derive(Clone, Default)]
pub struct CallbackParts {
    /// Handles callbacks from `callbacks.queue` (`callbacks.enabled`).
    matcher: Option<Arc<Matcher>>,
    /// The callback endpoint's view of the session (`callbacks.listen`).
    ingress: Option<Arc<IngressLink>>,
}

impl CallbackParts {
    /// Sessions hand their callbacks to `matcher` (with
    /// `callbacks.enabled`) and lend themselves to the endpoint's `ingress`
    /// link (with `callbacks.listen`).
    pub fn new(matcher: Option<Arc<Matcher>>, ingress: Option<Arc<IngressLink>>) -> Self {
        Self { matcher, ingress }
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Runs the worker until `shutdown` is cancelled.
///
/// With several nodes in `amqp.url`, each round tries them in turn, starting
/// with the one after the node whose session was lost (the first node at
/// start-up); the reconnect backoff applies only once a whole round failed.
pub async fn run(
    settings: &Settings,
    connector: &Connector,
    processor: Arc<Processor>,
    callbacks: CallbackParts,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let consumer_tag = format!("gewe-friend-worker-{}", uuid::Uuid::new_v4());
    // Tasks of every session, so shutdown waits for those of a lost session too.
    let tasks = TaskTracker::new();
    // One grace period for the whole shutdown, set when it begins.
    let stop_deadline = OnceLock::new();
    let mut pauses = RECONNECT_BACKOFF.waits();
    let mut started = false;
    // The node each round starts with.
    let mut first = 0;
    'rounds: while !shutdown.is_cancelled() {
        let mut every_node_failed = true;
        for node in (first..first + connector.len()).map(|i| i % connector.len()) {
            let opened = tokio::select! {
                () = shutdown.cancelled() => break 'rounds,
                s = Session::open(connector, node, settings, &consumer_tag) => s,
            };
            let session = match opened {
                Ok(session) => session,
                Err(e) if !started && e.needs_operator() => return Err(WorkerError::Startup(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "broker node unavailable");
                    continue;
                }
            };
            if started {
                meters().broker_reconnects.increment(1);
            }
            started = true;
            tracing::info!(node = connector.shown(node), queue = %settings.amqp.command_queue, prefetch = settings.amqp.prefetch, "consuming commands");
            if settings.callbacks.enabled {
                tracing::info!(queue = %settings.callbacks.queue, prefetch = CALLBACK_PREFETCH, "consuming callbacks");
            }
            // Opened before consuming is set; readiness also waits for
            // `consume` to attach it (see `Readiness`), so a ready
            // worker's endpoint publishes.
            let ingress_connection = match &callbacks.ingress {
                Some(_) => ingress_connection(connector, node, &consumer_tag).await,
                None => None,
            };
            readiness.set_consuming(true);
            let opened_at = tokio::time::Instant::now();
            let end = consume(
                session,
                Handlers {
                    commands: &processor,
                    callbacks: &callbacks,
                    ingress_connection,
                },
                &tasks,
                &readiness,
                settings.shutdown.grace,
                &shutdown,
                &stop_deadline,
            )
            .await;
            let SessionEnd::Lost(reason) = end else {
                break 'rounds;
            };
            first = node + 1;
            if opened_at.elapsed() >= HEALTHY_SESSION {
                // The others are tried right away, this node last.
                pauses.reset();
                tracing::warn!(node = connector.shown(node), %reason, "broker session lost; reconnecting");
                continue 'rounds;
            }
            // A session that died young ends the round with a backoff, so
            // a flapping node is not hammered.
            tracing::warn!(node = connector.shown(node), %reason, retry_in_ms = pauses.peek().as_millis() as u64, "broker session lost soon after it opened; reconnecting");
            every_node_failed = false;
            break;
        }
        if every_node_failed {
            tracing::warn!(
                nodes = connector.len(),
                retry_in_ms = pauses.peek().as_millis() as u64,
                "no broker node answered; retrying"
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(pauses.next_wait()) => {}
        }
    }
    readiness.stopping.store(true, Ordering::Relaxed);
    readiness.set_consuming(false);
    tasks.close();
    if !tasks.is_empty() {
        // Tasks of lost sessions: their deliveries are already back in the
        // queue; let them finish their GeWe calls (so outcomes get stored)
        // within what is left of the grace period.
        let deadline = *stop_deadline.get_or_init(|| Instant::now() + settings.shutdown.grace);
        let _ = tokio::time::timeout_at(deadline, tasks.wait()).await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Where a session's deliveries go.
struct Handlers<'a> {
    commands: &'a Arc<Processor>,
    callbacks: &'a CallbackParts,
    /// The callback endpoint's own connection for this session.
    ingress_connection: Option<lapin::Connection>,
}

/// A connection of the callback endpoint's own to `node`; `None` (the
/// endpoint then shares the session's) when it cannot be opened.
async fn ingress_connection(
    connector: &Connector,
    node: usize,
    consumer_tag: &str,
) -> Option<lapin::Connection> {
    let properties = lapin::ConnectionProperties::default()
        .with_connection_name(format!("gewe-friend-worker {consumer_tag} callbacks").into());
    match connector.connect(node, properties).await {
        Ok(connection) => Some(connection),
        Err(e) => {
            tracing::warn!(error = %e, "could not open the callback endpoint's own connection; it shares the session's");
            None
        }
    }
}

async fn consume(
    mut session: Session,
    Handlers {
        commands,
        callbacks,
        ingress_connection,
    }: Handlers<'_>,
    all_tasks: &TaskTracker,
    readiness: &Readiness,
    grace: Duration,
    shutdown: &CancellationToken,
    stop_deadline: &OnceLock<Instant>,
) -> SessionEnd {
    let tasks = TaskTracker::new();
    let control = SessionControl::new(session.publisher().clone());
    if let Some(link) = &callbacks.ingress {
        link.attach(session.connection(), ingress_connection).await;
    }
    // Made once, not per delivery: each one registers a waiter with its
    // token when first polled and takes it out again when dropped.
    let stopping = shutdown.cancelled();
    let broken = control.broken();
    tokio::pin!(stopping, broken);
    let end = loop {
        tokio::select! {
            () = &mut stopping => break SessionEnd::Shutdown,
            () = &mut broken => break SessionEnd::Lost("the publishing channel failed".to_owned()),
            next = session.next() => match next {
                Next::Command(Ok(delivery)) => {
                    let work = commands.clone().handle(delivery, control.handle());
                    // Boxed so spawning moves a pointer, not the whole state machine.
                    all_tasks.spawn(tasks.track_future(Box::pin(work)));
                }
                Next::Callback(Ok(delivery)) => match &callbacks.matcher {
                    Some(matcher) => {
                        let work = matcher.clone().handle(delivery, control.handle());
                        all_tasks.spawn(tasks.track_future(Box::pin(work)));
                    }
                    // Not consumed without a matcher; left unacked, the
                    // broker takes it back with the session.
                    None => tracing::error!("a callback arrived but callbacks are not enabled"),
                },
                Next::Command(Err(e)) | Next::Callback(Err(e)) => break SessionEnd::Lost(e.to_string()),
                Next::Cancelled(why) => break SessionEnd::Lost(why.to_owned()),
            },
        }
    };
    // Not ready before the endpoint is detached, so nothing routes a
    // callback to it while it refuses them.
    readiness.set_consuming(false);
    if let Some(link) = &callbacks.ingress {
        link.detach().await;
    }
    tasks.close();
    match &end {
        SessionEnd::Lost(_) => {
            // The broker puts this session's deliveries back: their waits
            // end now (pacing turns and claims go to the redeliveries),
            // while GeWe calls already sent finish and store their answer.
            control.lose();
        }
        SessionEnd::Shutdown => {
            let deadline = *stop_deadline.get_or_init(|| Instant::now() + grace);
            readiness.stopping.store(true, Ordering::Relaxed);
            tracing::info!(
                in_flight = tasks.len(),
                grace_ms = grace.as_millis() as u64,
                "shutting down: no new commands, finishing in-flight ones"
            );
            match tokio::time::timeout(BROKER_CALL_LIMIT, session.cancel_consumer()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not cancel the consumer"),
                Err(_) => tracing::warn!("cancelling the consumer timed out"),
            }
            if session.is_connected()
                && !tasks.is_empty()
                && tokio::time::timeout_at(deadline, tasks.wait())
                    .await
                    .is_err()
            {
                tracing::warn!(
                    left = tasks.len(),
                    "grace period over; unfinished commands go back to the queue"
                );
            }
            control.lose();
        }
    }
    // Closing the connection returns every unacked delivery to the queue.
    if let Ok(Err(e)) = tokio::time::timeout(BROKER_CALL_LIMIT, session.close()).await {
        tracing::debug!(error = %e, "connection close");
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerSettings;

    fn readiness(ingress: Option<Arc<IngressLink>>) -> Readiness {
        let breaker = Arc::new(Breaker::new(&BreakerSettings {
            failure_threshold: 10,
            cooldown: Duration::from_secs(30),
        }));
        Readiness::new(breaker, None, ingress)
    }

    #[test]
    fn a_worker_whose_callback_endpoint_has_no_session_is_not_ready() {
        // Consuming, but the session has not reached the endpoint (or has
        // left it): the endpoint answers 503, so the worker is not ready.
        let with_endpoint = readiness(Some(Arc::new(IngressLink::new())));
        with_endpoint.set_consuming(true);
        let reason = with_endpoint.not_ready_reason();
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.contains("callback endpoint")),
            "{reason:?}"
        );
        assert!(with_endpoint.consuming(), "the console's broker state");

        let without_endpoint = readiness(None);
        without_endpoint.set_consuming(true);
        assert_eq!(without_endpoint.not_ready_reason(), None);
    }
}
