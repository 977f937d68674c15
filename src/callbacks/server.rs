//! An HTTP/1 listener fit to face the internet (GeWe's callbacks): a cap on
//! open connections, a deadline for a request's headers (which also closes
//! idle keep-alive connections), small header limits, a maximum connection
//! age, and an accept loop that survives running out of file descriptors.
//!
//! `axum::serve` has no timer, so hyper's header timeout would be off, and
//! no connection cap; hence this loop around hyper's own connection builder.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use std::sync::Arc;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and to start the next
    /// request on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// Age after which a connection is closed once its request is answered.
    pub max_age: Duration,
    /// Time open connections get to finish at shutdown.
    pub drain: Duration,
}

/// The callback endpoint's limits: GeWe sends small bodies from a few
/// connections; anything slower or wider is not GeWe.
pub const CALLBACK_LIMITS: Limits = Limits {
    max_connections: 256,
    header_read_timeout: Duration::from_secs(10),
    max_age: Duration::from_secs(120),
    drain: Duration::from_secs(15),
};

/// Largest request head (request line and headers) accepted, in bytes.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most headers a request may carry.
const MAX_HEADERS: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` within `limits` until `shutdown`, then lets
/// open connections finish their requests for up to `limits.drain`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    loop {
        // A slot first: at the cap, new connections wait in the backlog
        // instead of being accepted and starved.
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "could not accept a connection; retrying");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        let connection =
            builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            tokio::select! {
                done = connection.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "callback connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep(limits.max_age) => {}
                () = stop.cancelled() => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.drain, connection).await;
        });
    }
    connections.close();
    let _ = tokio::time::timeout(limits.drain, connections.wait()).await;
}
