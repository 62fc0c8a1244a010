//! A gRPC channel to the server's agent API over our own TLS connector, so
//! that server authentication is SPIFFE-based and the client certificate can
//! change on renewal without rebuilding anything.
//!
//! With several servers (`servers` in agent.toml) the channel fails over:
//! every (re)connection starts at the server that last answered and tries
//! the others in turn, so when a server is lost the sync stream and
//! minting move to the next one that answers the TLS handshake. A host
//! name with several addresses is tried address by address.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::config::ServerAddress;

/// Per server: TCP connect and, separately, the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Which server to try first, shared by every channel of one agent so a
/// renewal's new channel starts where the old one was connected.
#[derive(Debug, Default)]
pub struct Preferred(AtomicUsize);

/// Opens a lazily connecting channel to the first of `servers` that
/// answers; every (re)connection performs a fresh TLS handshake with `tls`.
pub fn channel(
    servers: &[ServerAddress],
    preferred: Arc<Preferred>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, String> {
    let addrs: Arc<Vec<String>> = Arc::new(servers.iter().map(|s| s.connect_string()).collect());
    let first = addrs
        .first()
        .cloned()
        .ok_or_else(|| "no server address configured".to_string())?;
    let connector = TlsConnector::from(tls);
    let endpoint = Endpoint::from_shared(format!("http://{first}"))
        .map_err(|e| format!("server address {first:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let ch = endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let addrs = addrs.clone();
        let preferred = preferred.clone();
        let connector = connector.clone();
        async move {
            let start = preferred.0.load(Ordering::Relaxed);
            let mut last_err = None;
            for i in 0..addrs.len() {
                let n = (start + i) % addrs.len();
                let addr = &addrs[n];
                match connect_one(addr, &connector).await {
                    Ok(tls) => {
                        if n != start % addrs.len() {
                            tracing::warn!(server = %addr, "failed over to another server");
                        }
                        preferred.0.store(n, Ordering::Relaxed);
                        return Ok(TokioIo::new(tls));
                    }
                    Err(e) => {
                        if addrs.len() > 1 {
                            tracing::warn!(server = %addr, error = %e, "server unreachable; trying the next");
                        }
                        last_err = Some(e);
                    }
                }
            }
            Err(last_err.unwrap_or_else(|| std::io::Error::other("no server address")))
        }
    }));
    Ok(ch)
}

/// TCP (bounded) and the TLS handshake to one server.
async fn connect_one(
    addr: &str,
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    // The name is not checked (SPIFFE ID verification instead), but
    // rustls needs one for SNI.
    let name = ServerName::try_from("sigil-server").map_err(std::io::Error::other)?;
    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}
