//! Logging and trace export shared by relay's binaries (control plane, data
//! plane, mock upstream).
//!
//! This crate owns:
//! - the log subscriber: `text` or `json` on stderr, colour only on a terminal,
//!   filtered by `RUST_LOG` (default `info`); the text format leaves span attributes
//!   with dotted names (OpenTelemetry's) out of its lines ([`TextFields`]);
//! - OpenTelemetry trace export over OTLP (gRPC or HTTP/protobuf), configured
//!   only by the standard `OTEL_*` variables and off when none is set;
//! - the `tracing-opentelemetry` layer that turns `tracing` spans into
//!   OpenTelemetry spans;
//! - W3C trace-context helpers for HTTP headers (read the client's
//!   `traceparent`, write one upstream).
//!
//! The span queue is bounded and never blocks: a span that finds it full is
//! dropped and counted in `relay_trace_spans_dropped_total`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use tracing_opentelemetry::OpenTelemetrySpanExt;

mod text_fields;
mod tls;
pub use text_fields::TextFields;
pub use tls::TlsFiles;

/// The OpenTelemetry semantic-conventions release relay's span names and
/// attributes follow (GenAI client spans included).
pub const SEMCONV_VERSION: &str = "1.37.0";

/// Spans waiting for export at most; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 2048;
/// Spans sent in one export call at most.
const BATCH_SIZE: usize = 512;
/// A partial batch is sent after this long.
const BATCH_DELAY: Duration = Duration::from_secs(2);

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (or the traces variant) names a protocol relay does not speak.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0} is not supported: use grpc or http/protobuf")]
    Protocol(String),
    /// An `OTEL_*` variable holds a value relay would otherwise ignore or misread.
    #[error("{name}={value:?} is not valid: {why}")]
    Setting {
        /// The variable.
        name: &'static str,
        /// What it holds (these variables carry no secret; headers are not checked here).
        value: String,
        /// What it must be.
        why: &'static str,
    },
    /// A certificate variable names a file that cannot be used.
    #[error("{name}: {reason}")]
    Tls {
        /// The variable.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// The OTLP exporter could not be built (bad endpoint, TLS set-up).
    #[error("building the OTLP trace exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

impl LogFormat {
    /// `"json"` is JSON; anything else (the CLI only accepts `text`) is text.
    pub fn parse(s: &str) -> Self {
        if s == "json" {
            Self::Json
        } else {
            Self::Text
        }
    }
}

/// Which OTLP transport to export over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (default port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (default port 4318).
    HttpProtobuf,
}

/// The trace settings read from the standard `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceConfig {
    /// The transport.
    pub protocol: Protocol,
    /// Whether the endpoint is `https://` (then [`TraceConfig::tls`] applies).
    pub https: bool,
    /// Extra CA and client certificate from the `OTEL_*` certificate variables.
    pub tls: TlsFiles,
}

/// Reads the `OTEL_*` variables: `None` (export off) unless an OTLP endpoint
/// is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
/// and `OTEL_SDK_DISABLED` is not `true`. The endpoint itself, the service name,
/// resource attributes, sampler and headers are read by the SDK from the same
/// variables; the certificate variables (which the SDK does not read) here.
pub fn trace_config_from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<TraceConfig>, TelemetryError> {
    let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() {
        return Ok(None);
    }
    check_variables(&set)?;
    let protocol = match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL")) {
        None => Protocol::Grpc,
        Some(p) => match p.trim() {
            "grpc" => Protocol::Grpc,
            "http/protobuf" => Protocol::HttpProtobuf,
            other => return Err(TelemetryError::Protocol(other.to_string())),
        },
    };
    let endpoint = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .unwrap_or_default();
    let https = endpoint.trim().to_ascii_lowercase().starts_with("https://");
    let tls = TlsFiles::from_env(&set)?;
    if !https && tls != TlsFiles::default() {
        return Err(TelemetryError::Setting {
            name: "OTEL_EXPORTER_OTLP_ENDPOINT",
            value: endpoint,
            why:
                "certificates are set (OTEL_EXPORTER_OTLP_*CERTIFICATE, *_CLIENT_KEY), so the endpoint must be https://",
        });
    }
    Ok(Some(TraceConfig { protocol, https, tls }))
}

/// The samplers the SDK implements; any other name would be ignored by it.
const SAMPLERS: &[&str] = &[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Refuses the values the SDK would silently ignore or fall back from: an
/// endpoint that is not an `http(s)://host` URL, an unknown sampler, a ratio
/// outside 0..=1, a timeout that is not whole milliseconds.
fn check_variables(set: &impl Fn(&str) -> Option<String>) -> Result<(), TelemetryError> {
    let bad = |name: &'static str, value: String, why: &'static str| Err(TelemetryError::Setting { name, value, why });
    for name in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] {
        if let Some(v) = set(name) {
            let ok = v.trim().parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return bad(
                    name,
                    v,
                    "an http:// or https:// URL with a host, e.g. http://collector:4317",
                );
            }
        }
    }
    let sampler = set("OTEL_TRACES_SAMPLER").map(|v| v.trim().to_ascii_lowercase());
    if let Some(v) = &sampler {
        if !SAMPLERS.contains(&v.as_str()) {
            return bad(
                "OTEL_TRACES_SAMPLER",
                v.clone(),
                "one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio",
            );
        }
    }
    if let Some(arg) = set("OTEL_TRACES_SAMPLER_ARG") {
        let ratio = sampler.as_deref().is_some_and(|s| s.ends_with("traceidratio"));
        if !ratio {
            return bad(
                "OTEL_TRACES_SAMPLER_ARG",
                arg,
                "only read with OTEL_TRACES_SAMPLER=traceidratio or parentbased_traceidratio",
            );
        }
        if !arg.trim().parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r)) {
            return bad("OTEL_TRACES_SAMPLER_ARG", arg, "a ratio from 0 to 1, e.g. 0.1");
        }
    }
    for name in ["OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] {
        if let Some(v) = set(name) {
            if v.trim().parse::<u64>().is_err() {
                return bad(name, v, "whole milliseconds, e.g. 10000");
            }
        }
    }
    Ok(())
}

/// Flushes queued spans on shutdown. Keep it alive for the life of the process.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    flush: Option<mpsc::Sender<oneshot::Sender<()>>>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued (waiting at most `grace`), then stops export.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(flush) = self.flush.take() {
            let (tx, rx) = oneshot::channel();
            if flush.send(tx).await.is_ok() {
                let _ = tokio::time::timeout(grace, rx).await;
            }
        }
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global log subscriber and, when the `OTEL_*` variables ask for
/// it, OTLP trace export. `service` names the process when `OTEL_SERVICE_NAME`
/// is unset. Call once, inside the Tokio runtime.
pub fn init(format: LogFormat, service: &str) -> Result<Telemetry, TelemetryError> {
    let config = trace_config_from_env(|k| std::env::var(k).ok())?;
    let (otel_layer, telemetry) = match config {
        None => (
            None,
            Telemetry {
                provider: None,
                flush: None,
            },
        ),
        Some(c) => {
            let (provider, flush) = provider(&c, service)?;
            let tracer = provider.tracer("relay");
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_target(false)
                .with_filter(tracing_subscriber::filter::filter_fn(|m| m.is_span()));
            (
                Some(layer),
                Telemetry {
                    provider: Some(provider),
                    flush: Some(flush),
                },
            )
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.fmt_fields(TextFields).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    if telemetry.exporting() {
        tracing::info!(semconv = SEMCONV_VERSION, "exporting traces over OTLP");
    }
    Ok(telemetry)
}

type Flush = mpsc::Sender<oneshot::Sender<()>>;

fn provider(config: &TraceConfig, service: &str) -> Result<(SdkTracerProvider, Flush), TelemetryError> {
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME")
        .map(|s| s.trim().is_empty())
        .unwrap_or(true)
    {
        resource = resource.with_service_name(service.to_string());
    }
    let resource = resource.build();
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let (flush_tx, flush_rx) = mpsc::channel(1);
    match config.protocol {
        Protocol::Grpc => {
            use opentelemetry_otlp::WithTonicConfig;
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if config.https {
                b = b.with_tls_config(config.tls.tonic());
            }
            let mut e = b.build().map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            e.set_resource(&resource);
            tokio::spawn(export_loop(e, rx, flush_rx));
        }
        Protocol::HttpProtobuf => {
            let mut e = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(opentelemetry_http::hyper::HyperClient::new(
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(config.tls.rustls()?)
                        .https_or_http()
                        .enable_http1()
                        .build(),
                    Duration::from_secs(10),
                    None,
                ))
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            e.set_resource(&resource);
            tokio::spawn(export_loop(e, rx, flush_rx));
        }
    }
    // The SDK reads OTEL_TRACES_SAMPLER / _ARG itself (default: parent-based
    // always-on, so a client's sampled traceparent is honoured).
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(QueueProcessor {
            tx,
            closed: Arc::new(AtomicBool::new(false)),
        })
        .build();
    Ok((provider, flush_tx))
}

/// Hands finished spans to the export task through a bounded queue; never waits.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    closed: Arc<AtomicBool>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() || self.closed.load(Ordering::Relaxed) {
            return;
        }
        if self.tx.try_send(span).is_err() {
            metrics::counter!(relay_proto::metrics::TRACE_SPANS_DROPPED_TOTAL).increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.closed.store(true, Ordering::Relaxed);
        Ok(())
    }
}

async fn export_loop<E: SpanExporter + 'static>(
    exporter: E,
    mut rx: mpsc::Receiver<SpanData>,
    mut flush: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut batch = Vec::with_capacity(BATCH_SIZE);
    let mut tick = tokio::time::interval(BATCH_DELAY);
    let mut flush_open = true;
    loop {
        let mut done: Option<oneshot::Sender<()>> = None;
        tokio::select! {
            span = rx.recv() => match span {
                Some(s) => {
                    batch.push(s);
                    if batch.len() < BATCH_SIZE {
                        continue;
                    }
                }
                None => return send(&exporter, &mut batch).await,
            },
            _ = tick.tick() => {}
            f = flush.recv(), if flush_open => {
                while let Ok(s) = rx.try_recv() {
                    batch.push(s);
                }
                // The handle was dropped without a shutdown: keep exporting, stop asking.
                flush_open = f.is_some();
                done = f;
            }
        }
        send(&exporter, &mut batch).await;
        if let Some(d) = done {
            let _ = d.send(());
            return;
        }
    }
}

async fn send<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len();
    if let Err(e) = exporter.export(std::mem::take(batch)).await {
        metrics::counter!(relay_proto::metrics::TRACE_SPANS_DROPPED_TOTAL).increment(n as u64);
        tracing::warn!(spans = n, error = %e, "trace export failed; these spans are dropped");
    }
}

/// Reads W3C trace context from HTTP headers.
struct HeaderReader<'a>(&'a http::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderWriter<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the W3C `traceparent` in `headers`, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderReader(headers));
    let _ = span.set_parent(cx);
}

/// Writes `span`'s W3C `traceparent` (and `tracestate`) into `headers`.
/// Writes nothing when the span is not exported.
pub fn inject_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(headers));
}

/// Sets a string-array attribute on `span` (a `tracing` field cannot hold an array), e.g.
/// `gen_ai.response.finish_reasons`. Does nothing when the span is not exported.
pub fn set_string_array(span: &tracing::Span, key: &'static str, values: &[&str]) {
    use opentelemetry::{Array, StringValue, Value};
    let values: Vec<StringValue> = values.iter().map(|v| StringValue::from(v.to_string())).collect();
    span.set_attribute(key, Value::Array(Array::String(values)));
}

/// The trace id of `span` as 32 hex digits, when it has a valid one (export on,
/// or a client `traceparent` was honoured).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        assert_eq!(trace_config_from_env(env(&[])).unwrap(), None);
        assert_eq!(trace_config_from_env(env(&[("OTEL_SERVICE_NAME", "x")])).unwrap(), None);
        let disabled = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert_eq!(trace_config_from_env(env(&disabled)).unwrap(), None);
    }

    #[test]
    fn protocol_comes_from_the_standard_variables() {
        let grpc = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")];
        assert_eq!(
            trace_config_from_env(env(&grpc)).unwrap().unwrap().protocol,
            Protocol::Grpc
        );
        let http = [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ];
        assert_eq!(
            trace_config_from_env(env(&http)).unwrap().unwrap().protocol,
            Protocol::HttpProtobuf
        );
        let json = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ];
        let e = trace_config_from_env(env(&json)).unwrap_err().to_string();
        assert!(e.contains("http/json") && e.contains("http/protobuf"), "{e}");
    }

    #[test]
    fn a_full_span_queue_drops_and_counts_and_never_waits() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        use opentelemetry::trace::{Tracer, TracerProvider as _};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (tx, mut rx) = mpsc::channel(2);
        metrics::with_local_recorder(&recorder, || {
            let provider = SdkTracerProvider::builder()
                .with_span_processor(QueueProcessor {
                    tx,
                    closed: Arc::new(AtomicBool::new(false)),
                })
                .build();
            let tracer = provider.tracer("test");
            // Nobody reads the queue: the third span onwards finds it full.
            for i in 0..5 {
                drop(tracer.start(format!("span {i}")));
            }
        });
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 2);
        let dropped: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == relay_proto::metrics::TRACE_SPANS_DROPPED_TOTAL)
            .map(|(.., v)| v)
            .collect();
        assert_eq!(dropped, vec![DebugValue::Counter(3)]);
    }

    #[test]
    fn values_the_sdk_would_ignore_are_refused_by_name() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
        let refused = |extra: (&'static str, &'static str)| {
            let pairs = [extra, endpoint];
            trace_config_from_env(env(&pairs)).unwrap_err().to_string()
        };
        for (name, value) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317"),
            ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
        ] {
            let e = refused((name, value));
            assert!(e.contains(name) && e.contains(value), "{name}={value}: {e}");
        }
        let pairs = [
            endpoint,
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ];
        let e = trace_config_from_env(env(&pairs)).unwrap_err().to_string();
        assert!(e.contains("from 0 to 1"), "{e}");
        let pairs = [
            endpoint,
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
        ];
        let e = trace_config_from_env(env(&pairs)).unwrap_err().to_string();
        assert!(e.contains("traceidratio"), "{e}");
        let good = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4317"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000"),
        ];
        assert!(trace_config_from_env(env(&good)).unwrap().is_some());
    }
}
