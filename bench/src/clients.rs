//! The gRPC clients the bench uses, written against `sigil-proto` only (the
//! wire contracts), not against the server's or agent's internals:
//!
//! - [`admin`]: the server's admin socket (what `sigil-server entry ...`
//!   and `token generate` call; the CLI returns right after this call does);
//! - [`agent_health`]: the agent's admin socket (what `healthcheck` calls);
//! - [`workload`]: the SPIFFE Workload API over the agent's Unix socket;
//! - [`SimAgent`]: a simulated agent on the agent API (TLS 1.3, mTLS with
//!   the agent SVID it got from a join token), as the real agent speaks it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_core::tls::{ServerTrust, SpiffeServerVerifier};
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::agent_admin_api_client::AgentAdminApiClient;
use sigil_proto::admin::{
    AgentHealthResponse, EntryId, GenerateTokenRequest, GetBundleRequest, HealthRequest,
    UpdateEntryRequest,
};
use sigil_proto::agent::agent_api_client::AgentApiClient;
use sigil_proto::agent::{
    AttestBegin, AttestRequest, JoinToken, attest_begin, attest_request, attest_response,
};
use sigil_proto::common::Entry;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::Result;

/// A channel over a Unix socket (connects now).
pub(crate) async fn unix_channel(path: &Path) -> Result<Channel> {
    sigil_proto::unix::channel(path)
        .await
        .map_err(crate::Error::from)
}

/// The server's admin API.
pub(crate) mod admin {
    use super::*;

    pub(crate) type Client = AdminApiClient<Channel>;

    pub(crate) async fn connect(socket: &Path) -> Result<Client> {
        Ok(AdminApiClient::new(unix_channel(socket).await?).max_decoding_message_size(usize::MAX))
    }

    pub(crate) async fn healthy(socket: &Path) -> bool {
        match connect(socket).await {
            Ok(mut c) => c.health(HealthRequest::default()).await.is_ok(),
            Err(_) => false,
        }
    }

    /// The server's signing-queue statistics (`healthcheck --output json`).
    pub(crate) async fn signing(c: &mut Client) -> Result<sigil_proto::admin::SigningStats> {
        Ok(c.health(HealthRequest::default())
            .await?
            .into_inner()
            .signing
            .unwrap_or_default())
    }

    /// A join token for `spiffe_id` (as `sigil-server token generate`).
    pub(crate) async fn token(c: &mut Client, spiffe_id: &str) -> Result<String> {
        Ok(c.generate_token(GenerateTokenRequest {
            spiffe_id: spiffe_id.to_string(),
            ttl_seconds: 3600,
            ..Default::default()
        })
        .await?
        .into_inner()
        .token)
    }

    /// The trust bundle as PEM.
    pub(crate) async fn bundle_pem(c: &mut Client) -> Result<String> {
        let b = c
            .get_bundle(GetBundleRequest::default())
            .await?
            .into_inner();
        Ok(sigil_core::x509::certs_to_pem(
            b.x509_authorities.iter().map(Vec::as_slice),
        ))
    }

    /// An entry as `sigil-server entry create` would send it.
    pub(crate) fn entry(spiffe_id: &str, parent_id: &str, selectors: &[String]) -> Entry {
        Entry {
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent_id.to_string(),
            selectors: selectors.to_vec(),
            ..Default::default()
        }
    }

    /// Creates an entry; returns it with its server-assigned ID.
    pub(crate) async fn create(c: &mut Client, e: Entry) -> Result<Entry> {
        Ok(c.create_entry(e).await?.into_inner())
    }

    /// Creates `entries` with up to `parallel` calls in flight.
    pub(crate) async fn create_many(
        c: &Client,
        entries: Vec<Entry>,
        parallel: usize,
    ) -> Result<Vec<Entry>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut set = tokio::task::JoinSet::new();
        let mut it = entries.into_iter().enumerate();
        loop {
            while set.len() < parallel {
                let Some((i, e)) = it.next() else { break };
                let mut c = c.clone();
                set.spawn(async move { (i, c.create_entry(e).await.map(|r| r.into_inner())) });
            }
            let Some(r) = set.join_next().await else {
                break;
            };
            let (i, e) = r?;
            out.push((i, e?));
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, e)| e).collect())
    }

    /// Creates `entries` with `BatchCreateEntries`, `batch` per call, one
    /// call at a time (as `sigil-server entry create --file` does); fails
    /// if the server refused any.
    pub(crate) async fn create_batched(
        c: &Client,
        entries: Vec<Entry>,
        batch: usize,
    ) -> Result<Vec<Entry>> {
        let mut c = c.clone();
        let mut out = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(batch.max(1)) {
            let r = c
                .batch_create_entries(sigil_proto::admin::BatchCreateEntriesRequest {
                    entries: chunk.to_vec(),
                })
                .await?
                .into_inner();
            for res in r.results {
                out.push(
                    res.entry
                        .ok_or_else(|| format!("entry refused: {}", res.error))?,
                );
            }
        }
        Ok(out)
    }

    /// Changes the hint of entry `id` (as `sigil-server entry update ID --hint H`).
    pub(crate) async fn set_hint(c: &mut Client, id: &str, hint: &str) -> Result<Entry> {
        Ok(c.update_entry(UpdateEntryRequest {
            entry: Some(Entry {
                id: id.to_string(),
                hint: hint.to_string(),
                ..Default::default()
            }),
            set_fields: vec!["hint".into()],
            ..Default::default()
        })
        .await?
        .into_inner())
    }

    /// Creates a kill (as `sigil-server kill --entry|--spiffe-id|--agent`).
    pub(crate) async fn kill(
        c: &mut Client,
        target: sigil_proto::admin::kill_target::Target,
    ) -> Result<String> {
        let k = c
            .create_kill(sigil_proto::admin::CreateKillRequest {
                target: Some(sigil_proto::admin::KillTarget {
                    target: Some(target),
                }),
                reason: "sigil-bench kill".into(),
            })
            .await?
            .into_inner();
        Ok(k.id)
    }

    pub(crate) async fn delete(c: &mut Client, id: &str) -> Result<()> {
        c.delete_entry(EntryId {
            id: id.to_string(),
            ..Default::default()
        })
        .await?;
        Ok(())
    }
}

/// The agent's admin socket health (entries, SVIDs, synced).
pub(crate) async fn agent_health(socket: &Path) -> Option<AgentHealthResponse> {
    let ch = unix_channel(socket).await.ok()?;
    AgentAdminApiClient::new(ch)
        .agent_health(HealthRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The SPIFFE Workload API.
pub(crate) mod workload {
    use super::*;
    use sigil_proto::workload::X509svidRequest;
    use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    pub(crate) type Client = SpiffeWorkloadApiClient<Channel>;

    pub(crate) async fn connect(socket: &Path) -> Result<Client> {
        Ok(SpiffeWorkloadApiClient::new(unix_channel(socket).await?)
            .max_decoding_message_size(usize::MAX))
    }

    /// A FetchX509SVID request with the `workload.spiffe.io: true` header.
    pub(crate) fn x509_request() -> tonic::Request<X509svidRequest> {
        let mut req = tonic::Request::new(X509svidRequest::default());
        req.metadata_mut().insert(
            sigil_proto::WORKLOAD_API_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        req
    }
}

fn tls_config(client_svid: Option<(&[Vec<u8>], &[u8])>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            // The bench talks to the server it started itself on loopback:
            // no chain check, but the handshake signatures are still
            // verified, so the TLS work is the same as a real agent's.
            ServerTrust::Insecure,
            provider,
        )));
    let mut cfg = match client_svid {
        Some((chain, key)) => builder.with_client_auth_cert(
            chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// One connection to the example mTLS service (examples/ `mtls-server`)
/// on loopback `port`, presenting `chain`/`key` as the client: whether the
/// service admitted it (answered its line). A refused client certificate
/// shows up after the TLS 1.3 handshake, as a failed read.
pub(crate) async fn mtls_admitted(port: u16, chain: &[Vec<u8>], key: &[u8]) -> Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = (*tls_config(Some((chain, key)))?).clone();
    cfg.alpn_protocols.clear();
    let connector = TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("mtls-server").map_err(std::io::Error::other)?;
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return Ok(false);
    };
    if tls.write_all(b"hi\n").await.is_err() {
        return Ok(false);
    }
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    Ok(answer.starts_with(b"hello "))
}

/// One TLS connection to the agent API (connects now).
async fn tls_channel(port: u16, tls: Arc<rustls::ClientConfig>) -> Result<Channel> {
    tls_channel_with(port, tls, false).await
}

/// A channel to the agent API over TLS with `tls`. `lazy`: connect at the
/// first call (as `sigil-agent` does, which calls as soon as it connects)
/// instead of now. The server closes a connection that makes no call within
/// `HANDSHAKE_TIMEOUT` (10 s) of opening, so a simulated agent that waits
/// longer than that before its first call must connect lazily.
async fn tls_channel_with(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    lazy: bool,
) -> Result<Channel> {
    let connector = TlsConnector::from(tls);
    let ep = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(10));
    let dial = tower::service_fn(move |_| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("sigil-server").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    if lazy {
        Ok(ep.connect_with_connector_lazy(dial))
    } else {
        Ok(ep.connect_with_connector(dial).await?)
    }
}

/// A simulated agent: attested with a join token, then one mTLS
/// connection presenting its agent SVID (opened at its first call).
pub(crate) struct SimAgent {
    pub(crate) spiffe_id: String,
    pub(crate) api: AgentApiClient<Channel>,
}

impl SimAgent {
    /// Node attestation with `token`, then an mTLS connection.
    pub(crate) async fn attest(port: u16, token: &str) -> Result<SimAgent> {
        let (csr, key) = sigil_core::x509::new_key_and_csr()?;
        let ch = tls_channel(port, tls_config(None)?).await?;
        // Join-token attestation is one step of the challenge stream: the
        // server answers the begin message with the result.
        let begin = AttestRequest {
            step: Some(attest_request::Step::Begin(AttestBegin {
                evidence: Some(attest_begin::Evidence::JoinToken(JoinToken {
                    token: token.to_string(),
                    ..Default::default()
                })),
                csr,
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut answers = AgentApiClient::new(ch)
            .attest(tokio_stream::iter([begin]))
            .await?
            .into_inner();
        let resp = match answers.message().await?.and_then(|m| m.step) {
            Some(attest_response::Step::Result(r)) => r,
            Some(_) => return Err("the server sent a challenge for a join token".into()),
            None => return Err("attestation stream ended without a result".into()),
        };
        // Connected at its first call: the scale bench attests every agent
        // first and opens their streams only after creating the entries.
        let ch = tls_channel_with(port, tls_config(Some((&resp.svid_chain, &key)))?, true).await?;
        Ok(SimAgent {
            spiffe_id: resp.spiffe_id,
            api: AgentApiClient::new(ch)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        })
    }
}
