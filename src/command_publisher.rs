//! Publishing commands and awaiting their results, as a backend does:
//! what the `publish` and `demo` commands use.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
};
use serde_json::Value;

use crate::{broker::Connector, config::AmqpSettings};

/// A command as a publisher builds it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewCommand {
    /// Idempotency key.
    pub command_id: String,
    /// Account.
    pub app_id: String,
    /// Group.
    pub chatroom_id: String,
    /// Member.
    pub member_wxid: String,
    /// Greeting.
    pub content: String,
}

/// How the publisher hears about results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Commands carry `reply_to` = the private queue (request/reply).
    ReplyTo,
    /// The private queue is bound to the result exchange with `#` and
    /// commands carry no `reply_to` (as a downstream consumer would).
    ResultExchange,
    /// Fire and forget: no `reply_to`, nothing to wait on. A `reply_to`
    /// naming a queue that is gone once the publisher exits would only make
    /// the event harder to deliver.
    Nothing,
}

/// A publisher connection with confirms and a private queue for results.
pub struct CommandPublisher {
    connection: Connection,
    channel: Channel,
    reply_queue: String,
    replies: Consumer,
    command_queue: String,
    listen: Listen,
}

impl CommandPublisher {
    /// Connects to the broker of `amqp` and opens a private result queue.
    pub async fn connect(amqp: &AmqpSettings, listen: Listen) -> anyhow::Result<Self> {
        let connection = Connector::new(amqp)?
            .connect_first(
                ConnectionProperties::default()
                    .with_connection_name("gewe-friend-worker client".into()),
            )
            .await
            .context("could not connect to RabbitMQ")?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let reply_queue = queue.name().as_str().to_owned();
        if listen == Listen::ResultExchange {
            channel
                .queue_bind(
                    queue.name().clone(),
                    amqp.result_exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| {
                    format!("could not bind to exchange '{}'", amqp.result_exchange)
                })?;
        }
        let replies = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            connection,
            channel,
            reply_queue,
            replies,
            command_queue: amqp.command_queue.clone(),
            listen,
        })
    }

    /// Publishes a JSON command with `reply_to` set to the private queue.
    pub async fn send(&self, command: &NewCommand) -> anyhow::Result<()> {
        let body = serde_json::to_vec(command)?;
        self.send_raw(&body, Some(&command.command_id)).await
    }

    /// Publishes any body (tests and the demo send malformed ones too).
    pub async fn send_raw(&self, body: &[u8], message_id: Option<&str>) -> anyhow::Result<()> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if self.listen == Listen::ReplyTo {
            props = props.with_reply_to(self.reply_queue.as_str().into());
        }
        if let Some(id) = message_id {
            let id = ShortString::try_new(id).context("command id longer than 255 bytes")?;
            props = props.with_message_id(id.clone()).with_correlation_id(id);
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.command_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => bail!(
                "the command was unroutable: queue '{}' does not exist (is the worker running with amqp.declare=true?)",
                self.command_queue
            ),
            Confirmation::Nack(None) => bail!("the broker nacked the command"),
            Confirmation::NotRequested => bail!("publisher confirms were not enabled"),
        }
    }

    /// Waits for the next result event on the reply queue.
    pub async fn next_result(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let delivery = tokio::time::timeout(timeout, self.replies.next())
            .await
            .map_err(|_| anyhow::anyhow!("no result event within {timeout:?}"))?
            .context("the reply consumer was cancelled")??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        serde_json::from_slice(&delivery.data).context("result event is not JSON")
    }

    /// Waits for the result whose `commandId` is `command_id`.
    pub async fn wait_for(&mut self, command_id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self
                .next_result(left)
                .await
                .with_context(|| format!("waiting for the result of command {command_id}"))?;
            if event.get("commandId").and_then(Value::as_str) == Some(command_id) {
                return Ok(event);
            }
        }
    }

    /// Closes the connection (the reply queue goes with it).
    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}
