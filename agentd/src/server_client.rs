//! A gRPC channel to the server's agent API over our own TLS connector, so
//! that server authentication is SPIFFE-based and the client certificate can
//! change on renewal without rebuilding anything.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Opens a lazily connecting channel to `host:port`; every (re)connection
/// performs a fresh TLS handshake with `tls`.
pub fn channel(host: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> Result<Channel, String> {
    let addr = format!("{host}:{port}");
    let connector = TlsConnector::from(tls);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("server address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let ch = endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let addr = addr.clone();
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            let _ = tcp.set_nodelay(true);
            // The name is not checked (SPIFFE ID verification instead), but
            // rustls needs one for SNI.
            let name = ServerName::try_from("sigil-server").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }));
    Ok(ch)
}
