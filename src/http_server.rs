//! A small HTTP/1 server with limits, for the ports the worker listens on.
//!
//! `axum::serve` has no header-read timeout, no idle timeout and no
//! connection cap: a few hundred idle or slow-header connections can hold
//! descriptors for as long as they like and starve `/readyz`, so a liveness
//! probe restarts a healthy worker. Here every connection must send a whole
//! request head within [`Limits::header_read_timeout`] (hyper's timer also
//! applies it between keep-alive requests, which makes it the idle timeout
//! too), lives at most [`Limits::max_connection_age`], and at most
//! [`Limits::max_connections`] are open at once.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::limit::RequestBodyLimitLayer;

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time to send a request head, and the most a kept-alive connection
    /// may stay idle.
    pub header_read_timeout: Duration,
    /// Longest life of one connection, however busy.
    pub max_connection_age: Duration,
    /// Largest request body (413 beyond it).
    pub max_body_bytes: usize,
    /// Largest request head.
    pub max_head_bytes: usize,
}

/// Pause after a failed accept (out of descriptors, say), so the loop does
/// not spin while the condition lasts.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Time connections get to finish when the server stops.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` within `limits` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let router = router.layer(RequestBodyLimitLayer::new(limits.max_body_bytes));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut accept_failures: u64 = 0;
    loop {
        // The permit first: beyond the cap, connections stay unaccepted
        // and cost no descriptor of ours.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failures += 1;
                    // Once, then every 100th: a descriptor shortage can last.
                    if accept_failures % 100 == 1 {
                        tracing::warn!(error = %e, failures = accept_failures, "could not accept a connection");
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true)
                .max_buf_size(limits.max_head_bytes.max(8192))
                .max_headers(32);
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = tokio::time::sleep(limits.max_connection_age) => {}
                () = stop.cancelled() => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
        });
    }
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
}
