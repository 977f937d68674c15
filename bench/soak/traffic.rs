//! The soak's steady load and its result tally. Both talk to RabbitMQ
//! directly, not through the fault proxy: only the worker's connection is
//! disturbed.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::bail;
use futures_util::{StreamExt, future::join_all};
use lapin::{
    BasicProperties, Channel,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::FieldTable,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Accounts the commands are spread over (each paced by the worker).
const ACCOUNTS: usize = 100;

/// The member a command of this run names: unique per command, so GeWe's
/// calls per member are calls per command.
pub fn member(run: &str, i: usize) -> String {
    format!("wxid_soak_{run}_{i}")
}

/// Publishes `rate` commands a second, confirmed, until `stop`; counts the
/// confirmed ones in `published`.
pub async fn publish_steadily(
    ch: Channel,
    queue: String,
    rate: u32,
    run: String,
    published: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut due = 0.0;
    let mut next = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        due += f64::from(rate) / 10.0;
        let mut confirms = Vec::new();
        while due >= 1.0 {
            due -= 1.0;
            let body = serde_json::json!({
                "commandId": format!("soak-{run}-{next}"),
                "appId": format!("app-{}", next % ACCOUNTS),
                "chatroomId": "34757816141@chatroom",
                "memberWxid": member(&run, next),
                "content": "hello from the soak",
            });
            next += 1;
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    props.clone(),
                )
                .await?,
            );
        }
        for confirm in join_all(confirms).await {
            if !confirm?.is_ack() {
                bail!("the broker nacked a command");
            }
            published.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// What the result events said, per commandId.
#[derive(Default)]
pub struct Tally {
    /// commandId → (events, events not marked duplicate, last status/kind).
    per_command: HashMap<String, (usize, usize, String)>,
}

impl Tally {
    /// Commands with at least one event.
    pub fn answered(&self) -> usize {
        self.per_command.len()
    }

    /// Events in all.
    pub fn events(&self) -> usize {
        self.per_command.values().map(|(n, _, _)| n).sum()
    }

    /// Commands with more than one event not marked duplicate.
    pub fn unmarked_twice(&self) -> usize {
        self.per_command
            .values()
            .filter(|(_, unmarked, _)| *unmarked > 1)
            .count()
    }

    /// Commands by their last outcome (`succeeded` or the error kind).
    pub fn outcomes(&self) -> Vec<(String, usize)> {
        let mut by: HashMap<&str, usize> = HashMap::new();
        for (_, _, outcome) in self.per_command.values() {
            *by.entry(outcome).or_default() += 1;
        }
        let mut by: Vec<_> = by.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        by.sort();
        by
    }

    fn record(&mut self, event: &Value) {
        let id = event["commandId"].as_str().unwrap_or("").to_owned();
        let outcome = match event["status"].as_str() {
            Some("succeeded") => "succeeded".to_owned(),
            _ => format!("failed: {}", event["error"]["kind"].as_str().unwrap_or("?")),
        };
        let entry = self.per_command.entry(id).or_insert((0, 0, String::new()));
        entry.0 += 1;
        if event["duplicate"] != true {
            entry.1 += 1;
        }
        entry.2 = outcome;
    }
}

/// Consumes the result events from `queue` into `tally` until `stop`.
pub async fn collect(
    ch: Channel,
    queue: String,
    tally: Arc<Mutex<Tally>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut events = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            d = events.next() => match d {
                Some(d) => d?,
                None => bail!("the result consumer was cancelled"),
            },
        };
        let event: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
        tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(&event);
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
}
