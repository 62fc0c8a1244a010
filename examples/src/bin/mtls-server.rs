//! An mTLS echo service: answers `hello <client-id>, from <server-id>` to
//! every allowed client.

use clap::Parser;
use sigil_examples::{SpiffeTls, crl, own_id, source};
use spiffe::SpiffeId;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
struct Args {
    /// Workload API socket, e.g. unix:///run/sigil/agent/public/api.sock.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// SPIFFE ID allowed to connect; repeat for several.
    #[arg(long = "allow", required = true)]
    allowed: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let allowed = args
        .allowed
        .iter()
        .map(|a| SpiffeId::new(a).map_err(|e| format!("--allow {a:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let src = source(&args.socket).await?;
    let crls = crl::watch(&args.socket, std::time::Duration::from_secs(30)).await?;
    let tls = SpiffeTls::new(src.clone(), crls, allowed);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config().map_err(|e| e.to_string())?);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    println!("listening on {} as {}", args.listen, own_id(&src));
    loop {
        let (sock, peer) = listener.accept().await.map_err(|e| e.to_string())?;
        let acceptor = acceptor.clone();
        let src = src.clone();
        tokio::spawn(async move {
            let mut tls = match acceptor.accept(sock).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{peer}: handshake refused: {e}");
                    return;
                }
            };
            let client_id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| sigil_core::x509::SvidInfo::from_der(c).ok())
                .map(|i| i.spiffe_id.to_string())
                .unwrap_or_default();
            let mut line = String::new();
            let (r, mut w) = tokio::io::split(&mut tls);
            if BufReader::new(r).read_line(&mut line).await.is_ok() {
                let _ = w
                    .write_all(format!("hello {client_id}, from {}\n", own_id(&src)).as_bytes())
                    .await;
                let _ = w.shutdown().await;
            }
        });
    }
}
