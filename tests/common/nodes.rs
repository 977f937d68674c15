//! Extra RabbitMQ nodes beside the shared broker, started with the scripts
//! in `deploy/`: a 3-node cluster (`local-cluster.sh`) and a mutual-TLS node
//! (`local-tls-broker.sh`). Each is taken down again by its guard's `Drop`,
//! also when the test fails; the shared broker (rabbit@localhost) is never
//! touched. Their ports and node names are fixed, so each guard holds the
//! machine-wide [`lock::extra_nodes`] from before its nodes start until
//! after they are down.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::lock::{self, Held};

/// Runs `deploy/<script> <args…>`; panics with its output when it fails.
pub fn deploy_script(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(script);
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} cannot run: {e}", path.display()));
    assert!(
        out.status.success(),
        "{script} {args:?} failed (it needs rabbitmq-server and root):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `rabbitmqctl -n <node> <args…>`; panics with its stderr on failure.
pub fn ctl(node: &str, args: &[&str]) -> String {
    super::broker::rabbitmqctl(&[&["-q", "-n", node], args].concat())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok()
}

/// The local 3-node cluster: c1..c3@localhost on 5701..5703.
pub struct LocalCluster {
    /// One URL per node, in node order.
    pub urls: Vec<String>,
    /// Whether this guard started it (and so takes it down).
    owned: bool,
    /// Released after `Drop` took the cluster down.
    _lock: Held,
}

impl LocalCluster {
    /// The node names, in the order of [`LocalCluster::urls`].
    pub const NODES: [&'static str; 3] = ["c1@localhost", "c2@localhost", "c3@localhost"];

    /// Starts the cluster, or uses it as it is when all three nodes already
    /// listen (someone iterating on it keeps it up between runs).
    pub fn up() -> Self {
        let lock = lock::extra_nodes();
        let owned = ![5701, 5702, 5703].into_iter().all(port_open);
        let urls = deploy_script("local-cluster.sh", &["up"])
            .lines()
            .last()
            .unwrap_or_default()
            .split(',')
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(urls.len(), 3, "local-cluster.sh prints three URLs");
        Self {
            urls,
            owned,
            _lock: lock,
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.owned {
            let _ =
                Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local-cluster.sh"))
                    .arg("down")
                    .output();
        }
    }
}

/// A node whose rabbit app was stopped (`stop_app`); dropping the guard
/// starts it again and waits until it runs.
pub struct AppStopped {
    node: String,
    restored: bool,
}

impl AppStopped {
    /// Stops the app of `node` (blocking: rabbitmqctl takes seconds).
    pub fn stop(node: &str) -> Self {
        // The guard exists before the stop, so even a failing stop_app is
        // followed by a start_app.
        let guard = Self {
            node: node.to_owned(),
            restored: false,
        };
        ctl(node, &["stop_app"]);
        guard
    }

    /// Starts the app again and waits for it (blocking).
    pub fn restore(mut self) {
        ctl(&self.node, &["start_app"]);
        ctl(&self.node, &["await_startup"]);
        self.restored = true;
    }
}

impl Drop for AppStopped {
    fn drop(&mut self) {
        if !self.restored {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "-n", &self.node, "start_app"])
                .output();
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "-n", &self.node, "await_startup"])
                .output();
        }
    }
}

/// The mutual-TLS node tls1@localhost (AMQPS on 5771), serving the
/// certificates in `dir` (`ca.pem`, `server.pem`, `server.key`).
pub struct TlsBroker {
    dir: PathBuf,
    /// `amqps://guest:guest@localhost:5771/%2f`
    pub url: String,
    /// Released after `Drop` took the node down.
    _lock: Held,
}

impl TlsBroker {
    /// Starts the node (blocking, about ten seconds).
    pub fn up(dir: &Path) -> Self {
        let lock = lock::extra_nodes();
        let shown = dir.display().to_string();
        // A node left over by an interrupted run serves old certificates.
        deploy_script("local-tls-broker.sh", &["down", &shown]);
        let url = deploy_script("local-tls-broker.sh", &["up", &shown])
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        Self {
            dir: dir.to_owned(),
            url,
            _lock: lock,
        }
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local-tls-broker.sh"))
                .arg("down")
                .arg(&self.dir)
                .output();
    }
}
