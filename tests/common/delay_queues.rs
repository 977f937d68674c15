//! The worker's delay queues as a test sees them: what waits in them, and
//! the deferral ladder shortened so a deferred command comes back in
//! seconds instead of a minute (the queue keeps its name, so the broker's
//! `x-death` still names the worker's own queue).

use std::time::Duration;

use gewe_friend_worker::{
    broker::topology, config::Settings, config::defer_queue_name, defer::DEFER_DELAYS,
};
use lapin::{
    Channel, Connection,
    options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;

/// A command copy found in a delay queue.
#[derive(Debug)]
pub struct Copy {
    pub body: Value,
    pub headers: FieldTable,
}

impl Copy {
    /// An integer header, if present.
    pub fn count(&self, name: &str) -> Option<i64> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            _ => None,
        }
    }

    /// A text header, if present.
    pub fn text(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }
}

/// Every message in `queue`, left in place (read, then requeued); none
/// when the queue does not exist. On a connection of its own: reading a
/// missing queue closes the channel, and lapin can reuse its id before the
/// broker finished closing it, which ends the whole connection (seen once
/// under CI load); the test's own connection must not pay for that.
pub async fn peek(_test_connection: &Connection, queue: &str) -> Vec<Copy> {
    let (connection, channel) = crate::common::confirm_channel(&crate::common::amqp_url()).await;
    let mut out = Vec::new();
    let mut tags = Vec::new();
    while let Ok(Some(message)) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
    {
        tags.push(message.delivery.delivery_tag);
        out.push(Copy {
            body: serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null),
            headers: message
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default(),
        });
    }
    if let Some(last) = tags.last() {
        channel
            .basic_nack(
                *last,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .expect("requeue the peeked copies");
    }
    let _ = connection.close(200, "peeked".into()).await;
    out
}

/// Every copy waiting in the deferral ladder of `settings`' command queue.
pub async fn deferred_copies(connection: &Connection, settings: &Settings) -> Vec<Copy> {
    let mut out = Vec::new();
    for delay in DEFER_DELAYS {
        let queue = defer_queue_name(&settings.amqp.command_queue, delay);
        out.extend(peek(connection, &queue).await);
    }
    out
}

/// Replaces every queue of the deferral ladder with one of the same name
/// whose delay is `ttl`: deferred commands come back after `ttl`. Must run
/// after the worker declared its topology (it declares only at start-up).
pub async fn shorten_ladder(channel: &Channel, settings: &Settings, ttl: Duration) {
    for delay in DEFER_DELAYS {
        let queue = defer_queue_name(&settings.amqp.command_queue, delay);
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the deferral queue");
        // The worker's own arguments, with the short delay as the TTL.
        let args = topology::delay_queue_arguments(
            &settings.amqp.command_queue,
            ttl,
            settings.amqp.queue_type,
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .expect("declare the shortened deferral queue");
    }
}
