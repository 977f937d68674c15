//! Network faults without touching the shared services: a TCP proxy in
//! front of Redis or RabbitMQ that can drop every connection (a blip), cut
//! them (server unreachable) or freeze them (server hangs), and that counts
//! what its client sends; and a private `redis-server` that can be killed
//! with SIGKILL and started again on the same port.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixStream},
    sync::watch,
};

use super::{WAIT, done_or, eventually, redis_url};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Relays both ways.
    Open,
    /// Closes every connection and refuses new ones, as a dead server.
    Cut,
    /// Keeps connections open but moves no byte, as a hung server.
    Frozen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    mode: Mode,
    /// Bumped by [`TcpProxy::reset`]: connections of older generations close.
    generation: u64,
}

/// A TCP proxy in front of a server (Redis, RabbitMQ).
pub struct TcpProxy {
    /// The server's URL with host and port of the proxy.
    pub url: String,
    state: watch::Sender<State>,
    sent: Arc<AtomicUsize>,
}

impl TcpProxy {
    /// A proxy to the shared test Redis.
    pub async fn redis() -> Self {
        Self::to(&redis_url()).await
    }

    /// A proxy to the server of `url` (`redis://` or `amqp://`).
    pub async fn to(url: &str) -> Self {
        let proxied = url::Url::parse(url).expect("url");
        let default_port = if proxied.scheme().starts_with("amqp") {
            5672
        } else {
            6379
        };
        let upstream = format!(
            "{}:{}",
            proxied.host_str().unwrap_or("127.0.0.1"),
            proxied.port().unwrap_or(default_port)
        );
        Self::with_upstream(proxied, Upstream::Tcp(upstream)).await
    }

    /// A proxy serving `url` (whose host and port it replaces with its own)
    /// from the server at `upstream`.
    async fn with_upstream(mut proxied: url::Url, upstream: Upstream) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        proxied.set_host(Some("127.0.0.1")).expect("host");
        proxied.set_port(Some(port)).expect("port");
        let (state, watching) = watch::channel(State {
            mode: Mode::Open,
            generation: 0,
        });
        let sent = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept(listener, upstream, watching, sent.clone()));
        Self {
            url: proxied.to_string(),
            state,
            sent,
        }
    }

    /// How many reads from its clients the proxy relayed so far. A client
    /// that waits for each answer before it sends again (a Redis client
    /// polling) is seen here once per request.
    pub fn requests(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits until the clients sent `n` more requests than `since`: proof
    /// that a polling client is still at it.
    pub async fn wait_for_requests(&self, since: usize, n: usize) {
        eventually(WAIT, || async {
            let now = self.requests();
            done_or(now >= since + n, || {
                format!("{} of {n} requests since {since}", now - since)
            })
        })
        .await;
    }

    /// Switches the proxy to `mode`.
    pub fn set(&self, mode: Mode) {
        self.state.send_modify(|s| s.mode = mode);
    }

    /// Drops every connection open now, as a network blip would; new ones
    /// are relayed as before.
    pub fn reset(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }
}

/// Where a proxy's server is.
#[derive(Clone)]
enum Upstream {
    Tcp(String),
    Unix(PathBuf),
}

async fn accept(
    listener: TcpListener,
    upstream: Upstream,
    state: watch::Receiver<State>,
    sent: Arc<AtomicUsize>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let (upstream, mut state, sent) = (upstream.clone(), state.clone(), sent.clone());
        tokio::spawn(async move {
            let born = *state.borrow_and_update();
            match born.mode {
                Mode::Cut => return,
                Mode::Frozen => return hold(client, state).await,
                Mode::Open => {}
            }
            let relaying = async {
                match &upstream {
                    Upstream::Tcp(addr) => match TcpStream::connect(addr).await {
                        Ok(server) => relay(client, server, &sent).await,
                        Err(_) => drop(client),
                    },
                    Upstream::Unix(path) => match UnixStream::connect(path).await {
                        Ok(server) => relay(client, server, &sent).await,
                        Err(_) => drop(client),
                    },
                }
            };
            let frozen = tokio::select! {
                () = relaying => false,
                next = state.wait_for(|s| s.mode != Mode::Open || s.generation != born.generation) => {
                    next.is_ok_and(|s| s.mode == Mode::Frozen && s.generation == born.generation)
                }
            };
            if frozen {
                // Both sockets stay open and silent while frozen; then
                // they close and the client reconnects.
                let _ = state.wait_for(|s| s.mode != Mode::Frozen).await;
            }
        });
    }
}

/// Relays both ways until either side closes.
async fn relay(client: TcpStream, server: impl AsyncRead + AsyncWrite, sent: &AtomicUsize) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = tokio::io::split(server);
    tokio::select! {
        () = forward(&mut cr, &mut sw, sent) => {}
        _ = tokio::io::copy(&mut sr, &mut cw) => {}
    }
}

/// Copies client to server until either side closes, counting each read.
async fn forward(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    sent: &AtomicUsize,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        sent.fetch_add(1, Ordering::SeqCst);
    }
}

/// Holds a connection accepted while frozen, silent, until the proxy is cut
/// or reopened (a client then sees it closed and reconnects).
async fn hold(client: TcpStream, mut state: watch::Receiver<State>) {
    let _ = state.wait_for(|s| s.mode != Mode::Frozen).await;
    drop(client);
}

/// A private, unpersisted `redis-server` for tests that kill it. It listens
/// on a Unix socket in a directory of its own, behind a [`TcpProxy`] whose
/// port stays bound from start to end: a restart finds its address free,
/// and no other process can take the port meanwhile.
pub struct RedisServer {
    /// Its URL (the proxy's address).
    pub url: String,
    dir: tempfile::TempDir,
    password: Option<String>,
    cluster: bool,
    child: Option<Child>,
    _proxy: TcpProxy,
}

impl RedisServer {
    /// Starts a server and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None, false).await
    }

    /// A one-node Redis Cluster holding every slot: a script or a
    /// transaction whose keys are in two hash slots fails with CROSSSLOT,
    /// as on any Cluster.
    pub async fn start_cluster_node() -> Self {
        Self::start_with(None, true).await
    }

    /// Like [`RedisServer::start`], requiring `password` (in [`Self::url`]).
    pub async fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password), false).await
    }

    async fn start_with(password: Option<&str>, cluster: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut url = url::Url::parse("redis://127.0.0.1/0").expect("url");
        if password.is_some() {
            url.set_password(password).expect("password");
        }
        let proxy =
            TcpProxy::with_upstream(url, Upstream::Unix(dir.path().join("redis.sock"))).await;
        let mut server = Self {
            url: proxy.url.clone(),
            dir,
            password: password.map(str::to_owned),
            cluster,
            child: None,
            _proxy: proxy,
        };
        server.restart().await;
        server
    }

    /// SIGKILLs the server: everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again), empty.
    pub async fn restart(&mut self) {
        self.kill();
        let socket = self.dir.path().join("redis.sock");
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        if self.cluster {
            let _ = std::fs::remove_file(self.dir.path().join("nodes.conf"));
            command
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.path().join("nodes.conf"));
        }
        let child = command
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for Redis fault tests");
        self.child = Some(child);
        eventually(Duration::from_secs(10), || async {
            UnixStream::connect(&socket)
                .await
                .map(drop)
                .map_err(|e| format!("redis-server does not listen yet: {e}"))
        })
        .await;
        if self.cluster {
            self.take_every_slot().await;
        }
    }

    /// A connection to the server (through its proxy).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("the private redis-server answers")
    }

    async fn take_every_slot(&self) {
        let mut conn = self.connection().await;
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut conn)
            .await
            .expect("addslots");
        eventually(Duration::from_secs(10), || {
            let mut conn = conn.clone();
            async move {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                done_or(info.contains("cluster_state:ok"), || info.clone())
            }
        })
        .await;
    }
}
impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
