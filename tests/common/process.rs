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
