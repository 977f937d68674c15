//! The JSON log format's span fields, written straight into the span's
//! buffer.
//!
//! The JSON layer formats a span's fields when the span is created, logged
//! or not: each callback opens one (`callback`), and so did each command
//! before its log context moved to a task-local ([`super::CommandLines`]).
//! tracing-subscriber's own `JsonFields` first builds a map of
//! `serde_json::Value`s and then serialises it through a UTF-8-checking
//! adaptor: about a dozen allocations and 7,000 instructions per span
//! (BENCHMARKS.md). This writes the same JSON object directly: names and
//! strings by [`json_out`], other values by serde_json.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FormatFields, FormattedFields, format::Writer},
};

use crate::json_out;

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

/// A JSON object being written, encoded byte for byte as `JsonFields`
/// encodes it (names and strings by [`json_out`], other values by
/// serde_json); the first error is kept.
struct Object {
    out: Vec<u8>,
    first: bool,
    failed: Option<fmt::Error>,
}

impl Object {
    fn open(out: String) -> Self {
        let mut out = out.into_bytes();
        out.push(b'{');
        Self {
            out,
            first: true,
            failed: None,
        }
    }

    fn reopen(out: String) -> Self {
        Self {
            out: out.into_bytes(),
            first: false,
            failed: None,
        }
    }

    fn close(mut self) -> Result<String, fmt::Error> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        self.out.push(b'}');
        String::from_utf8(self.out).map_err(|_| fmt::Error)
    }

    /// Writes `"name":value`, except for fields `JsonFields` skips.
    fn entry<T: serde::Serialize + ?Sized>(&mut self, field: &Field, value: &T) {
        if self.name(field) && serde_json::to_writer(&mut self.out, value).is_err() {
            self.failed.get_or_insert(fmt::Error);
        }
    }

    /// Writes `"name":` and says whether a value is to follow: `JsonFields`
    /// skips the `log.` fields tracing-log adds.
    fn name(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        json_out::string(&mut self.out, name);
        self.out.push(b':');
        true
    }
}

impl Visit for Object {
    fn record_str(&mut self, field: &Field, value: &str) {
        // The common case, and the one serde_json spends most on.
        if self.name(field) {
            json_out::string(&mut self.out, value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, &value);
    }

    /// serde_json writes a non-finite number as `null`, as JSON has none.
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = String::new();
        match write!(text, "{value:?}") {
            Ok(()) => self.record_str(field, &text),
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
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
