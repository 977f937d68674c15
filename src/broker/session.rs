//! One broker session: a connection, a consuming channel with its prefetch,
//! and a confirm-mode publishing channel.
//!
//! A session is never repaired in place: when anything in it breaks, the
//! worker drops it and opens a new one, which re-declares the topology and
//! re-applies `basic_qos` (lapin's own recovery would not restore prefetch).
//! Deliveries of the dead channel are never acked on the new one; the broker
//! redelivers them.

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties, Consumer,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};

use super::{ConnectError, Connector, Publisher, TopologyError, topology};
use crate::config::AmqpSettings;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// TCP, TLS, authentication or vhost failure (or no answer in time).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Declaring the topology failed.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// Opening a channel, setting QoS or starting the consumer failed.
    #[error("could not set up {what}: {source}")]
    Channel {
        /// The step that failed.
        what: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
}

impl SessionError {
    /// Errors that reconnecting cannot fix (a topology mismatch needs an
    /// operator). At start-up these stop the program.
    pub fn needs_operator(&self) -> bool {
        match self {
            SessionError::Topology(t) => t.is_mismatch(),
            SessionError::Connect(_) | SessionError::Channel { .. } => false,
        }
    }
}

/// A live session.
pub struct Session {
    /// Closing it requeues every unacked delivery.
    connection: Connection,
    consume_channel: Channel,
    consumer: Consumer,
    publisher: Publisher,
}

impl Session {
    /// Connects to node `node` of `connector`, declares (when
    /// `amqp.declare`), applies prefetch and starts consuming
    /// `amqp.command_queue` with manual acks.
    pub async fn open(
        connector: &Connector,
        node: usize,
        a: &AmqpSettings,
        consumer_tag: &str,
    ) -> Result<Self, SessionError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("gewe-friend-worker {consumer_tag}").into());
        let connection = connector.connect(node, properties).await?;
        let channel_err = |what| move |source| SessionError::Channel { what, source };
        let consume_channel = connection
            .create_channel()
            .await
            .map_err(channel_err("the consuming channel"))?;
        if a.declare {
            topology::declare(&consume_channel, a).await?;
        }
        consume_channel
            .basic_qos(a.prefetch, BasicQosOptions::default())
            .await
            .map_err(channel_err("basic.qos"))?;
        let publisher = Publisher::open(&connection)
            .await
            .map_err(channel_err("the publishing channel"))?;
        let consumer = consume_channel
            .basic_consume(
                ShortString::from(a.command_queue.as_str()),
                ShortString::from(consumer_tag),
                BasicConsumeOptions {
                    no_ack: false,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(channel_err("the consumer"))?;
        Ok(Self {
            connection,
            consume_channel,
            consumer,
            publisher,
        })
    }
}

impl Session {
    /// The next delivery; `None` when the broker cancelled the consumer.
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        self.consumer.next().await
    }

    /// The session's confirm-mode publishing channel.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Stops the broker from sending more deliveries (shutdown).
    pub async fn cancel_consumer(&self) -> Result<(), lapin::Error> {
        self.consume_channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await
    }

    /// Whether the connection still works.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the connection, which returns every unacked delivery to the
    /// queue.
    pub async fn close(self) -> Result<(), lapin::Error> {
        self.connection
            .close(200, "worker session closed".into())
            .await
    }
}
