//! One broker session: a connection, a consuming channel with its prefetch,
//! a confirm-mode publishing channel and, with `callbacks.enabled`, a second
//! consuming channel for GeWe's callbacks with its own prefetch.
//!
//! A session is never repaired in place: when anything in it breaks, the
//! worker drops it and opens a new one, which re-declares the topology and
//! re-applies `basic_qos` (lapin's own recovery would not restore prefetch).
//! Deliveries of the dead channel are never acked on the new one; the broker
//! redelivers them.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties, Consumer,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};

use super::{ConnectError, Connector, Publisher, TopologyError, topology};
use crate::config::{CallbacksSettings, Settings};

/// Unacknowledged callbacks held at once. Handling one is a few Redis round
/// trips and at most one confirmed publish, so a small window keeps both
/// busy without holding many callbacks unacked; it is independent of
/// `amqp.prefetch`, so a backlog of commands never starves callbacks.
pub const CALLBACK_PREFETCH: u16 = 32;

/// What [`Session::next`] took from the broker.
pub enum Next {
    /// A command (or the consumer's error).
    Command(Result<Delivery, lapin::Error>),
    /// A GeWe callback (or the consumer's error).
    Callback(Result<Delivery, lapin::Error>),
    /// The broker cancelled a consumer (its queue was deleted, say).
    Cancelled(&'static str),
}

/// The consumer of `callbacks.queue` and its channel.
struct CallbackConsumer {
    channel: Channel,
    consumer: Consumer,
}

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
    /// Closing it requeues every unacked delivery. Shared with the callback
    /// endpoint, which opens its own publishing channel on it.
    connection: Arc<Connection>,
    consume_channel: Channel,
    consumer: Consumer,
    publisher: Publisher,
    callbacks: Option<CallbackConsumer>,
}

impl Session {
    /// Connects to node `node` of `connector`, declares (when
    /// `amqp.declare`; the delay queues of `retry.park` and the callbacks'
    /// objects too), applies prefetch and starts consuming
    /// `amqp.command_queue` with manual acks, and `callbacks.queue` too with
    /// `callbacks.enabled`.
    pub async fn open(
        connector: &Connector,
        node: usize,
        settings: &Settings,
        consumer_tag: &str,
    ) -> Result<Self, SessionError> {
        let (a, c) = (&settings.amqp, &settings.callbacks);
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("gewe-friend-worker {consumer_tag}").into());
        let connection = connector.connect(node, properties).await?;
        let consume_channel = connection
            .create_channel()
            .await
            .map_err(channel_err("the consuming channel"))?;
        if a.declare {
            topology::declare(&consume_channel, a).await?;
            topology::declare_delay_queues(&consume_channel, a, &settings.retry.park).await?;
            topology::declare_callbacks(&consume_channel, a, c).await?;
        }
        consume_channel
            .basic_qos(a.prefetch, BasicQosOptions::default())
            .await
            .map_err(channel_err("basic.qos"))?;
        let publisher = Publisher::open(&connection)
            .await
            .map_err(channel_err("the publishing channel"))?;
        let consumer = consume(&consume_channel, &a.command_queue, consumer_tag)
            .await
            .map_err(channel_err("the consumer"))?;
        let callbacks = if c.enabled {
            Some(CallbackConsumer::open(&connection, c, consumer_tag).await?)
        } else {
            None
        };
        Ok(Self {
            connection: Arc::new(connection),
            consume_channel,
            consumer,
            publisher,
            callbacks,
        })
    }
}

impl CallbackConsumer {
    async fn open(
        connection: &Connection,
        c: &CallbacksSettings,
        consumer_tag: &str,
    ) -> Result<Self, SessionError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(channel_err("the callbacks channel"))?;
        channel
            .basic_qos(CALLBACK_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(channel_err("basic.qos of the callbacks channel"))?;
        let consumer = consume(&channel, &c.queue, &format!("{consumer_tag}-callbacks"))
            .await
            .map_err(channel_err("the callbacks consumer"))?;
        Ok(Self { channel, consumer })
    }
}

fn channel_err(what: &'static str) -> impl FnOnce(lapin::Error) -> SessionError {
    move |source| SessionError::Channel { what, source }
}

/// Starts consuming `queue` with manual acks.
async fn consume(channel: &Channel, queue: &str, tag: &str) -> Result<Consumer, lapin::Error> {
    channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(tag),
            BasicConsumeOptions {
                no_ack: false,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

impl Session {
    /// The next command or callback.
    pub async fn next(&mut self) -> Next {
        let callback = async {
            match &mut self.callbacks {
                Some(c) => c.consumer.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = self.consumer.next() => match command {
                Some(d) => Next::Command(d),
                None => Next::Cancelled("the broker cancelled the command consumer"),
            },
            callback = callback => match callback {
                Some(d) => Next::Callback(d),
                None => Next::Cancelled("the broker cancelled the callbacks consumer"),
            },
        }
    }

    /// The connection, for the callback endpoint's own publishing channel.
    pub fn connection(&self) -> Arc<Connection> {
        self.connection.clone()
    }

    /// The session's confirm-mode publishing channel.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Stops the broker from sending more deliveries (shutdown).
    pub async fn cancel_consumer(&self) -> Result<(), lapin::Error> {
        if let Some(c) = &self.callbacks {
            c.channel
                .basic_cancel(c.consumer.tag(), BasicCancelOptions::default())
                .await?;
        }
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
