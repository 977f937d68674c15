//! Typed, layered configuration (contract §2).
//!
//! Layers, later wins: built-in defaults → TOML file (`--config PATH` or
//! `GEWE_WORKER_CONFIG`) → `GEWE_WORKER__SECTION__KEY` environment variables.
//! Everything is validated once at start-up so that a bad value stops the
//! program with a message naming the key, instead of surfacing as a broker or
//! HTTP error at 3 a.m.

use std::{collections::HashMap, path::Path, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

mod accounts;
mod admin;
mod durations;
mod nodes;
mod redis;
mod secrets;
mod sections;
#[cfg(test)]
mod tests;
mod tls;

pub use accounts::{AccountOverride, AccountsSettings, ActiveHours};
pub use admin::{AdminSettings, MIN_ADMIN_TOKEN_CHARS};
pub use nodes::{broker_urls, url_password};
pub use redis::{DEFAULT_MASTER_NAME, RedisSettings, split_address};
pub use secrets::{redact_url_list, redact_url_password};
pub use sections::*;
pub use tls::TlsSettings;

/// Environment variable prefix for configuration overrides.
pub const ENV_PREFIX: &str = "GEWE_WORKER";
/// Environment variable naming the TOML configuration file.
pub const CONFIG_PATH_ENV: &str = "GEWE_WORKER_CONFIG";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong type; the message
    /// from `config` names the key. Only its text is kept, with the source
    /// lines that TOML errors quote removed and every secret value found in
    /// the layers masked: the offending line may hold a password.
    #[error("invalid configuration: {0}")]
    Load(String),
    /// A value parsed but is outside what the worker can work with.
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid {
        /// Dotted configuration key, e.g. `amqp.prefetch`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        Self::Load(secrets::error_text(&e, &[]))
    }
}

impl ConfigError {
    fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

/// The whole configuration of the worker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Broker connection and topology.
    pub amqp: AmqpSettings,
    /// The GeWe API.
    pub gewe: GeweSettings,
    /// Retries of transient GeWe failures.
    pub retry: RetrySettings,
    /// Per-account pacing of GeWe calls.
    pub pacing: PacingSettings,
    /// Idempotency window.
    pub dedupe: DedupeSettings,
    /// Optional shared state store.
    pub redis: RedisSettings,
    /// Circuit breaker on systemic failures.
    pub breaker: BreakerSettings,
    /// Ops HTTP endpoint.
    pub http: HttpSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// Log output.
    pub log: LogSettings,
    /// GeWe callbacks.
    pub callbacks: CallbacksSettings,
    /// Budgets per WeChat account (§7).
    pub accounts: AccountsSettings,
    /// The operator's console (off unless `admin.listen` is set).
    #[serde(default)]
    pub admin: AdminSettings,
    /// Trace export.
    pub telemetry: TelemetrySettings,
}

/// Shortest accepted `gewe.token`.
const MIN_TOKEN_CHARS: usize = 8;

/// Shortest `dedupe.window` (contract §2): a shorter one lets a late copy
/// of a command call GeWe again.
const MIN_DEDUPE_WINDOW: Duration = Duration::from_secs(3600);

/// Bounds of `callbacks.early_grace`: below the lower one a callback that
/// raced GeWe's answer gets too few tries to be matched; above the upper one
/// unknown callbacks circle through the delay queue for no use.
const EARLY_GRACE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(3600));

/// Shortest `callbacks.secret` (contract §2).
const MIN_CALLBACK_SECRET_CHARS: usize = 16;

/// Most delays `retry.park` may list.
const MAX_PARKS: usize = 20;

/// Built-in defaults, exactly as in the contract's table.
const DEFAULTS: &[(&str, &str)] = &[
    ("amqp.url", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    ("amqp.command_queue", "gewe.add_friend.commands"),
    ("amqp.result_exchange", "gewe.add_friend.results"),
    ("amqp.dead_letter_exchange", "gewe.add_friend.dlx"),
    ("amqp.dead_letter_queue", "gewe.add_friend.dead"),
    ("amqp.queue_type", "quorum"),
    ("amqp.declare", "true"),
    ("amqp.prefetch", "64"),
    ("amqp.delivery_limit", "10"),
    ("amqp.max_hold", "10m"),
    ("gewe.base_url", "http://api.geweapi.com"),
    ("gewe.timeout", "10s"),
    ("retry.max_attempts", "5"),
    ("retry.initial_delay", "500ms"),
    ("retry.max_delay", "30s"),
    ("retry.multiplier", "2.0"),
    ("retry.park", ""),
    ("pacing.per_app_concurrency", "1"),
    ("pacing.per_app_min_interval", "1s"),
    ("dedupe.window", "24h"),
    ("redis.master_name", DEFAULT_MASTER_NAME),
    ("breaker.failure_threshold", "10"),
    ("breaker.cooldown", "30s"),
    ("http.listen", "0.0.0.0:8080"),
    ("shutdown.grace", "30s"),
    ("callbacks.enabled", "false"),
    ("callbacks.exchange", "gewe.callbacks"),
    ("callbacks.queue", "gewe.add_friend.callbacks"),
    ("callbacks.match_window", "30d"),
    ("accounts.daily_limit", "0"),
    ("accounts.timezone", "Asia/Shanghai"),
    ("accounts.active_hours", ""),
    ("accounts.cooldown", "6h"),
    ("accounts.cooldown_on", "频繁"),
    ("accounts.max_wait", "7d"),
    ("callbacks.early_grace", "2m"),
    ("telemetry.sample_ratio", "1.0"),
    ("telemetry.service_name", "gewe-friend-worker"),
];

impl Settings {
    /// Loads defaults, then the optional TOML file, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, None)
    }

    /// Like [`Settings::load`], but reads environment overrides from `env`
    /// instead of the process environment when given (tests use this so they
    /// never mutate global state).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in DEFAULTS {
            builder = builder.set_default(*key, *value)?;
        }
        // Tables with only optional keys must exist for serde to build them.
        builder = builder.set_default("log", HashMap::<String, String>::new())?;
        if let Some(path) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(false)
            .source(env);
        let layers = builder.add_source(environment).build()?;
        let secrets = secrets::secret_values(&layers);
        let settings: Settings = layers
            .try_deserialize()
            .map_err(|e| ConfigError::Load(secrets::error_text(&e, &secrets)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every constraint the types alone do not express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.amqp;
        nodes::validate_urls(&a.url)?;
        a.tls.load()?;
        for (key, value) in [
            ("amqp.command_queue", &a.command_queue),
            ("amqp.result_exchange", &a.result_exchange),
            ("amqp.dead_letter_exchange", &a.dead_letter_exchange),
            ("amqp.dead_letter_queue", &a.dead_letter_queue),
            ("callbacks.exchange", &self.callbacks.exchange),
            ("callbacks.queue", &self.callbacks.queue),
        ] {
            if value.trim().is_empty() || value.len() > 255 {
                return Err(ConfigError::invalid(key, "must be 1..=255 characters"));
            }
        }
        // Its early delay queue, `<callbacks.queue>.early`, must fit too.
        if self.callbacks.queue.len() > 255 - ".early".len() {
            return Err(ConfigError::invalid(
                "callbacks.queue",
                "must be at most 249 characters (its delay queue adds `.early`)",
            ));
        }
        if a.prefetch == 0 {
            return Err(ConfigError::invalid(
                "amqp.prefetch",
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        if a.delivery_limit == 0 {
            return Err(ConfigError::invalid(
                "amqp.delivery_limit",
                "must be at least 1",
            ));
        }
        http_url("gewe.base_url", &self.gewe.base_url)?;
        if self.gewe.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "gewe.timeout",
                "must be greater than 0",
            ));
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "retry.max_attempts",
                "must be at least 1",
            ));
        }
        if r.max_delay < r.initial_delay {
            return Err(ConfigError::invalid(
                "retry.max_delay",
                "must not be smaller than retry.initial_delay",
            ));
        }
        if !r.multiplier.is_finite() || r.multiplier < 1.0 {
            return Err(ConfigError::invalid(
                "retry.multiplier",
                "must be a number >= 1.0",
            ));
        }
        if r.park.len() > MAX_PARKS {
            return Err(ConfigError::invalid(
                "retry.park",
                format!("may list at most {MAX_PARKS} delays"),
            ));
        }
        for delay in &r.park {
            if *delay < Duration::from_secs(1) || *delay > Duration::from_secs(7 * 24 * 3600) {
                return Err(ConfigError::invalid(
                    "retry.park",
                    "delays must be between 1s and 7days",
                ));
            }
            if delay_queue_name(&self.amqp.command_queue, *delay).len() > 255 {
                return Err(ConfigError::invalid(
                    "retry.park",
                    "makes a delay queue name longer than 255 bytes (shorten amqp.command_queue)",
                ));
            }
        }
        if self.dedupe.window < MIN_DEDUPE_WINDOW {
            return Err(ConfigError::invalid(
                "dedupe.window",
                "must be at least 1h: a shorter window lets a late copy of a command call GeWe again",
            ));
        }
        if self.pacing.per_app_concurrency == 0 {
            return Err(ConfigError::invalid(
                "pacing.per_app_concurrency",
                "must be at least 1",
            ));
        }
        if self.breaker.failure_threshold == 0 {
            return Err(ConfigError::invalid(
                "breaker.failure_threshold",
                "must be at least 1",
            ));
        }
        self.redis.validate()?;
        for (key, value, limit) in [
            ("gewe.timeout", self.gewe.timeout, 10 * 60),
            ("retry.initial_delay", r.initial_delay, 3600),
            ("retry.max_delay", r.max_delay, 3600),
            (
                "pacing.per_app_min_interval",
                self.pacing.per_app_min_interval,
                3600,
            ),
            ("dedupe.window", self.dedupe.window, 366 * 24 * 3600),
            ("breaker.cooldown", self.breaker.cooldown, 3600),
            ("shutdown.grace", self.shutdown.grace, 3600),
            (
                "callbacks.match_window",
                self.callbacks.match_window,
                366 * 24 * 3600,
            ),
        ] {
            let limit = Duration::from_secs(limit);
            if value > limit {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be at most {}", humantime::format_duration(limit)),
                ));
            }
        }
        if let Some(token) = &self.gewe.token {
            let token = token.expose_secret();
            if token.trim().is_empty() {
                return Err(ConfigError::invalid("gewe.token", "must not be empty"));
            }
            // Every text that leaves the worker has the token masked; a short
            // one would be masked inside unrelated words and numbers too.
            if token.chars().count() < MIN_TOKEN_CHARS {
                return Err(ConfigError::invalid(
                    "gewe.token",
                    format!(
                        "must be at least {MIN_TOKEN_CHARS} characters (GeWe's tokens are longer; a short one would be masked inside unrelated log text)"
                    ),
                ));
            }
        }
        self.validate_hold()?;
        self.accounts.validate()?;
        self.validate_callbacks()?;
        self.admin.validate()?;
        self.validate_telemetry()
    }

    /// `amqp.max_hold` must leave room for one GeWe attempt and stay far
    /// below any broker's `consumer_timeout`.
    fn validate_hold(&self) -> Result<(), ConfigError> {
        let hold = self.amqp.max_hold;
        if hold < Duration::from_secs(10) || hold > Duration::from_secs(12 * 3600) {
            return Err(ConfigError::invalid(
                "amqp.max_hold",
                "must be between 10s and 12h (and well below the broker's consumer_timeout, 30m by default)",
            ));
        }
        if hold <= self.gewe.timeout {
            return Err(ConfigError::invalid(
                "amqp.max_hold",
                "must be longer than gewe.timeout: a delivery is held at least while its GeWe call runs",
            ));
        }
        Ok(())
    }

    fn validate_telemetry(&self) -> Result<(), ConfigError> {
        let t = &self.telemetry;
        if let Some(endpoint) = &t.otlp_endpoint {
            // Spans go to its `/v1/traces`: a query would end up before it.
            if http_url("telemetry.otlp_endpoint", endpoint)?
                .query()
                .is_some()
            {
                return Err(ConfigError::invalid(
                    "telemetry.otlp_endpoint",
                    "must not have a query",
                ));
            }
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(ConfigError::invalid(
                "telemetry.sample_ratio",
                "must be a number from 0.0 to 1.0",
            ));
        }
        if t.service_name.trim().is_empty() {
            return Err(ConfigError::invalid(
                "telemetry.service_name",
                "must not be empty",
            ));
        }
        Ok(())
    }

    fn validate_callbacks(&self) -> Result<(), ConfigError> {
        let c = &self.callbacks;
        if c.match_window.is_zero() {
            return Err(ConfigError::invalid(
                "callbacks.match_window",
                "must be greater than 0",
            ));
        }
        let (shortest, longest) = EARLY_GRACE;
        if c.early_grace < shortest || c.early_grace > longest {
            return Err(ConfigError::invalid(
                "callbacks.early_grace",
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(shortest),
                    humantime::format_duration(longest)
                ),
            ));
        }
        match &c.secret {
            Some(secret) => {
                let secret = secret.expose_secret();
                let url_safe = |ch: char| ch.is_ascii_alphanumeric() || "._~-".contains(ch);
                if secret.chars().count() < MIN_CALLBACK_SECRET_CHARS
                    || !secret.chars().all(url_safe)
                {
                    return Err(ConfigError::invalid(
                        "callbacks.secret",
                        format!(
                            "must be at least {MIN_CALLBACK_SECRET_CHARS} characters from A-Z a-z 0-9 . _ ~ - (nothing a URL would escape)"
                        ),
                    ));
                }
            }
            None => {
                if let Some(listen) = c.listen
                    && !listen.ip().is_loopback()
                {
                    return Err(ConfigError::invalid(
                        "callbacks.secret",
                        format!(
                            "is required when callbacks.listen ({listen}) is not a loopback address: without it anyone who reaches the port can forge callbacks"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The token, required by `run`: a worker without it could only produce
    /// `unauthorized` events.
    pub fn require_token(&self) -> Result<&SecretString, ConfigError> {
        self.gewe.token.as_ref().ok_or_else(|| {
            ConfigError::invalid(
                "gewe.token",
                "is required (set it in the config file or GEWE_WORKER__GEWE__TOKEN)",
            )
        })
    }

    /// The effective configuration as pretty JSON, secrets redacted.
    pub fn redacted_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }
}

/// `value` of `key` as an http(s) URL.
fn http_url(key: &'static str, value: &str) -> Result<reqwest::Url, ConfigError> {
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
        Ok(_) => Err(ConfigError::invalid(key, "must be an http(s) URL")),
        Err(e) => Err(ConfigError::invalid(key, format!("is not a URL: {e}"))),
    }
}
