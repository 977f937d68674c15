//! Logging set-up: `RUST_LOG` filtering, JSON or human format, and token
//! redaction on every line written; and trace export ([`export`], the
//! command spans in [`spans`]).

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::{
    EnvFilter,
    fmt::{MakeWriter, format::JsonFields},
};

use crate::{config::LogFormat, redact::Redactor};

mod command_context;
pub mod export;
pub mod spans;

pub use command_context::{
    CommandContext, CommandLines, scope as command_scope, with_current as with_current_command,
};
pub use export::{ExportSetupError, Traces};
pub use spans::{CommandTracer, DeliveryFacts, DeliverySpan, SpanIds};

/// Writes to stderr with the token masked. Each log event reaches the writer
/// as one formatted buffer, so a token is never split across writes.
#[derive(Clone)]
pub struct RedactingStderr {
    redactor: Redactor,
}

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr()
            .lock()
            .write_all(&self.redactor.redact_bytes(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Silenced unless `RUST_LOG` names it: lapin logs every returned
/// (unroutable) message at WARN with its whole body as decimal bytes,
/// about 2 KB a line; the worker logs one line per command itself.
const QUIET: &str = "lapin::returned_messages=error";

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG`
/// is unset. Logs go to stderr so stdout stays for program output
/// (`demo`, `publish --wait`, `check-config`). Calling it twice is harmless.
pub fn init(format: Option<LogFormat>, redactor: Redactor, default_filter: &str) {
    let wanted =
        std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_else(|_| default_filter.to_owned());
    // Later directives win, so RUST_LOG can still turn lapin's line back on.
    let filter = EnvFilter::try_new(format!("{QUIET},{wanted}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("{QUIET},{default_filter}")));
    let format = format.unwrap_or(if io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let writer = RedactingStderr { redactor };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => {
            let lines = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                // Every enclosing span, after the command's own entry.
                .with_span_list(true);
            builder
                .with_ansi(false)
                .fmt_fields(JsonFields::new())
                .event_format(CommandLines::json(lines))
                .try_init()
        }
        LogFormat::Pretty => builder
            .event_format(CommandLines::text(
                tracing_subscriber::fmt::format().compact(),
            ))
            .try_init(),
    };
    // Already initialised (e.g. by an embedding test): keep the first.
    let _ = result;
}

/// Logs panics through tracing, as one line with the thread, location and
/// message, instead of a plain-text backtrace in the JSON stream. Covers
/// every thread, the broker library's own included.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "<non-string panic payload>".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        tracing::error!(
            target: "panic",
            thread = thread.name().unwrap_or("<unnamed>"),
            location,
            panic = %message,
            "panic"
        );
    }));
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn a_panic_is_one_json_line_with_thread_location_and_message() {
        let captured = Captured::default();
        let previous = std::panic::take_hook();
        log_panics();
        let writer = captured.clone();
        let joined = std::thread::Builder::new()
            .name("doomed".into())
            .spawn(move || {
                let subscriber = tracing_subscriber::fmt()
                    .json()
                    .flatten_event(true)
                    .with_writer(writer)
                    .finish();
                let _guard = tracing::subscriber::set_default(subscriber);
                panic!("boom at 3 a.m.");
            })
            .expect("spawn")
            .join();
        std::panic::set_hook(previous);
        assert!(joined.is_err(), "the thread panicked");
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
        assert_eq!(line["target"], "panic");
        assert_eq!(line["thread"], "doomed");
        assert_eq!(line["panic"], "boom at 3 a.m.");
        assert!(
            line["location"]
                .as_str()
                .unwrap_or("")
                .contains("telemetry/mod.rs")
        );
    }
}
