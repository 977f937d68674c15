//! Private-CA TLS with client certificates, against a real broker
//! (`deploy/local-tls-broker.sh`: node tls1@localhost, AMQPS only, client
//! certificate required) serving certificates from a CA this test makes.
//!
//! The worker is the real binary, logging at `trace`, so lapin's and
//! rustls' own lines are searched for the key as well.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::common::{
    broker::wait_for_status,
    fake_gewe::{self, FakeGewe},
    nodes::TlsBroker,
    process::*,
    *,
};
use gewe_friend_worker::config::Settings;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// PEM files: the broker's (`ca.pem`, `server.pem`, `server.key`, what the
/// script serves) and the worker's (`client.pem`, `client.key`).
struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gewe-friend-worker test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let ca = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    let client_key = KeyPair::generate().expect("key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    client_params
        .distinguished_name
        .push(DnType::CommonName, "gewe-friend-worker");
    let client = client_params
        .signed_by(&client_key, &ca)
        .expect("client certificate");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    write("server.pem", server.pem());
    write("server.key", server_key.serialize_pem());
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        client_cert: write("client.pem", client.pem()),
        client_key: write("client.key", client_key.serialize_pem()),
    }
}

/// The lines of the key file that carry key material.
fn key_lines(pki: &Pki) -> Vec<String> {
    std::fs::read_to_string(&pki.client_key)
        .expect("key")
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

fn assert_no_key(text: &str, pki: &Pki, what: &str) {
    for line in key_lines(pki) {
        assert!(!text.contains(&line), "{what} shows the client key");
    }
    assert!(!text.contains("PRIVATE KEY"), "{what} shows a PEM key");
}

/// The real worker on `settings` (broker, topology, TLS files), logging
/// everything as JSON; its ops endpoint is returned with it.
async fn worker(
    settings: &Settings,
    gewe: &str,
) -> (tokio::process::Child, Logs, std::net::SocketAddr) {
    let mut cmd = worker_command(settings, gewe);
    cmd.env("GEWE_WORKER__LOG__FORMAT", "json")
        .env("RUST_LOG", "trace");
    let Worker {
        child, logs, ops, ..
    } = spawn_worker(cmd).await;
    (child, logs, ops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_behind_a_private_ca_needs_the_ca_and_the_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path());
    let path = dir.path().to_owned();
    let broker = tokio::task::spawn_blocking(move || TlsBroker::up(&path))
        .await
        .expect("TLS broker up");
    let gewe = FakeGewe::start(Duration::from_millis(5), fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.amqp.url = broker.url.clone();
    settings.amqp.tls.ca_file = Some(pki.ca.clone());
    settings.amqp.tls.client_cert_file = Some(pki.client_cert.clone());
    settings.amqp.tls.client_key_file = Some(pki.client_key.clone());
    // The test's own connection uses the same settings, through the crate.
    let mut listener = spawn_listener(&settings).await;

    // check-config shows the key file's path, never its content.
    let mut check = program();
    settings_env(&mut check, &settings);
    check.arg("check-config");
    let out = check.output().await.expect("check-config runs");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("client.key"), "{printed}");
    assert_no_key(&printed, &pki, "check-config");

    // Without the CA, the broker's certificate is not trusted, and the log
    // says which setting is missing.
    let mut no_ca = settings.clone();
    no_ca.amqp.tls.ca_file = None;
    let (mut child, logs, ops) = worker(&no_ca, &gewe.url).await;
    let line = logs
        .wait_for(&["was not trusted", "UnknownIssuer", "amqp.tls.ca_file"])
        .await;
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    eprintln!("without the CA: {line}");
    let (status, _) = crate::common::broker::get(ops, "/readyz").await;
    assert_eq!(status, 503, "not consuming without the CA");
    terminate(&mut child).await;
    assert_no_key(&logs.finish().await, &pki, "the log without the CA");

    // With the CA but without a client certificate, the broker refuses us.
    let mut no_cert = settings.clone();
    no_cert.amqp.tls.client_cert_file = None;
    no_cert.amqp.tls.client_key_file = None;
    let (mut child, logs, _) = worker(&no_cert, &gewe.url).await;
    let line = logs
        .wait_for(&["requires a client certificate", "amqp.tls.client_cert_file"])
        .await;
    eprintln!("without a client certificate: {line}");
    terminate(&mut child).await;

    // With both, every command succeeds.
    let (mut child, logs, ops) = worker(&settings, &gewe.url).await;
    logs.wait_for(&["consuming commands"]).await;
    wait_for_status(ops, "/readyz", 200).await;
    let ids: Vec<String> = (0..20)
        .map(|i| format!("tls-{i}-{}", uuid::Uuid::new_v4().simple()))
        .collect();
    for id in &ids {
        listener.publish(&command(id, "app-tls")).await;
    }
    let mut succeeded = std::collections::HashSet::new();
    while succeeded.len() < ids.len() {
        let e = listener.next_event().await;
        assert_eq!(e.status(), "succeeded", "{}", e.body);
        succeeded.insert(e.body["commandId"].as_str().unwrap_or("").to_owned());
    }
    assert!(terminate(&mut child).await.success());
    let log = logs.finish().await;
    // rustls' own lines are in the log (so the search below covers them).
    assert!(log.contains("rustls"), "trace includes rustls");
    assert_no_key(&log, &pki, "the worker's log");
    listener.stop().await;
    drop(broker);
}
