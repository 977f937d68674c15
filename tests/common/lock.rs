//! Machine-wide locks (`flock(2)` on files under `/tmp`), for what several
//! test runs on one machine share: two worktrees, or nextest's one process
//! per test, would otherwise collide.
//!
//! - The shared broker: every test process that uses it holds a *shared*
//!   lock from its first use until it exits; the broker-restart test takes
//!   it *exclusively*, so it never restarts RabbitMQ under anyone's test.
//! - The extra RabbitMQ nodes (cluster on 5701-5703, TLS node on 5771): one
//!   test at a time on the machine starts them.
//! - The Sentinel test's Redis servers and sentinels (27311-27330): one run
//!   at a time.
//!
//! flock locks belong to the open file: they go with the process however it
//! ends, so a killed run leaves no stale lock behind.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::Path,
    sync::{Mutex, PoisonError},
    time::Instant,
};

/// Held by every process that uses the shared broker (shared), or by the
/// broker-restart test (exclusive).
const BROKER: &str = "/tmp/gewe-test-broker.lock";
/// Held while the extra nodes of `deploy/local-cluster.sh` or
/// `deploy/local-tls-broker.sh` are up.
const EXTRA_NODES: &str = "/tmp/gewe-test-extra-nodes.lock";

/// An flock held until dropped (or the process ends).
pub struct Held(#[allow(dead_code)] File);

fn take(path: &str, exclusive: bool) -> Held {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(path))
        .unwrap_or_else(|e| panic!("cannot open the lock file {path}: {e}"));
    let operation = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    let asked = Instant::now();
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), operation) };
    assert_eq!(
        locked,
        0,
        "flock {path}: {}",
        std::io::Error::last_os_error()
    );
    let waited = asked.elapsed();
    if waited.as_secs() >= 1 {
        eprintln!("waited {waited:?} for {path} (another test run held it)");
    }
    Held(file)
}

/// This process's hold on the shared broker, taken once.
static BROKER_HELD: Mutex<Option<Held>> = Mutex::new(None);

/// Takes the shared broker lock for the rest of this process (once; later
/// calls return at once). Called wherever a test gets the broker's URL.
pub fn broker_shared() {
    let mut held = BROKER_HELD.lock().unwrap_or_else(PoisonError::into_inner);
    if held.is_none() {
        *held = Some(take(BROKER, false));
    }
}

/// Takes the broker lock exclusively for the rest of this process: waits
/// until no other test process uses the broker, and keeps every new one
/// waiting. Only for a test binary whose one test restarts RabbitMQ; it
/// must be called before anything in the process takes the shared lock.
pub fn broker_exclusive() {
    let mut held = BROKER_HELD.lock().unwrap_or_else(PoisonError::into_inner);
    assert!(
        held.is_none(),
        "broker_exclusive must come before the process's first use of the broker"
    );
    *held = Some(take(BROKER, true));
}

/// The extra RabbitMQ nodes, held until dropped.
pub fn extra_nodes() -> Held {
    take(EXTRA_NODES, true)
}

/// Held while `tests/sentinel.rs` has its Redis servers and sentinels up
/// (fixed ports 27311-27330).
const SENTINEL: &str = "/tmp/gewe-sentinel.lock";

/// The Sentinel test's ports, held until dropped.
pub fn sentinel() -> Held {
    take(SENTINEL, true)
}
