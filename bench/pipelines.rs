//! The pipelines the benchmark compares, each run as a child process (this
//! binary re-executed) so its CPU time and memory are its own:
//!
//! - `bare`: consume → confirmed `mandatory` publish → ack, no HTTP: the
//!   broker's own ceiling;
//! - `http`: the same plus one keep-alive reqwest POST to the GeWe
//!   simulator per command, its answer read: the ceiling of any worker that
//!   calls GeWe, and the anchor the worker is judged against;
//! - `worker`: the real worker;
//! - `traced`: the real worker exporting its spans to the bench's OTLP sink
//!   ([`crate::traced`]).
//!
//! Every pipeline handles deliveries concurrently, one task each, within
//! the same prefetch, so only what each does per message differs. The bare
//! loops publish what the worker publishes for a success: an event of the
//! same size, with the same properties (made by the worker's own
//! `outbound::properties`), so the broker and the client library move the
//! same bytes for all three.

use std::sync::Arc;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use gewe_friend_worker::{
    app::{self, Application},
    broker::Connector,
    config::Settings,
    gewe::{ADD_MEMBER_PATH, TOKEN_HEADER},
    outbound,
    redact::Redactor,
    telemetry,
};
use lapin::{
    Channel, ConnectionProperties,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::FieldTable,
};

/// Which pipeline a child process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pipeline {
    /// Consume, confirmed publish, ack.
    Bare,
    /// The same plus one HTTP POST per command.
    Http,
    /// The real worker.
    Worker,
    /// The real worker with trace export on.
    Traced,
}

impl Pipeline {
    /// Its `--as` value.
    pub fn arg(self) -> &'static str {
        match self {
            Pipeline::Bare => "bare",
            Pipeline::Http => "http",
            Pipeline::Worker => "worker",
            Pipeline::Traced => "traced",
        }
    }

    /// As the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Pipeline::Bare => "ceiling without HTTP (consume → confirmed publish → ack)",
            Pipeline::Http => "ceiling with HTTP (the same + one keep-alive POST to GeWe)",
            Pipeline::Worker => "gewe-friend-worker",
            Pipeline::Traced => "gewe-friend-worker, trace export on",
        }
    }
}

/// Runs `pipeline` in this (child) process on the settings of the
/// environment, until SIGTERM.
pub async fn run_child(pipeline: Pipeline) -> anyhow::Result<()> {
    // A config file when the phase gives one (the backlog's override).
    let file =
        std::env::var_os(gewe_friend_worker::config::CONFIG_PATH_ENV).map(std::path::PathBuf::from);
    let settings = Settings::load(file.as_deref())?;
    match pipeline {
        // The traced worker's endpoint is in its environment.
        Pipeline::Worker | Pipeline::Traced => {
            // Quiet unless RUST_LOG says otherwise (the soak keeps a log).
            telemetry::init(
                settings.log.format,
                Redactor::new(settings.secrets())?,
                "error",
            );
            Application::build(settings)
                .await?
                .run(app::shutdown_on_signals())
                .await
        }
        Pipeline::Bare | Pipeline::Http => {
            let stop = app::shutdown_on_signals();
            tokio::select! {
                () = stop.cancelled() => Ok(()),
                r = bare_loop(&settings, pipeline == Pipeline::Http) => r,
            }
        }
    }
}

/// What each delivery's task needs.
struct Loop {
    publish: Channel,
    exchange: String,
    /// `Some` for the `http` pipeline.
    http: Option<(reqwest::Client, reqwest::Url)>,
    /// What every delivery publishes ([`succeeded_event`]).
    event: Vec<u8>,
}

/// A bench command's id: `bench-<run>-<i>` (see `phases::command_bodies`).
const COMMAND_ID: &str = "bench-0123456789abcdef0123456789abcdef-12345";

/// The success event the worker publishes for a bench command, byte for
/// byte in shape and size.
fn succeeded_event() -> Vec<u8> {
    format!(
        concat!(
            r#"{{"commandId":"{}","status":"succeeded","#,
            r#""appId":"app-1234","chatroomId":"34757816141@chatroom","memberWxid":"wxid_12345","#,
            r#""v3":"v3_0123456789abcdef0123456789abcdef@stranger","attempts":1,"#,
            r#""receivedAt":"2026-11-27T19:24:31.123Z","completedAt":"2026-11-27T19:24:31.125Z"}}"#
        ),
        COMMAND_ID
    )
    .into_bytes()
}

/// The bare loop, with one GeWe POST per command when `with_http`.
async fn bare_loop(s: &Settings, with_http: bool) -> anyhow::Result<()> {
    let conn = Connector::new(&s.amqp)?
        .connect_first(ConnectionProperties::default())
        .await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(s.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let http = if with_http {
        let token = s.require_token()?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            TOKEN_HEADER,
            secrecy::ExposeSecret::expose_secret(token).parse()?,
        );
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(usize::from(s.amqp.prefetch))
            .build()?;
        let url = reqwest::Url::parse(&s.gewe.base_url)?.join(ADD_MEMBER_PATH)?;
        Some((client, url))
    } else {
        None
    };
    let pipeline = Arc::new(Loop {
        publish,
        exchange: s.amqp.result_exchange.clone(),
        http,
        event: succeeded_event(),
    });
    let mut consumer = consume
        .basic_consume(
            s.amqp.command_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.context("consumer failed")?;
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            if let Err(e) = pipeline.handle(delivery).await {
                eprintln!("pipeline: {e:#}");
            }
        });
    }
    Ok(())
}

impl Loop {
    async fn handle(&self, d: Delivery) -> anyhow::Result<()> {
        if let Some((client, url)) = &self.http {
            let answer = client
                .post(url.clone())
                .header("content-type", "application/json")
                .body(r#"{"appId":"app","chatroomId":"1@chatroom","memberWxid":"wxid_x","content":"hello"}"#)
                .send()
                .await?
                .bytes()
                .await?;
            if answer.is_empty() {
                bail!("empty answer");
            }
        }
        let confirm = self
            .publish
            .basic_publish(
                self.exchange.as_str().into(),
                "add_friend.succeeded".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &self.event,
                outbound::properties(COMMAND_ID, "add_friend.succeeded", None),
            )
            .await?
            .await?;
        if confirm.take_message().is_some() {
            bail!("unroutable");
        }
        d.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}
