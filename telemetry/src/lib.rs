//! Prometheus metrics and Kubernetes probes shared by `sigil-server` and
//! `sigil-agent`.
//!
//! - [`config`]: the `[telemetry]` table (`prometheus_port`,
//!   `prometheus_host`, loopback by default, off unless a port is set);
//! - [`http`]: the endpoint serving `/metrics` (OpenMetrics text, which
//!   Prometheus scrapes natively), `/ready` and `/live`;
//! - [`grpc`]: a tower layer counting gRPC calls by method and status code
//!   with a latency histogram per method.
//!
//! Each binary defines its own metrics (server/src/metrics.rs,
//! agentd/src/metrics.rs) on a [`Registry`] and implements [`Exporter`].

pub mod config;
pub mod grpc;
pub mod http;

pub use config::{RawTelemetry, TelemetryConfig};
pub use http::{Exporter, serve};
pub use prometheus_client;
pub use prometheus_client::registry::Registry;

use prometheus_client::metrics::histogram::Histogram;

/// Latency buckets in seconds for calls answered from memory or after one
/// signature / one database transaction: 100 µs to about 6.5 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 17,
    ))
}

/// Encodes `registry` as OpenMetrics text (ending with `# EOF`).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail; an encoder error would be a bug in
    // a metric's name, which the unit tests of each binary's metrics catch.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}
