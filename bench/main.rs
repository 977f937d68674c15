//! Benchmark: the worker against the broker's own ceiling, in one run.
//!
//! `cargo run --release --bin bench` (RabbitMQ at `GEWE_WORKER__AMQP__URL`
//! or the local default). Phases, each on its own uniquely named topology:
//!
//! 1. ceiling: a bare loop with the same queue type and prefetch that
//!    consumes, publishes a small confirmed event and acks (no HTTP);
//! 2. worker: the real worker (this binary re-executed as a child process)
//!    against the in-process GeWe simulator with no latency, pacing off;
//! 3. worker against a simulator with `--latency`: achieved vs ideal
//!    prefetch / latency.
//!
//! The load generator's publish rate and the result counter's drain rate
//! are measured too, to show they are not the bottleneck. Rates are taken
//! between the first and the last result, so start-up is not counted.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{StreamExt, future::join_all};
use gewe_friend_worker::{
    app::{self, Application},
    broker::topology,
    config::Settings,
    simulator,
};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;

mod cpu;
use cpu::{PhaseCpu, Snapshot};

#[derive(Parser, Debug)]
struct Args {
    /// Commands per throughput phase (ceiling and worker).
    #[arg(long, default_value_t = 20_000)]
    n: usize,
    /// Commands in the slow-GeWe phase.
    #[arg(long, default_value_t = 3_000)]
    slow_n: usize,
    /// GeWe latency in the slow phase.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Run as the worker child process (internal).
    #[arg(long, hide = true)]
    as_worker: bool,
}

const TOKEN: &str = "bench-token";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.as_worker {
        return rt.block_on(async {
            let settings = Settings::load(None)?;
            Application::build(settings)
                .await?
                .run(app::shutdown_on_signals())
                .await
        });
    }
    rt.block_on(bench(args))
}

fn settings(tag: &str) -> anyhow::Result<Settings> {
    let mut s = Settings::load(None)?;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    s.amqp.command_queue = format!("bench.{tag}.{id}.commands");
    s.amqp.result_exchange = format!("bench.{tag}.{id}.results");
    s.amqp.dead_letter_exchange = format!("bench.{tag}.{id}.dlx");
    s.amqp.dead_letter_queue = format!("bench.{tag}.{id}.dead");
    Ok(s)
}

fn command_body(i: usize) -> Vec<u8> {
    format!(
        r#"{{"commandId":"bench-{i}","appId":"app-{}","chatroomId":"34757816141@chatroom","memberWxid":"wxid_{i}","content":"hello"}}"#,
        i % 4096
    )
    .into_bytes()
}

/// Publishes `n` bodies with confirms, pipelined in windows of 1,000.
async fn preload(
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
                bail!("preload nacked");
            }
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A queue bound to `exchange` receiving every result.
async fn results_queue(ch: &Channel, exchange: &str) -> anyhow::Result<String> {
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
async fn count(conn: &Connection, queue: &str, n: usize) -> anyhow::Result<f64> {
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

/// The bare loop: consume, publish a small confirmed event, ack.
async fn bare_loop(url: &str, s: &Settings, n: usize) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(s.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            s.amqp.command_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let exchange: Arc<str> = Arc::from(s.amqp.result_exchange.as_str());
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let d = consumer.next().await.context("bare consumer closed")??;
        let (publish, exchange) = (publish.clone(), exchange.clone());
        tasks.push(tokio::spawn(async move {
            let body = br#"{"commandId":"x","status":"succeeded","v3":"v3_x","attempts":1}"#;
            let confirm = publish
                .basic_publish(
                    (*exchange).into(),
                    "add_friend.succeeded".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            if confirm.take_message().is_some() {
                bail!("unroutable");
            }
            d.acker.ack(BasicAckOptions::default()).await?;
            Ok(())
        }));
    }
    for t in join_all(tasks).await {
        t??;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// What one worker phase measured.
struct WorkerRun {
    rate: f64,
    peak_rss_kib: u64,
    cpu: PhaseCpu,
    generator: f64,
}

/// Runs the worker as a child process on `s`, against `gewe`, until `n`
/// results arrived.
async fn worker_phase(
    conn: &Connection,
    s: &Settings,
    gewe: SocketAddr,
    n: usize,
) -> anyhow::Result<WorkerRun> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare(&ch, &s.amqp).await?;
    let results = results_queue(&ch, &s.amqp.result_exchange).await?;
    let generator = preload(&ch, &s.amqp.command_queue, n, command_body).await?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--as-worker")
        .envs(gewe_friend_worker::config::amqp_env(&s.amqp))
        .env("GEWE_WORKER__GEWE__BASE_URL", format!("http://{gewe}"))
        .env("GEWE_WORKER__GEWE__TOKEN", TOKEN)
        .env("GEWE_WORKER__PACING__PER_APP_MIN_INTERVAL", "0s")
        .env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0")
        .envs(std::env::var("BENCH_WORKER_THREADS").map(|v| ("TOKIO_WORKER_THREADS", v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("worker pid")?;
    let broker = cpu::broker_pid();
    let before = Snapshot::take(broker, Some(pid));
    let rate = count(conn, &results, n).await?;
    let cpu = PhaseCpu::between(&before, &Snapshot::take(broker, Some(pid)), n);
    let peak_rss_kib = cpu::peak_rss_kib(pid)?;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(40), child.wait()).await;
    cleanup(&ch, s).await;
    Ok(WorkerRun {
        rate,
        peak_rss_kib,
        cpu,
        generator,
    })
}

async fn cleanup(ch: &Channel, s: &Settings) {
    topology::remove(ch, &s.amqp).await;
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let base = settings("probe")?;
    let url = base.amqp.url.clone();
    let conn = Arc::new(
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .context("the benchmark needs RabbitMQ (GEWE_WORKER__AMQP__URL)")?,
    );
    let stop = CancellationToken::new();
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let sim = |latency| simulator::Options {
        token: Some(TOKEN.into()),
        latency,
        ..Default::default()
    };
    let (fast_gewe, _) = simulator::spawn(local, sim(Duration::ZERO), stop.clone()).await?;
    let (slow_gewe, _) = simulator::spawn(local, sim(args.latency), stop.clone()).await?;
    println!(
        "gewe-friend-worker benchmark: n={} prefetch={} queue_type={:?}",
        args.n, base.amqp.prefetch, base.amqp.queue_type
    );

    // 1. ceiling
    let s = settings("ceiling")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare(&ch, &s.amqp).await?;
    let results = results_queue(&ch, &s.amqp.result_exchange).await?;
    preload(&ch, &s.amqp.command_queue, args.n, command_body).await?;
    let counter = {
        let (conn, results, n) = (conn.clone(), results.clone(), args.n);
        tokio::spawn(async move { count(&conn, &results, n).await })
    };
    let broker = cpu::broker_pid();
    let before = Snapshot::take(broker, None);
    bare_loop(&url, &s, args.n).await?;
    let ceiling = counter.await??;
    let ceiling_cpu = PhaseCpu::between(&before, &Snapshot::take(broker, None), args.n);
    cleanup(&ch, &s).await;

    // 2. worker, fast GeWe
    let fast = worker_phase(&conn, &settings("worker")?, fast_gewe, args.n).await?;
    let worker = fast.rate;

    // 3. worker, slow GeWe
    let slow = worker_phase(&conn, &settings("slow")?, slow_gewe, args.slow_n)
        .await?
        .rate;
    let ideal = f64::from(base.amqp.prefetch) / args.latency.as_secs_f64();

    // Counter check: drain a pre-filled queue as fast as the counter can.
    let s = settings("counter")?;
    let q = ch
        .queue_declare(
            s.amqp.command_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    preload(&ch, q.name().as_str(), args.n, |_| b"{}".to_vec()).await?;
    let counter_rate = count(&conn, q.name().as_str(), args.n).await?;
    let _ = ch
        .queue_delete(q.name().clone(), QueueDeleteOptions::default())
        .await;
    stop.cancel();

    println!();
    println!("| measurement | value |");
    println!("| --- | --- |");
    println!("| broker ceiling (bare consume → confirmed publish → ack) | {ceiling:.0} msg/s |");
    println!("| worker, GeWe simulator without latency | {worker:.0} msg/s |");
    println!("| worker / ceiling | {:.2} |", worker / ceiling);
    println!(
        "| worker, GeWe latency {:?} | {slow:.0} msg/s (ideal prefetch/latency {ideal:.0}) |",
        args.latency
    );
    println!("| slow / ideal | {:.2} |", slow / ideal);
    println!(
        "| worker peak RSS | {:.1} MiB |",
        fast.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "| worker CPU per 1,000 commands | {:.3} s |",
        fast.cpu.worker_us.unwrap_or(0.0) / 1000.0
    );
    println!(
        "| load generator publish rate (confirmed) | {:.0} msg/s |",
        fast.generator
    );
    println!("| result counter drain rate | {counter_rate:.0} msg/s |");
    println!();
    println!(
        "CPU time per message, in µs, by process (from /proc; the counter runs in the bench process):"
    );
    println!();
    println!("| phase | RabbitMQ | bench process | worker | machine busy |");
    println!("| --- | --- | --- | --- | --- |");
    for (phase, c) in [
        ("ceiling (bare loop + counter in bench)", &ceiling_cpu),
        ("worker (simulator + counter in bench)", &fast.cpu),
    ] {
        println!(
            "| {phase} | {} | {:.1} | {} | {}% |",
            cpu::opt(c.broker_us, 1),
            c.bench_us,
            cpu::opt(c.worker_us, 1),
            cpu::opt(c.busy.map(|b| b * 100.0), 0),
        );
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}
