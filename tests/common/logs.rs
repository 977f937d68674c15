//! The test binary's tracing subscriber for in-process workers.
//!
//! With `TEST_LOG` set (an `EnvFilter` directive such as `debug` or
//! `gewe_friend_worker=debug`), the workers' logs go to the test's captured
//! output, which `cargo test` shows when the test fails. Always, a layer
//! records when each GeWe call started and for which appId (the command's
//! log context), as the worker logs it: pacing tests judge what the worker
//! controls, not when requests happened to arrive at the mock.

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::Instant,
};

use gewe_friend_worker::telemetry::{CommandLines, with_current_command};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{EnvFilter, Layer, layer::Context, prelude::*};

static STARTS: OnceLock<Mutex<HashMap<String, Vec<Instant>>>> = OnceLock::new();

fn starts() -> &'static Mutex<HashMap<String, Vec<Instant>>> {
    STARTS.get_or_init(Default::default)
}

/// Installs the subscriber once per test binary.
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let shown = std::env::var("TEST_LOG").ok().map(|directives| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .event_format(CommandLines::text(tracing_subscriber::fmt::format()))
                .with_filter(EnvFilter::new(directives))
        });
        let _ = tracing_subscriber::registry()
            .with(CallStarts.with_filter(EnvFilter::new("gewe_friend_worker=debug")))
            .with(shown)
            .try_init();
    });
}

/// When the worker started each GeWe call for `app_id`, in order.
pub fn call_starts(app_id: &str) -> Vec<Instant> {
    starts()
        .lock()
        .expect("lock")
        .get(app_id)
        .cloned()
        .unwrap_or_default()
}

#[derive(Default)]
struct Message(Option<String>);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

struct CallStarts;

impl<S: Subscriber> Layer<S> for CallStarts {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut message = Message::default();
        event.record(&mut message);
        if message.0.as_deref() != Some("calling GeWe") {
            return;
        }
        let at = Instant::now();
        let Some(Some(app_id)) = with_current_command(|c| c.app_id.clone()) else {
            return;
        };
        starts()
            .lock()
            .expect("lock")
            .entry(app_id)
            .or_default()
            .push(at);
    }
}
