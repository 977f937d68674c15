//! Wiring: configuration in, a running worker (and its ops endpoint) out.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    breaker::Breaker,
    broker::Connector,
    config::Settings,
    gewe::{Backoff, GeweClient},
    idempotency::{Idempotency, LEASE_OVER_TIMEOUT},
    meters::meters,
    ops,
    pacing::{Pacer, SharedPacing},
    processor::{Parts, Processor},
    redact::Redactor,
    redis_client::RedisClient,
    worker::{self, Readiness},
};

/// Key prefix of the worker's state in Redis.
const REDIS_PREFIX: &str = "gewe-friend-worker";

/// A worker ready to run: configuration validated, HTTP client built, ops
/// port bound (so a busy port fails at start-up, not later).
pub struct Application {
    settings: Settings,
    connector: Connector,
    processor: Arc<Processor>,
    readiness: Arc<Readiness>,
    redis: Option<Arc<RedisClient>>,
    stop_calls: CancellationToken,
    ops_listener: TcpListener,
    ops_addr: SocketAddr,
}

impl Application {
    /// Builds everything that can fail before the first command.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Every metric exists from start-up, before the first command.
        let _ = meters();
        let token = settings.require_token()?;
        let redactor = Redactor::new(settings.secrets());
        let connector = Connector::new(&settings.amqp)?;
        let gewe = GeweClient::new(&settings.gewe.base_url, token, settings.gewe.timeout)?;
        let redis = match &settings.redis.url {
            Some(url) => Some(Arc::new(RedisClient::new(url)?)),
            None => None,
        };
        let idempotency = match &redis {
            // The lease outlasts one GeWe attempt, so no request outlives
            // the claim it was sent under.
            Some(client) => Idempotency::in_redis(
                client.clone(),
                REDIS_PREFIX,
                settings.dedupe.window,
                settings.gewe.timeout + LEASE_OVER_TIMEOUT,
            ),
            None => Idempotency::in_memory(settings.dedupe.window),
        };
        let pacing = redis
            .as_ref()
            .map(|client| SharedPacing::new(client.clone(), REDIS_PREFIX));
        let breaker = Arc::new(Breaker::new(&settings.breaker));
        // Cancelled when shutdown begins: no GeWe call starts after it.
        let stop_calls = CancellationToken::new();
        let processor = Arc::new(Processor::new(Parts {
            result_exchange: settings.amqp.result_exchange.clone(),
            gewe,
            backoff: Backoff::from(&settings.retry),
            pacer: Pacer::new(&settings.pacing, pacing),
            idempotency,
            breaker: breaker.clone(),
            redactor,
            shutdown: stop_calls.clone(),
            prefetch: settings.amqp.prefetch,
        }));
        let ops_listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("could not bind http.listen {}", settings.http.listen))?;
        let ops_addr = ops_listener.local_addr()?;
        Ok(Self {
            readiness: Arc::new(Readiness::new(breaker, redis.clone())),
            settings,
            connector,
            processor,
            redis,
            stop_calls,
            ops_listener,
            ops_addr,
        })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Runs until `shutdown` is cancelled and in-flight work is settled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ops_stop = CancellationToken::new();
        let ops = tokio::spawn(ops::serve(
            self.ops_listener,
            self.readiness.clone(),
            ops_stop.clone(),
        ));
        tracing::info!(ops = %self.ops_addr, gewe = %self.processor.gewe().url(), redis = self.redis.as_ref().map(|r| r.url()), "gewe-friend-worker starting");
        if self.settings.amqp.tls_unused() {
            tracing::warn!("amqp.tls is set but no URL in amqp.url is amqps://; it is not used");
        }
        if let Some(redis) = self.redis.clone() {
            let stop = ops_stop.clone();
            tokio::spawn(async move { redis.probe(stop).await });
        }
        // Command tasks see shutdown through the processor's own token, so
        // no GeWe call starts once it began.
        let stop_calls = self.stop_calls.clone();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            signal.cancelled().await;
            stop_calls.cancel();
        });
        let result = worker::run(
            &self.settings,
            &self.connector,
            self.processor,
            self.readiness,
            shutdown,
        )
        .await;
        ops_stop.cancel();
        let _ = ops.await;
        result.map_err(Into::into)
    }
}

/// Cancels the returned token on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the worker");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        trigger.cancel();
    });
    token
}
