//! Test harness: a real worker on a uniquely named topology of the real
//! RabbitMQ, GeWe mocked with wiremock, and a listener on the result
//! exchange standing in for a downstream consumer.
#![allow(dead_code)]

pub mod admin;
pub mod broker;
pub mod callbacks;
pub mod delay_queues;
pub mod fake_gewe;
pub mod lock;
pub mod logs;
pub mod nodes;
pub mod otlp;
pub mod process;
pub mod sentinel;
pub mod tcp_proxy;
pub mod webdriver;

use std::{future::Future, net::SocketAddr, time::Duration};

use futures_util::StreamExt;
use gewe_friend_worker::{
    app::Application,
    broker::{Connector, topology},
    config::{AmqpSettings, Settings},
};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;

/// The token every test worker uses.
pub const TOKEN: &str = "test-token-9f3c2a";
/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(20);
/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Broker URL: `GEWE_TEST_AMQP_URL` or the local default. Every test that
/// uses the shared broker gets its URL here, so this is where the process
/// takes its share of the machine-wide broker lock ([`lock::broker_shared`]):
/// the broker-restart test waits for it.
pub fn amqp_url() -> String {
    lock::broker_shared();
    std::env::var("GEWE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `prefix-<uuid>`: a name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Runs `check` until it returns `Ok`, looking again every 20 ms, for at
/// most `within`; then panics with its last `Err`, which says what it saw.
/// The one deadline loop of the tests: no test sleeps and hopes.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(done) => return done,
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                panic!("not within {within:?}: {seen}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// `Ok` when `done`, else `Err` with what was seen: an [`eventually`] check.
pub fn done_or(done: bool, seen: impl FnOnce() -> String) -> Result<(), String> {
    if done { Ok(()) } else { Err(seen()) }
}

/// In-process workers share this process's metrics (one global recorder).
/// Each holds a read guard while it runs; [`alone`] takes the write side.
static IN_PROCESS: RwLock<()> = RwLock::const_new(());

tokio::task_local! {
    /// Set inside [`alone`]: that test's own workers take no read guard.
    static ALONE: ();
}

/// Runs `test` while no other test's in-process worker runs, for a test
/// that reads this process's metrics: what it counts is its own worker's
/// doing. Counters keep what earlier tests counted, so such a test compares
/// with a value it read first.
pub async fn alone<F: Future>(test: F) -> F::Output {
    let _everyone_else = IN_PROCESS.write().await;
    ALONE.scope((), test).await
}

thread_local! {
    /// This test thread's share of [`IN_PROCESS`]: how many [`InProcess`]
    /// are alive, and the one read guard they share.
    static HELD: std::cell::RefCell<(usize, Option<RwLockReadGuard<'static, ()>>)> =
        const { std::cell::RefCell::new((0, None)) };
}

/// What an in-process worker holds while it runs (see [`alone`]).
///
/// One read guard per test thread, shared by that test's workers: tokio's
/// lock is fair, so a test taking a second read guard (a second replica)
/// while an [`alone`] test waits for the write side would wait behind it,
/// and that test waits for the first guard: both would hang.
pub struct InProcess(());

impl Drop for InProcess {
    fn drop(&mut self) {
        // Dropped on another thread (a multi-threaded test's task), the
        // count there is 0 and nothing happens: the guard then lives until
        // the test's thread ends, which is also when the test is over.
        let _ = HELD.try_with(|held| {
            let mut held = held.borrow_mut();
            if held.0 > 0 {
                held.0 -= 1;
                if held.0 == 0 {
                    held.1 = None;
                }
            }
        });
    }
}

/// Takes this test thread's share of the in-process lock (see
/// [`InProcess`]); `None` inside [`alone`].
pub async fn in_process() -> Option<InProcess> {
    if ALONE.try_with(|_| ()).is_ok() {
        return None;
    }
    if HELD.with(|held| held.borrow().0 == 0) {
        let guard = IN_PROCESS.read().await;
        HELD.with(|held| held.borrow_mut().1 = Some(guard));
    }
    HELD.with(|held| held.borrow_mut().0 += 1);
    Some(InProcess(()))
}

/// Settings with unique names, fast retries, no pacing, an ephemeral ops port.
pub fn test_settings(gewe_url: &str) -> Settings {
    let mut s = Settings::load_from(None, Some(Default::default())).expect("defaults are valid");
    let id = uuid::Uuid::new_v4().simple().to_string();
    s.amqp.url = amqp_url();
    s.amqp.command_queue = format!("test.{id}.commands");
    s.amqp.result_exchange = format!("test.{id}.results");
    s.amqp.dead_letter_exchange = format!("test.{id}.dlx");
    s.amqp.dead_letter_queue = format!("test.{id}.dead");
    // Off unless a test turns them on; named, so it only has to.
    s.callbacks.exchange = format!("test.{id}.callbacks");
    s.callbacks.queue = format!("test.{id}.callbacks.modcontacts");
    s.amqp.prefetch = 16;
    s.gewe.base_url = gewe_url.to_owned();
    s.gewe.token = Some(SecretString::from(TOKEN));
    s.gewe.timeout = Duration::from_secs(2);
    s.retry.max_attempts = 3;
    s.retry.initial_delay = Duration::from_millis(10);
    s.retry.max_delay = Duration::from_millis(100);
    s.pacing.per_app_min_interval = Duration::ZERO;
    s.pacing.per_app_concurrency = 64;
    s.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.shutdown.grace = Duration::from_secs(5);
    // Outcomes (and remembered v3s) the tests leave in Redis expire soon
    // after the run.
    s.dedupe.window = Duration::from_secs(3600);
    s.callbacks.match_window = Duration::from_secs(600);
    s
}

/// A running worker plus a broker connection for publishing and observing.
pub struct TestApp {
    pub settings: Settings,
    pub ops_addr: SocketAddr,
    /// `POST /gewe/callback`, when `callbacks.listen` is set.
    pub callback_addr: Option<SocketAddr>,
    /// The operator's console, when `admin.listen` is set.
    pub admin_addr: Option<SocketAddr>,
    pub connection: Connection,
    pub channel: Channel,
    pub events: Consumer,
    pub stop: CancellationToken,
    pub worker: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Held while the worker runs in this process (see [`alone`]).
    in_process: Option<InProcess>,
    /// Set once [`TestApp::stop`] removed the topology; until then dropping
    /// the app removes it (a test that panicked never reaches `stop`).
    removed: bool,
}

/// A received result event.
#[derive(Debug)]
pub struct Received {
    pub body: Value,
    pub properties: BasicProperties,
    pub routing_key: String,
}

impl Received {
    pub fn kind(&self) -> Option<&str> {
        self.body["error"]["kind"].as_str()
    }
    pub fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or("")
    }
    pub fn attempts(&self) -> u64 {
        self.body["attempts"].as_u64().unwrap_or(u64::MAX)
    }
}

/// Declares the topology, binds a listener to the result exchange (unless
/// `bind_results` is false), then starts the worker.
pub async fn spawn_app_with(settings: Settings, bind_results: bool) -> TestApp {
    spawn_app_with_accounts(settings, bind_results, None).await
}

/// Like [`spawn_app_with`], with the accounts the console shows.
pub async fn spawn_app_with_accounts(
    settings: Settings,
    bind_results: bool,
    accounts: Option<std::sync::Arc<dyn gewe_friend_worker::accounts::AccountDirectory>>,
) -> TestApp {
    logs::init();
    let mut app = listener(settings, bind_results).await;
    app.in_process = in_process().await;
    let worker = Application::build_with_accounts(app.settings.clone(), accounts)
        .await
        .expect("application builds");
    app.ops_addr = worker.ops_addr();
    app.admin_addr = worker.admin_addr();
    app.callback_addr = worker.callback_addr();
    app.worker = Some(tokio::spawn(worker.run(app.stop.clone())));
    app
}

/// Topology and a result listener, but no worker (for tests that run the
/// real binary as the worker).
pub async fn spawn_listener(settings: &Settings) -> TestApp {
    listener(settings.clone(), true).await
}

/// Like [`spawn_listener`], but nothing is bound to the result exchange.
pub async fn spawn_unbound_listener(settings: &Settings) -> TestApp {
    listener(settings.clone(), false).await
}

/// A connection and a confirm-mode channel on it.
pub async fn confirm_channel(url: &str) -> (Connection, Channel) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running for integration tests");
    confirm_mode(connection).await
}

/// Like [`confirm_channel`], to the first node of `amqp.url` that answers,
/// with `amqp.tls`, as the worker connects.
pub async fn confirm_channel_to(amqp: &AmqpSettings) -> (Connection, Channel) {
    let connection = Connector::new(amqp)
        .expect("TLS files readable")
        .connect_first(ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running for integration tests");
    confirm_mode(connection).await
}

async fn confirm_mode(connection: Connection) -> (Connection, Channel) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// Binds `queue` to every routing key of the result exchange.
pub async fn bind_to_results(channel: &Channel, queue: &str, settings: &Settings) {
    channel
        .queue_bind(
            queue.into(),
            settings.amqp.result_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

async fn listener(settings: Settings, bind_results: bool) -> TestApp {
    let (connection, channel) = confirm_channel_to(&settings.amqp).await;
    topology::declare(&channel, &settings.amqp)
        .await
        .expect("topology");
    topology::declare_delay_queues(&channel, &settings.amqp, &settings.retry.park)
        .await
        .expect("delay queues");
    topology::declare_callbacks(&channel, &settings.amqp, &settings.callbacks)
        .await
        .expect("callbacks topology");
    let listener = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("listener queue");
    if bind_results {
        bind_to_results(&channel, listener.name().as_str(), &settings).await;
    }
    let events = channel
        .basic_consume(
            listener.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    TestApp {
        settings,
        ops_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        callback_addr: None,
        admin_addr: None,
        connection,
        channel,
        events,
        stop: CancellationToken::new(),
        worker: None,
        in_process: None,
        removed: false,
    }
}

pub async fn spawn_app(settings: Settings) -> TestApp {
    spawn_app_with(settings, true).await
}

/// A valid command body.
pub fn command(id: &str, app_id: &str) -> Value {
    json!({
        "commandId": id,
        "appId": app_id,
        "chatroomId": "34757816141@chatroom",
        "memberWxid": format!("wxid_{id}"),
        "content": "hello from the group"
    })
}

/// A GeWe mock that fails the test (when dropped) if it is ever called.
pub async fn gewe_never_called() -> wiremock::MockServer {
    let gewe = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(gewe_ok("never")))
        .expect(0)
        .mount(&gewe)
        .await;
    gewe
}

/// A GeWe success body.
pub fn gewe_ok(v3: &str) -> Value {
    json!({"ret": 200, "msg": "操作成功", "data": {"v3": v3}})
}

impl TestApp {
    /// Publishes `body` to the command queue (default exchange), confirmed.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.settings.amqp.command_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            confirm.is_ack() && confirm.take_message().is_none(),
            "command not routed"
        );
    }

    pub async fn publish(&self, body: &Value) {
        self.publish_raw(body.to_string().as_bytes(), BasicProperties::default())
            .await;
    }

    /// Next event on the result exchange, or panic after [`WAIT`].
    pub async fn next_event(&mut self) -> Received {
        next_on(&mut self.events).await
    }

    /// The next event if one arrives within `within`.
    pub async fn try_next_event(&mut self, within: Duration) -> Option<Received> {
        let delivery = tokio::time::timeout(within, self.events.next())
            .await
            .ok()?
            .expect("consumer open")
            .expect("delivery");
        Some(received(ack(delivery).await))
    }

    /// Collects `n` events.
    pub async fn events(&mut self, n: usize) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_event().await);
        }
        out
    }

    /// Takes `expected` messages from the dead-letter queue (panics if they
    /// do not arrive within [`WAIT`]) and returns their bodies.
    pub async fn dead_letters(&self, expected: usize) -> Vec<Vec<u8>> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                self.settings.amqp.dead_letter_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume dead letters");
        let mut out = Vec::with_capacity(expected);
        while out.len() < expected {
            let delivery = next_acked(&mut consumer, || {
                format!("only {} of {expected} dead letters arrived", out.len())
            })
            .await;
            out.push(delivery.data);
        }
        let _ = channel.close(200, "done".into()).await;
        out
    }

    /// Stops the worker (keeping the topology), asserting a clean exit.
    pub async fn stop_worker(&mut self) {
        let worker = self.worker.take().expect("a running worker");
        self.stop.cancel();
        tokio::time::timeout(WAIT, worker)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker exits cleanly");
    }

    /// Takes the next command still in the command queue (the worker must
    /// be stopped), proving it was neither lost nor acked.
    pub async fn command_left_in_queue(&self) -> Value {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut queue = channel
            .basic_consume(
                self.settings.amqp.command_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume the command queue");
        let delivery =
            next_acked(&mut queue, || "a command is still in the queue".to_owned()).await;
        let _ = channel.close(200, "done".into()).await;
        serde_json::from_slice(&delivery.data).expect("json")
    }

    /// Stops the worker, asserts it exited cleanly, removes the topology.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(worker) = self.worker.take() {
            let result = tokio::time::timeout(WAIT, worker)
                .await
                .expect("worker stops in time");
            result.expect("worker task").expect("worker exits cleanly");
        }
        remove_topology(&self.channel, &self.settings).await;
        self.removed = true;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// Deletes the queues and exchanges a [`TestApp`] declared.
async fn remove_topology(channel: &Channel, settings: &Settings) {
    topology::remove(channel, &settings.amqp).await;
    topology::remove_delay_queues(channel, &settings.amqp, &settings.retry.park).await;
    topology::remove_callbacks(channel, &settings.callbacks).await;
}

impl Drop for TestApp {
    /// A test that failed before [`TestApp::stop`] would leave its queues
    /// and exchanges in the shared broker, where CI's next run finds them.
    /// They are removed here, over a connection of its own on a thread of
    /// its own: the test's runtime may be the one unwinding.
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.stop.cancel();
        let settings = self.settings.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok(connector) = Connector::new(&settings.amqp) else {
                    return;
                };
                let connect = connector.connect_first(ConnectionProperties::default());
                let Ok(Ok(connection)) = tokio::time::timeout(WAIT, connect).await else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    let _ = tokio::time::timeout(WAIT, remove_topology(&channel, &settings)).await;
                }
                let _ = connection
                    .close(200, "test failed; topology removed".into())
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Next delivery on `consumer`, acked; panics with `late()` after [`WAIT`].
async fn next_acked(consumer: &mut Consumer, late: impl FnOnce() -> String) -> Delivery {
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("{}", late()))
        .expect("consumer open")
        .expect("delivery");
    ack(delivery).await
}

async fn ack(delivery: Delivery) -> Delivery {
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    delivery
}

fn received(delivery: Delivery) -> Received {
    Received {
        body: serde_json::from_slice(&delivery.data).expect("event is JSON"),
        properties: delivery.properties,
        routing_key: delivery.routing_key.to_string(),
    }
}

/// Next delivery on `consumer` as a [`Received`], acked.
pub async fn next_on(consumer: &mut Consumer) -> Received {
    received(next_acked(consumer, || "an event arrives in time".to_owned()).await)
}

/// Redis for tests: `GEWE_TEST_REDIS_URL` or the local default.
pub fn redis_url() -> String {
    std::env::var("GEWE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// Another worker process (in-process) on the same settings.
pub async fn start_worker(
    settings: &Settings,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    SocketAddr,
) {
    logs::init();
    let guard = in_process().await;
    let app = Application::build(settings.clone())
        .await
        .expect("application builds");
    let addr = app.ops_addr();
    let stop = CancellationToken::new();
    let run = app.run(stop.clone());
    let worker = tokio::spawn(async move {
        let _guard = guard;
        run.await
    });
    (stop, worker, addr)
}

/// Reads one counter or gauge value from a `/metrics` text, summing label sets
/// whose line contains `filter`.
pub async fn metric(ops: SocketAddr, name: &str, filter: &str) -> f64 {
    let text = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the metric `name` (label sets containing `filter` summed)
/// of the process serving `ops` reaches `at_least`; panics after [`WAIT`]
/// naming `what` did not happen.
pub async fn wait_for_metric(ops: SocketAddr, name: &str, filter: &str, at_least: f64, what: &str) {
    eventually(WAIT, || async {
        let now = metric(ops, name, filter).await;
        done_or(now >= at_least, || {
            format!("{what}: {name}{{{filter}}} is {now}, not {at_least}")
        })
    })
    .await;
}

/// Polls `/readyz` until its body contains `needle` (or [`WAIT`] passes).
pub async fn wait_for_readyz(ops: SocketAddr, status: u16, needle: &str) {
    eventually(WAIT, || async {
        let r = reqwest::get(format!("http://{ops}/readyz"))
            .await
            .expect("readyz");
        let got = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        done_or(got == status && body.contains(needle), || {
            format!("/readyz stayed {got} {body:?}")
        })
    })
    .await;
}

/// Pre-declares `queue` as a plain classic queue, runs a worker on
/// `settings`, and returns the error it stops with at start-up (a topology
/// mismatch is fatal then); removes what was declared.
pub async fn start_up_error_with_a_classic(settings: &Settings, queue: &str) -> String {
    let (connection, channel) = confirm_channel(&settings.amqp.url).await;
    let _in_process = in_process().await;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("pre-declare a classic queue");
    let app = Application::build(settings.clone()).await.expect("builds");
    let err = tokio::time::timeout(WAIT, app.run(CancellationToken::new()))
        .await
        .expect("fails fast")
        .expect_err("a mismatch is fatal at start-up");
    topology::remove(&channel, &settings.amqp).await;
    topology::remove_callbacks(&channel, &settings.callbacks).await;
    let _ = connection.close(200, "done".into()).await;
    format!("{err:#}")
}

/// Waits (up to `within`) for the two events of every command in `ids`,
/// each published twice: asserts all succeeded and each command has exactly
/// one event not marked `duplicate`.
pub async fn twice_published_succeeded_once_each(
    listener: &mut TestApp,
    ids: &[String],
    within: Duration,
) {
    succeeded_once_each(listener, ids, (&[], 0), within).await;
}

/// Like [`twice_published_succeeded_once_each`] for `twice`, plus
/// `once.0`, each published once, of which exactly `once.1` succeed (the
/// others wait, e.g. deferred by a daily limit): every event is a
/// succeeded one, each of those commands has exactly one not marked
/// `duplicate`, and no other command has any.
pub async fn succeeded_once_each(
    listener: &mut TestApp,
    twice: &[String],
    (once, succeeding): (&[String], usize),
    within: Duration,
) {
    let expected = twice.len() * 2 + succeeding;
    let mut unmarked: std::collections::HashMap<String, usize> = Default::default();
    let mut events = 0;
    let all = tokio::time::timeout(within, async {
        while events < expected {
            let Some(e) = listener.try_next_event(Duration::from_secs(1)).await else {
                continue;
            };
            events += 1;
            assert_eq!(e.status(), "succeeded", "{}", e.body);
            if e.body["duplicate"] != true {
                *unmarked
                    .entry(e.body["commandId"].as_str().unwrap_or("").to_owned())
                    .or_default() += 1;
            }
        }
    })
    .await;
    assert!(all.is_ok(), "{events} of {expected} events arrived");
    assert!(unmarked.values().all(|n| *n == 1), "{unmarked:?}");
    for id in twice {
        assert!(unmarked.contains_key(id), "{id} has no succeeded event");
    }
    let once_done = once.iter().filter(|id| unmarked.contains_key(*id)).count();
    assert_eq!(once_done, succeeding, "succeeded of those published once");
    assert_eq!(
        unmarked.len(),
        twice.len() + succeeding,
        "no event of another command"
    );
}
