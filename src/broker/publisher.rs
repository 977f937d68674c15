//! Publishing with publisher confirms and `mandatory`.
//!
//! A result only counts once the broker has confirmed it; a nack or a
//! returned (unroutable) message is an error, never a silent success. Many
//! tasks publish concurrently on one confirm-mode channel and each awaits its
//! own confirm, so confirms are pipelined rather than serialised.

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};

use super::TopologyError;

/// Why an event is not known to be safe in the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused to take responsibility for the message.
    #[error("the broker nacked the event published to exchange '{exchange}'")]
    Nacked {
        /// Target exchange.
        exchange: String,
    },
    /// No queue is bound for the routing key: the event would be lost.
    #[error(
        "the event was unroutable: exchange '{exchange}' has no queue bound for routing key \
         '{routing_key}' (broker said {reply_code} {reply_text})"
    )]
    Unroutable {
        /// Target exchange.
        exchange: String,
        /// Routing key used.
        routing_key: String,
        /// AMQP reply code, usually 312 NO_ROUTE.
        reply_code: u16,
        /// Broker's reply text.
        reply_text: String,
    },
    /// The channel or connection failed (or the exchange does not exist).
    #[error("publishing to exchange '{exchange}' failed: {source}")]
    Broker {
        /// Target exchange.
        exchange: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// Confirms were not enabled on the channel (a programming error).
    #[error("publisher confirms are not enabled on the publishing channel")]
    NotConfirmed,
}

impl PublishError {
    /// Whether no queue took the message (for the default exchange: the
    /// queue does not exist).
    pub fn is_unroutable(&self) -> bool {
        match self {
            PublishError::Unroutable { .. } => true,
            PublishError::Nacked { .. }
            | PublishError::Broker { .. }
            | PublishError::NotConfirmed => false,
        }
    }

    /// Whether the channel is unusable after this error (the broker closed
    /// it, e.g. for a missing exchange, or it never had confirms): only a
    /// new session can publish again. A nack or a returned message leaves
    /// the channel working.
    pub fn breaks_channel(&self) -> bool {
        match self {
            PublishError::Broker { .. } | PublishError::NotConfirmed => true,
            PublishError::Nacked { .. } | PublishError::Unroutable { .. } => false,
        }
    }
}

/// A confirm-mode channel dedicated to publishing.
#[derive(Clone, Debug)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `connection` and puts it in confirm mode.
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    /// The channel, for the rare declare on the publishing path (a delay
    /// queue deleted by an operator).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Whether the channel can still publish.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes `body` to the delay queue `queue` (default exchange,
    /// mandatory) and waits for the confirm. A queue that is missing (an
    /// operator deleted it) is declared again with `declare` and the
    /// publish retried once, so what waits there is neither lost nor sent
    /// round a requeue loop (or to GeWe again) for that reason.
    pub async fn publish_to_delay_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        declare: impl AsyncFnOnce(&Channel) -> Result<(), TopologyError>,
    ) -> Result<(), PublishError> {
        let error = match self
            .publish("", queue, true, body, properties.clone())
            .await
        {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if !error.is_unroutable() {
            return Err(error);
        }
        tracing::warn!(queue, "the delay queue is missing; declaring it again");
        if let Err(e) = declare(&self.channel).await {
            tracing::error!(error = %e, queue, "could not declare the delay queue");
            return Err(error);
        }
        self.publish("", queue, true, body, properties).await
    }

    /// Publishes `body` and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let broker = |source| PublishError::Broker {
            exchange: exchange.to_owned(),
            source,
        };
        let routing = ShortString::try_new(routing_key).map_err(|_| PublishError::Unroutable {
            exchange: exchange.to_owned(),
            routing_key: routing_key.chars().take(64).collect(),
            reply_code: 0,
            reply_text: "routing key longer than 255 bytes".to_owned(),
        })?;
        // Boxed: lapin's publish future is kilobytes, and inline it would
        // be copied into every caller's state machine, twice where an event
        // also goes to `reply_to`.
        let confirm = Box::pin(self.channel.basic_publish(
            ShortString::from(exchange),
            routing,
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        ))
        .await
        .map_err(broker)?
        .await
        .map_err(broker)?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    reply_code: returned.reply_code,
                    reply_text: returned.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked {
                exchange: exchange.to_owned(),
            }),
            Confirmation::NotRequested => Err(PublishError::NotConfirmed),
        }
    }
}
