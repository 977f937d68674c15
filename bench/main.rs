//! Benchmark: the worker against the pipeline's own ceilings, in one run.
//!
//! `cargo run --release --bin bench` (RabbitMQ at `GEWE_WORKER__AMQP__URL`
//! or the local default). Phases, each on its own uniquely named topology
//! and each pipeline a child process (see [`pipelines`]):
//!
//! 1. ceiling without HTTP: consume → confirmed publish → ack;
//! 2. ceiling with HTTP: the same plus one keep-alive POST to the GeWe
//!    simulator (no latency) per command: the anchor, since no worker that
//!    calls GeWe can beat it;
//! 3. worker: the real worker against the same simulator, pacing off;
//! 4. worker against a simulator with `--latency`: achieved vs ideal
//!    prefetch / latency.
//!
//! With `--soak DURATION` it runs the fault soak instead (see [`soak`]).
//!
//! Phases 1 to 3 alternate for `--rounds` rounds and the medians are
//! reported: on a shared two-core machine one round can be off by 20 %.
//! The load generator's publish rate and the result counter's drain rate
//! are measured too, to show they are not the bottleneck, and every phase
//! reports the CPU time each process spent per message. Rates are taken
//! between the first and the last result, so start-up is not counted.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use gewe_friend_worker::{broker::Connector, simulator};
use lapin::{
    ConnectionProperties,
    options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;

mod cpu;
mod phases;
mod pipelines;
mod soak;
mod traced;

use cpu::PhaseCpu;
use phases::{Run, TOKEN};
use pipelines::Pipeline;

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
    /// Also measure the worker with Redis at this URL (shared dedupe,
    /// pacing and budgets), e.g. `redis://127.0.0.1:6379`: in every round,
    /// next to the worker without it.
    #[arg(long)]
    redis: Option<String>,
    /// Commands for one account over its daily limit in the two backlog
    /// phases: queued ahead of the others', then already deferred while
    /// the others run (0: no backlog phases).
    #[arg(long, default_value_t = 5_000)]
    backlog: usize,
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
    /// Run as this pipeline's child process (internal).
    #[arg(long = "as", hide = true, value_enum)]
    as_child: Option<Pipeline>,
}

/// The worker's allocator (see `src/main.rs`), so that the ceilings, which
/// run as this binary too, are measured on the same one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(pipeline) = args.as_child {
        return rt.block_on(pipelines::run_child(pipeline));
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
    let sink = traced::spawn_sink(stop.clone()).await?;
    let rounds = args.rounds.max(1);
    println!(
        "gewe-friend-worker benchmark: n={} rounds={rounds} prefetch={} queue_type={:?}",
        args.n, base.amqp.prefetch, base.amqp.queue_type
    );

    // Every round runs the pipelines in turn, so a slow stretch of the
    // machine hits all of them alike.
    let order = [
        Pipeline::Bare,
        Pipeline::Http,
        Pipeline::Worker,
        Pipeline::Traced,
    ];
    let mut runs: Vec<(Pipeline, Run)> = Vec::new();
    let mut redis_runs: Vec<Run> = Vec::new();
    let mut spans = Vec::new();
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        for pipeline in order {
            let s = phases::settings(pipeline.arg())?;
            let run = phases::phase(&conn, pipeline, &s, fast_gewe, None, args.n).await?;
            if pipeline == Pipeline::Traced {
                // The worker flushed its spans before it exited.
                spans.push(sink.take_spans());
            }
            line.push_str(&format!(
                " {} {:.0} msg/s {} µs/msg;",
                pipeline.arg(),
                run.rate,
                cpu::opt(run.cpu.child_us, 0)
            ));
            runs.push((pipeline, run));
        }
        if let Some(url) = &args.redis {
            let s = phases::settings("redis")?;
            let run =
                phases::phase(&conn, Pipeline::Worker, &s, fast_gewe, Some(url), args.n).await?;
            line.push_str(&format!(
                " worker+redis {:.0} msg/s {} µs/msg;",
                run.rate,
                cpu::opt(run.cpu.child_us, 0)
            ));
            redis_runs.push(run);
        }
        println!("{line}");
    }
    let mut backlog = Vec::new();
    if args.backlog > 0 {
        for how in [phases::Backlog::Arriving, phases::Backlog::Held] {
            let s = phases::settings("backlog")?;
            let (run, deferred) =
                phases::backlog_phase(&conn, &s, fast_gewe, (args.backlog, how), args.n).await?;
            println!(
                "backlog ({how:?}): {} commands for {} (daily limit 1), {} others: others {:.0} msg/s {} µs/msg; {deferred} copies in the deferral queues",
                args.backlog,
                phases::BACKLOG_APP,
                args.n,
                run.rate,
                cpu::opt(run.cpu.child_us, 0)
            );
            backlog.push((how, run, deferred));
        }
    }
    let slow = phases::phase(
        &conn,
        Pipeline::Worker,
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

    report(
        &runs,
        rounds,
        Budgets {
            with_redis: &redis_runs,
            backlog: &backlog,
            backlog_size: args.backlog,
        },
        slow,
        ideal,
        args.latency,
        counter_rate,
    );
    let of = |p: Pipeline| -> Vec<&Run> {
        runs.iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, r)| r)
            .collect()
    };
    traced::report(&of(Pipeline::Worker), &of(Pipeline::Traced), &spans, args.n);
    println!(
        "| export requests received by the sink | {} |",
        sink.requests()
    );
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

/// The phases that price Redis and the account budgets.
struct Budgets<'a> {
    /// The worker with Redis, one run per round.
    with_redis: &'a [Run],
    /// The backlog phases: how the backlog met the others, their run, the
    /// copies deferred afterwards.
    backlog: &'a [(phases::Backlog, Run, u32)],
    /// Commands in the backlog.
    backlog_size: usize,
}

/// Prints the tables of BENCHMARKS.md.
fn report(
    runs: &[(Pipeline, Run)],
    rounds: usize,
    budgets: Budgets<'_>,
    slow: f64,
    ideal: f64,
    latency: Duration,
    counter_rate: f64,
) {
    let of = |p: Pipeline| runs.iter().filter(move |(q, _)| *q == p).map(|(_, r)| r);
    let rates = |p: Pipeline| of(p).map(|r| r.rate).collect::<Vec<_>>();
    let cpus = |p: Pipeline| of(p).filter_map(|r| r.cpu.child_us).collect::<Vec<_>>();
    let per_round = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>();
    let rate = |v: f64| format!("{v:.0}");
    let micros = |v: f64| format!("{v:.1}");
    let ratio = |v: f64| format!("{v:.2}");

    println!();
    println!(
        "| pipeline (median of {rounds} rounds, range) | msg/s | CPU µs per message (its process) | peak RSS |"
    );
    println!("| --- | --- | --- | --- |");
    for p in [Pipeline::Bare, Pipeline::Http, Pipeline::Worker] {
        let rss = of(p).map(|r| r.peak_rss_kib).max().unwrap_or(0);
        println!(
            "| {} | {} | {} | {:.1} MiB |",
            p.name(),
            spread(&rates(p), rate),
            spread(&cpus(p), micros),
            rss as f64 / 1024.0
        );
    }
    println!();
    println!("| ratio (per round, median and range) | value |");
    println!("| --- | --- |");
    println!(
        "| worker / ceiling with HTTP, msg/s (target ≥ 0.90) | {} |",
        spread(
            &per_round(&rates(Pipeline::Worker), &rates(Pipeline::Http)),
            ratio
        )
    );
    println!(
        "| worker / ceiling with HTTP, CPU per message (target ≤ 1.2) | {} |",
        spread(
            &per_round(&cpus(Pipeline::Worker), &cpus(Pipeline::Http)),
            ratio
        )
    );
    println!(
        "| worker / ceiling without HTTP, msg/s | {} |",
        spread(
            &per_round(&rates(Pipeline::Worker), &rates(Pipeline::Bare)),
            ratio
        )
    );
    println!(
        "| ceiling with HTTP / without, msg/s | {} |",
        spread(
            &per_round(&rates(Pipeline::Http), &rates(Pipeline::Bare)),
            ratio
        )
    );
    let Budgets {
        with_redis,
        backlog,
        backlog_size,
    } = budgets;
    if !with_redis.is_empty() {
        let redis_rates: Vec<f64> = with_redis.iter().map(|r| r.rate).collect();
        let redis_cpus: Vec<f64> = with_redis.iter().filter_map(|r| r.cpu.child_us).collect();
        println!(
            "| worker with Redis (dedupe, pacing, budgets), msg/s | {} |",
            spread(&redis_rates, rate)
        );
        println!(
            "| worker with Redis / without, msg/s (per round) | {} |",
            spread(&per_round(&redis_rates, &rates(Pipeline::Worker)), ratio)
        );
        println!(
            "| worker with Redis / without, CPU per message (per round) | {} |",
            spread(&per_round(&redis_cpus, &cpus(Pipeline::Worker)), ratio)
        );
    }
    for (how, run, deferred) in backlog {
        let worker = median(rates(Pipeline::Worker));
        let size = backlog_size;
        let when = match how {
            phases::Backlog::Arriving => "queued ahead of them (its first pass included)",
            phases::Backlog::Held => "already deferred (held in the ladder)",
        };
        println!(
            "| others' commands, a backlog of {size} for one account {when}, msg/s | {:.0} ({:.2}× the worker's median without it; CPU {} µs/msg; {deferred} copies deferred) |",
            run.rate,
            run.rate / worker,
            cpu::opt(run.cpu.child_us, 0)
        );
    }
    println!(
        "| worker, GeWe latency {latency:?} | {slow:.0} msg/s (ideal prefetch/latency {ideal:.0}) |"
    );
    println!("| slow / ideal | {:.2} |", slow / ideal);
    let generator: Vec<f64> = runs.iter().map(|(_, r)| r.generator).collect();
    println!(
        "| load generator publish rate (confirmed) | {} msg/s |",
        spread(&generator, rate)
    );
    println!("| result counter drain rate | {counter_rate:.0} msg/s |");

    println!();
    println!(
        "CPU time per message in µs, by process, in each pipeline's median round (from /proc):"
    );
    println!();
    println!(
        "| phase | RabbitMQ | bench process (counter, simulator) | pipeline process | all | machine busy |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for p in [Pipeline::Bare, Pipeline::Http, Pipeline::Worker] {
        let Some(c) = median_cpu(of(p).map(|r| (r.rate, &r.cpu))) else {
            continue;
        };
        let all = c.broker_us.unwrap_or(0.0) + c.bench_us + c.child_us.unwrap_or(0.0);
        println!(
            "| {} | {} | {:.1} | {} | {all:.1} | {}% |",
            p.arg(),
            cpu::opt(c.broker_us, 1),
            c.bench_us,
            cpu::opt(c.child_us, 1),
            cpu::opt(c.busy.map(|b| b * 100.0), 0),
        );
    }
}
