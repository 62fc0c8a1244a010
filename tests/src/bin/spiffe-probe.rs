//! A tiny Workload API client built on the public `spiffe` crate, run by the
//! end-to-end tests as a separate process (possibly under another uid).
//! Prints `OK <spiffe-id>` or `ERR <kind>: <detail>` and exits 0 / 1.

use spiffe::{WorkloadApiClient, WorkloadApiError};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        println!("ERR usage: spiffe-probe unix:///path/to/api.sock");
        return std::process::ExitCode::from(2);
    };
    let result = async {
        let client = WorkloadApiClient::connect_to(&addr).await?;
        client.fetch_x509_svid().await
    }
    .await;
    match result {
        Ok(svid) => {
            println!("OK {}", svid.spiffe_id());
            std::process::ExitCode::SUCCESS
        }
        Err(WorkloadApiError::NoIdentityIssued) => {
            println!("ERR permission_denied: no identity issued");
            std::process::ExitCode::FAILURE
        }
        Err(WorkloadApiError::PermissionDenied(m)) => {
            println!("ERR permission_denied: {m}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            println!("ERR other: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
