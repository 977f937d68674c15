//! `demo`: the whole pipeline on a laptop with nothing but RabbitMQ.
//!
//! Runs the real worker against the in-process GeWe simulator on a private,
//! uniquely named topology (so it never touches a real deployment's queues),
//! publishes a few commands and prints each result event as it arrives,
//! then removes what it declared.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use lapin::ConnectionProperties;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::{
    app::Application,
    broker::{Connector, topology},
    client::{CommandClient, Listen, NewCommand},
    config::Settings,
    simulator,
};

/// Runs the demo; `Ok` only if every expected result arrived.
pub async fn run(mut settings: Settings, timeout: Duration) -> anyhow::Result<()> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let token = format!("demo-token-{run_id}");
    let stop = CancellationToken::new();
    let (gewe_addr, _sim) = simulator::spawn(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        simulator::Options {
            token: Some(token.clone()),
            latency: Duration::from_millis(50),
            ..simulator::Options::default()
        },
        stop.clone(),
    )
    .await
    .context("could not start the GeWe simulator")?;

    let a = &mut settings.amqp;
    a.command_queue = format!("gewe.demo.{run_id}.commands");
    a.result_exchange = format!("gewe.demo.{run_id}.results");
    a.dead_letter_exchange = format!("gewe.demo.{run_id}.dlx");
    a.dead_letter_queue = format!("gewe.demo.{run_id}.dead");
    a.declare = true;
    settings.gewe.base_url = format!("http://{gewe_addr}");
    settings.gewe.token = Some(SecretString::from(token));
    settings.pacing.per_app_min_interval = Duration::from_millis(200);
    settings.retry.initial_delay = Duration::from_millis(100);
    settings.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));

    println!(
        "gewe-friend-worker demo: worker + GeWe simulator at http://{gewe_addr} (no real WeChat account is touched)"
    );
    println!(
        "broker: {}",
        crate::config::redact_url_list(&settings.amqp.url)
    );
    println!("command queue: {}\n", settings.amqp.command_queue);

    // Declare first so the listener can bind before the worker publishes.
    let setup = Connector::new(&settings.amqp)?
        .connect_first(ConnectionProperties::default())
        .await
        .context("the demo needs RabbitMQ (start it, or set GEWE_WORKER__AMQP__URL)")?;
    let setup_channel = setup.create_channel().await?;
    topology::declare(&setup_channel, &settings.amqp).await?;
    let mut client = CommandClient::connect(&settings.amqp, Listen::ResultExchange).await?;

    let app = Application::build(settings.clone()).await?;
    let worker = tokio::spawn(app.run(stop.clone()));

    let commands = demo_commands(&run_id);
    for c in &commands {
        client.send(c).await?;
        println!(
            "→ published {} (appId {}, member {})",
            c.command_id, c.app_id, c.member_wxid
        );
    }
    client
        .send_raw(
            b"{this is not json",
            Some(&format!("demo-{run_id}-malformed")),
        )
        .await?;
    println!("→ published demo-{run_id}-malformed (a body that is not JSON)\n");

    let expected = commands.len() + 1;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = 0;
    let outcome = loop {
        if received == expected {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_result(left).await {
            Ok(event) => {
                received += 1;
                let status = event["status"].as_str().unwrap_or("?");
                let kind = event["error"]["kind"]
                    .as_str()
                    .map(|k| format!(" ({k})"))
                    .unwrap_or_default();
                println!("← result {received}/{expected}: {status}{kind}");
                println!("{}\n", serde_json::to_string_pretty(&event)?);
            }
            Err(e) => break Err(e),
        }
    };

    stop.cancel();
    match worker.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("worker error: {e:#}"),
        Err(e) => eprintln!("worker task failed: {e}"),
    }
    client.close().await;
    let dead = topology::remove(&setup_channel, &settings.amqp).await;
    let _ = setup.close(200, "demo done".into()).await;

    outcome?;
    println!(
        "the malformed command was dead-lettered ({dead} message in {})",
        settings.amqp.dead_letter_queue
    );
    if received != expected {
        bail!("only {received} of {expected} results arrived");
    }
    println!("demo finished: {expected} commands, {expected} result events");
    Ok(())
}

fn demo_commands(run_id: &str) -> Vec<NewCommand> {
    let cmd = |n: u32, app: &str, member: &str| NewCommand {
        command_id: format!("demo-{run_id}-{n}"),
        app_id: app.to_owned(),
        chatroom_id: "34757816141@chatroom".to_owned(),
        member_wxid: member.to_owned(),
        content: "你好，我们在群里见过".to_owned(),
    };
    vec![
        cmd(1, "demo_app_alpha", "wxid_demo_alice"),
        cmd(2, "demo_app_beta", "wxid_demo_bob"),
        cmd(3, "demo_app_alpha", "wxid_demo_carol"),
        cmd(4, "demo_app_beta", "wxid_demo_reject_dave"),
        cmd(5, "demo_app_offline", "wxid_demo_erin"),
    ]
}
