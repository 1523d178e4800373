//! The Prometheus recorder every relay process installs: histograms (not summaries), so dashboards
//! can aggregate percentiles across data planes, with each histogram's buckets from the metric
//! catalogue (`relay_proto::metrics`), and every metric's type and help described at install, so
//! every scrape carries `# HELP` and `# TYPE`.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;

/// The exporter with the catalogue's histogram buckets, not installed (tests build a local
/// recorder from it).
pub fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for m in relay_proto::metrics::CATALOGUE {
        let buckets = m.buckets();
        if buckets.is_empty() {
            continue;
        }
        // Fails only for an empty bucket list, which was skipped.
        builder = match builder.set_buckets_for_metric(Matcher::Full(m.name.to_string()), buckets) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
    }
    builder
}

/// Installs this process's one recorder and describes the catalogue in it; the handle renders
/// `/metrics` (the data plane serves it on its listener).
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = builder().install_recorder()?;
    relay_proto::metrics::describe_all();
    Ok(handle)
}

/// Installs this process's one recorder served at `http://addr/metrics` by the exporter's own
/// listener, and describes the catalogue in it. Needs a Tokio runtime.
pub fn install_with_listener(addr: SocketAddr) -> Result<(), BuildError> {
    builder().with_http_listener(addr).install()?;
    relay_proto::metrics::describe_all();
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn histograms_render_the_catalogue_buckets() {
        let m = relay_proto::metrics::CATALOGUE
            .iter()
            .find(|m| !m.buckets().is_empty())
            .unwrap();
        let recorder = super::builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!(m.name).record(0.0);
        });
        let text = handle.render();
        // One line per catalogue bucket, and +Inf.
        let buckets = text
            .lines()
            .filter(|l| l.starts_with(&format!("{}_bucket{{", m.name)))
            .count();
        assert_eq!(buckets, m.buckets().len() + 1, "{text}");
        assert!(!text.contains("quantile="), "{text}");
    }
}
