//! The physical reference of `fetch`: a bare tonic server in a process of
//! its own, on a Unix socket like the agent's, whose FetchX509SVID answers
//! every call with one pre-built response (the agent's own answer, captured
//! once, so the size is the same). No attestation, no snapshot, no header
//! check: what tonic, HTTP/2 and the socket cost for the same call.
//! `fetch` reports `ratio_to_bare_rpc` = agent fetches/s ÷ this server's
//! fetches/s at the same client count, measured in the same run.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, WitsvidRequest,
    WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Result;

/// `sigil-bench bare-rpc-serve`: serve `response` on `socket` until killed.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    #[arg(long)]
    socket: PathBuf,
    /// A file holding one encoded X509SVIDResponse.
    #[arg(long)]
    response: PathBuf,
}

struct Bare(X509svidResponse);

type Once<M> = Pin<Box<dyn Stream<Item = std::result::Result<M, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Bare {
    type FetchX509SVIDStream = Once<X509svidResponse>;
    type FetchX509BundlesStream = Once<X509BundlesResponse>;
    type FetchJWTBundlesStream = Once<JwtBundlesResponse>;
    type FetchWITSVIDStream = Once<WitsvidResponse>;
    type FetchWITBundlesStream = Once<WitBundlesResponse>;

    async fn fetch_witsvid(
        &self,
        _req: Request<WitsvidRequest>,
    ) -> std::result::Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("bare reference"))
    }
    async fn fetch_wit_bundles(
        &self,
        _req: Request<WitBundlesRequest>,
    ) -> std::result::Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("bare reference"))
    }

    async fn fetch_x509svid(
        &self,
        _req: Request<X509svidRequest>,
    ) -> std::result::Result<Response<Self::FetchX509SVIDStream>, Status> {
        // The chain, key and bundle are `Bytes`: the clone shares them, as
        // the agent's responses share its cache's buffers.
        let first = tokio_stream::once(Ok(self.0.clone()));
        // The stream then stays open, as the agent's does.
        let rest = tokio_stream::pending();
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::chain(
            first, rest,
        ))))
    }
    async fn fetch_x509_bundles(
        &self,
        _req: Request<X509BundlesRequest>,
    ) -> std::result::Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("bare reference"))
    }
    async fn fetch_jwtsvid(
        &self,
        _req: Request<JwtsvidRequest>,
    ) -> std::result::Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("bare reference"))
    }
    async fn fetch_jwt_bundles(
        &self,
        _req: Request<JwtBundlesRequest>,
    ) -> std::result::Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("bare reference"))
    }
    async fn validate_jwtsvid(
        &self,
        _req: Request<ValidateJwtsvidRequest>,
    ) -> std::result::Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("bare reference"))
    }
}

/// The hidden subcommand's body.
pub(crate) async fn serve(a: &ServeArgs) -> Result<()> {
    let resp = X509svidResponse::decode(std::fs::read(&a.response)?.as_slice())?;
    let _ = std::fs::remove_file(&a.socket);
    let listener = tokio::net::UnixListener::bind(&a.socket)?;
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(Bare(resp)))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}

/// A running bare server; killed on drop.
pub(crate) struct BareServer {
    child: Child,
    pub(crate) socket: PathBuf,
}

impl BareServer {
    /// Starts `sigil-bench bare-rpc-serve` answering with `response`.
    pub(crate) async fn start(dir: &Path, response: &X509svidResponse) -> Result<BareServer> {
        let file = dir.join("bare-response.bin");
        std::fs::write(&file, response.encode_to_vec())?;
        let socket = dir.join("bare.sock");
        let child = Command::new(std::env::current_exe()?)
            .arg("bare-rpc-serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--response")
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()?;
        let s = BareServer { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::clients::workload::connect(&s.socket).await.is_err() {
            if Instant::now() > deadline {
                return Err("the bare RPC server did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(s)
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
