//! `GET /api/summary` (contract §8): the worker's state at a glance, from
//! what it already knows (readiness, breaker, Redis health, its own
//! counters) and the broker's queue depths (passive declares).

use std::{sync::Arc, time::Duration};

use serde::Serialize;

use super::dead_letters::DeadLetters;
use crate::{
    breaker::{self, Breaker},
    config::{defer_queue_name, delay_queue_name},
    defer::DEFER_DELAYS,
    meters,
    redis_client::RedisClient,
    worker::Readiness,
};

/// What the summary reads from.
pub struct Sources {
    /// Broker session and overall readiness.
    pub readiness: Arc<Readiness>,
    /// The circuit breaker.
    pub breaker: Arc<Breaker>,
    /// Redis, when configured.
    pub redis: Option<Arc<RedisClient>>,
    /// `amqp.command_queue`, whose delay queues are counted.
    pub command_queue: String,
    /// `retry.park`.
    pub park: Vec<Duration>,
}

/// One delay queue's depth.
#[derive(Debug, Clone, Serialize)]
pub struct DelayQueue {
    /// Its name.
    pub queue: String,
    /// Its delay, e.g. `10m`.
    pub delay: String,
    /// Messages waiting in it; `null` when it does not exist or the broker
    /// did not answer.
    pub messages: Option<u32>,
}

/// The summary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// `connected` while a broker session consumes, else `disconnected`.
    pub broker: &'static str,
    /// `off` (no `redis.url`), `ok` or `unavailable`.
    pub redis: &'static str,
    /// Why Redis is unavailable.
    pub redis_error: Option<String>,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Why `/readyz` would answer 503, when it would.
    pub not_ready: Option<String>,
    /// Result events confirmed since start, by status (`succeeded`,
    /// `accepted`) or error kind.
    pub outcomes: serde_json::Map<String, serde_json::Value>,
    /// Commands being processed now.
    pub in_flight: u64,
    /// `retry.park`'s queues.
    pub parked: Vec<DelayQueue>,
    /// The deferral queues (§7).
    pub deferred: Vec<DelayQueue>,
    /// Messages in `amqp.dead_letter_queue`; `null` when unknown.
    pub dead_letters: Option<u32>,
    /// Why queue depths could not be read, when they could not.
    pub broker_error: Option<String>,
}

/// Reads the summary.
pub async fn read(sources: &Sources, dead_letters: &DeadLetters) -> Summary {
    let redis_error = sources.redis.as_ref().and_then(|r| r.unhealthy_reason());
    let redis = match (&sources.redis, &redis_error) {
        (None, _) => "off",
        (Some(_), None) => "ok",
        (Some(_), Some(_)) => "unavailable",
    };
    let breaker = match sources.breaker.state() {
        breaker::State::Closed => "closed",
        breaker::State::Open => "open",
        breaker::State::HalfOpen => "half_open",
    };
    let (outcomes, in_flight) = counters();
    let mut broker_error = None;
    let mut depth = async |queue: &str| match dead_letters.depth(queue).await {
        Ok(depth) => depth,
        Err(e) => {
            broker_error.get_or_insert_with(|| e.to_string());
            None
        }
    };
    let mut parked = Vec::new();
    for delay in &sources.park {
        let queue = delay_queue_name(&sources.command_queue, *delay);
        let messages = depth(&queue).await;
        let delay = humantime::format_duration(*delay)
            .to_string()
            .replace(' ', "");
        parked.push(DelayQueue {
            queue,
            delay,
            messages,
        });
    }
    let mut deferred = Vec::new();
    for delay in DEFER_DELAYS {
        let queue = defer_queue_name(&sources.command_queue, delay);
        let messages = depth(&queue).await;
        deferred.push(DelayQueue {
            queue,
            delay: humantime::format_duration(delay)
                .to_string()
                .replace(' ', ""),
            messages,
        });
    }
    let dead = match dead_letters.count().await {
        Ok(n) => n,
        Err(e) => {
            broker_error.get_or_insert_with(|| e.to_string());
            None
        }
    };
    Summary {
        broker: if sources.readiness.consuming() {
            "connected"
        } else {
            "disconnected"
        },
        redis,
        redis_error,
        breaker,
        not_ready: sources.readiness.not_ready_reason(),
        outcomes,
        in_flight,
        parked,
        deferred,
        dead_letters: dead,
        broker_error,
    }
}

/// Result events by outcome and commands in flight, read from the worker's
/// own `/metrics` text: the counters are write-only handles, and the
/// rendered text is what operators already trust.
fn counters() -> (serde_json::Map<String, serde_json::Value>, u64) {
    let text = meters::recorder().map(|r| r.render()).unwrap_or_default();
    let mut outcomes = serde_json::Map::new();
    let mut in_flight = 0;
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let value = value.max(0.0) as u64;
        if series == "commands_in_flight" {
            in_flight = value;
        } else if let Some(labels) = series.strip_prefix("results_published_total{") {
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches(['}', '"']).to_owned())
            };
            let key = match (label("status"), label("kind")) {
                (Some(status), Some(kind)) if status == "failed" => kind,
                (Some(status), _) => status,
                _ => continue,
            };
            outcomes.insert(key, value.into());
        }
    }
    (outcomes, in_flight)
}
