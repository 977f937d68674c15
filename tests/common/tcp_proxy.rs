//! Network faults without touching the shared services: a TCP proxy in
//! front of Redis or RabbitMQ that can drop every connection (a blip), cut
//! them (server unreachable) or freeze them (server hangs), and a private
//! `redis-server` that can be killed with SIGKILL and started again on the
//! same port.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::redis_url;

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
}

impl TcpProxy {
    /// A proxy to the shared test Redis.
    pub async fn redis() -> Self {
        Self::to(&redis_url()).await
    }

    /// A proxy to the server of `url` (`redis://` or `amqp://`).
    pub async fn to(url: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut proxied = url::Url::parse(url).expect("url");
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
        proxied.set_host(Some("127.0.0.1")).expect("host");
        proxied.set_port(Some(port)).expect("port");
        let (state, watching) = watch::channel(State {
            mode: Mode::Open,
            generation: 0,
        });
        tokio::spawn(accept(listener, upstream, watching));
        Self {
            url: proxied.to_string(),
            state,
        }
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

async fn accept(listener: TcpListener, upstream: String, state: watch::Receiver<State>) {
    while let Ok((client, _)) = listener.accept().await {
        let (upstream, mut state) = (upstream.clone(), state.clone());
        tokio::spawn(async move {
            let born = *state.borrow_and_update();
            match born.mode {
                Mode::Cut => return,
                Mode::Frozen => return hold(client, state).await,
                Mode::Open => {}
            }
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let relay = async {
                tokio::select! {
                    _ = tokio::io::copy(&mut cr, &mut sw) => {}
                    _ = tokio::io::copy(&mut sr, &mut cw) => {}
                }
            };
            let frozen = tokio::select! {
                () = relay => false,
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

/// Holds a connection accepted while frozen, silent, until the proxy is cut
/// or reopened (a client then sees it closed and reconnects).
async fn hold(client: TcpStream, mut state: watch::Receiver<State>) {
    let _ = state.wait_for(|s| s.mode != Mode::Frozen).await;
    drop(client);
}

/// A private, unpersisted `redis-server` for tests that kill it.
pub struct RedisServer {
    /// Its URL.
    pub url: String,
    port: u16,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Like [`RedisServer::start`], requiring `password` (in [`Self::url`]).
    pub async fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password)).await
    }

    async fn start_with(password: Option<&str>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        let mut server = Self {
            url: format!("redis://{auth}127.0.0.1:{port}/0"),
            port,
            password: password.map(str::to_owned),
            child: None,
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

    /// Starts the server (again) on its port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for Redis fault tests");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
