//! Revocation for the examples: the CRLs the Workload API delivers.
//!
//! The `spiffe` crate's `X509Source` does not expose the `crl` field of the
//! Workload API's `X509BundlesResponse`, so the examples read it
//! themselves: one `FetchX509Bundles` stream per process, kept open (and
//! reopened with backoff when it ends), whose latest CRLs every handshake
//! checks the peer's leaf against. A peer whose identity was killed is
//! refused at its next handshake even though its certificate has not
//! expired.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sigil_proto::WORKLOAD_API_HEADER;
use sigil_proto::workload::X509BundlesRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

/// The latest CRLs (DER) from the Workload API.
#[derive(Debug, Default)]
pub struct Crls(RwLock<Vec<Vec<u8>>>);

impl Crls {
    /// A copy of the current CRLs.
    pub fn current(&self) -> Vec<Vec<u8>> {
        self.0.read().map(|c| c.clone()).unwrap_or_default()
    }

    fn set(&self, crls: Vec<Vec<u8>>) {
        if let Ok(mut c) = self.0.write() {
            *c = crls;
        }
    }
}

/// The socket path of an endpoint address (`unix:///path` or `unix:/path`).
fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(|| format!("--socket {endpoint:?}: expected unix:///path"))?;
    Ok(PathBuf::from(p))
}

/// Reads one stream until it ends; publishes every update.
async fn follow(
    path: &std::path::Path,
    crls: &Crls,
    first: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    let mut client = SpiffeWorkloadApiClient::new(sigil_proto::unix::channel(path).await?);
    let mut req = tonic::Request::new(X509BundlesRequest {});
    req.metadata_mut().insert(
        WORKLOAD_API_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = client
        .fetch_x509_bundles(req)
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    while let Some(resp) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        crls.set(resp.crl);
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
    }
    Ok(())
}

/// Starts following the CRLs of the Workload API at `endpoint` and waits
/// (up to `wait`) for the first answer, so the first handshake is checked
/// too. The stream is reopened whenever it ends.
pub async fn watch(endpoint: &str, wait: Duration) -> Result<Arc<Crls>, String> {
    let path = socket_path(endpoint)?;
    let crls = Arc::new(Crls::default());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let out = crls.clone();
    tokio::spawn(async move {
        let mut first = Some(tx);
        let mut backoff =
            sigil_core::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match follow(&path, &out, &mut first).await {
                Ok(()) => backoff.reset(),
                Err(e) => eprintln!("CRL stream: {e}; reconnecting"),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    });
    tokio::time::timeout(wait, rx)
        .await
        .map_err(|_| format!("no CRL from the Workload API within {wait:?}"))?
        .map_err(|_| "CRL stream stopped".to_string())?;
    Ok(crls)
}
