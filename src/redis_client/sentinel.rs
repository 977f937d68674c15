//! Finding the master through Sentinel (`redis.sentinels`,
//! `redis.master_name`, `redis.sentinel_password`), and hearing of a
//! failover as it happens.
//!
//! The sentinels are asked in turn (`SENTINEL get-master-addr-by-name`),
//! starting with the last one that answered; the address they give is only
//! believed once that server says `ROLE` master itself, since a sentinel
//! can still name a master that has just been demoted. Each sentinel is
//! also watched on its `+switch-master` channel, so a failover is followed
//! at once instead of at the next failing command.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use futures_util::StreamExt;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo,
    Value, aio::MultiplexedConnection,
};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::RedisError;
use crate::config::{RedisSettings, redact_url_password, split_address};

/// One sentinel's connect and answer, each.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before a lost `+switch-master` subscription is made again.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// The sentinels of one master.
pub(super) struct Sentinels {
    addresses: Vec<(String, u16)>,
    master_name: String,
    password: Option<String>,
    /// `redis.url`: the master's password, database and TLS.
    base: ConnectionInfo,
    /// The sentinel that answered last: asked first next time.
    preferred: AtomicUsize,
}

impl Sentinels {
    /// The sentinels of `settings`, which name at least one.
    pub(super) fn new(settings: &RedisSettings) -> Result<Self, RedisError> {
        let url = settings.url_or_default();
        let base = url
            .into_connection_info()
            .map_err(|source| RedisError::Unavailable {
                url: redact_url_password(url),
                source,
            })?;
        let addresses = settings
            .sentinels
            .iter()
            .filter_map(|a| split_address(a).ok())
            .map(|(host, port)| (host.to_owned(), port))
            .collect();
        Ok(Self {
            addresses,
            master_name: settings.master_name.clone(),
            password: settings
                .sentinel_password
                .as_ref()
                .map(|p| p.expose_secret().to_owned()),
            base,
            preferred: AtomicUsize::new(0),
        })
    }

    /// `sentinel:<master>@<addresses>`, for logs and errors.
    pub(super) fn describe(&self) -> String {
        let addresses: Vec<String> = self
            .addresses
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        format!("sentinel:{}@{}", self.master_name, addresses.join(","))
    }

    fn sentinel_client(&self, (host, port): &(String, u16)) -> Result<redis::Client, RedisError> {
        let info = ConnectionInfo {
            addr: ConnectionAddr::Tcp(host.clone(), *port),
            redis: RedisConnectionInfo {
                password: self.password.clone(),
                ..Default::default()
            },
        };
        redis::Client::open(info).map_err(|e| self.no_master(e.to_string()))
    }

    fn no_master(&self, reason: String) -> RedisError {
        RedisError::NoMaster {
            master: self.master_name.clone(),
            reason,
        }
    }

    /// The master's connection details, as the first sentinel that knows
    /// it says; `NoMaster` when none does.
    pub(super) async fn resolve(&self) -> Result<ConnectionInfo, RedisError> {
        let count = self.addresses.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut reasons = Vec::new();
        for i in (0..count).map(|n| (first + n) % count) {
            let address = &self.addresses[i];
            match self.ask(address).await {
                Ok(Some((host, port))) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(self.master_info(host, port));
                }
                Ok(None) => reasons.push(format!("{}:{} does not know it", address.0, address.1)),
                Err(e) => reasons.push(format!("{}:{}: {e}", address.0, address.1)),
            }
        }
        Err(self.no_master(reasons.join("; ")))
    }

    async fn ask(&self, address: &(String, u16)) -> Result<Option<(String, u16)>, String> {
        let client = self.sentinel_client(address).map_err(|e| e.to_string())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(SENTINEL_TIMEOUT)
            .set_response_timeout(SENTINEL_TIMEOUT);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply)
    }

    fn master_info(&self, host: String, port: u16) -> ConnectionInfo {
        let addr = match &self.base.addr {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_) => ConnectionAddr::Tcp(host, port),
        };
        ConnectionInfo {
            addr,
            redis: self.base.redis.clone(),
        }
    }

    /// Calls `switched` whenever a sentinel announces a new master for our
    /// name, until `stop`; one subscription per sentinel, made again when lost.
    pub(super) async fn watch(&self, switched: impl Fn(&str), stop: CancellationToken) {
        let watches = self.addresses.iter().map(|address| async {
            loop {
                if let Err(e) = self.subscribe(address, &switched).await {
                    tracing::debug!(sentinel = %format!("{}:{}", address.0, address.1), error = %e, "+switch-master subscription lost");
                }
                tokio::time::sleep(RESUBSCRIBE).await;
            }
        });
        tokio::select! {
            () = stop.cancelled() => {}
            _ = futures_util::future::join_all(watches) => {}
        }
    }

    async fn subscribe(
        &self,
        address: &(String, u16),
        switched: &impl Fn(&str),
    ) -> Result<(), String> {
        let client = self.sentinel_client(address).map_err(|e| e.to_string())?;
        let mut pubsub = tokio::time::timeout(SENTINEL_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        pubsub
            .subscribe("+switch-master")
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            // "<name> <old ip> <old port> <new ip> <new port>"
            let payload: String = message.get_payload().unwrap_or_default();
            let mut words = payload.split(' ');
            if words.next() == Some(self.master_name.as_str()) {
                switched(&payload);
            }
        }
        Err("the sentinel closed the subscription".to_owned())
    }
}

/// Whether the server behind `conn` says it is a master, and how many
/// replicas it has connected (`ROLE`); `Err` with what it is otherwise.
pub(super) async fn master_role(conn: &mut MultiplexedConnection) -> Result<usize, RedisRoleError> {
    let role: Vec<Value> = redis::cmd("ROLE")
        .query_async(conn)
        .await
        .map_err(RedisRoleError::Redis)?;
    match role.first() {
        Some(Value::BulkString(name)) if name.as_slice() == b"master" => {
            let replicas = match role.get(2) {
                Some(Value::Array(replicas)) => replicas.len(),
                _ => 0,
            };
            Ok(replicas)
        }
        Some(Value::BulkString(name)) => Err(RedisRoleError::Not(
            String::from_utf8_lossy(name).into_owned(),
        )),
        _ => Err(RedisRoleError::Not(format!("{role:?}"))),
    }
}

/// Why [`master_role`] did not find a master.
pub(super) enum RedisRoleError {
    /// `ROLE` failed.
    Redis(redis::RedisError),
    /// The server is something else (`slave`, `sentinel`).
    Not(String),
}
