//! An mTLS client: connects `--count` times to the server, which must
//! present `--server-id`, and prints each answer. Exits non-zero if any
//! connection fails.

use std::time::Duration;

use clap::Parser;
use sigil_examples::{SpiffeTls, crl, source};
use spiffe::SpiffeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// Workload API socket.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    connect: String,
    /// The SPIFFE ID the server must present.
    #[arg(long)]
    server_id: String,
    /// Number of connections.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Pause between connections, in milliseconds.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let server_id = SpiffeId::new(&args.server_id).map_err(|e| format!("--server-id: {e}"))?;
    let src = source(&args.socket).await?;
    let crls = crl::watch(&args.socket, std::time::Duration::from_secs(30)).await?;
    let tls = SpiffeTls::new(src, crls, vec![server_id]);
    let connector =
        tokio_rustls::TlsConnector::from(tls.client_config().map_err(|e| e.to_string())?);
    let mut failures = 0;
    for i in 0..args.count {
        let result = async {
            let tcp = tokio::net::TcpStream::connect(&args.connect)
                .await
                .map_err(|e| e.to_string())?;
            let name =
                rustls_pki_types::ServerName::try_from("spiffe-peer").map_err(|e| e.to_string())?;
            let mut s = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            s.write_all(b"hello\n").await.map_err(|e| e.to_string())?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(reply)
        }
        .await;
        match result {
            Ok(reply) if !reply.is_empty() => print!("ok {i}: {reply}"),
            Ok(_) => {
                println!("failed {i}: the server closed the connection (refused?)");
                failures += 1;
            }
            Err(e) => {
                println!("failed {i}: {e}");
                failures += 1;
            }
        }
        if i + 1 < args.count {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
    }
    if failures > 0 {
        Err(format!("{failures} of {} connections failed", args.count))
    } else {
        Ok(())
    }
}
