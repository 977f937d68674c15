//! What a succeeded command leaves in Redis for `dedupe.window`, measured
//! on a private, empty `redis-server` (so `used_memory` counts nothing
//! else): the compact record in its hash bucket against the JSON hash per
//! commandId that earlier versions wrote. The figures are printed for
//! BENCHMARKS.md (`cargo test --test suite redis_memory -- --nocapture`).

use std::{sync::Arc, time::Duration};

use crate::common::{tcp_proxy::RedisServer, unique};
use gewe_friend_worker::{
    callbacks::{Phase, Sent, Store, store::Fields},
    command::Command,
    halt::{Halt, Signal},
    idempotency::{Fingerprint, Found, Idempotency, Record, Stored},
    outcome::CallOutcome,
    redis_client::RedisClient,
};
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

/// The v3 of the seed's example answer: GeWe's real length (211 characters).
const GEWE_V3: &str = "v3_020b3826fd030100000000003a070e7757675c000000501ea9a3dba12f95f6b60a0536a1adb690dcccc9bf58cc80765e6eb16bffa5996420bb1b2577634516ff82090419d8bdcd5689df8dfb21d40af93d286f72c3a0e8cfa6dcb68afed39226f008c6@stranger";
const COMMANDS: usize = 10_000;
/// The most a succeeded command may cost per retained day (issue 26).
const BUDGET: f64 = 300.0;

fn command(n: usize) -> Command {
    Command {
        // A commandId as publishers make them: 37 characters.
        command_id: format!("crm-7f3a-2026-11-25-{n:08}-{:08x}", n * 7919),
        app_id: "wx_3f8d2c1b".into(),
        chatroom_id: "34757816141@chatroom".into(),
        member_wxid: format!("wxid_member{n:08}"),
        content: "你好，我是群里的小王".into(),
    }
}

fn record(cmd: &Command, n: usize) -> Record {
    // Distinct v3s of GeWe's length: the last hex digits vary.
    let v3 = format!("{}{n:08x}@stranger", &GEWE_V3[..GEWE_V3.len() - 17]);
    Record::new(
        Fingerprint::of(cmd),
        CallOutcome {
            result: Ok(v3),
            attempts: 1,
        },
        gewe_friend_worker::outcome::Tries::default(),
    )
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

/// Sum of `MEMORY USAGE` over the keys under `prefix`.
async fn memory_usage(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> (f64, usize) {
    let keys: Vec<String> = conn.keys(format!("{prefix}:*")).await.expect("keys");
    let mut total = 0.0;
    for key in &keys {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(conn)
            .await
            .expect("memory usage");
        total += bytes.unwrap_or(0) as f64;
    }
    (total, keys.len())
}

/// A private, empty `redis-server` and a connection to it.
async fn private_redis() -> (RedisServer, redis::aio::MultiplexedConnection) {
    let server = RedisServer::start().await;
    let conn = server.connection().await;
    (server, conn)
}

/// `write` run for commands `0..COMMANDS`: the growth of `used_memory` per
/// command, and `MEMORY USAGE` per command over the keys under `prefix`
/// (which hold `extra` commands more) and how many keys those are.
async fn measure(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    extra: usize,
    mut write: impl AsyncFnMut(usize),
) -> (f64, f64, usize) {
    let before = used_memory(conn).await;
    for n in 0..COMMANDS {
        write(n).await;
    }
    let used = (used_memory(conn).await - before) / COMMANDS as f64;
    let (usage, keys) = memory_usage(conn, prefix).await;
    (used, usage / (COMMANDS + extra) as f64, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeded_command_leaves_at_most_300_bytes_in_redis() {
    let (server, mut conn) = private_redis().await;
    let prefix = unique("mem");
    let store = Idempotency::in_redis(
        Arc::new(RedisClient::new(&server.url).expect("url")),
        &prefix,
        Duration::from_secs(24 * 3600),
        Duration::from_secs(20),
    );
    let shutdown = Signal::new();
    let handle = async |n: usize| {
        let cmd = command(n);
        let Found::Claimed { mut claim, .. } = store
            .acquire(&cmd.command_id, Fingerprint::of(&cmd), &Halt::never())
            .await
            .expect("acquired")
        else {
            panic!("a fresh commandId is claimed");
        };
        assert_eq!(claim.store(&record(&cmd, n)).await, Stored::Kept);
        claim.published(&shutdown).await;
    };
    // Scripts loaded and the first buckets made before the baseline.
    handle(COMMANDS).await;
    let (compact_used, compact_usage, keys) = measure(&mut conn, &prefix, 1, handle).await;

    // The layout of earlier versions, for comparison: one hash per
    // commandId with the JSON record and the published flag.
    let legacy = unique("legacy");
    let mut writer = conn.clone();
    let (legacy_used, legacy_usage, _) = measure(&mut conn, &legacy, 0, async |n| {
        let cmd = command(n);
        let key = format!("{legacy}:rec:{}", cmd.command_id);
        let json = serde_json::to_string(&record(&cmd, n)).expect("json");
        let _: () = writer
            .hset_multiple(&key, &[("r", json.as_str()), ("p", "1")])
            .await
            .expect("hset");
        let _: () = writer.pexpire(&key, 86_400_000).await.expect("pexpire");
    })
    .await;

    eprintln!(
        "redis_memory: {COMMANDS} succeeded commands, v3 of {} characters, commandId of {}:\n  \
         compact buckets: {compact_used:.0} B/command (used_memory), {compact_usage:.0} B/command (MEMORY USAGE over {keys} keys)\n  \
         legacy JSON hash: {legacy_used:.0} B/command (used_memory), {legacy_usage:.0} B/command (MEMORY USAGE)",
        GEWE_V3.len(),
        command(0).command_id.len(),
    );
    assert!(compact_used <= BUDGET, "{compact_used:.0} B per command");
    assert!(compact_usage <= BUDGET, "{compact_usage:.0} B per command");
}

fn sent(n: usize, app_id: &str) -> Sent {
    let cmd = command(n);
    Sent {
        v3: format!("{}{n:08x}@stranger", &GEWE_V3[..GEWE_V3.len() - 17]),
        app_id: app_id.to_owned(),
        fields: Fields {
            chatroom_id: cmd.chatroom_id,
            member_wxid: cmd.member_wxid,
            correlation_id: cmd.command_id.clone(),
            completed_at: "2026-12-03T19:40:00.123Z".into(),
        },
        command_id: cmd.command_id,
    }
}

/// What a succeeded command leaves for `callbacks.match_window` (30 days):
/// its record packed into a hash bucket, against the JSON hash per v3 that
/// the previous version wrote, which this one still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_v3_leaves_at_most_300_bytes_in_redis() {
    let (server, mut conn) = private_redis().await;
    let client = Arc::new(RedisClient::new(&server.url).expect("url"));
    let window = Duration::from_secs(30 * 86_400);
    let app_id = unique("app");
    let prefix = unique("mem");
    let store = Store::in_redis(client.clone(), &prefix, window);
    // As the worker does: pending when GeWe's answer is stored, confirmed
    // once the succeeded event is.
    let remember = async |n: usize| {
        let sent = sent(n, &app_id);
        for phase in [Phase::Pending, Phase::Confirmed] {
            store.remember(&sent, phase).await.expect("remembered");
        }
    };
    remember(COMMANDS).await;
    let (packed_used, packed_usage, keys) = measure(&mut conn, &prefix, 1, remember).await;
    let found = store
        .lookup(&app_id, &sent(7, &app_id).v3)
        .await
        .expect("lookup");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].sent, sent(7, &app_id));
    assert_eq!(found[0].phase, Phase::Confirmed);

    // The previous layout, for comparison, and to show it is still read:
    // a hash per (appId, v3), a JSON record per commandId.
    let legacy = unique("legacy");
    let mut writer = conn.clone();
    let (legacy_used, legacy_usage, _) = measure(&mut conn, &legacy, 0, async |n| {
        let sent = sent(n, &app_id);
        let digest: String = Sha256::new()
            .chain_update(app_id.len().to_le_bytes())
            .chain_update(app_id.as_bytes())
            .chain_update(sent.v3.as_bytes())
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = format!("{legacy}:v3h:{digest}");
        let mut json = serde_json::to_value(&sent.fields).expect("json");
        json["confirmed"] = true.into();
        json["at"] = gewe_friend_worker::timestamp::now_millis().into();
        let _: () = writer
            .hset(&key, &sent.command_id, json.to_string())
            .await
            .expect("hset");
        let _: () = writer
            .pexpire(&key, 30 * 86_400_000)
            .await
            .expect("pexpire");
    })
    .await;
    let upgraded = Store::in_redis(client, &legacy, window);
    let found = upgraded
        .lookup(&app_id, &sent(7, &app_id).v3)
        .await
        .expect("lookup");
    assert_eq!(
        found.len(),
        1,
        "an earlier version's record matches: {found:?}"
    );
    assert_eq!(found[0].sent, sent(7, &app_id));

    eprintln!(
        "redis_memory: {COMMANDS} remembered v3s of {} characters, commandId of {}:\n  \
         packed buckets: {packed_used:.0} B/command (used_memory), {packed_usage:.0} B/command (MEMORY USAGE over {keys} keys)\n  \
         JSON hash per v3: {legacy_used:.0} B/command (used_memory), {legacy_usage:.0} B/command (MEMORY USAGE)",
        GEWE_V3.len(),
        command(0).command_id.len(),
    );
    assert!(packed_used <= BUDGET, "{packed_used:.0} B per command");
    assert!(packed_usage <= BUDGET, "{packed_usage:.0} B per command");
}
