//! Failover on a real 3-node RabbitMQ cluster (`deploy/local-cluster.sh`,
//! nodes c1..c3@localhost beside the shared broker, which is not touched).
//!
//! The worker gets all three nodes in `amqp.url`; 400 commands wait in a
//! quorum queue; mid-run the node the worker is connected to stops its app.
//! Every command must get its result, the worker must keep consuming through
//! another node, and GeWe may be called again only for commands that were in
//! flight when the node went; so may a second unmarked event be published,
//! only for those and only when the worker counted the first publish as
//! failed (its confirm was lost with the connection: README, guarantees).
//! The node is started again even when the test
//! fails, and the cluster goes down at the end if this test started it.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::common::{
    broker::{get, wait_for_status},
    fake_gewe::{self, FakeGewe},
    nodes::{AppStopped, LocalCluster, ctl},
    *,
};
use gewe_friend_worker::config::QueueType;

const COMMANDS: usize = 400;
const PREFETCH: u16 = 16;
/// Slow enough that the stop lands mid-run: about 50 commands a second.
const GEWE_LATENCY: Duration = Duration::from_millis(300);

/// The node (`c1@localhost` …) holding the worker's connection, found by
/// the connection name the worker gives itself; the connection's pid
/// (`<c1@localhost.1.2.3>`) names its node.
fn worker_node(ask: &str) -> Option<String> {
    ctl(ask, &["list_connections", "pid", "client_properties"])
        .lines()
        .filter(|l| l.contains("gewe-friend-worker gewe-friend-worker-"))
        .find_map(|l| {
            let pid = l.split_whitespace().next()?;
            let node = pid.trim_start_matches('<').split('.').next()?;
            Some(node.to_owned())
        })
}

/// Polls [`worker_node`] (asking `ask`) until the worker is connected to a
/// node other than `not`.
async fn wait_for_worker_node(ask: &'static str, not: Option<&str>) -> String {
    eventually(WAIT, || async {
        let found = tokio::task::spawn_blocking(move || worker_node(ask))
            .await
            .expect("rabbitmqctl");
        match found {
            Some(node) if Some(node.as_str()) != not => Ok(node),
            _ => Err(format!(
                "the worker did not connect to a node other than {not:?}"
            )),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_workers_node_mid_run_loses_nothing_and_repeats_only_what_was_in_flight() {
    // Alone: the reconnects and publish failures counted are this worker's.
    alone(async {
    let cluster = tokio::task::spawn_blocking(LocalCluster::up)
        .await
        .expect("cluster up");
    let gewe = FakeGewe::start(GEWE_LATENCY, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.amqp.url = cluster.urls.join(",");
    settings.amqp.queue_type = QueueType::Quorum;
    settings.amqp.prefetch = PREFETCH;
    settings.gewe.timeout = Duration::from_secs(5);
    // The test's own connection goes to c3, the last node the worker tries,
    // so it is not the node that stops.
    let mut on_c3 = settings.clone();
    on_c3.amqp.url = cluster.urls[2].clone();
    let mut listener = spawn_listener(&on_c3).await;

    let ids: Vec<String> = (0..COMMANDS)
        .map(|i| format!("cluster-{i}-{}", uuid::Uuid::new_v4().simple()))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        listener
            .publish(&command(id, &format!("app-{}", i % 16)))
            .await;
    }
    let (stop, worker, ops) = start_worker(&settings).await;
    let first_node = wait_for_worker_node("c3@localhost", None).await;
    assert_ne!(first_node, "c3@localhost", "the worker starts on c1");

    // Event arrivals per commandId, unmarked ones counted.
    let mut unmarked: HashMap<String, usize> = HashMap::new();
    let mut answered_before_stop: HashSet<String> = HashSet::new();
    let take = |e: Received, unmarked: &mut HashMap<String, usize>| {
        assert_eq!(e.status(), "succeeded", "{}", e.body);
        let id = e.body["commandId"].as_str().unwrap_or("").to_owned();
        if e.body["duplicate"] != true {
            *unmarked.entry(id).or_default() += 1;
        }
    };
    while unmarked.len() < 80 {
        take(listener.next_event().await, &mut unmarked);
    }
    answered_before_stop.extend(unmarked.keys().cloned());

    let stopping = Instant::now();
    let node = first_node.clone();
    let stopped = tokio::task::spawn_blocking(move || AppStopped::stop(&node))
        .await
        .expect("stop_app");
    let stopped_at = Instant::now();
    // The worker moves to another node while the first one stays down.
    let second_node = wait_for_worker_node("c3@localhost", Some(&first_node)).await;
    wait_for_status(ops, "/readyz", 200).await;
    let all = tokio::time::timeout(Duration::from_secs(90), async {
        while unmarked.len() < COMMANDS {
            if let Some(e) = listener.try_next_event(Duration::from_millis(500)).await {
                take(e, &mut unmarked);
            }
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "only {} of {COMMANDS} commands got their result",
        unmarked.len()
    );
    let calls = gewe.calls();
    let after_stop = calls.iter().filter(|(_, at)| *at > stopped_at).count();
    assert!(
        after_stop > 50,
        "the stop came mid-run: only {after_stop} GeWe calls after it"
    );
    assert!(!worker.is_finished(), "the worker keeps running");
    assert!(
        metric(ops, "broker_reconnects_total", "").await >= 1.0,
        "the worker reconnected"
    );
    let (status, _) = get(ops, "/readyz").await;
    assert_eq!(
        status, 200,
        "ready on {second_node} while {first_node} is down"
    );
    let publish_failures = metric(ops, "results_publish_failures_total", "").await;

    // Back to three nodes; the worker stays where it is and stays ready.
    tokio::task::spawn_blocking(move || stopped.restore())
        .await
        .expect("start_app");
    wait_for_status(ops, "/readyz", 200).await;

    stop.cancel();
    worker.await.expect("join").expect("clean exit");
    while let Some(e) = listener.try_next_event(Duration::from_millis(500)).await {
        take(e, &mut unmarked);
    }
    // A second unmarked event is the one thing README's guarantees allow
    // here: the connection died after the broker routed an event and before
    // its confirm came back, so the worker counted the publish as failed and
    // the redelivery's event is unmarked too. Only a command in flight at
    // the stop can be in that state, and each one is a counted failure.
    let twice: Vec<_> = unmarked
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id.clone(), *n))
        .collect();
    for (id, n) in &twice {
        assert_eq!(*n, 2, "{id}: {n} unmarked events");
        assert!(
            !answered_before_stop.contains(id),
            "{id} had its event before the stop began, yet got a second unmarked one"
        );
    }
    assert!(
        twice.len() as f64 <= publish_failures,
        "second unmarked events without a failed publish to explain them: {twice:?} \
         (results_publish_failures_total = {publish_failures})"
    );
    // A member called twice must have been in flight at the stop: its first
    // call began before the node was down, and its result had not arrived.
    let repeated = gewe.called_twice();
    let calls = gewe.calls();
    for (member, _) in &repeated {
        let first_call = calls
            .iter()
            .find(|(m, _)| m == member)
            .map(|(_, at)| *at)
            .expect("called");
        let id = member.trim_start_matches("wxid_");
        assert!(
            first_call < stopped_at && !answered_before_stop.contains(id),
            "{member} was called again but was not in flight at the stop (first call {:?} after the stop began)",
            first_call.saturating_duration_since(stopping)
        );
    }
    assert!(
        repeated.len() <= usize::from(PREFETCH),
        "more repeats than commands in flight: {repeated:?}"
    );
    eprintln!(
        "cluster failover: {first_node} -> {second_node}; {after_stop} commands called after the stop, \
         {} GeWe calls for {COMMANDS} commands, repeated: {repeated:?}, \
         second unmarked events after a lost confirm: {twice:?}",
        calls.len()
    );
    listener.stop().await;
    drop(cluster);
    })
    .await;
}
