//! Typed, layered configuration (contract §2).
//!
//! Layers, later wins: built-in defaults → TOML file (`--config PATH` or
//! `GEWE_WORKER_CONFIG`) → `GEWE_WORKER__SECTION__KEY` environment variables.
//! Everything is validated once at start-up so that a bad value stops the
//! program with a message naming the key, instead of surfacing as a broker or
//! HTTP error at 3 a.m.

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// Environment variable prefix for configuration overrides.
pub const ENV_PREFIX: &str = "GEWE_WORKER";
/// Environment variable naming the TOML configuration file.
pub const CONFIG_PATH_ENV: &str = "GEWE_WORKER_CONFIG";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong type; the message
    /// from `config` names the key.
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but is outside what the worker can work with.
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid {
        /// Dotted configuration key, e.g. `amqp.prefetch`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
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
}

/// Type of the command queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated quorum queue (supports `x-delivery-limit`).
    Quorum,
    /// Classic queue.
    Classic,
}

/// `[amqp]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL; may carry a password, so it is redacted when printed.
    #[serde(serialize_with = "serialize_url_redacted")]
    pub url: String,
    /// Queue the worker consumes.
    pub command_queue: String,
    /// Topic exchange results are published to.
    pub result_exchange: String,
    /// Exchange unprocessable commands are dead-lettered to.
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Type of the command queue.
    pub queue_type: QueueType,
    /// Declare the topology at start-up and after reconnects.
    pub declare: bool,
    /// Unacknowledged commands held (and processed) at once.
    pub prefetch: u16,
    /// Quorum `x-delivery-limit`.
    pub delivery_limit: u32,
}

/// `[gewe]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeweSettings {
    /// GeWe server, e.g. `http://api.geweapi.com`.
    pub base_url: String,
    /// `X-GEWE-TOKEN`; required by `run`.
    #[serde(default, serialize_with = "serialize_secret")]
    pub token: Option<SecretString>,
    /// Timeout of one HTTP attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts per command, the first included.
    pub max_attempts: u32,
    /// First backoff.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Cap of one backoff (and of an honoured `Retry-After`).
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Growth of the backoff between attempts.
    pub multiplier: f64,
}

/// `[pacing]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PacingSettings {
    /// GeWe calls in flight at once for one `appId`.
    pub per_app_concurrency: u32,
    /// Least time between the starts of two calls for one `appId`.
    #[serde(with = "humantime_serde")]
    pub per_app_min_interval: Duration,
}

/// `[dedupe]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeSettings {
    /// How long a known outcome suppresses new GeWe calls for its commandId.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Shared store for dedupe and pacing state.
    #[serde(default, serialize_with = "serialize_opt_url_redacted")]
    pub url: Option<String>,
}

/// `[breaker]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive systemic failures that open the breaker.
    pub failure_threshold: u32,
    /// Pause before a probe command is let through.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the ops endpoint.
    pub listen: SocketAddr,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// Time to finish in-flight commands on SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (default when stdout is not a terminal).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Unset means: `json` unless stdout is a terminal.
    #[serde(default)]
    pub format: Option<LogFormat>,
}

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
    ("gewe.base_url", "http://api.geweapi.com"),
    ("gewe.timeout", "10s"),
    ("retry.max_attempts", "5"),
    ("retry.initial_delay", "500ms"),
    ("retry.max_delay", "30s"),
    ("retry.multiplier", "2.0"),
    ("pacing.per_app_concurrency", "1"),
    ("pacing.per_app_min_interval", "1s"),
    ("dedupe.window", "24h"),
    ("breaker.failure_threshold", "10"),
    ("breaker.cooldown", "30s"),
    ("http.listen", "0.0.0.0:8080"),
    ("shutdown.grace", "30s"),
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
        builder = builder
            .set_default("redis", HashMap::<String, String>::new())?
            .set_default("log", HashMap::<String, String>::new())?;
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
        let settings: Settings = builder.add_source(environment).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every constraint the types alone do not express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.amqp;
        match a.url.parse::<lapin::uri::AMQPUri>() {
            Ok(_) => {}
            Err(e) => {
                return Err(ConfigError::invalid(
                    "amqp.url",
                    format!("is not an AMQP URL: {e}"),
                ));
            }
        }
        for (key, value) in [
            ("amqp.command_queue", &a.command_queue),
            ("amqp.result_exchange", &a.result_exchange),
            ("amqp.dead_letter_exchange", &a.dead_letter_exchange),
            ("amqp.dead_letter_queue", &a.dead_letter_queue),
        ] {
            if value.trim().is_empty() || value.len() > 255 {
                return Err(ConfigError::invalid(key, "must be 1..=255 characters"));
            }
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
        match reqwest::Url::parse(&self.gewe.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            Ok(_) => {
                return Err(ConfigError::invalid(
                    "gewe.base_url",
                    "must be an http(s) URL",
                ));
            }
            Err(e) => {
                return Err(ConfigError::invalid(
                    "gewe.base_url",
                    format!("is not a URL: {e}"),
                ));
            }
        }
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
        if let Some(url) = &self.redis.url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "redis" | "rediss") => {}
                _ => {
                    return Err(ConfigError::invalid(
                        "redis.url",
                        "must be a redis:// or rediss:// URL",
                    ));
                }
            }
        }
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
        ] {
            let limit = Duration::from_secs(limit);
            if value > limit {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be at most {}", humantime::format_duration(limit)),
                ));
            }
        }
        if let Some(token) = &self.gewe.token
            && token.expose_secret().trim().is_empty()
        {
            return Err(ConfigError::invalid("gewe.token", "must not be empty"));
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

fn serialize_secret<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

fn serialize_url_redacted<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url_password(v))
}

fn serialize_opt_url_redacted<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(url) => s.serialize_str(&redact_url_password(url)),
        None => s.serialize_none(),
    }
}

/// The environment variables that point another process at the same broker
/// and topology as `a` (used to start worker processes in tests and the
/// benchmark).
pub fn amqp_env(a: &AmqpSettings) -> [(&'static str, String); 5] {
    [
        ("GEWE_WORKER__AMQP__URL", a.url.clone()),
        ("GEWE_WORKER__AMQP__COMMAND_QUEUE", a.command_queue.clone()),
        (
            "GEWE_WORKER__AMQP__RESULT_EXCHANGE",
            a.result_exchange.clone(),
        ),
        (
            "GEWE_WORKER__AMQP__DEAD_LETTER_EXCHANGE",
            a.dead_letter_exchange.clone(),
        ),
        (
            "GEWE_WORKER__AMQP__DEAD_LETTER_QUEUE",
            a.dead_letter_queue.clone(),
        ),
    ]
}

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::load_from(None, env(&[])).expect("defaults are valid");
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.amqp.command_queue, "gewe.add_friend.commands");
        assert_eq!(s.amqp.queue_type, QueueType::Quorum);
        assert_eq!(s.amqp.prefetch, 64);
        assert_eq!(s.amqp.delivery_limit, 10);
        assert_eq!(s.retry.initial_delay, Duration::from_millis(500));
        assert_eq!(s.retry.max_delay, Duration::from_secs(30));
        assert_eq!(s.pacing.per_app_min_interval, Duration::from_secs(1));
        assert_eq!(s.dedupe.window, Duration::from_secs(24 * 3600));
        assert_eq!(s.http.listen.port(), 8080);
        assert!(s.gewe.token.is_none());
        assert!(s.require_token().is_err());
    }

    #[test]
    fn env_overrides_file_and_durations_are_human() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "[amqp]\nprefetch = 8\nqueue_type = \"classic\"\n[retry]\ninitial_delay = \"2s\"\n",
        )
        .expect("write");
        let s = Settings::load_from(
            Some(&path),
            env(&[
                ("GEWE_WORKER__AMQP__PREFETCH", "16"),
                ("GEWE_WORKER__AMQP__COMMAND_QUEUE", "q1"),
                ("GEWE_WORKER__GEWE__TOKEN", "tok"),
            ]),
        )
        .expect("valid");
        assert_eq!(s.amqp.prefetch, 16);
        assert_eq!(s.amqp.queue_type, QueueType::Classic);
        assert_eq!(s.amqp.command_queue, "q1");
        assert_eq!(s.retry.initial_delay, Duration::from_secs(2));
        assert_eq!(
            s.require_token().map(|t| t.expose_secret().to_owned()).ok(),
            Some("tok".into())
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (var, value, key) in [
            ("GEWE_WORKER__AMQP__PREFETCH", "abc", "amqp.prefetch"),
            ("GEWE_WORKER__AMQP__PREFETCH", "0", "amqp.prefetch"),
            (
                "GEWE_WORKER__RETRY__INITIAL_DELAY",
                "soon",
                "retry.initial_delay",
            ),
            ("GEWE_WORKER__AMQP__QUEUE_TYPE", "stream", "amqp.queue_type"),
            ("GEWE_WORKER__RETRY__MULTIPLIER", "0.5", "retry.multiplier"),
            ("GEWE_WORKER__GEWE__BASE_URL", "not a url", "gewe.base_url"),
            ("GEWE_WORKER__AMQP__URL", "http://x", "amqp.url"),
            ("GEWE_WORKER__HTTP__LISTEN", "nowhere", "http.listen"),
            ("GEWE_WORKER__DEDUPE__WINDOW", "2000years", "dedupe.window"),
            (
                "GEWE_WORKER__PACING__PER_APP_MIN_INTERVAL",
                "100000years",
                "pacing.per_app_min_interval",
            ),
            ("GEWE_WORKER__REDIS__URL", "http://redis", "redis.url"),
        ] {
            let err = Settings::load_from(None, env(&[(var, value)]))
                .expect_err(&format!("{var}={value} must be rejected"))
                .to_string();
            assert!(
                err.contains(key),
                "{var}={value}: {err:?} does not name {key}"
            );
        }
    }

    #[test]
    fn printed_config_hides_secrets() {
        let s = Settings::load_from(
            None,
            env(&[
                ("GEWE_WORKER__GEWE__TOKEN", "s3cr3t-token"),
                ("GEWE_WORKER__AMQP__URL", "amqp://u:hunter2@h:5672/%2f"),
            ]),
        )
        .expect("valid");
        let printed = s.redacted_json();
        assert!(!printed.contains("s3cr3t-token"));
        assert!(!printed.contains("hunter2"));
        assert!(printed.contains("amqp://u:***@h:5672/%2f"));
        assert!(!format!("{s:?}").contains("s3cr3t-token"));
    }
}
