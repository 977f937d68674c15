//! The test binary's tracing subscriber for in-process workers: with
//! `TEST_LOG` set (an `EnvFilter` directive such as `debug` or
//! `gewe_friend_worker=debug`), the workers' logs go to the test's captured
//! output, which `cargo test` shows when the test fails.

use std::sync::OnceLock;

use gewe_friend_worker::telemetry::CommandLines;
use tracing_subscriber::{EnvFilter, prelude::*};

/// Installs the subscriber once per test binary.
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(directives) = std::env::var("TEST_LOG") else {
            return;
        };
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .event_format(CommandLines::text(tracing_subscriber::fmt::format()))
                    .with_filter(EnvFilter::new(directives)),
            )
            .try_init();
    });
}
