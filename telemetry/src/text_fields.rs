//! The text log format's fields: tracing-subscriber's own formatting of each field
//! ([`DefaultVisitor`]), except fields with a dotted name (`otel.name`, `http.route`,
//! `gen_ai.usage.input_tokens`, `relay.key.name`, `error.type`, …), which are OpenTelemetry
//! span attributes: the trace exporter reads them from the span itself, and a text line's span
//! prefix keeps relay's ids (`request{request_id=… client_request_id=…}`). The fmt layer formats a
//! span's fields when the span opens and whenever one is recorded, whether or not any line is
//! ever written inside it; leaving the attributes out saves that work on every request.
//!
//! Without ANSI colours (logs to a file or a collector), `name=value` is written straight to the
//! line ([`Plain`]): the same bytes as tracing-subscriber's visitor, which styles every name and
//! `=` even when the style is empty (the `message` and errors still go through it, for its
//! escaping of control characters).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

/// The text format's [`FormatFields`]: see the [module docs](self).
#[derive(Debug, Default, Clone, Copy)]
pub struct TextFields;

fn attribute(field: &Field) -> bool {
    field.name().contains('.')
}

/// Passes every field but attributes on to the inner visitor.
struct Undotted<V>(V);

impl<V: Visit> Visit for Undotted<V> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if !attribute(field) {
            self.0.record_f64(field, value)
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if !attribute(field) {
            self.0.record_i64(field, value)
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if !attribute(field) {
            self.0.record_u64(field, value)
        }
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        if !attribute(field) {
            self.0.record_i128(field, value)
        }
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        if !attribute(field) {
            self.0.record_u128(field, value)
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        if !attribute(field) {
            self.0.record_bool(field, value)
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if !attribute(field) {
            self.0.record_str(field, value)
        }
    }
    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        if !attribute(field) {
            self.0.record_bytes(field, value)
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !attribute(field) {
            self.0.record_error(field, value)
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !attribute(field) {
            self.0.record_debug(field, value)
        }
    }
}

/// Whether a record holds any field that is not an attribute.
#[derive(Default)]
struct AnyUndotted(bool);

impl Visit for AnyUndotted {
    fn record_debug(&mut self, field: &Field, _: &dyn fmt::Debug) {
        self.0 |= !attribute(field);
    }
}

/// The fields of a line without ANSI colours: see the [module docs](self).
struct Plain<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl<'a> Plain<'a> {
    fn new(writer: Writer<'a>, is_empty: bool) -> Self {
        Plain {
            writer,
            is_empty,
            result: Ok(()),
        }
    }

    /// One field through tracing-subscriber's own visitor, spaced as the others.
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }

    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl Visit for Plain<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || attribute(field) {
            return;
        }
        if field.name() == "message" {
            return self.delegate(|v| v.record_str(field, value));
        }
        self.record_debug(field, &value)
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() || attribute(field) {
            return;
        }
        self.delegate(|v| v.record_error(field, value))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || attribute(field) {
            return;
        }
        let name = field.name();
        if name == "message" {
            return self.delegate(|v| v.record_debug(field, value));
        }
        if std::mem::replace(&mut self.is_empty, false) {
        } else if let Err(e) = self.writer.write_char(' ') {
            self.result = Err(e);
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .writer
            .write_str(name)
            .and_then(|()| self.writer.write_char('='))
            .and_then(|()| write!(self.writer, "{value:?}"));
    }
}

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if !writer.has_ansi_escapes() {
            let mut v = Plain::new(writer, true);
            fields.record(&mut v);
            return v.finish();
        }
        let mut v = Undotted(DefaultVisitor::new(writer, true));
        fields.record(&mut v);
        v.0.finish()
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Only attributes recorded: nothing to add (not even the separating space).
        let mut any = AnyUndotted::default();
        fields.record(&mut any);
        if !any.0 {
            return Ok(());
        }
        let empty = current.fields.is_empty();
        let writer = current.as_writer();
        if !writer.has_ansi_escapes() {
            let mut v = Plain::new(writer, empty);
            fields.record(&mut v);
            return v.finish();
        }
        let mut v = Undotted(DefaultVisitor::new(writer, empty));
        fields.record(&mut v);
        v.0.finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_keeps_relay_s_fields_and_leaves_span_attributes_to_traces() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .without_time()
                .fmt_fields(TextFields)
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                request_id = "req_1",
                client_request_id = tracing::field::Empty,
                otel.kind = "server",
                http.route = "messages",
                http.response.status_code = tracing::field::Empty,
            );
            span.record("http.response.status_code", 200);
            span.record("client_request_id", "c-1");
            span.in_scope(|| tracing::warn!(account = "a", attempts = 2, "upstream refused"));
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains(r#"request{request_id="req_1" client_request_id="c-1"}: "#),
            "{text}"
        );
        assert!(text.contains(r#"upstream refused account="a" attempts=2"#), "{text}");
        for attribute in ["otel.kind", "http.route", "status_code", "server"] {
            assert!(!text.contains(attribute), "{attribute} in {text}");
        }
    }

    /// The same events through tracing-subscriber's own fields and through [`TextFields`].
    fn lines(ansi: bool, fields: impl for<'w> FormatFields<'w> + Send + Sync + 'static) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .without_time()
                .fmt_fields(fields)
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                request_id = "req_1",
                client_request_id = tracing::field::Empty
            );
            span.record("client_request_id", "c \"1\"");
            span.in_scope(|| {
                let e = std::io::Error::other("refused\u{1b}[31m");
                tracing::info!(
                    target: "relay::request",
                    request_id = %"req_2",
                    trace_id = "",
                    r#type = "x",
                    n = 5u64,
                    d = -3i64,
                    ok = true,
                    cost = 0.25f64,
                    error = &e as &(dyn std::error::Error + 'static),
                    "request \u{1b}[2J done"
                );
                tracing::warn!(attempts = 2, "second");
                tracing::warn!("only a message");
                tracing::warn!(only = "fields");
            });
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn lines_read_as_tracing_subscriber_writes_them() {
        for ansi in [false, true] {
            let ours = lines(ansi, TextFields);
            let theirs = lines(ansi, tracing_subscriber::fmt::format::DefaultFields::new());
            assert_eq!(ours, theirs, "ansi={ansi}");
            if !ansi {
                assert!(ours.contains("n=5 d=-3 ok=true cost=0.25"), "{ours}");
            }
        }
    }
}
