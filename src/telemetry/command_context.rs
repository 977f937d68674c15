//! The command a log line is about, carried by the command's task instead
//! of a tracing span.
//!
//! Every log line written while a command is handled names its command
//! (`spans[0]`: `name` `command`, `command_id`, `app_id`, `redelivered`, and
//! the trace ids of its `traceparent`). A tracing span did that, but every
//! command paid for it whether it logged or not: the span's fields
//! formatted at creation, and the registry's enter and exit on each of the
//! five or so polls of the command's task, about 4,500 instructions per
//! command against a ceiling of about 105,000 (BENCHMARKS.md). Most
//! commands log nothing. Here the task holds the plain values
//! ([`scope`]), one task-local swap per poll, and the event formatter
//! ([`CommandLines`]) writes them only into the lines that are written.

use std::{fmt, future::Future};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

use crate::json_out;

tokio::task_local! {
    // Boxed: the value is swapped in and out of the thread on every poll.
    static COMMAND: Box<CommandContext>;
}

/// What a command's log lines say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    /// The command's id (resolved, or what could be read of an invalid one).
    pub command_id: String,
    /// Its `appId`, when it could be read.
    pub app_id: Option<String>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// With a valid `traceparent`: the caller's trace id.
    pub trace_id: Option<String>,
    /// With a valid `traceparent`: the worker's own span id for it.
    pub span_id: Option<String>,
    /// With a valid `traceparent`: the caller's span id.
    pub parent_span_id: Option<String>,
}

impl CommandContext {
    /// `{"command_id":…,…,"name":"command"}`, the entry tracing's JSON span
    /// list would hold for a span `command` with these fields.
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut object = json_out::Object::open(out);
        object.str("command_id", &self.command_id);
        object.opt_str("app_id", self.app_id.as_deref());
        object.bool("redelivered", self.redelivered);
        object.opt_str("trace_id", self.trace_id.as_deref());
        object.opt_str("span_id", self.span_id.as_deref());
        object.opt_str("parent_span_id", self.parent_span_id.as_deref());
        object.str("name", "command");
        object.close();
    }

    /// `command{command_id=… app_id=…}`, as the human format shows a span.
    fn write_text(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(out, "command{{command_id={:?}", self.command_id)?;
        if let Some(app_id) = &self.app_id {
            write!(out, " app_id={app_id:?}")?;
        }
        write!(out, " redelivered={}", self.redelivered)?;
        for (name, value) in [
            ("trace_id", &self.trace_id),
            ("span_id", &self.span_id),
            ("parent_span_id", &self.parent_span_id),
        ] {
            if let Some(value) = value {
                write!(out, " {name}={value:?}")?;
            }
        }
        out.write_char('}')
    }
}

/// Runs `work` as the handling of `command`: lines it logs name it.
pub fn scope<F: Future>(command: CommandContext, work: F) -> impl Future<Output = F::Output> {
    COMMAND.scope(Box::new(command), work)
}

/// `f` of the command the current task is handling, if it handles one: for
/// a tracing layer that attributes events to commands, as [`CommandLines`]
/// does for log lines.
pub fn with_current<R>(f: impl FnOnce(&CommandContext) -> R) -> Option<R> {
    COMMAND.try_with(|command| f(command)).ok()
}

/// The line format: how the command is added to a line.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// First in the line's `spans` list (made when absent).
    Json,
    /// In front of the line, as `command{…} `.
    Text,
}

/// An event format that adds the current task's [`CommandContext`], if any, to
/// each line `inner` writes.
#[derive(Debug)]
pub struct CommandLines<F> {
    inner: F,
    shape: Shape,
}

impl<F> CommandLines<F> {
    /// For a JSON format written with `with_span_list(true)`.
    pub fn json(inner: F) -> Self {
        Self {
            inner,
            shape: Shape::Json,
        }
    }

    /// For a human-readable format.
    pub fn text(inner: F) -> Self {
        Self {
            inner,
            shape: Shape::Text,
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for CommandLines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let written = COMMAND.try_with(|command| match self.shape {
            Shape::Text => {
                command.write_text(&mut writer)?;
                writer.write_char(' ')?;
                self.inner.format_event(ctx, writer.by_ref(), event)
            }
            Shape::Json => {
                let mut line = String::new();
                self.inner
                    .format_event(ctx, Writer::new(&mut line), event)?;
                let mut entry = Vec::with_capacity(128);
                command.write_json(&mut entry);
                let entry = std::str::from_utf8(&entry).map_err(|_| fmt::Error)?;
                writer.write_str(&with_span(&line, entry))
            }
        });
        match written {
            Ok(result) => result,
            // Not inside a command.
            Err(_) => self.inner.format_event(ctx, writer, event),
        }
    }
}

/// `line` (one JSON object and a newline) with `entry` first in its
/// `spans` list. The list, when there is one, is the object's last member,
/// and `,"spans":[` cannot occur inside a JSON string (its quotes would be
/// escaped), so its last occurrence is the list.
fn with_span(line: &str, entry: &str) -> String {
    const KEY: &str = ",\"spans\":[";
    let mut out = String::with_capacity(line.len() + entry.len() + KEY.len() + 2);
    if let Some(at) = line.rfind(KEY) {
        let (head, tail) = line.split_at(at + KEY.len());
        out.push_str(head);
        out.push_str(entry);
        if !tail.starts_with(']') {
            out.push(',');
        }
        out.push_str(tail);
        return out;
    }
    let body = line.trim_end();
    let (object, after) = line.split_at(body.len());
    match object.strip_suffix('}') {
        Some(head) => {
            out.push_str(head);
            if !head.trim_end().ends_with('{') {
                out.push(',');
            }
            out.push_str(&KEY[1..]);
            out.push_str(entry);
            out.push_str("]}");
            out.push_str(after);
        }
        // Not an object: left as it is.
        None => out.push_str(line),
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, PoisonError};

    use serde_json::{Value, json};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<Value> {
            let text = String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8");
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }
    }

    fn json_subscriber(captured: &Captured) -> impl Subscriber + Send + Sync + use<> {
        let format = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(captured.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(CommandLines::json(format))
            .finish()
    }

    fn command() -> CommandContext {
        CommandContext {
            command_id: "c-\"1\"".into(),
            app_id: Some("app-1".into()),
            redelivered: true,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            span_id: Some("00f067aa0ba902b7".into()),
            parent_span_id: None,
        }
    }

    #[tokio::test]
    async fn a_line_logged_while_handling_a_command_names_it_first_in_spans() {
        let captured = Captured::default();
        let _guard = tracing::subscriber::set_default(json_subscriber(&captured));
        tracing::warn!(attempt = 2u64, "outside");
        assert_eq!(with_current(|c| c.command_id.clone()), None);
        scope(command(), async {
            assert_eq!(
                with_current(|c| c.app_id.clone()),
                Some(Some("app-1".to_owned()))
            );
            tracing::warn!(attempt = 1u64, "plain");
            let inner = tracing::info_span!("call", host = "gewe");
            let _entered = inner.enter();
            tracing::warn!("in a span");
        })
        .await;
        let lines = captured.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("spans").is_none(), "{}", lines[0]);
        let named = json!({
            "command_id": "c-\"1\"",
            "app_id": "app-1",
            "redelivered": true,
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "span_id": "00f067aa0ba902b7",
            "name": "command",
        });
        assert_eq!(lines[1]["message"], "plain");
        assert_eq!(lines[1]["attempt"], 1);
        assert_eq!(lines[1]["spans"], json!([named]));
        assert_eq!(lines[2]["message"], "in a span");
        assert_eq!(
            lines[2]["spans"],
            json!([named, {"host": "gewe", "name": "call"}])
        );
    }

    #[test]
    fn the_entry_goes_into_any_line_shape() {
        let entry = r#"{"name":"command"}"#;
        assert_eq!(
            with_span("{\"a\":1}\n", entry),
            "{\"a\":1,\"spans\":[{\"name\":\"command\"}]}\n"
        );
        assert_eq!(
            with_span("{}\n", entry),
            "{\"spans\":[{\"name\":\"command\"}]}\n"
        );
        assert_eq!(
            with_span("{\"a\":1,\"spans\":[]}\n", entry),
            "{\"a\":1,\"spans\":[{\"name\":\"command\"}]}\n"
        );
        assert_eq!(
            with_span(
                "{\"m\":\"x,\\\"spans\\\":[\",\"spans\":[{\"b\":2}]}\n",
                entry
            ),
            "{\"m\":\"x,\\\"spans\\\":[\",\"spans\":[{\"name\":\"command\"},{\"b\":2}]}\n"
        );
        assert_eq!(with_span("not json\n", entry), "not json\n");
    }

    #[tokio::test]
    async fn the_human_format_puts_the_command_in_front() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .event_format(CommandLines::text(
                tracing_subscriber::fmt::format().compact(),
            ))
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        scope(command(), async { tracing::warn!("plain") }).await;
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(
            text.starts_with(
                "command{command_id=\"c-\\\"1\\\"\" app_id=\"app-1\" redelivered=true trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\" span_id=\"00f067aa0ba902b7\"} "
            ),
            "{text}"
        );
        assert!(text.contains("WARN"), "{text}");
        assert!(text.trim_end().ends_with("plain"), "{text}");
    }
}
