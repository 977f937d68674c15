//! CPU and memory accounting from `/proc`, so one run shows who spent the
//! machine's cores in each phase: the broker (`beam.smp`), the benchmark
//! process itself (load generator, result counter, simulator) and the
//! pipeline's child process (a ceiling loop or the worker).

use anyhow::Context;

/// Clock ticks per second (`CLK_TCK`); 100 on every Linux we run on.
fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of `pid` (all its threads) so far.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields start after ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 / ticks_per_sec())
}

/// Peak resident set size (`VmHWM`) of `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM")
}

/// Resident set size now (`VmRSS`) of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

/// The RabbitMQ node's process, if it runs on this machine.
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// (busy, total) jiffies of the whole machine, from `/proc/stat`.
fn machine() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// A snapshot of the parties' CPU time at one instant.
pub struct Snapshot {
    broker: Option<f64>,
    bench: f64,
    child: Option<f64>,
    machine: Option<(u64, u64)>,
}

impl Snapshot {
    /// Takes a snapshot; `child` is the pipeline's process, if one runs.
    pub fn take(broker: Option<u32>, child: Option<u32>) -> Self {
        Self {
            broker: broker.and_then(|p| cpu_secs(p).ok()),
            bench: cpu_secs(std::process::id()).unwrap_or(0.0),
            child: child.and_then(|p| cpu_secs(p).ok()),
            machine: machine(),
        }
    }
}

/// CPU spent per message by each party between two snapshots.
pub struct PhaseCpu {
    /// µs of broker CPU per message.
    pub broker_us: Option<f64>,
    /// µs of this process's CPU per message.
    pub bench_us: f64,
    /// µs of the pipeline process's CPU per message.
    pub child_us: Option<f64>,
    /// Share of the machine's cores that were busy (0..=1).
    pub busy: Option<f64>,
}

impl PhaseCpu {
    /// The CPU spent between `before` and `after`, per message of `n`.
    pub fn between(before: &Snapshot, after: &Snapshot, n: usize) -> Self {
        let per = |a: Option<f64>, b: Option<f64>| Some((b? - a.unwrap_or(0.0)) * 1e6 / n as f64);
        Self {
            broker_us: per(before.broker, after.broker),
            bench_us: (after.bench - before.bench) * 1e6 / n as f64,
            child_us: per(before.child, after.child),
            busy: match (before.machine, after.machine) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                    Some((b1 - b0) as f64 / (t1 - t0) as f64)
                }
                _ => None,
            },
        }
    }
}

/// Formats an optional figure, `—` when unknown.
pub fn opt(v: Option<f64>, precision: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.precision$}"))
}
