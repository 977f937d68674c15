//! Declaration of the worker's topology (contract §2, `amqp.*`).
//!
//! RabbitMQ answers a re-declaration with different arguments with a bare
//! `PRECONDITION_FAILED` that closes the channel; [`TopologyError`] turns that
//! into a message that names the object and the argument that differs, and
//! what the operator can do about it.

use lapin::{
    Channel, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use std::time::Duration;

use crate::{
    config::{AmqpSettings, CallbacksSettings, QueueType, defer_queue_name, delay_queue_name},
    defer::DEFER_DELAYS,
};

/// The `TypeName` of GeWe's contact-change callback, and the routing key the
/// callbacks queue is bound with (contract §6).
pub const MOD_CONTACTS: &str = "ModContacts";

/// How long a callback that came too early waits in the early delay queue
/// before it is tried again (contract §6, `callbacks.early_grace`): short,
/// since a member who needs no verification accepts within moments.
pub const EARLY_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// The early delay queue of `callbacks_queue`: `<callbacks.queue>.early`.
pub fn early_queue_name(callbacks_queue: &str) -> String {
    format!("{callbacks_queue}.early")
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An object already exists with other arguments.
    #[error(
        "{object} already exists with a different {argument} than this worker declares \
         (broker said: {broker_text}); change the worker's amqp.* settings to match, \
         delete the {object} so it can be re-created, or set amqp.declare=false"
    )]
    Mismatch {
        /// e.g. `queue 'gewe.add_friend.commands'`.
        object: String,
        /// e.g. `argument 'x-queue-type'`.
        argument: String,
        /// The broker's own text.
        broker_text: String,
    },
    /// Any other broker error while declaring.
    #[error("could not declare {object}: {source}")]
    Broker {
        /// What was being declared.
        object: String,
        /// The broker or connection error.
        #[source]
        source: lapin::Error,
    },
}

impl TopologyError {
    /// A mismatch will not go away by reconnecting; other errors may.
    pub fn is_mismatch(&self) -> bool {
        match self {
            TopologyError::Mismatch { .. } => true,
            TopologyError::Broker { .. } => false,
        }
    }

    fn from_lapin(object: String, source: lapin::Error) -> Self {
        if let lapin::ErrorKind::ProtocolError(amqp) = source.kind()
            && matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            )
        {
            let text = amqp.get_message().as_str().to_owned();
            let argument = text
                .split_once("inequivalent arg '")
                .and_then(|(_, rest)| rest.split_once('\''))
                .map(|(arg, _)| format!("argument '{arg}'"))
                .unwrap_or_else(|| "setting".to_owned());
            return TopologyError::Mismatch {
                object,
                argument,
                broker_text: text,
            };
        }
        TopologyError::Broker { object, source }
    }
}

/// The arguments of the command queue, exactly as declared.
pub fn command_queue_arguments(a: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(a.dead_letter_exchange.as_str())),
    );
    if a.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(a.delivery_limit)),
        );
    }
    args
}

fn queue_type_arguments(a: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    if a.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// Declares the dead-letter exchange and queue, the result exchange and the
/// command queue. Idempotent; a failure leaves `channel` closed.
pub async fn declare(channel: &Channel, a: &AmqpSettings) -> Result<(), TopologyError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let exchange = |name: &str| format!("exchange '{name}'");
    let queue = |name: &str| format!("queue '{name}'");

    channel
        .exchange_declare(
            ShortString::from(a.dead_letter_exchange.as_str()),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(exchange(&a.dead_letter_exchange), e))?;
    channel
        .queue_declare(
            ShortString::from(a.dead_letter_queue.as_str()),
            durable_queue,
            queue_type_arguments(a),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(queue(&a.dead_letter_queue), e))?;
    channel
        .queue_bind(
            ShortString::from(a.dead_letter_queue.as_str()),
            ShortString::from(a.dead_letter_exchange.as_str()),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(queue(&a.dead_letter_queue), e))?;
    channel
        .exchange_declare(
            ShortString::from(a.result_exchange.as_str()),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(exchange(&a.result_exchange), e))?;
    channel
        .queue_declare(
            ShortString::from(a.command_queue.as_str()),
            durable_queue,
            command_queue_arguments(a),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(queue(&a.command_queue), e))?;
    Ok(())
}

/// Declares the callbacks exchange (topic, durable) when callbacks are
/// consumed or received over HTTP, and with `callbacks.enabled` the
/// callbacks queue, bound to it with [`MOD_CONTACTS`]. The queue has the
/// command queue's arguments: the same type, delivery limit and dead-letter
/// exchange, so a callback that is not a JSON object lands in
/// `amqp.dead_letter_queue` too. Kept apart from [`declare`] so each
/// feature's objects read on their own; called right after it.
pub async fn declare_callbacks(
    channel: &Channel,
    a: &AmqpSettings,
    c: &CallbacksSettings,
) -> Result<(), TopologyError> {
    if !c.enabled && c.listen.is_none() {
        return Ok(());
    }
    channel
        .exchange_declare(
            ShortString::from(c.exchange.as_str()),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(format!("exchange '{}'", c.exchange), e))?;
    if !c.enabled {
        return Ok(());
    }
    let queue = format!("queue '{}'", c.queue);
    channel
        .queue_declare(
            ShortString::from(c.queue.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            command_queue_arguments(a),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(queue.clone(), e))?;
    channel
        .queue_bind(
            ShortString::from(c.queue.as_str()),
            ShortString::from(c.exchange.as_str()),
            MOD_CONTACTS.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(queue, e))?;
    declare_early_queue(channel, &c.queue, a.queue_type).await
}

/// Declares `<callbacks_queue>.early`, where callbacks that came before
/// their command's `succeeded` wait and go back to the callbacks queue
/// (see `callbacks::early`): at start-up, and again when a publish finds
/// it missing (an operator deleted it).
pub async fn declare_early_queue(
    channel: &Channel,
    callbacks_queue: &str,
    queue_type: QueueType,
) -> Result<(), TopologyError> {
    let early = early_queue_name(callbacks_queue);
    channel
        .queue_declare(
            ShortString::from(early.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            delay_queue_arguments(callbacks_queue, EARLY_DELAY, queue_type),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(format!("queue '{early}'"), e))?;
    Ok(())
}

/// Deletes what [`declare_callbacks`] creates (best effort), for private
/// topologies like [`remove`].
pub async fn remove_callbacks(channel: &Channel, c: &CallbacksSettings) {
    for queue in [c.queue.clone(), early_queue_name(&c.queue)] {
        let _ = channel
            .queue_delete(
                ShortString::from(queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = channel
        .exchange_delete(
            ShortString::from(c.exchange.as_str()),
            ExchangeDeleteOptions::default(),
        )
        .await;
}

/// Declares the delay queues: those of `retry.park` (see [`crate::park`])
/// and the deferral ladder (see [`crate::defer`]), with the same clear
/// errors when one exists with other arguments.
///
/// A delay queue's message TTL is its delay and its dead-letter target the
/// command queue, so the broker hands a parked or deferred command back
/// when the delay has passed. The delay queues have the command queue's
/// type. Quorum queues on RabbitMQ 3.10 honour `x-message-ttl` (checked
/// against 3.10.8) and offer at-least-once dead-lettering
/// (`x-dead-letter-strategy`, which needs `x-overflow: reject-publish`), so
/// a command cannot be lost on its way back, and it is replicated like the
/// commands themselves. Classic queues dead-letter at most once.
pub async fn declare_delay_queues(
    channel: &Channel,
    a: &AmqpSettings,
    park: &[Duration],
) -> Result<(), TopologyError> {
    for (name, delay) in delay_queues(a, park) {
        declare_delay_queue(channel, a, &name, delay).await?;
    }
    Ok(())
}

/// Every delay queue's name and delay: the parking delays, then the ladder.
fn delay_queues(a: &AmqpSettings, park: &[Duration]) -> Vec<(String, Duration)> {
    let parking = park
        .iter()
        .map(|d| (delay_queue_name(&a.command_queue, *d), *d));
    let ladder = DEFER_DELAYS
        .iter()
        .map(|d| (defer_queue_name(&a.command_queue, *d), *d));
    parking.chain(ladder).collect()
}

/// Declares one delay queue `name` with `delay`: at start-up, and again
/// when a publish to it finds it missing (an operator deleted it).
pub async fn declare_delay_queue(
    channel: &Channel,
    a: &AmqpSettings,
    name: &str,
    delay: Duration,
) -> Result<(), TopologyError> {
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            ShortString::from(name),
            durable_queue,
            delay_queue_arguments(&a.command_queue, delay, a.queue_type),
        )
        .await
        .map_err(|e| TopologyError::from_lapin(format!("queue '{name}'"), e))?;
    Ok(())
}

/// The arguments of a delay queue whose messages return to `command_queue`
/// (the command queue, or the callbacks queue) after `delay`, exactly as
/// declared. Public for the tests, which shorten a delay queue in place
/// with the worker's own arguments.
pub fn delay_queue_arguments(
    command_queue: &str,
    delay: Duration,
    queue_type: QueueType,
) -> FieldTable {
    let mut args = FieldTable::default();
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(command_queue)),
    );
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    args
}

/// Deletes the delay queues [`declare_delay_queues`] creates (best effort).
pub async fn remove_delay_queues(channel: &Channel, a: &AmqpSettings, park: &[Duration]) {
    for (name, _) in delay_queues(a, park) {
        let _ = channel
            .queue_delete(
                ShortString::from(name.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
    }
}

/// Deletes everything [`declare`] creates (best effort: objects already gone
/// are skipped). For the demo, the benchmark and tests, which run on private
/// topologies; returns how many messages the dead-letter queue held.
pub async fn remove(channel: &Channel, a: &AmqpSettings) -> u32 {
    let delete_queue =
        |name: &str| channel.queue_delete(ShortString::from(name), QueueDeleteOptions::default());
    let _ = delete_queue(&a.command_queue).await;
    let dead = delete_queue(&a.dead_letter_queue).await.unwrap_or(0);
    for exchange in [&a.result_exchange, &a.dead_letter_exchange] {
        let _ = channel
            .exchange_delete(
                ShortString::from(exchange.as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    dead
}
