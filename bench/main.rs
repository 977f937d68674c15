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
//! With `--soak DURATION` it runs the fault soak instead (see [`soak`]).
//!
//! Phases 1 and 2 alternate for `--rounds` rounds and the medians are
//! reported: on a shared two-core machine one round can be off by 20 %.
//! The load generator's publish rate and the result counter's drain rate
//! are measured too, to show they are not the bottleneck, and every phase
//! reports the CPU time each process spent per message. Rates are taken
//! between the first and the last result, so start-up is not counted.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use gewe_friend_worker::{
    app::{self, Application},
    broker::Connector,
    config::Settings,
    redact::Redactor,
    simulator, telemetry,
};
use lapin::{
    ConnectionProperties,
    options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;

mod cpu;
mod phases;
mod soak;

use cpu::PhaseCpu;
use phases::{CeilingRun, TOKEN, WorkerRun};

#[derive(Parser, Debug)]
struct Args {
    /// Commands per throughput phase (ceiling and worker).
    #[arg(long, default_value_t = 20_000)]
    n: usize,
    /// Ceiling/worker rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Commands in the slow-GeWe phase.
    #[arg(long, default_value_t = 3_000)]
    slow_n: usize,
    /// Also measure the worker with Redis at this URL (shared dedupe), e.g.
    /// `redis://127.0.0.1:6379`.
    #[arg(long)]
    redis: Option<String>,
    /// GeWe latency in the slow phase.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Run the fault soak for this long (e.g. `10m`) instead of the benchmark.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Commands per second during the soak.
    #[arg(long, default_value_t = 20)]
    soak_rate: u32,
    /// Where the soak writes `rss.csv` and the worker's `worker.log`.
    #[arg(long, default_value = "target/soak")]
    soak_dir: PathBuf,
    /// Run as the worker child process (internal).
    #[arg(long, hide = true)]
    as_worker: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.as_worker {
        return rt.block_on(async {
            let settings = Settings::load(None)?;
            // Quiet unless RUST_LOG says otherwise (the soak keeps a log).
            telemetry::init(
                settings.log.format,
                Redactor::new(settings.secrets()),
                "error",
            );
            Application::build(settings)
                .await?
                .run(app::shutdown_on_signals())
                .await
        });
    }
    if let Some(duration) = args.soak {
        return rt.block_on(soak::run(duration, args.soak_rate, &args.soak_dir));
    }
    rt.block_on(bench(args))
}

/// The median of `values` (upper median for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `median (min–max)` of `values`, each formatted by `fmt`.
fn spread(values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{} ({}–{})",
        fmt(median(values.to_vec())),
        fmt(min),
        fmt(max)
    )
}

/// The per-party CPU of the round with the median rate.
fn median_cpu<'a>(runs: impl Iterator<Item = (f64, &'a PhaseCpu)>) -> Option<&'a PhaseCpu> {
    let mut runs: Vec<_> = runs.collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mid = runs.len() / 2;
    runs.get(mid).map(|r| r.1)
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let base = phases::settings("probe")?;
    let conn = Arc::new(
        Connector::new(&base.amqp)?
            .connect_first(ConnectionProperties::default())
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
    let rounds = args.rounds.max(1);
    println!(
        "gewe-friend-worker benchmark: n={} rounds={rounds} prefetch={} queue_type={:?}",
        args.n, base.amqp.prefetch, base.amqp.queue_type
    );

    let mut ceilings: Vec<CeilingRun> = Vec::new();
    let mut workers: Vec<WorkerRun> = Vec::new();
    for round in 1..=rounds {
        let c = phases::ceiling_phase(&conn, args.n).await?;
        let w = phases::worker_phase(&conn, &phases::settings("worker")?, fast_gewe, None, args.n)
            .await?;
        println!(
            "round {round}: ceiling {:.0} msg/s, worker {:.0} msg/s, ratio {:.2}",
            c.rate,
            w.rate,
            w.rate / c.rate
        );
        ceilings.push(c);
        workers.push(w);
    }
    let with_redis = match &args.redis {
        Some(url) => Some(
            phases::worker_phase(
                &conn,
                &phases::settings("redis")?,
                fast_gewe,
                Some(url),
                args.n,
            )
            .await?,
        ),
        None => None,
    };
    let slow = phases::worker_phase(
        &conn,
        &phases::settings("slow")?,
        slow_gewe,
        None,
        args.slow_n,
    )
    .await?
    .rate;
    let ideal = f64::from(base.amqp.prefetch) / args.latency.as_secs_f64();

    // Counter check: drain a pre-filled queue as fast as the counter can.
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let q = ch
        .queue_declare(
            phases::settings("counter")?
                .amqp
                .command_queue
                .as_str()
                .into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    phases::preload(&ch, q.name().as_str(), args.n, |_| b"{}".to_vec()).await?;
    let counter_rate = phases::count(&conn, q.name().as_str(), args.n).await?;
    let _ = ch
        .queue_delete(q.name().clone(), QueueDeleteOptions::default())
        .await;
    stop.cancel();

    let rate = |v: f64| format!("{v:.0}");
    let ceiling_rates: Vec<f64> = ceilings.iter().map(|c| c.rate).collect();
    let worker_rates: Vec<f64> = workers.iter().map(|w| w.rate).collect();
    let ratios: Vec<f64> = workers
        .iter()
        .zip(&ceilings)
        .map(|(w, c)| w.rate / c.rate)
        .collect();
    let peak_rss = workers.iter().map(|w| w.peak_rss_kib).max().unwrap_or(0);
    let worker_cpu: Vec<f64> = workers
        .iter()
        .filter_map(|w| w.cpu.worker_us)
        .map(|us| us / 1000.0)
        .collect();
    let generator: Vec<f64> = workers.iter().map(|w| w.generator).collect();

    println!();
    println!("| measurement (median of {rounds} rounds, range) | value |");
    println!("| --- | --- |");
    println!(
        "| broker ceiling (bare consume → confirmed publish → ack) | {} msg/s |",
        spread(&ceiling_rates, rate)
    );
    println!(
        "| worker, GeWe simulator without latency | {} msg/s |",
        spread(&worker_rates, rate)
    );
    println!(
        "| worker / ceiling (per round) | {} |",
        spread(&ratios, |v| format!("{v:.2}"))
    );
    if let Some(r) = &with_redis {
        println!(
            "| worker with Redis (shared dedupe), simulator without latency, one round | {:.0} msg/s ({:.2}× the in-memory median; worker CPU {} µs per message) |",
            r.rate,
            r.rate / median(worker_rates.clone()),
            cpu::opt(r.cpu.worker_us, 1),
        );
    }
    println!(
        "| worker, GeWe latency {:?} | {slow:.0} msg/s (ideal prefetch/latency {ideal:.0}) |",
        args.latency
    );
    println!("| slow / ideal | {:.2} |", slow / ideal);
    println!(
        "| worker peak RSS (largest) | {:.1} MiB |",
        peak_rss as f64 / 1024.0
    );
    println!(
        "| worker CPU per 1,000 commands | {} s |",
        spread(&worker_cpu, |v| format!("{v:.3}"))
    );
    println!(
        "| load generator publish rate (confirmed) | {} msg/s |",
        spread(&generator, rate)
    );
    println!("| result counter drain rate | {counter_rate:.0} msg/s |");

    println!();
    println!("CPU time per message in µs, by process, in the median round (from /proc):");
    println!();
    println!("| phase | RabbitMQ | bench process | worker | all | machine busy |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let rows = [
        (
            "ceiling (bench: bare loop + counter)",
            median_cpu(ceilings.iter().map(|c| (c.rate, &c.cpu))),
        ),
        (
            "worker (bench: simulator + counter)",
            median_cpu(workers.iter().map(|w| (w.rate, &w.cpu))),
        ),
    ];
    for (phase, c) in rows {
        let Some(c) = c else { continue };
        let all = c.broker_us.unwrap_or(0.0) + c.bench_us + c.worker_us.unwrap_or(0.0);
        println!(
            "| {phase} | {} | {:.1} | {} | {all:.1} | {}% |",
            cpu::opt(c.broker_us, 1),
            c.bench_us,
            cpu::opt(c.worker_us, 1),
            cpu::opt(c.busy.map(|b| b * 100.0), 0),
        );
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}
