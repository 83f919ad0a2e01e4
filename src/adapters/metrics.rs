//! The Prometheus recorder behind the `metrics` facade that the domain and
//! the adapters record to, and its text rendering for `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from 100 µs (a cached read) to 10 min (the
/// longest turn the default timeout allows).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

/// The process-wide recorder, installed on first use. A process has one
/// global `metrics` recorder, so every server built in it (tests build many)
/// shares it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            // The suffix matcher cannot fail for a non-empty bucket list.
            let builder = builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// A live connection counted in a gauge for as long as it is held.
pub struct LiveConnection(metrics::Gauge);

impl LiveConnection {
    /// Counts one more in `gauge` (for example
    /// `autopoiesis_websocket_connections`) until dropped.
    #[must_use]
    pub fn count(gauge: &'static str) -> Self {
        let gauge = metrics::gauge!(gauge);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
