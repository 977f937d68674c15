//! Wiring: configuration in, a running worker (and its ops endpoint) out.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    accounts::AccountDirectory,
    accounts::Accounts,
    admin::{self, Admin, dead_letters::DeadLetters, summary::Sources},
    breaker::Breaker,
    broker::{Connector, topology},
    callbacks::{self, Early, Ingress, IngressLink, Matcher, Store},
    config::{QueueType, Settings},
    gewe::{GeweClient, RetryPolicy},
    halt::Signal,
    http_server,
    idempotency::{Idempotency, LEASE_OVER_TIMEOUT},
    meters::meters,
    ops,
    pacing::Pacer,
    park::Parking,
    processor::{Parts, Processor},
    redact::Redactor,
    redis_client::RedisClient,
    resources,
    telemetry::{CommandTracer, Traces},
    worker::{self, CallbackParts, Readiness},
};

/// How long the spans still buffered at shutdown may take to export, after
/// the last command is settled.
const TRACE_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// Key prefix of the worker's state in Redis.
const REDIS_PREFIX: &str = "gewe-friend-worker";

/// A worker ready to run: configuration validated, HTTP client built, ops
/// port bound (so a busy port fails at start-up, not later).
pub struct Application {
    /// The account budgets, for the operator's console (§8).
    accounts: Arc<Accounts>,
    settings: Settings,
    connector: Connector,
    processor: Arc<Processor>,
    readiness: Arc<Readiness>,
    redis: Option<Arc<RedisClient>>,
    stop_calls: Signal,
    ops_listener: TcpListener,
    ops_addr: SocketAddr,
    callbacks: CallbackParts,
    /// `callbacks.listen`, bound, with the endpoint behind it.
    callback_endpoint: Option<(TcpListener, Arc<Ingress>)>,
    callback_addr: Option<SocketAddr>,
    /// `admin.listen`, bound, with the console behind it.
    admin: Option<(TcpListener, Arc<Admin>)>,
    admin_addr: Option<SocketAddr>,
    /// With `telemetry.otlp_endpoint`: the trace export.
    traces: Option<Traces>,
}

impl Application {
    /// Builds everything that can fail before the first command.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_accounts(settings, None).await
    }

    /// Like [`Application::build`], with the accounts the operator's
    /// console (`admin.listen`) shows and steers: `None` for the worker's
    /// own budget keeper (tests pass a directory of their own). This is the
    /// one place a directory reaches the console.
    pub async fn build_with_accounts(
        settings: Settings,
        directory: Option<Arc<dyn AccountDirectory>>,
    ) -> anyhow::Result<Self> {
        // Every metric exists from start-up, before the first command.
        let _ = meters();
        let token = settings.require_token()?;
        let redactor = Redactor::new(settings.secrets())?;
        let connector = Connector::new(&settings.amqp)?;
        let fd_limit = resources::fd_limit();
        let gewe = GeweClient::new(
            &settings.gewe.base_url,
            token,
            settings.gewe.timeout,
            max_idle_connections(settings.amqp.prefetch, fd_limit),
        )?;
        warn_if_descriptors_could_run_out(&settings, fd_limit);
        let redis = RedisClient::from_settings(&settings.redis)?.map(Arc::new);
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
        let accounts = Arc::new(
            Accounts::from_settings(&settings, redis.clone(), REDIS_PREFIX)
                .context("accounts.timezone")?,
        );
        let breaker = Arc::new(Breaker::new(&settings.breaker));
        // Raised when shutdown begins: no GeWe call starts after it.
        let stop_calls = Signal::new();
        let c = &settings.callbacks;
        let matcher = c.enabled.then(|| {
            let store = match &redis {
                Some(client) => Store::in_redis(client.clone(), REDIS_PREFIX, c.match_window),
                None => Store::in_memory(c.match_window),
            };
            let early = Early {
                queue: topology::early_queue_name(&c.queue),
                returns_to: c.queue.clone(),
                queue_type: settings.amqp.queue_type,
                grace: c.early_grace,
            };
            Arc::new(Matcher::new(
                store,
                settings.amqp.result_exchange.clone(),
                early,
                stop_calls.clone(),
            ))
        });
        let (callback_endpoint, callback_addr) = match c.listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("could not bind callbacks.listen {addr}"))?;
                let bound = listener.local_addr()?;
                let ingress = Ingress::new(
                    Arc::new(IngressLink::new()),
                    c.exchange.clone(),
                    c.secret.as_ref(),
                );
                (Some((listener, Arc::new(ingress))), Some(bound))
            }
            None => (None, None),
        };
        let traces = Traces::start(&settings.telemetry)?;
        let tracer = traces.as_ref().map(|traces| {
            CommandTracer::new(
                traces.tracer(),
                &settings.amqp.command_queue,
                &settings.amqp.result_exchange,
                gewe.url(),
            )
        });
        let processor = Arc::new(Processor::new(Parts {
            amqp: settings.amqp.clone(),
            gewe_timeout: settings.gewe.timeout,
            result_exchange: settings.amqp.result_exchange.clone(),
            gewe,
            retry: RetryPolicy::from(&settings.retry),
            pacer: Pacer::new(accounts.clone()),
            idempotency,
            breaker: breaker.clone(),
            parking: Parking::new(&settings.amqp.command_queue, &settings.retry.park),
            redactor,
            shutdown: stop_calls.clone(),
            prefetch: settings.amqp.prefetch,
            delivery_limit: (settings.amqp.queue_type == QueueType::Quorum)
                .then_some(settings.amqp.delivery_limit),
            matcher: matcher.clone(),
            tracer,
        }));
        let ops_listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("could not bind http.listen {}", settings.http.listen))?;
        let ops_addr = ops_listener.local_addr()?;
        let ingress_link = callback_endpoint.as_ref().map(|(_, i)| i.link());
        let readiness = Arc::new(Readiness::new(
            breaker.clone(),
            redis.clone(),
            ingress_link.clone(),
        ));
        let (admin, admin_addr) = match settings.admin.listen.zip(settings.admin.token.as_ref()) {
            Some((addr, token)) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("could not bind admin.listen {addr}"))?;
                let bound = listener.local_addr()?;
                let a = &settings.amqp;
                let dead_letters =
                    DeadLetters::new(Connector::new(a)?, &a.dead_letter_queue, &a.command_queue);
                let sources = Sources {
                    readiness: readiness.clone(),
                    breaker,
                    redis: redis.clone(),
                    command_queue: a.command_queue.clone(),
                    park: settings.retry.park.clone(),
                };
                // The accounts the console steers: the caller's (tests),
                // else the budget keeper's own.
                let directory =
                    directory.unwrap_or_else(|| accounts.clone() as Arc<dyn AccountDirectory>);
                let console = Admin::new(token, Some(directory), dead_letters, sources);
                (Some((listener, Arc::new(console))), Some(bound))
            }
            None => (None, None),
        };
        Ok(Self {
            accounts,
            readiness,
            settings,
            connector,
            processor,
            redis,
            stop_calls,
            ops_listener,
            ops_addr,
            callbacks: CallbackParts::new(matcher, ingress_link),
            callback_endpoint,
            callback_addr,
            admin,
            admin_addr,
            traces,
        })
    }

    /// The account budgets: what the console lists, pauses and resumes.
    pub fn accounts(&self) -> Arc<Accounts> {
        self.accounts.clone()
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Where `POST /gewe/callback` is served (`callbacks.listen`).
    pub fn callback_addr(&self) -> Option<SocketAddr> {
        self.callback_addr
    }

    /// Where the operator's console and its API are served (`admin.listen`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Runs until `shutdown` is cancelled and in-flight work is settled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ops_stop = CancellationToken::new();
        let ops = tokio::spawn(ops::serve(
            self.ops_listener,
            self.readiness.clone(),
            ops::limits(resources::fd_limit()),
            ops_stop.clone(),
        ));
        tracing::info!(ops = %self.ops_addr, gewe = %self.processor.gewe().url(), redis = self.redis.as_ref().map(|r| r.url()), callbacks = self.settings.callbacks.enabled, "gewe-friend-worker starting");
        if let Some(endpoint) = &self.settings.telemetry.otlp_endpoint {
            tracing::info!(
                endpoint = %crate::config::redact_url_password(endpoint),
                sample_ratio = self.settings.telemetry.sample_ratio,
                service_name = %self.settings.telemetry.service_name,
                "exporting traces over OTLP/HTTP"
            );
        }
        if self.settings.amqp.tls_unused() {
            tracing::warn!("amqp.tls is set but no URL in amqp.url is amqps://; it is not used");
        }
        let endpoint = self.callback_endpoint.map(|(listener, ingress)| {
            tracing::info!(addr = ?self.callback_addr, exchange = %self.settings.callbacks.exchange, "receiving GeWe callbacks on POST {}", callbacks::ingress::CALLBACK_PATH);
            tokio::spawn(http_server::serve(
                listener,
                callbacks::ingress::router(ingress),
                callbacks::ingress::LIMITS,
                // GeWe is answered until shutdown begins; then it sends
                // its callbacks to another replica or again later.
                shutdown.clone(),
            ))
        });
        // Served until the worker has stopped, like the ops port: an
        // operator can watch a shutdown from the console.
        let console = self.admin.map(|(listener, console)| {
            tracing::info!(addr = ?self.admin_addr, "operator's console listening");
            tokio::spawn(http_server::serve(
                listener,
                admin::router(console),
                admin::limits(resources::fd_limit()),
                ops_stop.clone(),
            ))
        });
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
            stop_calls.raise();
        });
        let result = worker::run(
            &self.settings,
            &self.connector,
            self.processor,
            self.callbacks,
            self.readiness,
            shutdown,
        )
        .await;
        ops_stop.cancel();
        let _ = ops.await;
        if let Some(console) = console {
            let _ = console.await;
        }
        if let Some(endpoint) = endpoint {
            let _ = endpoint.await;
        }
        if let Some(traces) = self.traces {
            traces.shutdown(TRACE_FLUSH).await;
        }
        result.map_err(Into::into)
    }
}

/// Descriptors the worker needs besides GeWe connections: the broker and
/// Redis connections, the runtime, logs, and a margin.
const BASE_DESCRIPTORS: u64 = 64;

/// Idle GeWe connections kept: one per command in flight, but never more
/// than a quarter of the descriptors.
fn max_idle_connections(prefetch: u16, fd_limit: Option<u64>) -> usize {
    let by_limit = fd_limit.map_or(usize::MAX, |l| usize::try_from(l / 4).unwrap_or(usize::MAX));
    usize::from(prefetch).min(by_limit).max(1)
}

/// Warns when the worker's own bounds could exceed the open-file limit:
/// then a local shortage, not GeWe, would slow it down.
fn warn_if_descriptors_could_run_out(settings: &Settings, fd_limit: Option<u64>) {
    let Some(limit) = fd_limit else { return };
    let ops_connections = ops::limits(fd_limit).max_connections;
    let callback_connections = settings
        .callbacks
        .listen
        .map_or(0, |_| callbacks::ingress::LIMITS.max_connections);
    let admin_connections = settings
        .admin
        .listen
        .map_or(0, |_| admin::limits(fd_limit).max_connections);
    let needed = u64::from(settings.amqp.prefetch)
        + (ops_connections + callback_connections + admin_connections) as u64
        + BASE_DESCRIPTORS;
    if needed > limit {
        tracing::warn!(
            limit,
            needed,
            prefetch = settings.amqp.prefetch,
            ops_connections,
            callback_connections,
            admin_connections,
            "the open-file limit may be too low: raise the hard limit (ulimit -n, LimitNOFILE) or lower amqp.prefetch"
        );
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
