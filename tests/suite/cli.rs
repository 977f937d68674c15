//! The program as users run it: the real binary, its exit codes and output.

use std::time::Duration;

use crate::common::{process::*, *};
use gewe_friend_worker::gewe::ADD_MEMBER_PATH;
use serde_json::{Value, json};
use tokio::{io::AsyncReadExt, process::Command};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

async fn output(mut cmd: Command, limit: Duration) -> std::process::Output {
    tokio::time::timeout(limit, cmd.output())
        .await
        .expect("the program finishes in time")
        .expect("the program starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, "[amqp]\nprefetch = 8\n[retry]\nmax_delay = \"1m\"\n").expect("write");
    let mut cmd = program();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&file)
        .env("GEWE_WORKER__GEWE__TOKEN", "very-secret-token")
        .env(
            "GEWE_WORKER__AMQP__URL",
            "amqp://user:hunter2@broker:5672/%2f",
        )
        .env("GEWE_WORKER__AMQP__PREFETCH", "32")
        .env("GEWE_WORKER__CALLBACKS__SECRET", "cb-hunter3-0123456789")
        .env("GEWE_WORKER__CALLBACKS__LISTEN", "0.0.0.0:8081");
    let out = output(cmd, WAIT).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let printed: Value = serde_json::from_str(&stdout).expect("prints JSON");
    assert_eq!(printed["amqp"]["prefetch"], 32, "env wins over the file");
    assert_eq!(
        printed["retry"]["max_delay"], "1m",
        "the file wins over defaults"
    );
    assert_eq!(printed["gewe"]["token"], "***");
    assert_eq!(printed["amqp"]["url"], "amqp://user:***@broker:5672/%2f");
    assert_eq!(printed["callbacks"]["secret"], "***");
    assert_eq!(printed["callbacks"]["listen"], "0.0.0.0:8081");
    assert!(
        !stdout.contains("very-secret-token")
            && !stdout.contains("hunter2")
            && !stdout.contains("cb-hunter3-0123456789")
    );
}

#[tokio::test]
async fn check_config_rejects_bad_values_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad_file = dir.path().join("bad.toml");
    std::fs::write(&bad_file, "[retry]\ninitial_delay = \"soon\"\n").expect("write");
    type Case<'a> = (
        Vec<(&'a str, &'a str)>,
        Option<&'a std::path::Path>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            vec![("GEWE_WORKER__AMQP__PREFETCH", "lots")],
            None,
            "amqp.prefetch",
        ),
        (
            vec![("GEWE_WORKER__AMQP__QUEUE_TYPE", "stream")],
            None,
            "amqp.queue_type",
        ),
        (
            vec![("GEWE_WORKER__GEWE__TIMEOUT", "0s")],
            None,
            "gewe.timeout",
        ),
        (vec![], Some(bad_file.as_path()), "retry.initial_delay"),
    ];
    for (env, file, key) in cases {
        let mut cmd = program();
        cmd.arg("check-config");
        if let Some(f) = file {
            cmd.arg("--config").arg(f);
        }
        cmd.env("GEWE_WORKER__GEWE__TOKEN", "t-123456");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = output(cmd, WAIT).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{key}: must fail");
        assert!(
            stderr.contains(key),
            "{key}: stderr {stderr:?} must name the key"
        );
    }
}

#[tokio::test]
async fn check_config_without_a_token_is_valid_but_warns_that_run_needs_it() {
    let mut cmd = program();
    cmd.arg("check-config");
    let out = output(cmd, WAIT).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).expect("prints JSON");
    assert_eq!(printed["gewe"]["token"], Value::Null);
    assert!(text(&out.stderr).contains("gewe.token"));

    let mut run = program();
    run.arg("run")
        .env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0");
    let out = output(run, WAIT).await;
    assert!(
        !out.status.success(),
        "run refuses to start without a token"
    );
    assert!(
        text(&out.stderr).contains("gewe.token"),
        "{}",
        text(&out.stderr)
    );
}

/// Makes an X.509 v1 client certificate and its key in `dir` the way an
/// operator would by mistake: `openssl x509 -req` without `-extfile`.
fn v1_client_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (key, csr, cert) = (
        dir.join("client.key"),
        dir.join("client.csr"),
        dir.join("client.pem"),
    );
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    openssl(&[
        "req".as_ref(),
        "-new".as_ref(),
        "-newkey".as_ref(),
        "rsa:2048".as_ref(),
        "-nodes".as_ref(),
        "-subj".as_ref(),
        "/CN=gewe-friend-worker".as_ref(),
        "-keyout".as_ref(),
        key.as_os_str(),
        "-out".as_ref(),
        csr.as_os_str(),
    ]);
    openssl(&[
        "x509".as_ref(),
        "-req".as_ref(),
        "-days".as_ref(),
        "2".as_ref(),
        "-in".as_ref(),
        csr.as_os_str(),
        "-signkey".as_ref(),
        key.as_os_str(),
        "-out".as_ref(),
        cert.as_os_str(),
    ]);
    (cert, key)
}

#[tokio::test]
async fn an_x509_v1_client_certificate_is_refused_naming_the_key_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = v1_client_certificate(dir.path());
    for command in ["check-config", "run"] {
        let mut cmd = program();
        cmd.arg(command)
            .env(
                "GEWE_WORKER__AMQP__URL",
                "amqps://guest:guest@127.0.0.1:5771/%2f",
            )
            .env("GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE", &cert)
            .env("GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE", &key)
            .env("GEWE_WORKER__GEWE__TOKEN", TOKEN)
            .env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0");
        let out = output(cmd, WAIT).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{command} must refuse it: {stderr}");
        for needle in [
            "amqp.tls.client_cert_file",
            "X.509 v1",
            "v3",
            "extendedKeyUsage=clientAuth",
        ] {
            assert!(
                stderr.contains(needle),
                "{command}: {needle:?} missing from {stderr:?}"
            );
        }
        assert!(!stderr.contains("ca_file"), "{command}: {stderr}");
    }
}

#[tokio::test]
async fn demo_runs_end_to_end_and_exits_zero() {
    let mut cmd = program();
    cmd.arg("demo").env("GEWE_WORKER__AMQP__URL", amqp_url());
    let out = output(cmd, Duration::from_secs(60)).await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains(
            "demo finished: 8 commands, 7 result events, 4 friend requests accepted, 1 deferred for its account"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("⏸ deferred: ")
            && stdout.contains("demo_app_gamma reached its daily limit"),
        "the account over its limit is shown resting: {stdout}"
    );
    for needle in [
        "\"status\": \"succeeded\"",
        "\"kind\": \"rejected\"",
        "\"kind\": \"app_offline\"",
        "\"kind\": \"invalid_command\"",
        "\"status\": \"accepted\"",
    ] {
        assert!(stdout.contains(needle), "demo output shows {needle}");
    }
    // Each member's acceptance comes after the request's success.
    for member in ["alice", "bob", "carol"] {
        let line = |what: &str| {
            stdout
                .find(&format!("\"{what}\": \"wxid_demo_{member}\""))
                .unwrap_or_else(|| panic!("no {what} {member}: {stdout}"))
        };
        assert!(line("memberWxid") < line("friendWxid"), "{stdout}");
    }
}

#[tokio::test]
async fn simulate_gewe_plays_the_member_who_accepts() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/gewe/callback"))
        .and(wiremock::matchers::query_param("secret", "s3"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&receiver)
        .await;
    let mut sim = program();
    sim.args([
        "simulate-gewe",
        "--listen",
        "127.0.0.1:0",
        "--callback-url",
        &format!("{}/gewe/callback?secret=s3", receiver.uri()),
        "--accept-after",
        "300ms",
    ]);
    let mut sim = sim.spawn().expect("the simulator starts");
    // It binds the port itself and says which.
    let listen = Logs::capture(&mut sim)
        .reported("GeWe simulator listening", "addr")
        .await;
    let request = json!({"appId": "wx_sim", "chatroomId": "1@chatroom",
                         "memberWxid": "wxid_member", "content": "hi"});
    let asked_at = tokio::time::Instant::now();
    let answer: Value = reqwest::Client::new()
        .post(format!("http://{listen}{ADD_MEMBER_PATH}"))
        .header("X-GEWE-TOKEN", "any")
        .json(&request)
        .send()
        .await
        .expect("the simulator answers")
        .json()
        .await
        .expect("GeWe's JSON");
    let v3 = answer["data"]["v3"].as_str().expect("a v3").to_owned();
    let callback = eventually(WAIT, || async {
        let requests = receiver.received_requests().await.unwrap_or_default();
        let first = requests.first().ok_or("the callback has not arrived")?;
        Ok(serde_json::from_slice::<Value>(&first.body).expect("JSON"))
    })
    .await;
    assert!(
        asked_at.elapsed() >= Duration::from_millis(300),
        "not before --accept-after"
    );
    assert_eq!(callback["TypeName"], "ModContacts");
    assert_eq!(callback["Appid"], "wx_sim");
    assert_eq!(callback["Data"]["EncryptUserName"], v3.as_str());
    assert_eq!(callback["Data"]["UserName"]["string"], "wxid_member");
}

#[tokio::test]
async fn publish_wait_prints_the_result_event() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_cli")))
        .expect(1)
        .mount(&gewe)
        .await;
    let app = spawn_app(test_settings(&gewe.uri())).await;
    let mut cmd = program();
    settings_env(&mut cmd, &app.settings);
    cmd.args([
        "publish",
        "--app-id",
        "wx_cli",
        "--chatroom-id",
        "1@chatroom",
        "--member-wxid",
        "wxid_m",
        "--content",
        "hi",
        "--command-id",
        "cli-cmd-1",
        "--wait",
        "20",
    ]);
    let out = output(cmd, Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let event: Value = serde_json::from_slice(&out.stdout).expect("prints the event as JSON");
    assert_eq!(event["commandId"], "cli-cmd-1");
    assert_eq!(event["status"], "succeeded");
    assert_eq!(event["v3"], "v3_cli");
    app.stop().await;
}

#[tokio::test]
async fn the_token_never_leaves_the_process_and_sigterm_exits_zero() {
    let gewe = MockServer::start().await;
    // GeWe echoes the token in its token error.
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"ret": 500, "msg": format!("HTTP HEADER: X-GEWE-TOKEN={TOKEN} 不可用或已过期")}),
        ))
        .expect(1)
        .mount(&gewe)
        .await;
    // The harness only declares and listens; the worker is the real binary.
    let settings = test_settings(&gewe.uri());
    let mut listener = spawn_listener(&settings).await;
    let mut cmd = program();
    settings_env(&mut cmd, &settings);
    cmd.arg("run")
        .env("GEWE_WORKER__GEWE__BASE_URL", gewe.uri())
        .env("GEWE_WORKER__GEWE__TOKEN", TOKEN)
        .env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0")
        .env("GEWE_WORKER__PACING__PER_APP_MIN_INTERVAL", "0s")
        .env("GEWE_WORKER__LOG__FORMAT", "json")
        .env("RUST_LOG", "trace");
    let mut child = cmd.spawn().expect("worker starts");
    // Drain stderr while the worker runs so a full pipe never blocks it.
    let mut stderr = child.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        let mut logs = String::new();
        stderr.read_to_string(&mut logs).await.map(|_| logs)
    });
    listener
        .publish(&json!({"commandId": "bad-1", "appId": "app-b"}))
        .await;
    assert_eq!(listener.next_event().await.kind(), Some("invalid_command"));
    listener.publish(&command("secret-1", "app-s")).await;
    let event = listener.next_event().await;
    let raw = event.body.to_string();
    assert_eq!(event.kind(), Some("unauthorized"));
    assert!(!raw.contains(TOKEN), "event leaks the token: {raw}");
    assert!(
        event.body["error"]["gewe"]["msg"]
            .as_str()
            .unwrap_or("")
            .contains("***")
    );

    let status = terminate(&mut child).await;
    let logs = logs.await.expect("join").expect("read logs");
    assert!(status.success(), "SIGTERM exits 0; logs:\n{logs}");
    // Each command's log lines carry its ids from the command span.
    let line = |needle: &str| -> Value {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
            .unwrap_or_else(|| panic!("no log line with {needle:?}:\n{logs}"))
    };
    for (needle, id, app) in [
        ("GeWe call failed", "secret-1", "app-s"),
        ("invalid command", "bad-1", "app-b"),
    ] {
        let l = line(needle);
        let command_span = &l["spans"][0];
        assert_eq!(command_span["name"], "command", "{l}");
        assert_eq!(command_span["command_id"], id, "{l}");
        assert_eq!(command_span["app_id"], app, "{l}");
    }
    assert!(logs.contains("***"), "the redacted GeWe message is logged");
    assert!(!logs.contains(TOKEN), "logs leak the token");
    listener.stop().await;
}

/// Counts GeWe calls per memberWxid.
struct CountCalls(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>);

impl wiremock::Respond for CountCalls {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let member = body["memberWxid"].as_str().unwrap_or("").to_owned();
        *self.0.lock().expect("lock").entry(member).or_default() += 1;
        ResponseTemplate::new(200)
            .set_body_json(gewe_ok("v3_kill"))
            .set_delay(Duration::from_millis(20))
    }
}

fn worker_process(
    settings: &gewe_friend_worker::config::Settings,
    gewe: &str,
) -> tokio::process::Child {
    let mut cmd = worker_command(settings, gewe);
    cmd.env("GEWE_WORKER__REDIS__URL", redis_url())
        .env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0");
    cmd.spawn().expect("worker starts")
}

#[tokio::test]
async fn a_sigkilled_worker_loses_nothing_and_with_redis_repeats_no_stored_call() {
    let gewe = MockServer::start().await;
    let calls = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(CountCalls(calls.clone()))
        .mount(&gewe)
        .await;
    let settings = test_settings(&gewe.uri());
    let mut listener = spawn_listener(&settings).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let total = 200;
    let mut first = worker_process(&settings, &gewe.uri());
    for i in 0..total {
        listener
            .publish(&command(
                &format!("kill-{run}-{i}"),
                &format!("app-{}", i % 10),
            ))
            .await;
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 20 {
        let e = listener.next_event().await;
        seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("reaped");
    let stored_before_kill = seen.clone();

    let mut second = worker_process(&settings, &gewe.uri());
    while seen.len() < total {
        let e = listener.next_event().await;
        assert_eq!(e.status(), "succeeded", "{}", e.body);
        seen.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }
    assert!(terminate(&mut second).await.success());

    let counts = calls.lock().expect("lock").clone();
    for id in &stored_before_kill {
        assert_eq!(
            counts.get(&format!("wxid_{id}")),
            Some(&1),
            "{id} reached GeWe once"
        );
    }
    listener.stop().await;
}

#[tokio::test]
async fn every_documented_metric_is_there_at_zero_before_the_first_command() {
    let gewe = MockServer::start().await;
    let settings = test_settings(&gewe.uri());
    let listener = spawn_listener(&settings).await;
    let mut worker = spawn_worker(worker_command(&settings, &gewe.uri())).await;
    let (status, text) = broker::get(worker.ops, "/metrics").await;
    assert_eq!(status, 200, "/metrics answers");
    let series: Vec<(&str, f64)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name, value.parse().ok()?))
        })
        .collect();
    let has = |name: &str| series.iter().any(|(s, _)| s.starts_with(name));
    for name in [
        "commands_received_total",
        "commands_in_flight",
        "commands_duplicate_total",
        "results_publish_failures_total",
        "gewe_request_duration_seconds_count",
        "gewe_retries_total",
        "pacing_wait_seconds_count",
        "broker_reconnects_total",
        "redis_errors_total",
        "claims_lost_total",
        "commands_parked_total",
        "breaker_state",
        r#"results_published_total{status="succeeded",kind="none"}"#,
        r#"results_published_total{status="failed",kind="upstream_unavailable"}"#,
        r#"results_published_total{status="failed",kind="invalid_command"}"#,
        r#"gewe_requests_total{outcome="success"}"#,
        r#"gewe_requests_total{outcome="rejected"}"#,
        r#"commands_requeued_total{reason="publish_failed"}"#,
        r#"commands_requeued_total{reason="shutdown"}"#,
        r#"commands_requeued_total{reason="session_lost"}"#,
        r#"results_published_total{status="accepted",kind="none"}"#,
        r#"callbacks_total{outcome="matched"}"#,
        r#"callbacks_total{outcome="unmatched"}"#,
        r#"callbacks_total{outcome="repeated"}"#,
        r#"callbacks_total{outcome="invalid"}"#,
        "callbacks_accept_delay_seconds_count",
        r#"callback_requests_total{status="200"}"#,
        r#"callback_requests_total{status="401"}"#,
        r#"callback_requests_total{status="413"}"#,
        r#"callback_requests_total{status="503"}"#,
    ] {
        assert!(has(name), "/metrics lacks {name} at start-up:\n{text}");
    }
    for (name, value) in &series {
        assert_eq!(*value, 0.0, "{name} is {value} before any command");
    }
    worker.child.start_kill().expect("kill");
    let _ = worker.child.wait().await;
    listener.stop().await;
}

#[tokio::test]
async fn a_message_id_that_cannot_serve_as_command_id_is_logged() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_m")))
        .mount(&gewe)
        .await;
    let settings = test_settings(&gewe.uri());
    let mut listener = spawn_listener(&settings).await;
    let mut cmd = worker_command(&settings, &gewe.uri());
    cmd.env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped());
    let worker = cmd.spawn().expect("worker starts");
    let mut body = command("unused", "app-m");
    body.as_object_mut().expect("object").remove("commandId");
    let long = "m".repeat(200);
    listener
        .publish_raw(
            body.to_string().as_bytes(),
            lapin::BasicProperties::default().with_message_id(long.as_str().into()),
        )
        .await;
    let e = listener.next_event().await;
    assert_eq!(e.status(), "succeeded");
    assert_eq!(
        e.body["commandId"].as_str().map(str::len),
        Some(36),
        "a generated id"
    );
    sigterm(&worker);
    let out = tokio::time::timeout(WAIT, worker.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    let logs = text(&out.stderr);
    assert!(
        logs.lines()
            .any(|l| l.contains("cannot serve as one") && l.contains("message_id")),
        "the unusable message_id is logged:\n{logs}"
    );
    listener.stop().await;
}
