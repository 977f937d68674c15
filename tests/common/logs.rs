//! The test binary's tracing subscriber for in-process workers.
//!
//! With `TEST_LOG` set (an `EnvFilter` directive such as `debug` or
//! `gewe_friend_worker=debug`), the workers' logs go to the test's captured
//! output, which `cargo test` shows when the test fails. Always, a layer
//! records when each GeWe call started and for which appId, as the worker
//! logs it: pacing tests judge what the worker controls, not when requests
//! happened to arrive at the mock.

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::Instant,
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id},
};
use tracing_subscriber::{EnvFilter, Layer, layer::Context, prelude::*, registry::LookupSpan};

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

struct AppId(String);

#[derive(Default)]
struct Fields {
    app_id: Option<String>,
    message: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "app_id" {
            self.app_id = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = Some(format!("{value:?}"));
        }
    }
}

struct CallStarts;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for CallStarts {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "command" {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(app_id), Some(span)) = (fields.app_id, ctx.span(id)) {
            span.extensions_mut().insert(AppId(app_id));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message.as_deref() != Some("calling GeWe") {
            return;
        }
        let at = Instant::now();
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(AppId(app_id)) = span.extensions().get::<AppId>() {
                starts()
                    .lock()
                    .expect("lock")
                    .entry(app_id.clone())
                    .or_default()
                    .push(at);
                return;
            }
        }
    }
}
