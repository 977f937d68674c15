//! What the soak measured, as it is printed (markdown tables, ready for
//! BENCHMARKS.md), written (a CSV of the RSS samples) and judged.

use std::{
    collections::HashMap,
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{gewe::Call, traffic::Tally};

/// RSS at the end of the load may differ from RSS after a minute by this
/// share at most.
const RSS_TOLERANCE: f64 = 0.10;
/// A repeated call counts as caused by a fault that happened up to this
/// long before the first call (the delivery was taken before the fault and
/// its call went out as the session died).
const FAULT_MARGIN: Duration = Duration::from_secs(1);

/// One sample of the worker and the traffic.
pub struct Sample {
    /// Since the load began.
    pub at: Duration,
    /// `load`, `drain` or `drained`.
    pub phase: &'static str,
    /// The worker's resident set size.
    pub rss_kib: u64,
    /// Commands published (confirmed) so far.
    pub published: usize,
    /// Commands with a result event so far.
    pub answered: usize,
    /// GeWe calls so far.
    pub gewe_calls: usize,
}

impl Sample {
    /// Prints the sample on the minute and half-minute marks.
    pub fn print_if_due(&self) {
        if self.at.as_secs().is_multiple_of(30) {
            println!(
                "soak t={:>4}s rss={:>6.1} MiB in={} out={} gewe_calls={}",
                self.at.as_secs(),
                self.rss_kib as f64 / 1024.0,
                self.published,
                self.answered,
                self.gewe_calls
            );
        }
    }
}

/// A fault, and when it was injected.
pub struct Fault {
    /// Since the load began.
    pub at: Duration,
    /// What happened.
    pub what: &'static str,
}

impl Fault {
    /// A fault injected now.
    pub fn new(started: Instant, what: &'static str) -> Self {
        println!("soak t={:>4}s fault: {what}", started.elapsed().as_secs());
        Self {
            at: started.elapsed(),
            what,
        }
    }
}

/// Repeated GeWe calls, by cause.
#[derive(Default)]
struct Repeats {
    /// Calls answered 503.
    unavailable: usize,
    /// Calls for a command whose earlier call was answered 503 (the
    /// worker's own retries).
    retries: usize,
    /// Calls for a command GeWe had already answered with success.
    after_success: usize,
    /// Of those, how many a fault between the two calls explains.
    explained: usize,
}

/// Everything the soak saw.
pub struct Report<'a> {
    /// Length of the load.
    pub duration: Duration,
    /// When the load began.
    pub started: Instant,
    /// Commands published and confirmed.
    pub sent: usize,
    /// The result events.
    pub tally: &'a Tally,
    /// GeWe's calls.
    pub calls: &'a [Call],
    /// The faults injected.
    pub faults: &'a [Fault],
    /// RSS and progress over time.
    pub samples: &'a [Sample],
}

impl Report<'_> {
    fn repeats(&self) -> Repeats {
        let mut per_member: HashMap<&str, Vec<&Call>> = HashMap::new();
        for call in self.calls {
            per_member.entry(&call.member).or_default().push(call);
        }
        let mut r = Repeats::default();
        for calls in per_member.values() {
            let mut first_success: Option<Duration> = None;
            for call in calls {
                let at = call.at.saturating_duration_since(self.started);
                match first_success {
                    Some(first) => {
                        r.after_success += 1;
                        let from = first.saturating_sub(FAULT_MARGIN);
                        if self.faults.iter().any(|f| f.at >= from && f.at <= at) {
                            r.explained += 1;
                        }
                    }
                    None if call.succeeded => first_success = Some(at),
                    None => {}
                }
                if !call.succeeded {
                    r.unavailable += 1;
                }
            }
            let before_success = calls.iter().take_while(|c| !c.succeeded).count();
            r.retries += before_success.min(calls.len().saturating_sub(1));
        }
        r
    }

    fn rss_at(&self, at: Duration) -> Option<u64> {
        self.samples
            .iter()
            .find(|s| s.at >= at && s.rss_kib > 0)
            .map(|s| s.rss_kib)
    }

    fn rss_change(&self) -> Option<(u64, u64, f64)> {
        let minute = self.rss_at(Duration::from_secs(60))?;
        let end = self
            .samples
            .iter()
            .rfind(|s| s.phase == "load" && s.rss_kib > 0)?
            .rss_kib;
        Some((minute, end, end as f64 / minute as f64 - 1.0))
    }

    /// Writes the samples as CSV.
    pub fn write_csv(&self, path: &Path) -> anyhow::Result<()> {
        let mut out = std::fs::File::create(path)?;
        writeln!(
            out,
            "seconds,phase,rss_kib,commands_in,commands_out,gewe_calls"
        )?;
        for s in self.samples {
            writeln!(
                out,
                "{},{},{},{},{},{}",
                s.at.as_secs(),
                s.phase,
                s.rss_kib,
                s.published,
                s.answered,
                s.gewe_calls
            )?;
        }
        println!("soak: samples written to {}", path.display());
        Ok(())
    }

    /// Prints the figures as markdown tables.
    pub fn print(&self) {
        let r = self.repeats();
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
        let outcomes: Vec<String> = self
            .tally
            .outcomes()
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        println!();
        println!("| soak ({:?}) | value |", self.duration);
        println!("| --- | --- |");
        println!("| commands in (published, confirmed) | {} |", self.sent);
        println!(
            "| commands out (with a result event) | {} |",
            self.tally.answered()
        );
        println!(
            "| lost | {} |",
            self.sent.saturating_sub(self.tally.answered())
        );
        println!("| outcomes | {} |", outcomes.join(", "));
        println!(
            "| result events (commands with a second unmarked event: its first publish's confirm was lost with the connection) | {} ({}) |",
            self.tally.events(),
            self.tally.unmarked_twice()
        );
        println!(
            "| GeWe calls (answered 503; retries after a 503) | {} ({}; {}) |",
            self.calls.len(),
            r.unavailable,
            r.retries
        );
        println!(
            "| repeated GeWe calls after a success (explained by a fault in between) | {} ({}) |",
            r.after_success, r.explained
        );
        let mut kinds: Vec<(&str, usize)> = Vec::new();
        for f in self.faults.iter().filter(|f| f.what != "GeWe normal again") {
            match kinds.iter_mut().find(|(k, _)| *k == f.what) {
                Some((_, n)) => *n += 1,
                None => kinds.push((f.what, 1)),
            }
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        println!("| faults injected | {} |", kinds.join(", "));
        if let Some((minute, end, change)) = self.rss_change() {
            println!(
                "| worker RSS after 1 min → end of load (change) | {} → {} ({:+.1} %) |",
                mib(minute),
                mib(end),
                change * 100.0
            );
        }
        println!();
        println!("| t (s) | RSS (MiB) | commands in | commands out | GeWe calls |");
        println!("| --- | --- | --- | --- | --- |");
        for s in self
            .samples
            .iter()
            .filter(|s| s.at.as_secs().is_multiple_of(60) || s.phase == "drained")
        {
            println!(
                "| {}{} | {:.1} | {} | {} | {} |",
                s.at.as_secs(),
                if s.phase == "load" { "" } else { " (drained)" },
                s.rss_kib as f64 / 1024.0,
                s.published,
                s.answered,
                s.gewe_calls
            );
        }
    }

    /// `Ok` when nothing was lost, every repeat has a fault to explain it,
    /// and RSS held. A second unmarked event is not a failure: when the
    /// connection dies between the broker routing an event and its confirm
    /// reaching the worker, the worker cannot know the event got through
    /// (README, Guarantees).
    pub fn verdict(&self) -> anyhow::Result<()> {
        let r = self.repeats();
        let lost = self.sent.saturating_sub(self.tally.answered());
        let mut problems = Vec::new();
        if lost > 0 {
            problems.push(format!("{lost} commands lost"));
        }
        if r.explained < r.after_success {
            problems.push(format!(
                "{} repeated GeWe calls with no fault in between",
                r.after_success - r.explained
            ));
        }
        match self.rss_change() {
            Some((_, _, change)) if change.abs() <= RSS_TOLERANCE => {}
            Some((minute, end, change)) => problems.push(format!(
                "RSS went from {minute} KiB to {end} KiB ({:+.1} %)",
                change * 100.0
            )),
            None => problems.push("no RSS samples after a minute".to_owned()),
        }
        if problems.is_empty() {
            println!("\nsoak: PASS");
            Ok(())
        } else {
            bail!("soak: FAIL: {}", problems.join("; "))
        }
    }
}
