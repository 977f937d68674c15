//! The worker under resource pressure, as the real binary: out of file
//! descriptors (a child with a low RLIMIT_NOFILE), and a log flood while
//! results are unroutable.

use std::{process::Stdio, time::Duration};

use crate::common::{fake_gewe::FakeGewe, process::*, tcp_proxy::TcpProxy, *};

/// Descriptors for the child: about 20 are used at rest, so a prefetch of
/// 200 against a GeWe that answers in a second must run out.
const NOFILE: u64 = 48;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_is_neither_a_gewe_outage_nor_a_panic_loop() {
    let gewe = FakeGewe::start(Duration::from_secs(1), fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.amqp.prefetch = 200;
    let mut listener = spawn_listener(&settings).await;
    let proxy = TcpProxy::to(&settings.amqp.url).await;
    let mut through_proxy = settings.clone();
    through_proxy.amqp.url = proxy.url.clone();
    let mut cmd = worker_command(&through_proxy, &gewe.url);
    cmd.env("GEWE_WORKER__GEWE__TIMEOUT", "10s")
        .env("GEWE_WORKER__BREAKER__FAILURE_THRESHOLD", "3");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| rlimit::setrlimit(rlimit::Resource::NOFILE, NOFILE, NOFILE));
    }
    let Worker {
        mut child,
        logs,
        ops,
        ..
    } = spawn_worker(cmd).await;
    let total = 200;
    for i in 0..total {
        listener
            .publish(&command(&unique(&format!("fd-{i}")), &unique("app")))
            .await;
    }
    // Out of descriptors: GeWe requests cannot leave...
    wait_for_metric(
        ops,
        "gewe_requests_total",
        "local_error",
        1.0,
        "the worker runs out of descriptors",
    )
    .await;
    // ...and the broker connection drops meanwhile: reconnecting meets the
    // limit too.
    proxy.reset();
    let mut seen = std::collections::HashSet::new();
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        while seen.len() < total {
            let Some(e) = listener.try_next_event(Duration::from_secs(1)).await else {
                continue;
            };
            assert_eq!(
                e.status(),
                "succeeded",
                "a local shortage failed a command: {}",
                e.body
            );
            seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "only {} of {total} commands got their event",
        seen.len()
    );
    assert_eq!(
        metric(ops, "breaker_state", "").await,
        0.0,
        "the breaker never opened for a local shortage"
    );
    child.start_kill().expect("kill");
    let _ = child.wait().await;
    let logs = logs.finish().await;
    assert!(
        !logs.contains("panic") && !logs.contains("poisoned"),
        "no panic: {}",
        logs.lines()
            .filter(|l| l.contains("panic") || l.contains("poisoned"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        logs.contains("could not leave this process"),
        "the shortage is logged"
    );
    listener.stop().await;
}

#[tokio::test]
async fn an_unroutable_result_is_one_line_per_delivery_that_names_the_outcome() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.amqp.delivery_limit = 2;
    // Nothing bound to the result exchange: every event is returned.
    let listener = spawn_unbound_listener(&settings).await;
    let mut cmd = worker_command(&settings, &gewe.url);
    cmd.env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0")
        .env("GEWE_WORKER__AMQP__DELIVERY_LIMIT", "2")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    let mut worker = cmd.spawn().expect("worker starts");
    let id = unique("unroutable");
    listener.publish(&command(&id, "app-u")).await;
    // The broker dead-letters it after the last delivery the limit allows.
    listener.dead_letters(1).await;
    worker.start_kill().expect("kill");
    let out = worker.wait_with_output().await.expect("output");
    let logs = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains(&id)).collect();
    let unroutable: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("result event unroutable"))
        .collect();
    assert_eq!(
        unroutable.len(),
        3,
        "one line per delivery (limit 2: three deliveries):\n{logs}"
    );
    for line in &unroutable {
        assert!(
            line.contains(&format!("v3_wxid_{id}@stranger")),
            "the v3 is in the line: {line}"
        );
        assert!(
            line.len() < 1500,
            "a line, not the message bytes: {} bytes",
            line.len()
        );
    }
    assert!(
        unroutable[2].contains("dead-letters"),
        "the last one says the command is dead-lettered: {}",
        unroutable[2]
    );
    assert!(
        !logs.contains("returned us a message"),
        "lapin's own line is filtered"
    );
    listener.stop().await;
}
