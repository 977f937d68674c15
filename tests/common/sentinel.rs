//! A Redis master, its replicas and three sentinels as child processes on
//! fixed local ports (servers from 27311, sentinels from 27321), for the
//! failover test. Fixed ports, so the set is held under the machine-wide
//! lock [`super::lock::sentinel`]; everything is killed when the set is
//! dropped, also when the test panics.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use redis::{AsyncConnectionConfig, Value};

use super::{eventually, lock};

/// The master's name in Sentinel.
pub const MASTER_NAME: &str = "mymaster";
const FIRST_SERVER: u16 = 27311;
const FIRST_SENTINEL: u16 = 27321;
const SENTINELS: u16 = 3;
/// How long the sentinels wait before they call a silent master down.
const DOWN_AFTER_MS: u64 = 1000;

/// The running set.
pub struct SentinelSet {
    dir: tempfile::TempDir,
    /// Index 0 was started as the master.
    servers: Vec<(u16, Option<Child>)>,
    sentinels: Vec<Child>,
    _lock: lock::Held,
}

fn spawn(args: &[&str]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed for the Sentinel test (.ci/run installs it)")
}

/// One command to the server on `port`; `Err` says why not.
pub async fn query(port: u16, cmd: &redis::Cmd) -> Result<Value, String> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|e| e.to_string())?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_millis(500))
        .set_response_timeout(Duration::from_millis(500));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("port {port}: {e}"))?;
    cmd.query_async(&mut conn)
        .await
        .map_err(|e| format!("port {port}: {e}"))
}

fn array_len(value: &Value) -> usize {
    match value {
        Value::Array(items) => items.len(),
        _ => 0,
    }
}

impl SentinelSet {
    /// Starts a master with `replicas` replicas and three sentinels (quorum
    /// 2), and waits until the replicas are in sync and every sentinel
    /// knows the replicas and the other sentinels.
    pub async fn start(replicas: u16) -> Self {
        let lock = lock::sentinel();
        // Leftovers of a run that was killed: ours, since we hold the lock.
        for port in (FIRST_SERVER..FIRST_SERVER + 1 + replicas)
            .chain(FIRST_SENTINEL..FIRST_SENTINEL + SENTINELS)
        {
            let _ = query(port, redis::cmd("SHUTDOWN").arg("NOSAVE")).await;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut servers = Vec::new();
        for i in 0..=replicas {
            let port = FIRST_SERVER + i;
            let data = dir.path().join(format!("server-{port}"));
            std::fs::create_dir_all(&data).expect("dir");
            let port_text = port.to_string();
            let master = FIRST_SERVER.to_string();
            let mut args = vec![
                "--port",
                &port_text,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                data.to_str().expect("utf-8 path"),
            ];
            if i > 0 {
                args.extend(["--replicaof", "127.0.0.1", &master]);
            }
            servers.push((port, Some(spawn(&args))));
        }
        let mut sentinels = Vec::new();
        for i in 0..SENTINELS {
            let port = FIRST_SENTINEL + i;
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {FIRST_SERVER} 2\nsentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\nsentinel failover-timeout {MASTER_NAME} 10000\nsentinel parallel-syncs {MASTER_NAME} 2\n",
                    dir.path().display()
                ),
            )
            .expect("sentinel conf");
            sentinels.push(spawn(&[conf.to_str().expect("utf-8 path"), "--sentinel"]));
        }
        let set = Self {
            dir,
            servers,
            sentinels,
            _lock: lock,
        };
        let replicas = usize::from(replicas);
        eventually(Duration::from_secs(30), || async {
            let role = query(FIRST_SERVER, &redis::cmd("ROLE")).await?;
            let Value::Array(role) = role else {
                return Err(format!("ROLE {role:?}"));
            };
            let synced = role.get(2).map_or(0, array_len);
            if synced < replicas {
                return Err(format!("{synced} of {replicas} replicas in sync"));
            }
            for port in set.sentinel_ports() {
                let known = query(
                    port,
                    redis::cmd("SENTINEL").arg("replicas").arg(MASTER_NAME),
                )
                .await?;
                let peers = query(
                    port,
                    redis::cmd("SENTINEL").arg("sentinels").arg(MASTER_NAME),
                )
                .await?;
                if array_len(&known) < replicas || array_len(&peers) < usize::from(SENTINELS) - 1 {
                    return Err(format!(
                        "sentinel {port} knows {} replicas and {} other sentinels",
                        array_len(&known),
                        array_len(&peers)
                    ));
                }
            }
            Ok(())
        })
        .await;
        set
    }

    fn sentinel_ports(&self) -> impl Iterator<Item = u16> {
        FIRST_SENTINEL..FIRST_SENTINEL + SENTINELS
    }

    /// `redis.sentinels` for this set.
    pub fn sentinel_addresses(&self) -> String {
        self.sentinel_ports()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port the sentinels name as the master now.
    pub async fn master_port(&self) -> Result<u16, String> {
        let reply = query(
            FIRST_SENTINEL,
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER_NAME),
        )
        .await?;
        let (_, port): (String, u16) =
            redis::from_redis_value(&reply).map_err(|e| e.to_string())?;
        Ok(port)
    }

    /// `kill -9` the server on `port`.
    pub fn kill_server(&mut self, port: u16) {
        for (p, child) in &mut self.servers {
            if *p == port
                && let Some(mut child) = child.take()
            {
                // std's kill is SIGKILL.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Where the servers and sentinels keep their files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        let children = self
            .servers
            .iter_mut()
            .filter_map(|(_, c)| c.as_mut())
            .chain(self.sentinels.iter_mut());
        for child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
