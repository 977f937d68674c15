//! Broker-side helpers: `rabbitmqctl` and the ops endpoints, for tests
//! that disturb only their own worker's connection.

use std::{collections::HashSet, net::SocketAddr};

use super::{WAIT, eventually};

/// GETs an ops route; returns status and body.
pub async fn get(addr: SocketAddr, route: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{route}"))
        .await
        .expect("ops endpoint answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Polls `route` until it answers `want` or [`WAIT`] passes. A refused
/// connection counts as not yet.
pub async fn wait_for_status(addr: SocketAddr, route: &str, want: u16) {
    eventually(WAIT, || async {
        match reqwest::get(format!("http://{addr}{route}")).await {
            Ok(response) if response.status().as_u16() == want => Ok(()),
            Ok(response) => Err(format!(
                "{route} stayed {} ({}), wanted {want}",
                response.status().as_u16(),
                response.text().await.unwrap_or_default()
            )),
            Err(e) => Err(format!("{route} unanswered ({e}), wanted {want}")),
        }
    })
    .await;
}

/// Runs `rabbitmqctl`; panics with its stderr when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is needed for broker fault tests");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes the worker's broker connection (only this test's worker: the
/// connection name carries the consumer tag), leaving every other test's
/// connections alone. Waits (up to [`WAIT`]) for the worker to be consuming
/// first; returns how many connections it closed.
pub async fn close_worker_connection(queue: &str) -> usize {
    eventually(WAIT, || async {
        // rabbitmqctl takes a second or so: off the test's runtime thread,
        // so the worker and the mocks keep running meanwhile.
        let q = queue.to_owned();
        let closed = tokio::task::spawn_blocking(move || close_worker_connections(&q))
            .await
            .expect("rabbitmqctl");
        if closed > 0 {
            Ok(closed)
        } else {
            Err(format!("no connection consuming {queue}"))
        }
    })
    .await
}

pub fn close_worker_connections(queue: &str) -> usize {
    let consumers = rabbitmqctl(&["list_consumers", "-q", "queue_name", "consumer_tag"]);
    let tags: HashSet<String> = consumers
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(q, _)| *q == queue)
        .map(|(_, tag)| tag.trim().to_owned())
        .collect();
    let connections = rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"]);
    let mut closed = 0;
    for line in connections.lines() {
        let Some((pid, props)) = line.split_once('\t') else {
            continue;
        };
        if tags.iter().any(|t| props.contains(t.as_str())) {
            rabbitmqctl(&["close_connection", pid, "test: simulated broker failure"]);
            closed += 1;
        }
    }
    closed
}

/// The prefetch of each consumer on `queue`.
pub fn consumer_prefetch(queue: &str) -> Vec<String> {
    rabbitmqctl(&["list_consumers", "-q", "queue_name", "prefetch_count"])
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(q, _)| *q == queue)
        .map(|(_, p)| p.trim().to_owned())
        .collect()
}
