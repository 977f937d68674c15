//! The real binary as a child process, for tests that need a fresh process
//! (its own metrics, its own exit code) or a kill.

use std::{net::SocketAddr, process::Stdio};

use gewe_friend_worker::config::{Settings, amqp_env};
use tokio::process::Command;

use super::TOKEN;

/// Path of the worker binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_gewe-friend-worker");

/// The binary with a clean configuration environment.
pub fn program() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("GEWE_WORKER") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Env vars that point a child process at `settings`' broker and names.
pub fn settings_env(cmd: &mut Command, s: &Settings) {
    cmd.envs(amqp_env(&s.amqp));
}

/// `run` against `gewe`, on `settings`' topology, quiet, with the test
/// defaults (no pacing, short dedupe window). Add env and spawn.
pub fn worker_command(settings: &Settings, gewe: &str) -> Command {
    let mut cmd = program();
    settings_env(&mut cmd, settings);
    cmd.arg("run")
        .env("GEWE_WORKER__GEWE__BASE_URL", gewe)
        .env("GEWE_WORKER__GEWE__TOKEN", TOKEN)
        .env("GEWE_WORKER__DEDUPE__WINDOW", "10m")
        // The test timeout: it also sets the Redis claim lease (timeout +
        // 10 s), which a killed worker's claims hold commands for.
        .env(
            "GEWE_WORKER__GEWE__TIMEOUT",
            humantime::format_duration(settings.gewe.timeout).to_string(),
        )
        .env("GEWE_WORKER__PACING__PER_APP_MIN_INTERVAL", "0s")
        .env(
            "GEWE_WORKER__AMQP__PREFETCH",
            settings.amqp.prefetch.to_string(),
        )
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null());
    cmd
}

/// A free local port for a child's ops endpoint (released right away, so
/// another process could take it first; good enough for tests).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Sends SIGTERM to `child`, as an orchestrator stops it.
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the child is running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -TERM {pid}");
}

/// A child's stderr, read line by line while it runs (so a full pipe never
/// blocks it), for tests that wait for a log line or search the whole log.
pub struct Logs {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Logs {
    /// Starts reading `child`'s stderr.
    pub fn capture(child: &mut tokio::process::Child) -> Self {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = text.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut text = sink.lock().expect("lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        Self { text, reader }
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.text.lock().expect("lock").clone()
    }

    /// The whole log of a child that has exited.
    pub async fn finish(self) -> String {
        let Self { text, reader } = self;
        let _ = tokio::time::timeout(super::WAIT, reader).await;
        text.lock().expect("lock").clone()
    }

    /// Waits up to [`super::WAIT`] for a line containing every one of
    /// `needles`; returns it, or panics with the log.
    pub async fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            if let Some(line) = self
                .text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {needles:?}:\n{}",
                self.text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// SIGTERM to `child`, then its exit status (within [`super::WAIT`]).
pub async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    sigterm(child);
    tokio::time::timeout(super::WAIT, child.wait())
        .await
        .expect("exits within grace")
        .expect("wait")
}
