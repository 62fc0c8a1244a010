//! A gRPC channel over a Unix domain socket: the Workload API socket and
//! the admin sockets are reached this way by the CLIs, the examples, the
//! benchmark and the tests.

use std::path::Path;

use tonic::transport::{Channel, Endpoint};

/// Connects to the gRPC server listening on the Unix socket `path`. The
/// URI's authority is a placeholder (`localhost`): the socket path decides
/// where the connection goes. The error names the path.
pub async fn channel(path: &Path) -> Result<Channel, String> {
    let p = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                tokio::net::UnixStream::connect(p)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))
}
