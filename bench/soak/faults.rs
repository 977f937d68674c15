//! The soak's fault injectors: a TCP proxy between the worker and RabbitMQ
//! that closes every connection on demand (as a broker restart or a network
//! blip would), and a private `redis-server` that is killed and started
//! again, empty, on the same port.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A TCP proxy to one upstream address.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Bumped by [`Proxy::close_all`]; connections of older generations end.
    generation: watch::Sender<u64>,
}

impl Proxy {
    /// Starts a proxy on a free local port to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, watching) = watch::channel(0);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream.clone(), watching.clone()));
            }
        });
        Ok(Self { addr, generation })
    }

    /// Closes every connection open now; new ones are accepted as before.
    pub fn close_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn relay(mut client: TcpStream, upstream: String, mut generation: watch::Receiver<u64>) {
    let born = *generation.borrow_and_update();
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = generation.wait_for(|g| *g != born) => {}
    }
}

/// A private, unpersisted `redis-server`.
pub struct Redis {
    /// Its URL.
    pub url: String,
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts one on a free port and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut redis = Self {
            url: format!("redis://127.0.0.1:{port}/0"),
            port,
            child: None,
        };
        redis.restart().await?;
        Ok(redis)
    }

    /// Kills it (SIGKILL: whatever it held is gone) and starts it again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("the soak needs redis-server")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("redis-server did not start on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
