//! `sigil.delegation.Delegation` on the Workload API socket: token
//! exchange for a workload acting on behalf of a user, and the
//! `sigil-agent api delegate` client.
//!
//! A call is checked like a Workload API call (security header, the
//! calling process attested by the same [`AttestorSet`]). The agent picks
//! the caller's entry among those its selectors entitle it to: the ones
//! with delegable scopes (if none has any, the entry is still named to the
//! server, which refuses and audits the refusal); with several SPIFFE IDs
//! to choose from the request must name one (`spiffe_id`, as in
//! FetchJWTSVID). The agent then forwards the exchange to the server
//! (`DelegationAgentApi`), which verifies the subject token, narrows the
//! scopes, signs and audits. Nothing is cached: every exchange is decided
//! and audited by the server.

use std::sync::Arc;

use clap::Args;
use sigil_attestors::workload::AttestorSet;
use sigil_core::SpiffeId;
use sigil_core::entry::Entry;
use sigil_proto::delegation::delegation_agent_api_client::DelegationAgentApiClient;
use sigil_proto::delegation::delegation_client::DelegationClient;
use sigil_proto::delegation::delegation_server::{Delegation, DelegationServer};
use sigil_proto::delegation::{AgentExchangeRequest, ExchangeTokenRequest, ExchangeTokenResponse};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cache::Snapshot;
use crate::workload_api::attest_caller;

/// Longest subject token forwarded, bytes (the server's bound too).
const MAX_SUBJECT_TOKEN: usize = 16 * 1024;

/// The service.
pub struct DelegationApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    server: watch::Receiver<Channel>,
    attestors: Arc<AttestorSet>,
}

impl DelegationApi {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        server: watch::Receiver<Channel>,
        attestors: Arc<AttestorSet>,
    ) -> DelegationServer<Self> {
        DelegationServer::new(Self {
            snapshots,
            server,
            attestors,
        })
        .max_decoding_message_size(crate::workload_socket::MAX_MESSAGE)
    }
}

/// The entry a caller entitled to `entitled` acts as: see the module doc.
fn pick_entry(entitled: Vec<Arc<Entry>>, wanted: Option<&SpiffeId>) -> Result<Arc<Entry>, Status> {
    let matching: Vec<Arc<Entry>> = entitled
        .into_iter()
        .filter(|e| wanted.is_none_or(|w| &e.spiffe_id == w))
        .collect();
    if matching.is_empty() {
        return Err(Status::permission_denied(match wanted {
            Some(w) => format!("no identity {w} issued to this process"),
            None => "no identity issued".into(),
        }));
    }
    let delegating: Vec<&Arc<Entry>> = matching
        .iter()
        .filter(|e| !e.delegable_scopes.is_empty())
        .collect();
    let pool: Vec<&Arc<Entry>> = if delegating.is_empty() {
        matching.iter().collect()
    } else {
        delegating
    };
    let mut ids: Vec<String> = pool.iter().map(|e| e.spiffe_id.to_string()).collect();
    ids.sort();
    ids.dedup();
    if ids.len() > 1 {
        return Err(Status::invalid_argument(format!(
            "invalid field `spiffe_id`: this process has several identities that may delegate ({}): name one",
            ids.join(", ")
        )));
    }
    // One SPIFFE ID (possibly under several entries): the lowest entry ID,
    // so the choice is stable.
    pool.into_iter()
        .min_by(|a, b| a.id.cmp(&b.id))
        .cloned()
        .ok_or_else(|| Status::permission_denied("no identity issued"))
}

#[tonic::async_trait]
impl Delegation for DelegationApi {
    async fn exchange_token(
        &self,
        req: Request<ExchangeTokenRequest>,
    ) -> Result<Response<ExchangeTokenResponse>, Status> {
        let caller = attest_caller(&self.attestors, &req).await?;
        let r = req.into_inner();
        if r.subject_token.is_empty() {
            return Err(Status::invalid_argument(
                "invalid field `subject_token`: required",
            ));
        }
        if r.subject_token.len() > MAX_SUBJECT_TOKEN {
            return Err(Status::invalid_argument(format!(
                "invalid field `subject_token`: {} bytes exceed the maximum of {MAX_SUBJECT_TOKEN}",
                r.subject_token.len()
            )));
        }
        sigil_core::jwt::check_audiences(&r.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let wanted =
            if r.spiffe_id.is_empty() {
                None
            } else {
                Some(SpiffeId::new(&r.spiffe_id).map_err(|e| {
                    Status::invalid_argument(format!("invalid field `spiffe_id`: {e}"))
                })?)
            };
        let snap = self.snapshots.borrow().clone();
        if snap.offline {
            return Err(Status::unavailable(
                "this agent has had no contact with the server for longer than serve_offline_for",
            ));
        }
        let mut pending = Vec::new();
        let mut entitled = Vec::new();
        for e in snap.entitled(&caller.selectors) {
            match &e.approval_pending {
                Some(why) => pending.push(why.clone()),
                None => entitled.push(e.clone()),
            }
        }
        if entitled.is_empty() && !pending.is_empty() {
            return Err(Status::permission_denied(pending.join("; ")));
        }
        let entry = pick_entry(entitled, wanted.as_ref())?;
        let ch = self.server.borrow().clone();
        let resp = DelegationAgentApiClient::new(ch)
            .exchange_token(AgentExchangeRequest {
                entry_id: entry.id.clone(),
                subject_token: r.subject_token,
                subject_token_type: r.subject_token_type,
                audience: r.audience,
                scope: r.scope,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition => Status::new(s.code(), s.message()),
                _ => Status::unavailable(format!(
                    "could not reach the server for the exchange: {}",
                    s.message()
                )),
            })?;
        drop(caller);
        Ok(resp)
    }
}

/// `sigil-agent api delegate`.
#[derive(Args)]
pub struct DelegateArgs {
    #[command(flatten)]
    socket: crate::cli::SocketArgs,
    /// The token of the party to act for (a JWT: OIDC ID or access token,
    /// or a delegation token addressed to this workload).
    #[arg(long)]
    subject_token: String,
    /// urn:ietf:params:oauth:token-type:jwt (default), ...:id_token or ...:access_token.
    #[arg(long, default_value = "")]
    subject_token_type: String,
    /// Audience of the issued token; repeat for several.
    #[arg(long, required = true)]
    audience: Vec<String>,
    /// Scope to request; repeat for several (default: every scope allowed).
    #[arg(long)]
    scope: Vec<String>,
    /// Act as this SPIFFE ID (when the process has several identities).
    #[arg(long)]
    spiffe_id: Option<String>,
    /// `text` (the token alone) or `json` (the whole response).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// Runs `sigil-agent api delegate`: prints the token, or the response as JSON.
pub async fn delegate(a: DelegateArgs) -> Result<(), String> {
    if let Some(id) = &a.spiffe_id {
        sigil_core::ids::parse_spiffe_id(id).map_err(|e| format!("--spiffe-id: {e}"))?;
    }
    let path = crate::cli::socket_path(a.socket.socket.as_deref())?;
    let ch = sigil_proto::unix::channel(&path).await?;
    let r = DelegationClient::new(ch)
        .exchange_token(crate::cli::with_header(ExchangeTokenRequest {
            subject_token: a.subject_token,
            subject_token_type: a.subject_token_type,
            audience: a.audience,
            scope: a.scope,
            spiffe_id: a.spiffe_id.unwrap_or_default(),
        }))
        .await
        .map_err(crate::cli::grpc_err)?
        .into_inner();
    if a.output == "json" {
        let v = serde_json::json!({
            "access_token": r.access_token,
            "issued_token_type": r.issued_token_type,
            "token_type": r.token_type,
            "expires_in": r.expires_in,
            "scope": r.scope,
            "spiffe_id": r.spiffe_id,
            "jti": r.jti,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        println!("{}", r.access_token);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_proto::common::Entry as PbEntry;

    fn entry(id: &str, spiffe: &str, scopes: &[&str]) -> Arc<Entry> {
        let td = sigil_core::TrustDomain::new("example.org").unwrap();
        Arc::new(
            Entry::from_proto(
                &PbEntry {
                    id: id.into(),
                    spiffe_id: spiffe.into(),
                    parent_id: "spiffe://example.org/agent".into(),
                    selectors: vec!["unix:uid:1".into()],
                    delegable_scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
                &td,
            )
            .unwrap(),
        )
    }

    #[test]
    fn the_delegating_entry_is_picked_and_ambiguity_named() {
        let a = entry("a", "spiffe://example.org/a", &["mail"]);
        let b = entry("b", "spiffe://example.org/b", &[]);
        let c = entry("c", "spiffe://example.org/c", &["cal"]);
        assert_eq!(
            pick_entry(vec![a.clone(), b.clone()], None).unwrap().id,
            "a"
        );
        assert_eq!(pick_entry(vec![b.clone()], None).unwrap().id, "b");
        let e = pick_entry(vec![a.clone(), c.clone()], None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("spiffe_id"), "{}", e.message());
        let w = SpiffeId::new("spiffe://example.org/c").unwrap();
        assert_eq!(pick_entry(vec![a.clone(), c], Some(&w)).unwrap().id, "c");
        let e = pick_entry(vec![a], Some(&w)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
