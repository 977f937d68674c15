//! The real binary as a child process, for tests that need a fresh process
//! (its own metrics, its own exit code) or a kill.

use std::{net::SocketAddr, process::Stdio};

use gewe_friend_worker::config::{Settings, amqp_env};
use tokio::process::Command;

use super::{TOKEN, WAIT, eventually};

/// Path of the worker binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_gewe-friend-worker");

/// The binary with a clean configuration environment: [`BIN`], or the one
/// `GEWE_TEST_WORKER_BIN` names (to measure another build, e.g. main's,
/// with the same test).
pub fn program() -> Command {
    let bin = std::env::var_os("GEWE_TEST_WORKER_BIN").unwrap_or_else(|| BIN.into());
    let mut cmd = Command::new(bin);
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
        .env("GEWE_WORKER__DEDUPE__WINDOW", "1h")
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
        // Warnings, and the start-up lines that report the bound ports.
        .env("RUST_LOG", "warn,gewe_friend_worker::app=info")
        .stderr(Stdio::null());
    cmd
}

/// A worker child started by [`spawn_worker`], with the addresses it
/// reported.
pub struct Worker {
    pub child: tokio::process::Child,
    pub logs: Logs,
    /// Its ops endpoint.
    pub ops: SocketAddr,
    /// Its callback endpoint, when `callbacks.listen` was set.
    pub callbacks: Option<SocketAddr>,
}

/// Spawns `cmd` (a [`worker_command`]) with its ops endpoint, and its
/// callback endpoint when `GEWE_WORKER__CALLBACKS__LISTEN` is set, on ports
/// the child binds itself (`127.0.0.1:0`), so no other process can take them
/// first; reads the bound addresses from the line it logs at start-up. Its
/// `RUST_LOG` must show `gewe_friend_worker::app` at `info` (as
/// [`worker_command`]'s does) and its log is JSON (stderr is a pipe).
pub async fn spawn_worker(mut cmd: Command) -> Worker {
    let callbacks = cmd
        .as_std()
        .get_envs()
        .any(|(key, value)| key == "GEWE_WORKER__CALLBACKS__LISTEN" && value.is_some());
    cmd.env("GEWE_WORKER__HTTP__LISTEN", "127.0.0.1:0");
    if callbacks {
        cmd.env("GEWE_WORKER__CALLBACKS__LISTEN", "127.0.0.1:0");
    }
    let mut child = cmd.stderr(Stdio::piped()).spawn().expect("worker starts");
    let logs = Logs::capture(&mut child);
    let ops = logs.reported("gewe-friend-worker starting", "ops").await;
    let callbacks = match callbacks {
        true => Some(logs.reported("receiving GeWe callbacks", "addr").await),
        false => None,
    };
    Worker {
        child,
        logs,
        ops,
        callbacks,
    }
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
        let _ = tokio::time::timeout(WAIT, reader).await;
        text.lock().expect("lock").clone()
    }

    /// Waits up to [`WAIT`] for a line containing every one of `needles`;
    /// returns it, or panics with the log.
    pub async fn wait_for(&self, needles: &[&str]) -> String {
        eventually(WAIT, || async {
            let text = self.text();
            text.lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
                .ok_or_else(|| format!("no log line with {needles:?}:\n{text}"))
        })
        .await
    }

    /// The address in the JSON field `field` of the first line with
    /// `message` (a bound listener the process reports).
    pub async fn reported(&self, message: &str, field: &str) -> SocketAddr {
        let line = self.wait_for(&[message]).await;
        let parsed: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("a JSON log line ({e}): {line}"));
        let shown = parsed[field].as_str().unwrap_or_default();
        // An `Option` logged with `?` reads `Some(addr)`.
        let addr = shown.trim_start_matches("Some(").trim_end_matches(')');
        addr.parse()
            .unwrap_or_else(|e| panic!("{field} is an address ({e}): {line}"))
    }
}

/// SIGTERM to `child`, then its exit status (within [`WAIT`]).
pub async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    sigterm(child);
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits within grace")
        .expect("wait")
}
