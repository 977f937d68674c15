//! The benchmark's phases: load generation, the result counter, the bare
//! broker loop (the ceiling) and the worker as a child process.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::{StreamExt, future::join_all};
use gewe_friend_worker::{broker::topology, config::Settings};
use lapin::{
    BasicProperties, Channel, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};

use crate::{
    cpu::{self, PhaseCpu, Snapshot},
    pipelines::Pipeline,
};

/// The token the worker sends and the simulator expects.
pub const TOKEN: &str = "bench-token";

/// Settings with uniquely named queues and exchanges tagged `tag`.
pub fn settings(tag: &str) -> anyhow::Result<Settings> {
    let mut s = Settings::load(None)?;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    s.amqp.command_queue = format!("bench.{tag}.{id}.commands");
    s.amqp.result_exchange = format!("bench.{tag}.{id}.results");
    s.amqp.dead_letter_exchange = format!("bench.{tag}.{id}.dlx");
    s.amqp.dead_letter_queue = format!("bench.{tag}.{id}.dead");
    Ok(s)
}

/// Command bodies whose commandIds are unique to this phase, so outcomes
/// stored by an earlier run (in Redis) are never found.
fn command_bodies() -> impl Fn(usize) -> Vec<u8> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    move |i| {
        format!(
            r#"{{"commandId":"bench-{run}-{i}","appId":"app-{}","chatroomId":"34757816141@chatroom","memberWxid":"wxid_{i}","content":"hello"}}"#,
            i % 4096
        )
        .into_bytes()
    }
}

/// The account that holds the backlog in [`backlog_phase`].
pub const BACKLOG_APP: &str = "bench-backlog";

/// Commands for [`BACKLOG_APP`], unique to this phase.
fn backlog_bodies() -> impl Fn(usize) -> Vec<u8> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    move |i| {
        format!(
            r#"{{"commandId":"backlog-{run}-{i}","appId":"{BACKLOG_APP}","chatroomId":"34757816141@chatroom","memberWxid":"wxid_b{i}","content":"hello"}}"#
        )
        .into_bytes()
    }
}

/// Publishes `n` bodies with confirms, pipelined in windows of 1,000.
pub async fn preload(
    ch: &Channel,
    queue: &str,
    n: usize,
    body: impl Fn(usize) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    for window in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut confirms = Vec::with_capacity(window.len());
        for &i in window {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(i),
                    props.clone(),
                )
                .await?,
            );
        }
        for c in join_all(confirms).await {
            if !c?.is_ack() {
                bail!("a preloaded command was not confirmed");
            }
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A queue bound to `exchange` receiving every result.
pub async fn results_queue(ch: &Channel, exchange: &str) -> anyhow::Result<String> {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(q.name().to_string())
}

/// Consumes `n` messages; returns the rate between the first and the last.
pub async fn count(conn: &Connection, queue: &str, n: usize) -> anyhow::Result<f64> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut first = None;
    for i in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("results stopped arriving")?
            .context("consumer closed")??;
        first.get_or_insert_with(Instant::now);
        // One ack per 100 (multiple) keeps the counter cheap next to the
        // pipeline it measures.
        if i % 100 == 99 || i + 1 == n {
            d.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    Ok((n.saturating_sub(1)) as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// The worker (this binary re-executed with `--as worker`) on `s`'s broker
/// and topology, against the GeWe at `gewe` and Redis at `redis`, if given;
/// default settings otherwise. Add env and spawn.
pub fn worker_command(
    s: &Settings,
    gewe: SocketAddr,
    redis: Option<&str>,
) -> anyhow::Result<tokio::process::Command> {
    pipeline_command(Pipeline::Worker, s, gewe, redis)
}

/// `pipeline` as a child process (this binary re-executed with `--as`) on
/// `s`'s broker and topology, against the GeWe at `gewe` and Redis at
/// `redis`, if given; default settings otherwise. Add env and spawn.
pub fn pipeline_command(
    pipeline: Pipeline,
    s: &Settings,
    gewe: SocketAddr,
    redis: Option<&str>,
) -> anyhow::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("--as")
        .arg(pipeline.arg())
        .envs(gewe_friend_worker::config::amqp_env(&s.amqp))
        .env("GEWE_WORKER__GEWE__BASE_URL", format!("http://{gewe}"))
        .env("GEWE_WORKER__GEWE__TOKEN", TOKEN)
        .env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0")
        // The stored outcomes expire soon after the run.
        .envs(redis.into_iter().flat_map(|url| {
            [
                ("GEWE_WORKER__REDIS__URL", url),
                ("GEWE_WORKER__DEDUPE__WINDOW", "1h"),
            ]
        }))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if pipeline == Pipeline::Traced {
        let endpoint = crate::traced::endpoint().context("the span sink is not running")?;
        cmd.env("GEWE_WORKER__TELEMETRY__OTLP_ENDPOINT", endpoint);
    }
    Ok(cmd)
}

/// SIGTERM to the worker child; waits up to 40 s for it to exit.
pub async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(40), child.wait()).await;
}

/// The workers' `pacing.per_app_min_interval`: `0s` (pacing off), or
/// `BENCH_PACING` (e.g. `1ms`: every call reserves its turn, as in
/// production, without the interval limiting the rate).
fn pacing_interval() -> String {
    std::env::var("BENCH_PACING").unwrap_or_else(|_| "0s".to_owned())
}

/// What one phase measured.
pub struct Run {
    /// Results per second, first to last.
    pub rate: f64,
    /// The pipeline process's peak RSS.
    pub peak_rss_kib: u64,
    /// CPU per message, by party.
    pub cpu: PhaseCpu,
    /// The load generator's confirmed publish rate while preloading.
    pub generator: f64,
}

/// How the backlog meets the measured commands in [`backlog_phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Queued ahead of the others: its first pass (each command consumed
    /// and deferred once) is part of the measured phase.
    Arriving,
    /// Deferred before the others are queued (a worker ran until the
    /// deferral ladder held it, then stopped): the account holds it while
    /// the others are measured.
    Held,
}

/// The worker with [`BACKLOG_APP`] limited to one request a day, its
/// `backlog` commands met as `how` says, and `n` commands for other
/// accounts: the backlog is deferred (one request goes out, its one
/// event is counted with the others when arriving), and the rate is
/// that of the others' results. Returns the run and how many copies wait
/// in the deferral queues afterwards.
pub async fn backlog_phase(
    conn: &Connection,
    s: &Settings,
    gewe: SocketAddr,
    (backlog, how): (usize, Backlog),
    n: usize,
) -> anyhow::Result<(Run, u32)> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare(&ch, &s.amqp).await?;
    topology::declare_delay_queues(&ch, &s.amqp, &[]).await?;
    let results = results_queue(&ch, &s.amqp.result_exchange).await?;
    let config = std::env::temp_dir().join(format!("bench-backlog-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!("[accounts.overrides.\"{BACKLOG_APP}\"]\ndaily_limit = 1\n"),
    )?;
    let worker = || -> anyhow::Result<tokio::process::Child> {
        Ok(pipeline_command(Pipeline::Worker, s, gewe, None)?
            .env(
                "GEWE_WORKER__PACING__PER_APP_MIN_INTERVAL",
                pacing_interval(),
            )
            .env("GEWE_WORKER_CONFIG", &config)
            .stderr(Stdio::null())
            .spawn()?)
    };
    preload(&ch, &s.amqp.command_queue, backlog, backlog_bodies()).await?;
    let mut expected = n + 1;
    if how == Backlog::Held {
        let mut child = worker()?;
        count(conn, &results, 1).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while deferred_copies(&ch, s).await? + 1 < backlog as u32 {
            if Instant::now() > deadline {
                bail!("the backlog was not deferred within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        terminate(&mut child).await;
        expected = n;
    }
    let generator = preload(&ch, &s.amqp.command_queue, n, command_bodies()).await?;
    let mut child = worker()?;
    let pid = child.id().context("child pid")?;
    let broker = cpu::broker_pid();
    let before = Snapshot::take(broker, Some(pid));
    let rate = count(conn, &results, expected).await?;
    let cpu = PhaseCpu::between(&before, &Snapshot::take(broker, Some(pid)), n);
    let peak_rss_kib = cpu::peak_rss_kib(pid)?;
    terminate(&mut child).await;
    let deferred = deferred_copies(&ch, s).await?;
    topology::remove_delay_queues(&ch, &s.amqp, &[]).await;
    topology::remove(&ch, &s.amqp).await;
    let _ = std::fs::remove_file(&config);
    Ok((
        Run {
            rate,
            peak_rss_kib,
            cpu,
            generator,
        },
        deferred,
    ))
}

/// Copies waiting in `s`'s deferral queues.
async fn deferred_copies(ch: &Channel, s: &Settings) -> anyhow::Result<u32> {
    let mut deferred = 0;
    for delay in gewe_friend_worker::defer::DEFER_DELAYS {
        let queue = gewe_friend_worker::config::defer_queue_name(&s.amqp.command_queue, delay);
        let declared = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        deferred += declared.message_count();
    }
    Ok(deferred)
}

/// Runs `pipeline` as a child process on `s` (its own topology), against
/// `gewe` (and Redis at `redis`, if given), until `n` preloaded commands
/// have their results, counted on the result exchange the same way for
/// every pipeline.
pub async fn phase(
    conn: &Connection,
    pipeline: Pipeline,
    s: &Settings,
    gewe: SocketAddr,
    redis: Option<&str>,
    n: usize,
) -> anyhow::Result<Run> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare(&ch, &s.amqp).await?;
    let results = results_queue(&ch, &s.amqp.result_exchange).await?;
    let generator = preload(&ch, &s.amqp.command_queue, n, command_bodies()).await?;
    let mut child = pipeline_command(pipeline, s, gewe, redis)?
        .env(
            "GEWE_WORKER__PACING__PER_APP_MIN_INTERVAL",
            pacing_interval(),
        )
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id().context("child pid")?;
    let broker = cpu::broker_pid();
    let before = Snapshot::take(broker, Some(pid));
    let rate = count(conn, &results, n).await?;
    let cpu = PhaseCpu::between(&before, &Snapshot::take(broker, Some(pid)), n);
    let peak_rss_kib = cpu::peak_rss_kib(pid)?;
    terminate(&mut child).await;
    topology::remove(&ch, &s.amqp).await;
    Ok(Run {
        rate,
        peak_rss_kib,
        cpu,
        generator,
    })
}
