//! gRPC call metrics as a tower layer: `<prefix>_calls_total{method,code}`
//! and `<prefix>_call_duration_seconds{method}` (time to the response
//! headers: the whole call for unary RPCs, the time to the first answer for
//! streams).
//!
//! The status code is read from the response headers: a refusal is sent
//! trailers-only (code in the headers); a response without one is `OK`.
//! Methods not in the list given to [`GrpcMetrics::new`] count as `other`,
//! so a client sending arbitrary paths cannot grow the label set.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the call counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `Service/Method`, or `other`.
    pub method: String,
    /// The gRPC status code's name (`OK`, `PermissionDenied`, …).
    pub code: String,
}

/// Label of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// `Service/Method`, or `other`.
    pub method: String,
}

/// The call metrics of one gRPC server.
#[derive(Debug)]
pub struct GrpcMetrics {
    methods: Vec<String>,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabel, Histogram, fn() -> Histogram>,
}

impl GrpcMetrics {
    /// Registers `<prefix>_calls` and `<prefix>_call_duration_seconds` on
    /// `registry`; `methods` are the `Service/Method` names counted by name.
    pub fn new(registry: &mut Registry, prefix: &str, methods: &[&str]) -> Arc<Self> {
        let m = Self {
            methods: methods.iter().map(|s| s.to_string()).collect(),
            calls: Family::default(),
            latency: Family::new_with_constructor(crate::latency_histogram),
        };
        registry.register(
            format!("{prefix}_calls"),
            "gRPC calls answered, by method and status code",
            m.calls.clone(),
        );
        registry.register_with_unit(
            format!("{prefix}_call_duration"),
            "Time from a gRPC call's arrival to its response headers",
            prometheus_client::registry::Unit::Seconds,
            m.latency.clone(),
        );
        Arc::new(m)
    }

    fn method(&self, path: &str) -> String {
        let name = path.strip_prefix('/').unwrap_or(path);
        if self.methods.iter().any(|m| m == name) {
            name.to_string()
        } else {
            "other".to_string()
        }
    }

    /// Records one answered call.
    pub fn observe(&self, path: &str, code: tonic::Code, started: Instant) {
        let method = self.method(path);
        self.latency
            .get_or_create(&MethodLabel {
                method: method.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        self.calls
            .get_or_create(&CallLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// The count for one method and code (for tests and health output).
    pub fn count(&self, method: &str, code: tonic::Code) -> u64 {
        self.calls
            .get_or_create(&CallLabels {
                method: method.to_string(),
                code: code_name(code),
            })
            .get()
    }
}

/// The code's name as gRPC's own libraries label it (`OK`, `NotFound`, …).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        c => format!("{c:?}"),
    }
}

/// The layer; wraps a tonic server (`Server::builder().layer(...)`).
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer(pub Arc<GrpcMetrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            metrics: self.0.clone(),
            inner,
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around a gRPC server.
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    metrics: Arc<GrpcMetrics>,
    inner: S,
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>> + Clone + Send,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let code = resp
                .headers()
                .get("grpc-status")
                .map_or(tonic::Code::Ok, |v| tonic::Code::from_bytes(v.as_bytes()));
            metrics.observe(&path, code, started);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_label() {
        let mut r = Registry::default();
        let m = GrpcMetrics::new(&mut r, "t", &["S/A"]);
        m.observe("/S/A", tonic::Code::Ok, Instant::now());
        m.observe("/S/B", tonic::Code::PermissionDenied, Instant::now());
        m.observe("/evil/x", tonic::Code::PermissionDenied, Instant::now());
        assert_eq!(m.count("S/A", tonic::Code::Ok), 1);
        assert_eq!(m.count("other", tonic::Code::PermissionDenied), 2);
        let text = crate::encode(&r);
        assert!(
            text.contains("t_calls_total{method=\"S/A\",code=\"OK\"} 1"),
            "{text}"
        );
        assert!(!text.contains("evil"), "{text}");
        assert!(text.contains("t_call_duration_seconds_bucket"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
