//! The telemetry endpoint: plain HTTP/1.1, GET only.
//!
//! - `/metrics`: the process's metrics as OpenMetrics text;
//! - `/ready`: 200 when the process can do its job now (the exporter
//!   decides: the server's datastore answers, the agent holds a synced
//!   entry set and is not past its offline limit), else 503 with the reason;
//! - `/live`: 200 whenever the runtime answers at all.
//!
//! Bounded like every other listener: at most [`MAX_CONNECTIONS`] at once,
//! request headers within [`HEADER_READ_TIMEOUT`] and [`MAX_BUF`] bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 32;
/// Time allowed for a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head buffered.
pub const MAX_BUF: usize = 16 * 1024;
/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a process exposes through the endpoint.
pub trait Exporter: Send + Sync + 'static {
    /// The metrics as OpenMetrics text (gauges refreshed for this scrape).
    fn metrics(&self) -> String;
    /// `Ok` when ready to serve; otherwise why not (sent with the 503).
    fn ready(&self) -> Result<(), String>;
}

/// Binds `addr` and serves the endpoint on it until the process exits;
/// returns the bound address (a port of 0 picks a free one).
pub async fn serve(addr: SocketAddr, exporter: Arc<dyn Exporter>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "telemetry endpoint listening (/metrics, /ready, /live)");
    tokio::spawn(accept_loop(listener, exporter));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, exporter: Arc<dyn Exporter>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take a slot first: a full endpoint stops accepting.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (sock, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "telemetry accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let exporter = exporter.clone();
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                async move {
                    // Off the runtime: an exporter may read the datastore.
                    let r = tokio::task::spawn_blocking(move || {
                        answer(exporter.as_ref(), &method, &path)
                    })
                    .await
                    .unwrap_or_else(|_| {
                        text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "text/plain; charset=utf-8",
                            "exporter failed\n".into(),
                        )
                    });
                    Ok::<_, Infallible>(r)
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_BUF);
            if let Err(e) = b.serve_connection(TokioIo::new(sock), svc).await {
                tracing::debug!(error = %e, "telemetry connection ended");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// The answer to one request (pure, so that it is unit-tested without a socket).
pub fn answer(exporter: &dyn Exporter, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n".into(),
        );
    }
    match path {
        "/metrics" => text(StatusCode::OK, OPENMETRICS, exporter.metrics()),
        "/live" => text(StatusCode::OK, PLAIN, "live\n".into()),
        "/ready" => match exporter.ready() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake(AtomicBool);
    impl Exporter for Fake {
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
        fn ready(&self) -> Result<(), String> {
            if self.0.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("no datastore".into())
            }
        }
    }

    #[test]
    fn routes_and_probes() {
        let f = Fake(AtomicBool::new(false));
        let r = answer(&f, &Method::GET, "/ready");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        f.0.store(true, Ordering::Relaxed);
        assert_eq!(answer(&f, &Method::GET, "/ready").status(), StatusCode::OK);
        assert_eq!(answer(&f, &Method::GET, "/live").status(), StatusCode::OK);
        let m = answer(&f, &Method::GET, "/metrics");
        assert_eq!(m.status(), StatusCode::OK);
        assert_eq!(m.headers()[header::CONTENT_TYPE], OPENMETRICS);
        assert_eq!(
            answer(&f, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            answer(&f, &Method::GET, "/x").status(),
            StatusCode::NOT_FOUND
        );
    }
}
