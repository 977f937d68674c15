//! `--soak DURATION`: a steady load through faults.
//!
//! The worker (this binary as a child, default settings, Redis for shared
//! state) takes `--soak-rate` commands a second for DURATION while:
//!
//! - its broker connection is closed every minute (at :30), by a TCP proxy
//!   between it and RabbitMQ;
//! - GeWe answers HTTP 503 to every call for 10 s from 0:15 and from 70 %
//!   of DURATION (the breaker opens, a backlog builds and then drains at
//!   full concurrency);
//! - its private Redis is killed and started again, empty, at 42 %;
//! - GeWe answers after 2 s instead of 50 ms for 30 s from 50 %.
//!
//! The first burst falls in the first minute on purpose: draining its
//! backlog at full concurrency sets the allocator's high-water mark, so the
//! RSS after one minute is that of a worker that has been through a fault,
//! and the comparison with the end shows growth, not warm-up.
//!
//! Then the load stops and every command must get its result. It reports
//! commands in and out, lost ones, repeated GeWe calls (a call for a command
//! GeWe had already answered with success; each is set against the faults),
//! and the worker's RSS every 10 s, into a CSV as well. It fails (non-zero
//! exit) when a command is lost, a repeat has no fault to explain it, or the
//! RSS at the end of the load is not within 10 % of the RSS after a minute.
//! Commands with a second unmarked event are counted, not failed: see
//! [`report::Report::verdict`].

mod faults;
mod gewe;
mod report;
mod traffic;

use std::{
    path::Path,
    process::Stdio,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use gewe_friend_worker::{
    broker::{Connector, topology},
    config::broker_urls,
};
use lapin::{ConnectionProperties, options::ConfirmSelectOptions};
use tokio_util::sync::CancellationToken;

use crate::{cpu, phases};
use faults::{Proxy, Redis};
use gewe::{FakeGewe, Mode};
use report::{Fault, Sample};
use traffic::Tally;

/// RSS and progress are sampled this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Longest wait for the last results once the load stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// One thing the schedule does.
#[derive(Debug, Clone, Copy)]
enum Action {
    Sample,
    CloseBrokerConnections,
    RestartRedis,
    Gewe(Mode),
}

/// What happens when, for a load of `duration`.
fn schedule(duration: Duration) -> Vec<(Duration, Action)> {
    let at = |share: f64| duration.mul_f64(share);
    let burst = Duration::from_secs(15);
    let mut plan = vec![
        (burst, Action::Gewe(Mode::Failing)),
        (burst + Duration::from_secs(10), Action::Gewe(Mode::Normal)),
        (at(0.42), Action::RestartRedis),
        (at(0.5), Action::Gewe(Mode::Slow)),
        (
            at(0.5) + Duration::from_secs(30),
            Action::Gewe(Mode::Normal),
        ),
        (at(0.7), Action::Gewe(Mode::Failing)),
        (
            at(0.7) + Duration::from_secs(10),
            Action::Gewe(Mode::Normal),
        ),
    ];
    let mut close = Duration::from_secs(30);
    while close < duration {
        plan.push((close, Action::CloseBrokerConnections));
        close += Duration::from_secs(60);
    }
    let mut sample = SAMPLE_EVERY;
    while sample <= duration {
        plan.push((sample, Action::Sample));
        sample += SAMPLE_EVERY;
    }
    // Samples sort first at equal times: they show the state before a fault.
    plan.sort_by_key(|(t, a)| (*t, !matches!(a, Action::Sample)));
    plan
}

/// Runs the soak for `duration` at `rate` commands a second, writing the
/// RSS samples and the worker's log into `dir`.
pub async fn run(duration: Duration, rate: u32, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stop = CancellationToken::new();
    let settings = phases::settings("soak")?;
    let conn = Connector::new(&settings.amqp)?
        .connect_first(ConnectionProperties::default())
        .await
        .context("the soak needs RabbitMQ (GEWE_WORKER__AMQP__URL)")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare(&ch, &settings.amqp).await?;
    let results = phases::results_queue(&ch, &settings.amqp.result_exchange).await?;

    let gewe = FakeGewe::start(stop.clone()).await?;
    let mut redis = Redis::start().await?;
    let mut broker = url::Url::parse(broker_urls(&settings.amqp.url).next().unwrap_or_default())?;
    let upstream = format!(
        "{}:{}",
        broker.host_str().unwrap_or("127.0.0.1"),
        broker.port().unwrap_or(5672)
    );
    let proxy = Proxy::start(upstream).await?;
    broker
        .set_host(Some("127.0.0.1"))
        .context("broker URL host")?;
    let _ = broker.set_port(Some(proxy.addr.port()));
    let mut through_proxy = settings.clone();
    through_proxy.amqp.url = broker.to_string();
    let log_path = dir.join("worker.log");
    let log = std::fs::File::create(&log_path)?;
    let mut worker = phases::worker_command(&through_proxy, gewe.addr, Some(&redis.url))?
        .env("RUST_LOG", "info")
        .env("GEWE_WORKER__LOG__FORMAT", "json")
        .stderr(Stdio::from(log))
        .spawn()?;
    let pid = worker.id().context("worker pid")?;

    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let published = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let load_stop = CancellationToken::new();
    let publisher = tokio::spawn(traffic::publish_steadily(
        conn.create_channel().await?,
        settings.amqp.command_queue.clone(),
        rate,
        run.clone(),
        published.clone(),
        load_stop.clone(),
    ));
    let collector = tokio::spawn(traffic::collect(
        conn.create_channel().await?,
        results,
        tally.clone(),
        stop.clone(),
    ));
    println!(
        "soak: {duration:?} at {rate} commands/s; worker pid {pid}, log {}",
        log_path.display()
    );

    let started = Instant::now();
    let answered = || {
        tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .answered()
    };
    let sample = |phase: &'static str| -> Sample {
        Sample {
            at: started.elapsed(),
            phase,
            rss_kib: cpu::rss_kib(pid).unwrap_or(0),
            published: published.load(Ordering::SeqCst),
            answered: answered(),
            gewe_calls: gewe.calls().len(),
        }
    };
    let mut samples = vec![sample("load")];
    let mut faults: Vec<Fault> = Vec::new();
    for (offset, action) in schedule(duration) {
        tokio::time::sleep_until((started + offset).into()).await;
        if publisher.is_finished() {
            bail!("the load generator stopped: {:?}", publisher.await);
        }
        match action {
            Action::Sample => {
                let s = sample("load");
                s.print_if_due();
                samples.push(s);
            }
            Action::CloseBrokerConnections => {
                proxy.close_all();
                faults.push(Fault::new(started, "broker connection closed"));
            }
            Action::RestartRedis => {
                redis.restart().await?;
                faults.push(Fault::new(started, "Redis restarted (empty)"));
            }
            Action::Gewe(mode) => {
                gewe.set(mode);
                let what = match mode {
                    Mode::Failing => "GeWe 503 burst begins",
                    Mode::Slow => "GeWe slow answers begin",
                    Mode::Normal => "GeWe normal again",
                };
                faults.push(Fault::new(started, what));
            }
        }
    }
    load_stop.cancel();
    publisher.await??;
    let sent = published.load(Ordering::SeqCst);
    println!("soak: load stopped after {sent} commands; draining");
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    let mut next_sample = Instant::now() + SAMPLE_EVERY;
    while answered() < sent && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() >= next_sample {
            samples.push(sample("drain"));
            next_sample += SAMPLE_EVERY;
        }
    }
    samples.push(sample("drained"));
    phases::terminate(&mut worker).await;
    stop.cancel();
    let _ = collector.await;
    let _ = ch.close(200, "soak done".into()).await;
    let cleanup = conn.create_channel().await?;
    topology::remove(&cleanup, &settings.amqp).await;
    let _ = conn.close(200, "soak done".into()).await;

    let tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
    let outcome = report::Report {
        duration,
        started,
        sent,
        tally: &tally,
        calls: &gewe.calls(),
        faults: &faults,
        samples: &samples,
    };
    outcome.write_csv(&dir.join("rss.csv"))?;
    outcome.print();
    outcome.verdict()
}
