//! `GET /metrics`: Prometheus text for operators (behind auth like every
//! route but health).

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use poem_openapi::payload::PlainText;
use poem_openapi::{ApiResponse, OpenApi};

use super::ApiTags;
use crate::domain::control::ControlPlane;

pub struct MetricsApi {
    pub handle: PrometheusHandle,
    /// Asked for the pending-approval count at each scrape, so the gauge is
    /// current even when no dashboard is watching.
    pub control: Arc<ControlPlane>,
}

#[derive(ApiResponse)]
enum MetricsReply {
    /// Prometheus text exposition format.
    #[oai(status = 200, content_type = "text/plain; version=0.0.4")]
    Ok(PlainText<String>),
}

#[OpenApi]
impl MetricsApi {
    /// Metrics
    ///
    /// Requests by route and status with latency histograms, live stream
    /// clients, turns by outcome with their duration, slow clients closed,
    /// pending approvals.
    #[oai(
        path = "/metrics",
        method = "get",
        operation_id = "metrics",
        tag = "ApiTags::System"
    )]
    async fn metrics(&self) -> MetricsReply {
        // A failure is logged by the control plane; the gauge keeps its
        // last value.
        let _ = self.control.count_pending().await;
        self.handle.run_upkeep();
        MetricsReply::Ok(PlainText(self.handle.render()))
    }
}
