//! `demo`: the whole pipeline on a laptop with nothing but RabbitMQ.
//!
//! Runs the real worker against the in-process GeWe simulator on a private,
//! uniquely named topology (so it never touches a real deployment's queues),
//! publishes a few commands and prints each result event as it arrives,
//! then removes what it declared. Callbacks are on: the simulator plays the
//! members, who accept [`ACCEPT_AFTER`] after each success by posting
//! GeWe's callback to the worker's own callback endpoint, so every
//! `succeeded` is followed by an `accepted`. One account, `demo_app_gamma`,
//! may send one friend request a day (`accounts.overrides`): its second
//! command is deferred to the broker's deferral ladder instead of being
//! sent, as it would be in production, and the demo shows where it waits.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use lapin::ConnectionProperties;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    app::Application,
    broker::{Connector, topology},
    command_publisher::{CommandPublisher, Listen, NewCommand},
    config::Settings,
    simulator,
};

/// Time from a success to the simulated member's acceptance.
const ACCEPT_AFTER: Duration = Duration::from_secs(1);
/// The account with a daily limit of one request.
const LIMITED_APP: &str = "demo_app_gamma";

/// Runs the demo; `Ok` only if every expected result arrived.
pub async fn run(mut settings: Settings, timeout: Duration) -> anyhow::Result<()> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let token = format!("demo-token-{run_id}");
    let callback_secret = format!("demo-secret-{run_id}");
    let stop = CancellationToken::new();
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let gewe_listener = TcpListener::bind(local)
        .await
        .context("could not start the GeWe simulator")?;
    let gewe_addr = gewe_listener.local_addr()?;

    let a = &mut settings.amqp;
    a.command_queue = format!("gewe.demo.{run_id}.commands");
    a.result_exchange = format!("gewe.demo.{run_id}.results");
    a.dead_letter_exchange = format!("gewe.demo.{run_id}.dlx");
    a.dead_letter_queue = format!("gewe.demo.{run_id}.dead");
    a.declare = true;
    let c = &mut settings.callbacks;
    c.enabled = true;
    c.exchange = format!("gewe.demo.{run_id}.callbacks");
    c.queue = format!("gewe.demo.{run_id}.callbacks.modcontacts");
    c.listen = Some(local);
    c.secret = Some(SecretString::from(callback_secret.clone()));
    settings.gewe.base_url = format!("http://{gewe_addr}");
    settings.gewe.token = Some(SecretString::from(token.clone()));
    settings.pacing.per_app_min_interval = Duration::from_millis(200);
    settings.retry.initial_delay = Duration::from_millis(100);
    settings.http.listen = local;
    settings.accounts.overrides.insert(
        LIMITED_APP.to_owned(),
        crate::config::AccountOverride {
            daily_limit: Some(1),
            ..Default::default()
        },
    );

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
    topology::declare_callbacks(&setup_channel, &settings.amqp, &settings.callbacks).await?;
    let mut publisher = CommandPublisher::connect(&settings.amqp, Listen::ResultExchange).await?;

    let app = Application::build(settings.clone()).await?;
    let callback_addr = app
        .callback_addr()
        .context("the demo worker has no callback endpoint")?;
    let callback_url = url::Url::parse(&format!(
        "http://{callback_addr}{}?secret={callback_secret}",
        crate::callbacks::ingress::CALLBACK_PATH
    ))?;
    let _sim = simulator::serve(
        gewe_listener,
        simulator::Options {
            token: Some(token),
            latency: Duration::from_millis(50),
            accept: Some(simulator::AcceptPlan {
                url: callback_url.clone(),
                accept_after: ACCEPT_AFTER,
            }),
            ..simulator::Options::default()
        },
        stop.clone(),
    );
    println!(
        "callbacks: the simulated members accept {} after each success and GeWe's callback goes to {}",
        humantime::format_duration(ACCEPT_AFTER),
        simulator::without_query(&callback_url)
    );
    let worker = tokio::spawn(app.run(stop.clone()));

    let commands = demo_commands(&run_id);
    for c in &commands {
        publisher.send(c).await?;
        println!(
            "→ published {} (appId {}, member {})",
            c.command_id, c.app_id, c.member_wxid
        );
    }
    publisher
        .send_raw(
            b"{this is not json",
            Some(&format!("demo-{run_id}-malformed")),
        )
        .await?;
    println!("→ published demo-{run_id}-malformed (a body that is not JSON)\n");

    // The limited account's second command is deferred, not answered.
    let expected = commands.len();
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut received, mut succeeded, mut accepted) = (0, 0, 0);
    // Every success is followed by its member's acceptance.
    let outcome = loop {
        if received == expected && accepted == succeeded {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match publisher.next_result(left).await {
            Ok(event) => {
                let status = event["status"].as_str().unwrap_or("?");
                if status == "accepted" {
                    accepted += 1;
                    let friend = event["friendWxid"].as_str().unwrap_or("?");
                    println!(
                        "← accepted {accepted}/{succeeded}: {friend} accepted the friend request"
                    );
                } else {
                    received += 1;
                    succeeded += usize::from(status == "succeeded");
                    let kind = event["error"]["kind"]
                        .as_str()
                        .map(|k| format!(" ({k})"))
                        .unwrap_or_default();
                    println!("← result {received}/{expected}: {status}{kind}");
                }
                println!("{}\n", serde_json::to_string_pretty(&event)?);
            }
            Err(e) => break Err(e),
        }
    };

    let deferred = if outcome.is_ok() {
        show_deferred(&setup, &settings).await
    } else {
        0
    };
    stop.cancel();
    match worker.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("worker error: {e:#}"),
        Err(e) => eprintln!("worker task failed: {e}"),
    }
    publisher.close().await;
    let dead = topology::remove(&setup_channel, &settings.amqp).await;
    topology::remove_delay_queues(&setup_channel, &settings.amqp, &settings.retry.park).await;
    topology::remove_callbacks(&setup_channel, &settings.callbacks).await;
    let _ = setup.close(200, "demo done".into()).await;

    outcome?;
    println!(
        "the malformed command was dead-lettered ({dead} message in {})",
        settings.amqp.dead_letter_queue
    );
    if received != expected {
        bail!("only {received} of {expected} results arrived");
    }
    if deferred != 1 {
        bail!("{deferred} deferred commands found, 1 expected");
    }
    println!(
        "demo finished: {} commands, {expected} result events, {accepted} friend requests accepted, {deferred} deferred for its account",
        expected + 1
    );
    Ok(())
}

/// Prints the commands waiting in the deferral ladder (left in place: the
/// queues are removed with the rest); returns how many there are.
async fn show_deferred(connection: &lapin::Connection, settings: &Settings) -> usize {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let mut found = 0;
    // Deferral happens before the results of the others are all in, but
    // the copy's confirm may trail them by a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while found == 0 && tokio::time::Instant::now() < deadline {
        for delay in crate::defer::DEFER_DELAYS {
            let queue = crate::config::defer_queue_name(&settings.amqp.command_queue, delay);
            let Ok(channel) = connection.create_channel().await else {
                return found;
            };
            // One copy per queue: it goes back to the head when released.
            if let Ok(Some(message)) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await
            {
                found += 1;
                let body: serde_json::Value =
                    serde_json::from_slice(&message.delivery.data).unwrap_or_default();
                println!(
                    "⏸ deferred: {} waits in {queue} ({} reached its daily limit of 1; it is tried again after the delay, up to accounts.max_wait)",
                    body["commandId"].as_str().unwrap_or("?"),
                    body["appId"].as_str().unwrap_or("?"),
                );
                let _ = channel
                    .basic_nack(
                        message.delivery.delivery_tag,
                        BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        },
                    )
                    .await;
            }
            let _ = channel.close(200, "shown".into()).await;
        }
        if found == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    found
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
        cmd(6, LIMITED_APP, "wxid_demo_frank"),
        cmd(7, LIMITED_APP, "wxid_demo_grace"),
    ]
}
