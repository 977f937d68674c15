//! The sections of the configuration, one struct each (contract §2).

use std::{net::SocketAddr, time::Duration};

use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize};

use super::{
    TlsSettings,
    secrets::{serialize_opt_url_redacted, serialize_secret, serialize_url_list_redacted},
};

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
    /// Broker URL, or the URLs of a cluster's nodes separated by commas;
    /// passwords are redacted when printed.
    #[serde(serialize_with = "serialize_url_list_redacted")]
    pub url: String,
    /// Private CA and client certificate for `amqps://` URLs.
    #[serde(default)]
    pub tls: TlsSettings,
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
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
}

impl AmqpSettings {
    /// `amqp.tls` is set but no node is reached over TLS: most likely an
    /// `amqp://` URL that should be `amqps://`.
    pub fn tls_unused(&self) -> bool {
        self.tls.is_set() && !super::broker_urls(&self.url).any(|u| u.starts_with("amqps://"))
    }
}

/// The environment variables that point another process at the same broker
/// and topology as `a` (used to start worker processes in tests and the
/// benchmark).
pub fn amqp_env(a: &AmqpSettings) -> Vec<(&'static str, String)> {
    let tls = [
        ("GEWE_WORKER__AMQP__TLS__CA_FILE", &a.tls.ca_file),
        (
            "GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE",
            &a.tls.client_cert_file,
        ),
        (
            "GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE",
            &a.tls.client_key_file,
        ),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v.as_ref()?.display().to_string())));
    let mut env = vec![
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
    ];
    env.extend(tls);
    env
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
    /// Delays to park a command in the broker for, one per try, when it
    /// ended `app_offline` or `upstream_unavailable`; empty: no parking.
    #[serde(default, with = "super::durations")]
    pub park: Vec<Duration>,
}

/// The delay queue `retry.park` puts a command of `command_queue` in for
/// `delay` (contract §4): `<command_queue>.park.<delay>`, the delay as
/// `1m`, `10m`, `1h30m`.
pub fn delay_queue_name(command_queue: &str, delay: Duration) -> String {
    format!("{command_queue}.park.{}", delay_label(delay))
}

/// The deferral queue for `delay` (contract §7): `<command_queue>.defer.1m`.
pub fn defer_queue_name(command_queue: &str, delay: Duration) -> String {
    format!("{command_queue}.defer.{}", delay_label(delay))
}

fn delay_label(delay: Duration) -> String {
    humantime::format_duration(delay)
        .to_string()
        .replace(' ', "")
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

/// `[callbacks]`: GeWe's friend-accepted callbacks (contract §6).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallbacksSettings {
    /// Consume callbacks and publish `add_friend.accepted` events.
    pub enabled: bool,
    /// Topic exchange callbacks are published to (routing key = `TypeName`).
    pub exchange: String,
    /// Queue the worker consumes callbacks from, bound with `ModContacts`.
    pub queue: String,
    /// Where `POST /gewe/callback` is served; off when unset.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Required as the query parameter `secret` when set; never printed.
    #[serde(default, serialize_with = "serialize_secret")]
    pub secret: Option<SecretString>,
    /// How long the `v3` of a succeeded command is kept for matching.
    #[serde(with = "humantime_serde")]
    pub match_window: Duration,
    /// How long a `ModContacts` callback whose `v3` is not known (or whose
    /// command's `succeeded` event is not confirmed) yet is tried again
    /// before it counts as unmatched.
    #[serde(with = "humantime_serde")]
    pub early_grace: Duration,
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

/// `[telemetry]`: OpenTelemetry trace export (contract §9).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP/HTTP endpoint (`http://host:4318`); spans are posted to its
    /// `/v1/traces`. Off when unset or empty. Printed without its password.
    #[serde(
        default,
        deserialize_with = "empty_as_none",
        serialize_with = "serialize_opt_url_redacted"
    )]
    pub otlp_endpoint: Option<String>,
    /// Share of the traces the worker starts itself that are recorded; a
    /// sampled `traceparent` from the publisher is always followed.
    pub sample_ratio: f64,
    /// OpenTelemetry `service.name`.
    pub service_name: String,
}

/// An empty value is no value, as with OpenTelemetry's own variables: an
/// empty `GEWE_WORKER__TELEMETRY__OTLP_ENDPOINT` turns export off (so a
/// compose file can default it and still let it be switched off).
fn empty_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|v| !v.trim().is_empty()))
}
