//! The JSON log format's span fields, written straight into the span's
//! buffer.
//!
//! Every command opens a span, logged or not, and the JSON layer formats
//! its fields when the span is created. tracing-subscriber's own
//! `JsonFields` first builds a map of `serde_json::Value`s and then
//! serialises it through a UTF-8-checking adaptor: about a dozen
//! allocations and 7,000 instructions per command, for lines most commands
//! never log (BENCHMARKS.md). This writes the same JSON object directly.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FormatFields, FormattedFields, format::Writer},
};

/// Formats span fields as one JSON object, as `JsonFields` does, so the
/// JSON event formatter reads them back unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut object = Object::open(String::with_capacity(96));
        fields.record(&mut object);
        writer.write_str(&object.close()?)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Reopen the object: drop its closing brace, keep its fields.
        let mut buffer = std::mem::take(&mut current.fields);
        let empty = matches!(buffer.as_str(), "" | "{}");
        if empty {
            buffer.clear();
        } else {
            buffer.pop();
        }
        let mut object = if empty {
            Object::open(buffer)
        } else {
            Object::reopen(buffer)
        };
        fields.record(&mut object);
        current.fields = object.close()?;
        Ok(())
    }
}

/// A JSON object being written; the first formatting error is kept.
struct Object {
    out: String,
    first: bool,
    failed: Option<fmt::Error>,
}

impl Object {
    fn open(mut out: String) -> Self {
        out.push('{');
        Self {
            out,
            first: true,
            failed: None,
        }
    }

    fn reopen(out: String) -> Self {
        Self {
            out,
            first: false,
            failed: None,
        }
    }

    fn close(mut self) -> Result<String, fmt::Error> {
        match self.failed {
            Some(e) => Err(e),
            None => {
                self.out.push('}');
                Ok(self.out)
            }
        }
    }

    /// Writes `"name":` and returns false for fields `JsonFields` skips.
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_escaped(&mut self.out, name);
        self.out.push(':');
        true
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.key(field)
            && let Err(e) = self.out.write_fmt(value)
        {
            self.failed.get_or_insert(e);
        }
    }
}

impl Visit for Object {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            push_escaped(&mut self.out, value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            // As serde_json: JSON has no NaN or infinity.
            self.raw(field, format_args!("null"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.key(field) {
            return;
        }
        self.out.push('"');
        if let Err(e) = write!(Escaping(&mut self.out), "{value:?}") {
            self.failed.get_or_insert(e);
        }
        self.out.push('"');
    }
}

/// `text` as a JSON string.
fn push_escaped(out: &mut String, text: &str) {
    out.push('"');
    escape_into(out, text);
    out.push('"');
}

/// Appends `text` escaped for the inside of a JSON string. Scans bytes:
/// every byte that needs escaping is ASCII, so the runs between them are
/// whole UTF-8 and are copied as they are.
fn escape_into(out: &mut String, text: &str) {
    let bytes = text.as_bytes();
    // Ids and names rarely need escaping: one check, one copy.
    if !bytes.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(text);
        return;
    }
    let mut start = 0;
    for (at, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[start..at]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        start = at + 1;
    }
    out.push_str(&text[start..]);
}

/// Escapes what a `Debug` or `Display` implementation writes.
struct Escaping<'a>(&'a mut String);

impl Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use tracing_subscriber::{fmt::format::JsonFields, registry::LookupSpan};

    /// What both formatters wrote for the same span, parsed.
    fn both(make: impl Fn() -> tracing::Span) -> (Value, Value) {
        fn fields<N>(make: &dyn Fn() -> tracing::Span, n: N) -> Value
        where
            N: for<'w> FormatFields<'w> + Send + Sync + 'static,
        {
            let subscriber = tracing_subscriber::fmt()
                .fmt_fields(n)
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                let span = make();
                let id = span.id().expect("span enabled");
                tracing::dispatcher::get_default(|d| {
                    let registry = d
                        .downcast_ref::<tracing_subscriber::Registry>()
                        .expect("the span registry");
                    let data = registry.span(&id).expect("span data");
                    let ext = data.extensions();
                    let text = &ext.get::<FormattedFields<N>>().expect("formatted").fields;
                    serde_json::from_str(text).expect("valid JSON")
                })
            })
        }
        (
            fields(&make, JsonSpanFields),
            fields(&make, JsonFields::new()),
        )
    }

    #[test]
    fn span_fields_are_the_json_object_json_fields_writes() {
        let (ours, theirs) = both(|| {
            tracing::error_span!(
                "command",
                command_id = "cmd \"1\"\n\\ \u{1}",
                app_id = Some("wx_app"),
                absent = None::<&str>,
                redelivered = true,
                n = -3i64,
                u = 7u64,
                f = 0.5f64,
                shown = %"a \"display\"",
                debugged = ?vec!["x"],
                r#type = "raw",
            )
        });
        assert_eq!(ours, theirs);
        assert_eq!(ours["command_id"], json!("cmd \"1\"\n\\ \u{1}"));
        assert_eq!(ours["type"], json!("raw"));
    }

    #[test]
    fn recorded_fields_are_added_to_the_object() {
        let (ours, theirs) = both(|| {
            let span = tracing::error_span!("s", a = 1u64, later = tracing::field::Empty);
            span.record("later", "x");
            span
        });
        assert_eq!(ours, json!({"a": 1, "later": "x"}));
        assert_eq!(ours, theirs);
        let (ours, _) = both(|| {
            let span = tracing::error_span!("s", later = tracing::field::Empty);
            span.record("later", false);
            span
        });
        assert_eq!(ours, json!({"later": false}));
    }
}
