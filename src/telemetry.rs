//! Logging set-up: `RUST_LOG` filtering, JSON or human format, and token
//! redaction on every line written.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

use crate::{config::LogFormat, redact::Redactor};

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

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG`
/// is unset. Logs go to stderr so stdout stays for program output
/// (`demo`, `publish --wait`, `check-config`). Calling it twice is harmless.
pub fn init(format: Option<LogFormat>, redactor: Redactor, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
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
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            // Every enclosing span: lines inside `attempt` still carry the
            // command's command_id and app_id.
            .with_span_list(true)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    // Already initialised (e.g. by an embedding test): keep the first.
    let _ = result;
}
