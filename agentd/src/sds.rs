//! Envoy's Secret Discovery Service v3 on the Workload API socket, with
//! SPIRE's naming conventions, so that an Envoy configured for SPIRE's agent
//! works unchanged:
//!
//! - a `tls_certificate` secret per X.509-SVID the caller is entitled to,
//!   named by its SPIFFE ID, and `default` for the first of them;
//! - a `validation_context` per trust domain the caller may verify, named
//!   `spiffe://<td>` (its own and those its entries federate with),
//!   `ROOTCA` for its own, and `ALL` for all of them at once through Envoy's
//!   SPIFFE certificate validator (`SPIFFECertValidatorConfig`).
//!
//! A request naming no resources gets every SVID and every trust domain by
//! its own name. `StreamSecrets` pushes a new response (new version and
//! nonce) whenever what the caller would receive changes — rotation, a new
//! or withdrawn entry, a bundle change — and when a request changes the
//! names; an ACK changes nothing, a NACK (`error_detail`) is logged and not
//! answered (the next change is). `FetchSecrets` answers once;
//! `DeltaSecrets` is Unimplemented. The caller is attested like a Workload
//! API caller (Envoy sends no `workload.spiffe.io` header, so none is
//! required here), and a stream ends when the attested process exits.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use sigil_attestors::workload::AttestorSet;
use sigil_core::selector::SelectorSet;
use sigil_core::x509::{certs_to_pem, split_der_certs};
use sigil_proto::envoy::core::{DataSource, TypedExtensionConfig, data_source};
use sigil_proto::envoy::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use sigil_proto::envoy::secret::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use sigil_proto::envoy::tls::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use sigil_proto::envoy::{SECRET_TYPE_URL, SPIFFE_VALIDATOR_NAME, SPIFFE_VALIDATOR_TYPE_URL};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::Snapshot;

/// Name of the caller's first X.509-SVID.
pub const DEFAULT_SVID: &str = "default";
/// Name of the caller's own trust domain's bundle.
pub const ROOT_CA: &str = "ROOTCA";
/// Name of every bundle the caller may use, as one SPIFFE validator.
pub const ALL_BUNDLES: &str = "ALL";
/// Most resource names accepted in one request.
pub const MAX_RESOURCE_NAMES: usize = 64;
/// Longest resource name accepted.
pub const MAX_RESOURCE_NAME: usize = 2048;

/// The SDS service.
pub struct Sds {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    attestors: Arc<AttestorSet>,
}

impl Sds {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        attestors: Arc<AttestorSet>,
    ) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(Self {
            snapshots,
            attestors,
        })
        .max_decoding_message_size(crate::workload_socket::MAX_MESSAGE)
    }
}

/// Checks what a request asks for: the type, and bounded names.
fn requested(req: &DiscoveryRequest) -> Result<Vec<String>, Status> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "invalid field `type_url`: this service serves {SECRET_TYPE_URL}"
        )));
    }
    if req.resource_names.len() > MAX_RESOURCE_NAMES
        || req
            .resource_names
            .iter()
            .any(|n| n.len() > MAX_RESOURCE_NAME)
    {
        return Err(Status::invalid_argument(format!(
            "invalid field `resource_names`: at most {MAX_RESOURCE_NAMES} names of at most {MAX_RESOURCE_NAME} bytes"
        )));
    }
    Ok(req.resource_names.clone())
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    })
}

fn tls_secret(name: &str, chain_der: &[u8], key_der: &[u8]) -> Option<Secret> {
    let chain = split_der_certs(chain_der).ok()?;
    let key = pem::encode(&pem::Pem::new("PRIVATE KEY", key_der.to_vec()));
    Some(Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(certs_to_pem(chain.iter().map(Vec::as_slice)).into_bytes()),
            private_key: inline(key.into_bytes()),
        })),
    })
}

fn ca_secret(name: &str, pem: &str) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(pem.as_bytes().to_vec()),
                custom_validator_config: None,
            },
        )),
    }
}

fn all_secret(bundles: &[(String, String)]) -> Secret {
    let cfg = SpiffeCertValidatorConfig {
        trust_domains: bundles
            .iter()
            .map(|(td, pem)| spiffe_cert_validator_config::TrustDomain {
                name: td.trim_start_matches("spiffe://").to_string(),
                trust_bundle: inline(pem.as_bytes().to_vec()),
            })
            .collect(),
    };
    Secret {
        name: ALL_BUNDLES.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: None,
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR_NAME.to_string(),
                    typed_config: Some(prost_types::Any {
                        type_url: SPIFFE_VALIDATOR_TYPE_URL.to_string(),
                        value: cfg.encode_to_vec(),
                    }),
                }),
            },
        )),
    }
}

/// The secrets `names` select for a caller with `selectors` (every SVID
/// and trust domain when `names` is empty), in a stable order. `Ok(None)`:
/// entitled, but nothing minted yet.
pub fn secrets(
    snap: &Snapshot,
    selectors: &SelectorSet,
    names: &[String],
) -> Result<Option<Vec<Secret>>, Status> {
    let (matching, pending) = snap.servable(selectors);
    if matching.is_empty() {
        return crate::workload_api::none_servable(snap, &pending).map(|()| None);
    }
    let svids: Vec<_> = matching
        .iter()
        .filter_map(|e| snap.svids.get(&e.id))
        .collect();
    let Some(td) = &snap.trust_domain else {
        return Ok(None);
    };
    if svids.is_empty() || snap.bundle.certs.is_empty() {
        return Ok(None);
    }
    // Trust domains by ID: own first, then the federated ones any entry names.
    let own = td.id_string();
    let own_pem = certs_to_pem(snap.bundle.certs.iter().map(Vec::as_slice));
    let mut bundles = vec![(own.clone(), own_pem.clone())];
    let federated: BTreeSet<String> = matching
        .iter()
        .flat_map(|e| e.federates_with.iter().map(|t| t.id_string()))
        .collect();
    for ftd in federated {
        if let Some(der) = snap.trust.federated_x509.get(&ftd)
            && let Ok(certs) = split_der_certs(der)
        {
            bundles.push((ftd, certs_to_pem(certs.iter().map(Vec::as_slice))));
        }
    }
    let mut out = Vec::new();
    if names.is_empty() {
        out.extend(
            svids
                .iter()
                .filter_map(|s| tls_secret(&s.spiffe_id, &s.chain_der, &s.key_der)),
        );
        out.extend(bundles.iter().map(|(td, pem)| ca_secret(td, pem)));
        return Ok(Some(out));
    }
    for name in names {
        let found = match name.as_str() {
            DEFAULT_SVID => svids
                .first()
                .and_then(|s| tls_secret(DEFAULT_SVID, &s.chain_der, &s.key_der)),
            ROOT_CA => Some(ca_secret(ROOT_CA, &own_pem)),
            ALL_BUNDLES => Some(all_secret(&bundles)),
            n => svids
                .iter()
                .find(|s| s.spiffe_id == n)
                .and_then(|s| tls_secret(n, &s.chain_der, &s.key_der))
                .or_else(|| {
                    bundles
                        .iter()
                        .find(|(td, _)| td == n)
                        .map(|(td, pem)| ca_secret(td, pem))
                }),
        };
        // A name the caller is not entitled to is left out (as SPIRE does):
        // Envoy keeps waiting for it.
        out.extend(found);
    }
    Ok(Some(out))
}

fn response(version: u64, secrets: &[Secret]) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_string(),
        resources: secrets
            .iter()
            .map(|s| prost_types::Any {
                type_url: SECRET_TYPE_URL.to_string(),
                value: s.encode_to_vec(),
            })
            .collect(),
        canary: false,
        type_url: SECRET_TYPE_URL.to_string(),
        nonce: format!("{version:x}"),
        control_plane: None,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets is not served: use StreamSecrets",
        ))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = crate::workload_api::attest_peer(&self.attestors, &req).await?;
        let names = requested(req.get_ref())?;
        let snap = self.snapshots.borrow().clone();
        match secrets(&snap, &caller.selectors, &names)? {
            Some(s) => Ok(Response::new(response(1, &s))),
            None => Err(Status::unavailable(
                "the caller's SVIDs are not minted yet; retry",
            )),
        }
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = crate::workload_api::attest_peer(&self.attestors, &req).await?;
        let mut inbound = req.into_inner();
        let mut snaps = self.snapshots.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let crate::workload_api::Caller {
                selectors,
                call: _call,
                peer,
                ..
            } = caller;
            let mut names: Option<Vec<String>> = None;
            let mut version = 0u64;
            let mut sent: Option<Vec<Secret>> = None;
            let exited = peer.clone();
            let mut gone = Box::pin(async move { exited.exited().await });
            loop {
                // What the caller would receive now, if it has asked yet.
                if let Some(n) = &names {
                    let snap = snaps.borrow_and_update().clone();
                    match secrets(&snap, &selectors, n) {
                        Ok(Some(s)) if sent.as_ref() != Some(&s) => {
                            version += 1;
                            if tx.send(Ok(response(version, &s))).await.is_err() {
                                return;
                            }
                            sent = Some(s);
                        }
                        Ok(_) => {}
                        Err(st) => {
                            let _ = tx.send(Err(st)).await;
                            return;
                        }
                    }
                }
                tokio::select! {
                    msg = inbound.message() => {
                        let req = match msg {
                            Ok(Some(r)) => r,
                            Ok(None) | Err(_) => return,
                        };
                        let wanted = match requested(&req) {
                            Ok(w) => w,
                            Err(st) => {
                                let _ = tx.send(Err(st)).await;
                                return;
                            }
                        };
                        tracing::debug!(pid = peer.pid, names = req.resource_names.len(), nonce = %req.response_nonce, nack = req.error_detail.is_some(), "SDS request");
                        let current = format!("{version:x}");
                        if !req.response_nonce.is_empty() && req.response_nonce != current {
                            // An answer to an older response: superseded.
                            continue;
                        }
                        if let Some(err) = &req.error_detail {
                            tracing::warn!(pid = peer.pid, node = req.node.as_ref().map(|n| n.id.as_str()).unwrap_or(""), version = %req.version_info, error = %err.message, "SDS client rejected secrets (NACK)");
                            continue;
                        }
                        if names.as_ref() != Some(&wanted) {
                            names = Some(wanted);
                            // The new names get an answer even if the
                            // secrets happen to be the same.
                            sent = None;
                        }
                    }
                    r = snaps.changed() => if r.is_err() { return },
                    _ = gone.as_mut() => {
                        let _ = tx.send(Err(Status::permission_denied(
                            "the process that opened this stream has exited: its identity ended",
                        ))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
