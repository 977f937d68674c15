//! A flood of large callback bodies against the endpoint of a worker
//! process (contract §6): it holds at most 16 MiB of bodies and takes
//! them at 16 MiB/s, so its memory stays bounded, commands keep flowing
//! meanwhile, and refusals are logged at most once a second per status.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::{callbacks::*, process::*, *};

/// Connections sending large bodies at once.
const CONNECTIONS: usize = 256;
/// Size of each body: just under the 1 MiB limit.
const BODY_BYTES: usize = 1024 * 1024 - 64;
/// Every this many senders, one sends a small body with a wrong secret:
/// its 401s must not flood the log.
const FORGER_EVERY: usize = 8;
/// Commands timed quietly and during the flood: enough that the p99 is
/// not simply the slowest one.
const SAMPLES: usize = 200;
/// The process must stay under this (contract §6; the Kubernetes limit
/// shipped is 256 MiB).
const RSS_LIMIT_KIB: u64 = 128 * 1024;

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Times `SAMPLES` commands one after the other, to their succeeded event.
async fn command_latencies(listener: &mut TestApp, app_id: &str) -> Vec<Duration> {
    let mut took = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let id = unique("flow");
        let start = Instant::now();
        listener.publish(&command(&id, app_id)).await;
        let event = listener.next_event().await;
        assert_eq!(event.status(), "succeeded", "{}", event.body);
        took.push(start.elapsed());
    }
    took.sort();
    took
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99).div_ceil(100).saturating_sub(1)]
}

// Two threads: on one, the 256 senders' tasks would delay the timing of
// the commands, which is the test's own latency, not the worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_callbacks_keeps_the_worker_small_and_commands_flowing() {
    let gewe = gewe().await;
    let mut settings = callback_settings(&gewe.uri());
    settings.callbacks.enabled = false;
    let mut listener = spawn_listener(&settings).await;
    let mut cmd = worker_command(&settings, &gewe.uri());
    cmd.env(
        "GEWE_WORKER__CALLBACKS__EXCHANGE",
        &settings.callbacks.exchange,
    )
    .env("GEWE_WORKER__CALLBACKS__LISTEN", "127.0.0.1:0")
    .env("GEWE_WORKER__CALLBACKS__SECRET", SECRET)
    .env("GEWE_WORKER__LOG__FORMAT", "json");
    let Worker {
        mut child,
        logs,
        ops,
        callbacks,
    } = spawn_worker(cmd).await;
    let endpoint = callbacks.expect("the callback endpoint is reported");
    let pid = child.id().expect("running");
    wait_for_readyz(ops, 200, "ready").await;
    let app_id = unique("app");
    let quiet = command_latencies(&mut listener, &app_id).await;
    let rss_before = peak_rss_kib(pid);

    // A type nobody binds: the broker drops what it confirms.
    let body = bytes::Bytes::from(
        json!({"TypeName": "Flood", "pad": "x".repeat(BODY_BYTES - 40)}).to_string(),
    );
    let url = format!("http://{endpoint}/gewe/callback{}", with_secret());
    let forged = format!("http://{endpoint}/gewe/callback?secret=forged-0123456789");
    let stop = CancellationToken::new();
    let flood_started = Instant::now();
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let (body, url) = match i % FORGER_EVERY {
                0 => (bytes::Bytes::from_static(b"{}"), forged.clone()),
                _ => (body.clone(), url.clone()),
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                // A connection of its own for each sender.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("client");
                let mut statuses = Vec::new();
                while !stop.is_cancelled() {
                    let sent = client.post(&url).body(body.clone()).send().await;
                    statuses.push(sent.map_or(0, |r| r.status().as_u16()));
                }
                statuses
            })
        })
        .collect();
    let flooded = command_latencies(&mut listener, &app_id).await;
    stop.cancel();
    let mut answers = std::collections::BTreeMap::new();
    for sender in senders {
        for status in sender.await.expect("sender") {
            *answers.entry(status).or_insert(0u64) += 1;
        }
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let rss_peak = peak_rss_kib(pid);
    let ok = json!({"TypeName": "ModContacts", "Data": {}}).to_string();
    assert_eq!(
        post(endpoint, &with_secret(), ok).await,
        200,
        "served after the flood"
    );
    let status = terminate(&mut child).await;
    let logs = logs.finish().await;
    let refusal_lines = logs
        .lines()
        .filter(|l| l.contains("callback requests refused"))
        .count();
    let per_request_lines = logs
        .lines()
        .filter(|l| l.contains("answered 503") || l.contains("callback refused"))
        .count();
    println!(
        "flood: {CONNECTIONS} connections x {BODY_BYTES} B for {flood_secs:.1}s, answers {answers:?}; \
         peak RSS {} KiB before, {} KiB after; command p99 {:?} quiet, {:?} flooded (max {:?}); \
         {refusal_lines} rate-limited refusal lines, {per_request_lines} per-request lines",
        rss_before,
        rss_peak,
        p99(&quiet),
        p99(&flooded),
        flooded.last()
    );
    assert!(status.success(), "SIGTERM exits 0");
    assert!(
        rss_peak < RSS_LIMIT_KIB,
        "peak RSS {rss_peak} KiB, over {RSS_LIMIT_KIB} KiB"
    );
    assert!(
        answers.get(&401).copied().unwrap_or(0) > 100,
        "the forgers were refused: {answers:?}"
    );
    // At most one line a second per status (401, and 503 if a body found
    // no room), plus one for a partial second at each end.
    let most = 2 * (flood_secs.ceil() as usize + 2);
    assert!(
        refusal_lines + per_request_lines <= most,
        "{refusal_lines} + {per_request_lines} refusal lines in {flood_secs:.1}s"
    );
    listener.stop().await;
}
