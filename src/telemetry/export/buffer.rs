//! The bounded buffer between ended spans and the collector.
//!
//! A span that ends is offered to a bounded queue without waiting
//! ([`Buffer::on_end`]); a full queue drops it. One task on the worker's
//! tokio runtime ([`export_loop`]) takes batches from the queue and posts
//! them, one request at a time, each bounded by a timeout; a batch that
//! fails (collector down, slow, answering 500) is dropped. The task wakes
//! once a full batch is queued or the linger has passed, never per span:
//! a wake per span cost a cross-thread unpark each. So a command
//! never waits for the collector, whatever it does: at worst its spans are
//! lost, counted in `telemetry_spans_dropped_total` and reported in at most
//! one log line a minute.
//!
//! It replaces the SDK's batch processor, which exports from a thread of
//! its own: there an async HTTP client finds no tokio reactor, panics, and
//! every span is lost without a word.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::{Instant, sleep, timeout},
};

/// How the buffer and its export task are sized and timed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Spans waiting for export at most; more are dropped.
    pub capacity: usize,
    /// Spans per request at most.
    pub batch: usize,
    /// How long a batch waits to fill before it is sent anyway.
    pub linger: Duration,
    /// Bound on one export request.
    pub timeout: Duration,
    /// Least time between two log lines about dropped spans.
    pub report_every: Duration,
}

/// Takes ended spans into the queue; never blocks.
#[derive(Debug)]
pub(super) struct Buffer {
    queue: mpsc::Sender<SpanData>,
    /// Raised once a full batch waits.
    ready: Arc<Notify>,
    /// Free places left in the queue when a full batch waits.
    full_batch_at: usize,
    drops: Arc<Drops>,
}

/// The export task's end of the buffer.
#[derive(Debug)]
pub(super) struct Queue {
    spans: mpsc::Receiver<SpanData>,
    ready: Arc<Notify>,
}

impl Buffer {
    /// A buffer of `limits.capacity` spans and the export task's end of it.
    pub(super) fn new(limits: &Limits, drops: Arc<Drops>) -> (Self, Queue) {
        let capacity = limits.capacity.max(1);
        let (queue, spans) = mpsc::channel(capacity);
        let ready = Arc::new(Notify::new());
        let buffer = Self {
            queue,
            ready: ready.clone(),
            full_batch_at: capacity.saturating_sub(limits.batch.max(1)),
            drops,
        };
        (buffer, Queue { spans, ready })
    }
}

impl SpanProcessor for Buffer {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        // Recorded but not sampled: not for export.
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            self.drops.add(1, Why::BufferFull);
        } else if self.queue.capacity() <= self.full_batch_at {
            // A stored permit if the task is busy: one wake at most.
            self.ready.notify_one();
        }
    }

    /// Nothing to do here: the export task flushes on its own schedule, and
    /// [`super::Traces::shutdown`] drains the queue (both async; this is
    /// called from sync code).
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Why spans were dropped, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Why {
    /// The queue was full: the collector does not keep up, or is failing.
    BufferFull,
    /// The collector refused or failed the request.
    Failed(String),
    /// The collector did not answer in time.
    TimedOut(Duration),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::BufferFull => f.write_str("the export buffer was full"),
            Why::Failed(error) => write!(f, "the export failed: {error}"),
            Why::TimedOut(after) => write!(f, "the collector did not answer within {after:?}"),
        }
    }
}

/// Dropped spans: the metric, and what the next log line says.
#[derive(Debug)]
pub(super) struct Drops {
    /// Dropped since the last log line.
    unreported: AtomicU64,
    /// The latest reason, and when the last line was written.
    report: Mutex<Report>,
    every: Duration,
    /// `telemetry_spans_dropped_total`.
    counter: metrics::Counter,
}

#[derive(Debug)]
struct Report {
    latest: Option<Why>,
    logged_at: Option<Instant>,
}

impl Drops {
    /// Counts in `counter`, logs at most one line per `every`.
    pub(super) fn new(every: Duration, counter: metrics::Counter) -> Self {
        Self {
            counter,
            unreported: AtomicU64::new(0),
            report: Mutex::new(Report {
                latest: None,
                logged_at: None,
            }),
            every,
        }
    }

    /// Counts `n` dropped spans.
    pub(super) fn add(&self, n: u64, why: Why) {
        self.counter.increment(n);
        self.unreported.fetch_add(n, Ordering::Relaxed);
        // A full buffer drops span by span on the commands' path: keep the
        // reason of a failing export, which says more, and take no lock
        // when the reason is already known.
        if why == Why::BufferFull {
            if let Ok(mut report) = self.report.try_lock()
                && report.latest.is_none()
            {
                report.latest = Some(why);
            }
            return;
        }
        self.lock().latest = Some(why);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the log line about the spans dropped since the last one, if
    /// any were and the last line is old enough; true when it did. Called
    /// by the export task.
    pub(super) fn log_if_due(&self) -> bool {
        let mut report = self.lock();
        if report.logged_at.is_some_and(|at| at.elapsed() < self.every) {
            return false;
        }
        let dropped = self.unreported.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            return false;
        }
        let why = report
            .latest
            .take()
            .map_or_else(String::new, |why| why.to_string());
        report.logged_at = Some(Instant::now());
        tracing::warn!(
            dropped,
            reason = %why,
            "trace spans dropped instead of exported (commands are not affected; see telemetry_spans_dropped_total)"
        );
        true
    }
}

/// Sends what the queue holds to `exporter`, in batches, each time a full
/// batch waits or the linger has passed, until `stop` brings a deadline (or
/// is dropped); then what is left, while the deadline allows.
pub(super) async fn export_loop<E: SpanExporter>(
    exporter: E,
    queue: Queue,
    drops: Arc<Drops>,
    limits: Limits,
    mut stop: oneshot::Receiver<Instant>,
) {
    let Queue { mut spans, ready } = queue;
    let mut batch = Vec::with_capacity(limits.batch);
    // What one wake sends at most, so a stop is seen in time.
    let rounds = limits.capacity / limits.batch.max(1) + 1;
    let deadline = loop {
        let lingered = tokio::select! {
            biased;
            deadline = &mut stop => break deadline.ok(),
            () = ready.notified() => false,
            () = sleep(limits.linger) => true,
        };
        // Full batches only, unless the linger has passed: each request
        // costs the worker a few context switches, so fewer, fuller ones.
        for _ in 0..rounds {
            let queued = spans.len();
            if queued == 0 || (!lingered && queued < limits.batch) {
                break;
            }
            // Not empty: takes what is there without waiting.
            spans.recv_many(&mut batch, limits.batch).await;
            send(&exporter, &mut batch, &drops, limits.timeout).await;
        }
        drops.log_if_due();
    };
    // Stopping: spans still ending are dropped (counted); those queued go
    // out while time is left.
    spans.close();
    while spans.recv_many(&mut batch, limits.batch).await > 0 {
        let left = deadline.map_or(limits.timeout, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            drops.add(batch.len() as u64, Why::TimedOut(Duration::ZERO));
            batch.clear();
            continue;
        }
        send(&exporter, &mut batch, &drops, left.min(limits.timeout)).await;
    }
    // Nothing to wait for: the last line is written whatever its age.
    drops.lock().logged_at = None;
    drops.log_if_due();
}

/// Exports `batch` (emptied) within `within`; what fails is dropped.
async fn send<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    drops: &Drops,
    within: Duration,
) {
    let n = batch.len() as u64;
    let spans = std::mem::take(batch);
    match timeout(within, exporter.export(spans)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => drops.add(n, Why::Failed(e.to_string())),
        Err(_) => drops.add(n, Why::TimedOut(within)),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        borrow::Cow,
        sync::atomic::AtomicUsize,
        time::{Duration, SystemTime},
    };

    use opentelemetry::{
        InstrumentationScope,
        trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    };
    use opentelemetry_sdk::{
        error::OTelSdkError,
        trace::{SpanEvents, SpanLinks},
    };

    use super::*;

    fn span(n: u64, sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(u128::from(n) + 1),
                SpanId::from(n + 1),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed("test"),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("test").build(),
        }
    }

    /// Counts what it is given; fails when told to.
    #[derive(Debug, Default)]
    struct Fake {
        exported: Arc<AtomicUsize>,
        fail: bool,
    }

    impl SpanExporter for Fake {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(OTelSdkError::InternalFailure("HTTP 500".into()));
            }
            self.exported.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    const LIMITS: Limits = Limits {
        capacity: 4,
        batch: 2,
        linger: Duration::from_millis(100),
        timeout: Duration::from_secs(1),
        report_every: Duration::from_secs(60),
    };

    fn unreported(drops: &Drops) -> u64 {
        drops.unreported.load(Ordering::SeqCst)
    }

    #[test]
    fn a_full_buffer_drops_without_waiting_and_counts() {
        let drops = Arc::new(Drops::new(LIMITS.report_every, metrics::Counter::noop()));
        let (buffer, mut queue) = Buffer::new(&LIMITS, drops.clone());
        for n in 0..10 {
            buffer.on_end(span(n, true));
        }
        buffer.on_end(span(99, false));
        assert_eq!(unreported(&drops), 6);
        assert_eq!(drops.lock().latest, Some(Why::BufferFull));
        let mut queued = 0;
        while queue.spans.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 4, "unsampled spans are not queued");
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_one_line_a_minute() {
        let drops = Drops::new(Duration::from_secs(60), metrics::Counter::noop());
        assert!(!drops.log_if_due(), "nothing dropped, nothing to say");
        drops.add(3, Why::Failed("HTTP 500".into()));
        assert!(drops.log_if_due());
        drops.add(1, Why::BufferFull);
        assert!(!drops.log_if_due());
        tokio::time::advance(Duration::from_secs(59)).await;
        drops.add(1, Why::TimedOut(Duration::from_secs(10)));
        assert!(!drops.log_if_due());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(drops.log_if_due());
        assert_eq!(unreported(&drops), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn spans_are_exported_in_batches_and_drained_on_stop() {
        let drops = Arc::new(Drops::new(LIMITS.report_every, metrics::Counter::noop()));
        let (buffer, queue) = Buffer::new(&LIMITS, drops.clone());
        let exported = Arc::new(AtomicUsize::new(0));
        let fake = Fake {
            exported: exported.clone(),
            fail: false,
        };
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(export_loop(fake, queue, drops.clone(), LIMITS, stopped));
        for n in 0..3 {
            buffer.on_end(span(n, true));
        }
        tokio::time::sleep(LIMITS.linger * 2).await;
        assert_eq!(exported.load(Ordering::SeqCst), 3);
        buffer.on_end(span(7, true));
        stop.send(Instant::now() + Duration::from_secs(1))
            .expect("the loop waits");
        task.await.expect("the loop ends");
        assert_eq!(exported.load(Ordering::SeqCst), 4, "the queue is drained");
        buffer.on_end(span(8, true));
        assert_eq!(unreported(&drops), 1, "a span after the stop is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_export_drops_its_batch_and_counts_it() {
        let drops = Arc::new(Drops::new(LIMITS.report_every, metrics::Counter::noop()));
        let (buffer, queue) = Buffer::new(&LIMITS, drops.clone());
        let fake = Fake {
            exported: Arc::default(),
            fail: true,
        };
        let (_stop, stopped) = oneshot::channel();
        tokio::spawn(export_loop(fake, queue, drops.clone(), LIMITS, stopped));
        for n in 0..3 {
            buffer.on_end(span(n, true));
        }
        tokio::time::sleep(LIMITS.linger * 2).await;
        // The full batch went at once and failed: logged (the first line).
        // The third span went after the linger, failed too, and waits for
        // the next line, a minute later.
        assert!(drops.lock().logged_at.is_some());
        assert_eq!(unreported(&drops), 1);
        let latest = drops.lock().latest.clone();
        assert!(
            matches!(&latest, Some(Why::Failed(e)) if e.contains("HTTP 500")),
            "{latest:?}"
        );
    }
}
