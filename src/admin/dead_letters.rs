//! The dead-letter queue as an operator sees and re-drives it (contract §8).
//!
//! **Listing leaves every message in place, in order.** A listing takes
//! *every* dead letter (up to [`MAX_SCAN`] messages and
//! [`MAX_HELD_BYTES`] of bodies) with `basic.get`,
//! unacknowledged, on a channel of its own, shows the first ones, and hands
//! all of them back with one `basic.nack` (requeue) each, in the order they
//! came, 30 at a time, waiting until the queue holds each batch again
//! before the next (and before it closes the channel). A classic queue puts each requeued message back in its place.
//! A quorum queue (RabbitMQ 3.10.8, measured by the suite) puts returned
//! messages at the back, in the order they were returned: handing back the
//! whole queue in order is a full turn, and the order is what it was. Only
//! a partial turn would change it, and closing the channel with messages
//! unacknowledged returns them shuffled; both were seen in the suite before
//! this design. A quorum queue counts each return in the message's
//! `x-delivery-count`; the dead-letter queue has no delivery limit on
//! RabbitMQ 3.x, so that count is all that changes. (RabbitMQ 4 gives
//! quorum queues a default delivery limit of 20: give the dead-letter queue
//! `x-delivery-limit: -1` by policy there.) A dead letter that arrives
//! during a listing lands before the ones handed back. Listings and
//! replays take turns.
//!
//! **Replay is publish-confirm-then-ack.** Each selected message is
//! published to the command queue (default exchange, `mandatory`) with a
//! publisher confirm, and only then acknowledged in the dead letters. A
//! crash between the two leaves the command in both queues: it comes back
//! twice, and idempotency answers the second copy with its outcome marked
//! `duplicate`. Nothing is lost. Messages scanned but not selected (replay
//! by ids) are handed back in order, like a listing's.
//!
//! A message's id is a digest of its body and properties (the broker's
//! `x-delivery-count` left out, since it changes while the message sits in
//! the queue), so it stays the same across listings and replicas.

use std::{collections::HashSet, sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::{
    broker::{Connector, PublishError, Publisher},
    command::{self, ATTEMPTS_HEADER, Envelope, PARKED_HEADER},
    timestamp,
};

/// Header on a replayed command: times it was replayed from the dead letters.
pub const REPLAYED_HEADER: &str = "x-gewe-replayed";
/// Headers a replay removes: the worker's try counters and the broker's
/// dead-lettering history, so the command starts over like a new one.
const RESET_HEADERS: &[&str] = &[
    PARKED_HEADER,
    ATTEMPTS_HEADER,
    "x-gewe-deferred",
    "x-gewe-first-received",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];
/// Most messages one listing shows.
pub const MAX_LIST: usize = 1000;
/// Most messages one listing or replay reads: they are held in memory
/// until handed back. Beyond it, a listing changes a quorum queue's order.
pub const MAX_SCAN: usize = 10_000;
/// Nacks in flight at once while handing back: below the 32 commands a
/// quorum queue's client sends before it holds more back.
const RETURN_BATCH: usize = 30;
/// Most bytes of bodies a listing or a replay by ids holds at once, so a
/// queue of large dead letters cannot grow the worker past its memory
/// limit (the Deployment's is 256 MiB). Beyond it, as beyond
/// [`MAX_SCAN`], a listing is a partial turn and moves what it read of a
/// quorum queue behind the rest.
const MAX_HELD_BYTES: usize = 32 * 1024 * 1024;
/// How long handing back may take before the channel is closed anyway.
const HAND_BACK_LIMIT: Duration = Duration::from_secs(10);
/// Longest body shown in a listing, in bytes.
const MAX_SHOWN_BODY: usize = 16 * 1024;
/// Bound on every broker call of an operator's request.
const BROKER_CALL_LIMIT: Duration = Duration::from_secs(15);

/// Why the dead letters could not be read or moved.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// No broker node answered.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    /// A broker call failed.
    #[error("broker error while {what}: {source}")]
    Broker {
        /// What was being done.
        what: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// A replayed copy was not confirmed: it stays a dead letter.
    #[error("a replayed command was not confirmed, so it stays in the dead letters: {0}")]
    Publish(#[from] PublishError),
    /// A broker call took longer than [`BROKER_CALL_LIMIT`].
    #[error("the broker did not answer within {BROKER_CALL_LIMIT:?}")]
    Timeout,
}

fn broker(what: &'static str) -> impl FnOnce(lapin::Error) -> DeadLetterError {
    move |source| DeadLetterError::Broker { what, source }
}

/// One dead letter as `GET /api/dead-letters` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Stable id: a digest of the message.
    pub id: String,
    /// The command's id, as the worker would resolve it.
    pub command_id: String,
    /// `appId`, when the body has one.
    pub app_id: Option<String>,
    /// Why it is here: the `invalid_command` text, or the broker's reason
    /// (`delivery_limit`, `rejected`, `expired`, `maxlen`).
    pub reason: String,
    /// When the broker dead-lettered it.
    pub dead_at: Option<String>,
    /// Times it was replayed before.
    pub replayed: u32,
    /// The body, as text (cut at 16 KiB).
    pub body: String,
}

/// Which dead letters a replay moves.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Those with these ids.
    Ids(HashSet<String>),
    /// The first `limit`.
    All {
        /// How many at most.
        limit: usize,
    },
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replayed {
    /// Messages moved back to the command queue.
    pub replayed: usize,
    /// Ids asked for that are not (or no longer) in the dead letters.
    pub not_found: Vec<String>,
    /// The commandIds moved, in order.
    pub command_ids: Vec<String>,
}

/// The dead-letter queue and the command queue it is replayed into, over a
/// broker connection of the console's own.
pub struct DeadLetters {
    connector: Connector,
    dead_letter_queue: String,
    command_queue: String,
    connection: Mutex<Option<Arc<Connection>>>,
    /// Held by a listing or a replay: one at a time reads the queue.
    turn: Mutex<()>,
}

impl DeadLetters {
    /// Replays from `dead_letter_queue` to `command_queue` over connections
    /// from `connector` (opened on first use).
    pub fn new(connector: Connector, dead_letter_queue: &str, command_queue: &str) -> Self {
        Self {
            connector,
            dead_letter_queue: dead_letter_queue.to_owned(),
            command_queue: command_queue.to_owned(),
            connection: Mutex::new(None),
            turn: Mutex::new(()),
        }
    }

    /// The console's connection, opened again when it is gone.
    async fn connection(&self) -> Result<Arc<Connection>, DeadLetterError> {
        let mut current = self.connection.lock().await;
        if let Some(c) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let properties =
            ConnectionProperties::default().with_connection_name("gewe-friend-worker admin".into());
        let fresh = Arc::new(
            self.connector
                .connect_first(properties)
                .await
                .map_err(|e| DeadLetterError::Unavailable(e.to_string()))?,
        );
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    /// A new channel on the console's connection.
    async fn channel(&self) -> Result<Channel, DeadLetterError> {
        let connection = self.connection().await?;
        limit(connection.create_channel())
            .await?
            .map_err(broker("opening a channel"))
    }

    /// Messages ready in `queue`, `None` when it does not exist (a passive
    /// declare, on a channel of its own: a missing queue closes it).
    pub async fn depth(&self, queue: &str) -> Result<Option<u32>, DeadLetterError> {
        let channel = self.channel().await?;
        let declared = limit(channel.queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ))
        .await?;
        let depth = declared.ok().map(|q| q.message_count());
        let _ = channel.close(200, "depth read".into()).await;
        Ok(depth)
    }

    /// Messages in the dead-letter queue.
    pub async fn count(&self) -> Result<Option<u32>, DeadLetterError> {
        self.depth(&self.dead_letter_queue).await
    }

    /// The first `limit` dead letters, left in place and in order.
    pub async fn list(&self, limit_to: usize) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let _turn = self.turn.lock().await;
        let channel = self.channel().await?;
        let mut out = Vec::new();
        let mut taken = Vec::new();
        let read = async {
            let mut held = 0;
            while taken.len() < MAX_SCAN && held < MAX_HELD_BYTES {
                match self.get(&channel).await? {
                    Some(message) => {
                        if out.len() < limit_to.min(MAX_LIST) {
                            out.push(view(&message));
                        }
                        held += message.delivery.data.len();
                        taken.push(message);
                    }
                    None => break,
                }
            }
            Ok(())
        }
        .await;
        self.hand_back(&channel, taken).await;
        read.map(|()| out)
    }

    /// Moves the selected dead letters back to the command queue.
    pub async fn replay(&self, selection: &Selection) -> Result<Replayed, DeadLetterError> {
        let _turn = self.turn.lock().await;
        let connection = self.connection().await?;
        let channel = limit(connection.create_channel())
            .await?
            .map_err(broker("opening a channel"))?;
        let publisher = limit(Publisher::open(&connection))
            .await?
            .map_err(broker("opening the confirm channel"))?;
        let mut done = Replayed::default();
        let mut found = HashSet::new();
        let mut passed = Vec::new();
        let moved = self
            .move_selected(
                &channel,
                &publisher,
                selection,
                &mut done,
                &mut found,
                &mut passed,
            )
            .await;
        self.hand_back(&channel, passed).await;
        if let Selection::Ids(ids) = selection {
            let mut missing: Vec<String> = ids.difference(&found).cloned().collect();
            missing.sort();
            done.not_found = missing;
        }
        moved.map(|()| done)
    }

    async fn move_selected(
        &self,
        channel: &Channel,
        publisher: &Publisher,
        selection: &Selection,
        done: &mut Replayed,
        found: &mut HashSet<String>,
        passed: &mut Vec<BasicGetMessage>,
    ) -> Result<(), DeadLetterError> {
        // `all` means the dead letters there now: one replayed and
        // dead-lettered again at once (still malformed) joins the back of
        // the queue and must not be taken a second time.
        let present = match selection {
            Selection::All { .. } => self
                .depth(&self.dead_letter_queue)
                .await?
                .map_or(MAX_SCAN, |n| usize::try_from(n).unwrap_or(MAX_SCAN)),
            Selection::Ids(_) => MAX_SCAN,
        };
        let (mut scanned, mut held) = (0, 0);
        while scanned < MAX_SCAN.min(present) && held < MAX_HELD_BYTES {
            // A replay by ids reads on after the last one: handing back
            // the whole queue keeps its order (see the module's note).
            if let Selection::All { limit } = selection
                && done.replayed >= *limit
            {
                break;
            }
            let Some(message) = self.get(channel).await? else {
                break;
            };
            scanned += 1;
            let id = message_id(&message);
            if let Selection::Ids(ids) = selection {
                if !ids.contains(&id) {
                    held += message.delivery.data.len();
                    passed.push(message);
                    continue;
                }
                found.insert(id.clone());
            }
            let shown = view(&message);
            let properties = replayed_properties(&message.delivery.properties);
            limit(publisher.publish(
                "",
                &self.command_queue,
                true,
                &message.delivery.data,
                properties,
            ))
            .await??;
            // Only now: a crash before this line leaves it in both queues.
            let acked = limit(message.delivery.acker.ack(BasicAckOptions::default()))
                .await?
                .map_err(broker("acking a replayed dead letter"))?;
            if !acked {
                return Err(DeadLetterError::Unavailable(
                    "the channel closed before the replayed dead letter was acked; it may come back twice".to_owned(),
                ));
            }
            tracing::info!(
                action = "replay",
                id = %id,
                command_id = %shown.command_id,
                app_id = shown.app_id.as_deref(),
                reason = %shown.reason,
                queue = %self.command_queue,
                "dead letter replayed to the command queue"
            );
            done.replayed += 1;
            done.command_ids.push(shown.command_id);
        }
        Ok(())
    }

    /// Returns `taken` to the queue one nack each, in the order they came,
    /// [`RETURN_BATCH`] at a time: before the next batch (and before the
    /// channel closes) it waits, up to [`HAND_BACK_LIMIT`], until the queue
    /// holds the batch again. A quorum queue's client holds back commands
    /// beyond 32 in flight and later sends them in reverse order, and
    /// closing the channel under them returns them shuffled (both seen in
    /// the suite).
    async fn hand_back(&self, channel: &Channel, taken: Vec<BasicGetMessage>) {
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let deadline = tokio::time::Instant::now() + HAND_BACK_LIMIT;
        // Messages ready besides those taken (beyond MAX_SCAN, say).
        let mut expected = match self.count().await {
            Ok(Some(ready)) => ready as usize,
            _ => 0,
        };
        'batches: for batch in taken.chunks(RETURN_BATCH) {
            for message in batch {
                let failure = match limit(message.delivery.acker.nack(requeue)).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(error = %failure, "could not hand a dead letter back; the channel's close returns it");
                break 'batches;
            }
            expected += batch.len();
            // Polls the broker with a deadline: there is no event to wait on.
            while tokio::time::Instant::now() < deadline {
                match self.count().await {
                    Ok(Some(ready)) if ready as usize >= expected => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    Err(_) => break 'batches,
                }
            }
        }
        let _ = channel.close(200, "dead letters handed back".into()).await;
    }

    async fn get(&self, channel: &Channel) -> Result<Option<BasicGetMessage>, DeadLetterError> {
        limit(channel.basic_get(
            ShortString::from(self.dead_letter_queue.as_str()),
            BasicGetOptions { no_ack: false },
        ))
        .await?
        .map_err(broker("reading the dead letters"))
    }
}

async fn limit<F: std::future::Future>(f: F) -> Result<F::Output, DeadLetterError> {
    tokio::time::timeout(BROKER_CALL_LIMIT, f)
        .await
        .map_err(|_| DeadLetterError::Timeout)
}

/// The stable id of a dead letter.
fn message_id(message: &BasicGetMessage) -> String {
    let d = &message.delivery;
    let mut digest = Sha256::new();
    digest.update((d.data.len() as u64).to_be_bytes());
    digest.update(&d.data);
    let mut p = d.properties.clone();
    if let Some(headers) = p.headers().clone() {
        let mut inner = headers.inner().clone();
        inner.remove("x-delivery-count");
        p = p.with_headers(FieldTable::from(inner));
    }
    // Debug of lapin's property and header types is deterministic (the
    // headers are a sorted map).
    digest.update(format!("{p:?}").as_bytes());
    let hash = digest.finalize();
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// What the listing shows of one message.
fn view(message: &BasicGetMessage) -> DeadLetter {
    let d = &message.delivery;
    // Only for the commandId's fallbacks (message_id, correlation_id): a
    // dead letter's try counters are not read, so no queue vouches for them.
    let envelope = Envelope::from_properties(&d.properties, "");
    let headers = d.properties.headers().as_ref();
    let death = headers.and_then(|h| match h.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(latest)) => Some(latest.clone()),
            _ => None,
        },
        _ => None,
    });
    let broker_reason = death
        .as_ref()
        .and_then(|t| text(t.inner().get("reason")))
        .unwrap_or_else(|| "unknown".to_owned());
    let dead_at = death.as_ref().and_then(|t| match t.inner().get("time") {
        Some(AMQPValue::Timestamp(secs)) => Some(timestamp::format_millis(secs * 1000)),
        _ => None,
    });
    let (command_id, app_id, reason) = match command::decode(&d.data, &envelope) {
        Ok(cmd) => (cmd.command_id, Some(cmd.app_id), broker_reason),
        Err(rejected) => {
            // The worker rejects an invalid command with the text of its
            // `invalid_command` event; decoding again finds the same text.
            let reason = if broker_reason == "rejected" {
                format!("invalid_command: {}", rejected.reason)
            } else {
                broker_reason
            };
            (rejected.partial.command_id, rejected.partial.app_id, reason)
        }
    };
    let shown = &d.data[..d.data.len().min(MAX_SHOWN_BODY)];
    DeadLetter {
        id: message_id(message),
        command_id,
        app_id,
        reason,
        dead_at,
        replayed: counter(headers, REPLAYED_HEADER),
        body: String::from_utf8_lossy(shown).into_owned(),
    }
}

fn text(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn counter(headers: Option<&FieldTable>, name: &str) -> u32 {
    match headers.and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortShortInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(*n),
        _ => 0,
    }
}

/// The properties of a replayed copy: the dead letter's own (`traceparent`,
/// ids, `reply_to` kept), its try counters and dead-lettering history
/// removed, `x-gewe-replayed` counted up.
pub fn replayed_properties(original: &BasicProperties) -> BasicProperties {
    let headers = original.headers().clone().unwrap_or_default();
    let replayed = counter(Some(&headers), REPLAYED_HEADER).saturating_add(1);
    let mut inner = headers.inner().clone();
    for name in RESET_HEADERS {
        inner.remove(*name);
    }
    inner.insert(
        REPLAYED_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(replayed)),
    );
    original.clone().with_headers(FieldTable::from(inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_copy_starts_over_but_keeps_its_trace() {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        );
        for name in RESET_HEADERS {
            headers.insert((*name).into(), AMQPValue::LongLongInt(3));
        }
        headers.insert(REPLAYED_HEADER.into(), AMQPValue::LongLongInt(1));
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(headers);
        let copy = replayed_properties(&original);
        let inner = copy
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        assert!(RESET_HEADERS.iter().all(|h| !inner.contains_key(*h)));
        assert_eq!(inner.get(REPLAYED_HEADER), Some(&AMQPValue::LongLongInt(2)));
        assert!(inner.contains_key("traceparent"));
        assert_eq!(copy.message_id(), original.message_id());
        let fresh = replayed_properties(&BasicProperties::default());
        assert_eq!(counter(fresh.headers().as_ref(), REPLAYED_HEADER), 1);
    }
}
