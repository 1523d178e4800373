//! relay-runtime: what every relay binary (control plane, data plane, mock upstream, bench) does
//! at start and at stop, written once.
//!
//! - [`init_logging`]: the log subscriber and OTLP trace export (`relay-telemetry` owns them);
//! - [`metrics`]: the Prometheus recorder, with histogram buckets and descriptions from the
//!   metric catalogue (`relay_proto::metrics`);
//! - [`signal`]: the shutdown signal (Ctrl-C or SIGTERM);
//! - [`datadir`]: the exclusive lock on a data directory and the check that a secret file is
//!   its owner's alone.

pub mod datadir;
pub mod metrics;
pub mod signal;

pub use relay_telemetry::{LogFormat, Telemetry, TelemetryError};

/// Starts logging (`--log-format`: `text` or `json`) and, when the `OTEL_*` variables ask for
/// it, trace export for `service`. Keep the returned [`Telemetry`] and shut it down at exit.
pub fn init_logging(log_format: &str, service: &str) -> Result<Telemetry, TelemetryError> {
    relay_telemetry::init(LogFormat::parse(log_format), service)
}
