//! The admin API on the server's Unix socket. Only root and the server's own
//! uid may call it (checked from the socket's peer credentials on every call).

use std::sync::Arc;
use std::time::Duration;

use sigil_proto::admin::admin_api_server::AdminApi;
use sigil_proto::admin::{
    Agent, AgentId, Bundle, DeleteResponse, EntryId, GenerateTokenRequest, GenerateTokenResponse,
    GetBundleRequest, HealthRequest, HealthResponse, ListAgentsRequest, ListAgentsResponse,
    ListEntriesRequest, ListEntriesResponse, UpdateEntryRequest,
};
use sigil_proto::admin::{
    ClusterServerHealth, DatastoreHealth, ListFederatedBundlesRequest,
    ListFederatedBundlesResponse, SetFederatedBundleRequest, SigningStats, TrustDomainId,
};
use sigil_proto::common::Entry as PbEntry;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::blocking;
use crate::datastore::{ApprovalRecord, ApprovalStatus, KillRecord, KillTarget};
use crate::state::{Caller, EntryField, ReviewQuery, ServerState};
use sigil_proto::admin::kill_target::Target;
use sigil_proto::admin::{
    AgentReviewRow, Approval, ApprovalId, EntryReviewRow, GrantApprovalRequest,
    ListApprovalsRequest, ListApprovalsResponse, ReviewAgentsResponse, ReviewEntriesResponse,
    ReviewRequest,
};
use sigil_proto::admin::{
    BatchCreateEntriesRequest, BatchCreateEntriesResponse, BatchEntryResult, ExportAuditRequest,
    ExportAuditResponse,
};
use sigil_proto::admin::{
    CreateKillRequest, Kill, KillId, KillTarget as PbKillTarget, ListKillsRequest,
    ListKillsResponse,
};
use sigil_proto::admin::{
    GetAuditKeyRequest, GetAuditKeyResponse, QueryAuditRequest, QueryAuditResponse,
};

/// Most audit records in one export page.
const MAX_AUDIT_PAGE: u32 = 10_000;

/// Longest join token lifetime.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

pub struct AdminService {
    state: Arc<ServerState>,
    own_uid: u32,
}

impl AdminService {
    pub fn new(state: Arc<ServerState>) -> Self {
        Self {
            state,
            own_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Admits root and the server's own uid; returns the caller, by its
    /// peer credentials, for the audit trail.
    pub(crate) fn authorize<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .ok_or_else(|| {
                Status::permission_denied("admin socket peer credentials unavailable")
            })?;
        let uid = cred.uid();
        if uid == 0 || uid == self.own_uid {
            Ok(Caller::admin(uid, cred.gid(), cred.pid()))
        } else {
            Err(Status::permission_denied(format!(
                "uid {uid} may not use the admin API"
            )))
        }
    }
}

impl AdminService {
    /// An agent's wire form, with when it was last seen.
    fn agent_proto(&self, a: &crate::datastore::AgentRecord) -> Agent {
        let mut p = a.to_proto();
        p.last_seen_at = self
            .state
            .agent_last_seen(&a.spiffe_id.to_string())
            .unwrap_or(0);
        p
    }
}

/// A review period from the wire (seconds; 0 flags everything the period
/// applies to); errors name the field.
fn review_period(field: &str, secs: i64) -> Result<Duration, Status> {
    if secs < 0 {
        return Err(Status::invalid_argument(format!(
            "invalid field `{field}`: must not be negative"
        )));
    }
    Ok(Duration::from_secs(secs.unsigned_abs()))
}

/// The wire form of an approval request; a grant that has ended shows as
/// `expired`.
fn approval_to_proto(a: &ApprovalRecord) -> Approval {
    let status = if a.status == ApprovalStatus::Granted && !a.grants_at(sigil_core::now_unix()) {
        "expired"
    } else {
        a.status.as_str()
    };
    Approval {
        id: a.id.clone(),
        entry_id: a.entry_id.clone(),
        spiffe_id: a.spiffe_id.to_string(),
        agent_id: a.agent_id.to_string(),
        status: status.into(),
        requested_at: a.requested_at,
        decided_at: a.decided_at,
        decided_by: a.decided_by.clone(),
        expires_at: a.expires_at,
    }
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn review_entries(
        &self,
        req: Request<ReviewRequest>,
    ) -> Result<Response<ReviewEntriesResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let q = ReviewQuery {
            unused_for: review_period("unused_for", r.unused_for)?,
            expiring_within: review_period("expiring_within", r.expiring_within)?,
        };
        let state = self.state.clone();
        let rows = blocking(move || state.review_entries(&q)).await?;
        Ok(Response::new(ReviewEntriesResponse {
            rows: rows
                .into_iter()
                .map(|r| EntryReviewRow {
                    entry: Some(r.entry.to_proto()),
                    reasons: r.reasons.iter().map(|s| s.to_string()).collect(),
                    last_used_at: r.last_used_at.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn review_agents(
        &self,
        req: Request<ReviewRequest>,
    ) -> Result<Response<ReviewAgentsResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let q = ReviewQuery {
            unused_for: review_period("unused_for", r.unused_for)?,
            expiring_within: Duration::ZERO,
        };
        let state = self.state.clone();
        let rows = blocking(move || state.review_agents(&q)).await?;
        Ok(Response::new(ReviewAgentsResponse {
            rows: rows
                .into_iter()
                .map(|r| AgentReviewRow {
                    agent: Some(self.agent_proto(&r.agent)),
                    reasons: r.reasons.iter().map(|s| s.to_string()).collect(),
                    last_seen_at: r.last_seen_at.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn list_approvals(
        &self,
        req: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        self.authorize(&req)?;
        let state = self.state.clone();
        let v = blocking(move || state.list_approvals()).await?;
        Ok(Response::new(ListApprovalsResponse {
            approvals: v.iter().map(approval_to_proto).collect(),
        }))
    }

    async fn grant_approval(
        &self,
        req: Request<GrantApprovalRequest>,
    ) -> Result<Response<Approval>, Status> {
        let caller = self.authorize(&req)?;
        let r = req.into_inner();
        if r.duration <= 0 {
            return Err(Status::invalid_argument(
                "invalid field `for`: must be positive",
            ));
        }
        let d = Duration::from_secs(r.duration.unsigned_abs());
        let state = self.state.clone();
        let a = blocking(move || state.grant_approval(&caller, &r.id, d)).await?;
        Ok(Response::new(approval_to_proto(&a)))
    }

    async fn deny_approval(&self, req: Request<ApprovalId>) -> Result<Response<Approval>, Status> {
        let caller = self.authorize(&req)?;
        let id = req.into_inner().id;
        let state = self.state.clone();
        let a = blocking(move || state.deny_approval(&caller, &id)).await?;
        Ok(Response::new(approval_to_proto(&a)))
    }

    async fn health(
        &self,
        req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.authorize(&req)?;
        let state = self.state.clone();
        // An unreachable datastore is reported, not an error: the answer
        // says what is wrong.
        let (entries, agents, ds) = blocking(move || {
            let ds = state.datastore_health();
            let agents = if ds.error.is_none() {
                state.agent_count().unwrap_or(0)
            } else {
                0
            };
            Ok::<_, crate::error::RegistryError>((state.entry_count()?, agents, ds))
        })
        .await?;
        let s = self.state.signing.stats();
        Ok(Response::new(HealthResponse {
            trust_domain: self.state.trust_domain().to_string(),
            entries: entries as u64,
            agents: agents as u64,
            signing: Some(SigningStats {
                free_slots: s.free_slots,
                waiting_calls: s.waiting_calls,
                waiting_csrs: s.waiting_csrs,
                peak_calls: s.peak_calls,
                peak_csrs: s.peak_csrs,
                svids_signed: s.signed,
            }),
            datastore: Some(datastore_health_pb(ds)),
            cluster_servers: self
                .state
                .cluster_servers()
                .into_iter()
                .map(|c| ClusterServerHealth {
                    server_id: c.server_id,
                    this: c.this,
                    x509_authorities: u32::try_from(c.x509_authorities).unwrap_or(u32::MAX),
                    jwt_authorities: u32::try_from(c.jwt_authorities).unwrap_or(u32::MAX),
                    published_at: c.published_at,
                })
                .collect(),
        }))
    }

    async fn create_entry(&self, req: Request<PbEntry>) -> Result<Response<PbEntry>, Status> {
        let caller = self.authorize(&req)?;
        let state = self.state.clone();
        let pb = req.into_inner();
        let e = blocking(move || state.create_entry(&caller, pb)).await?;
        Ok(Response::new(e.to_proto()))
    }

    async fn batch_create_entries(
        &self,
        req: Request<BatchCreateEntriesRequest>,
    ) -> Result<Response<BatchCreateEntriesResponse>, Status> {
        let caller = self.authorize(&req)?;
        let state = self.state.clone();
        let entries = req.into_inner().entries;
        let results = blocking(move || state.create_entries(&caller, entries)).await?;
        Ok(Response::new(BatchCreateEntriesResponse {
            results: results
                .into_iter()
                .map(|r| match r {
                    Ok(e) => BatchEntryResult {
                        entry: Some(e.to_proto()),
                        code: 0,
                        error: String::new(),
                    },
                    Err(err) => {
                        let status = Status::from(err);
                        BatchEntryResult {
                            entry: None,
                            code: status.code() as i32,
                            error: status.message().to_string(),
                        }
                    }
                })
                .collect(),
        }))
    }

    async fn update_entry(
        &self,
        req: Request<UpdateEntryRequest>,
    ) -> Result<Response<PbEntry>, Status> {
        let caller = self.authorize(&req)?;
        let state = self.state.clone();
        let r = req.into_inner();
        let pb = r
            .entry
            .ok_or_else(|| Status::invalid_argument("invalid field `entry`: missing"))?;
        let mask = EntryField::parse_mask(&r.set_fields)?;
        let e = blocking(move || state.update_entry(&caller, pb, &mask)).await?;
        Ok(Response::new(e.to_proto()))
    }

    async fn get_entry(&self, req: Request<EntryId>) -> Result<Response<PbEntry>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(
            self.state.get_entry(&req.into_inner().id)?.to_proto(),
        ))
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        self.authorize(&req)?;
        let f = req.into_inner();
        let entries = self
            .state
            .list_entries()?
            .into_iter()
            .filter(|e| f.by_spiffe_id.is_empty() || e.spiffe_id.to_string() == f.by_spiffe_id)
            .filter(|e| f.by_parent_id.is_empty() || e.parent_id.to_string() == f.by_parent_id)
            .map(|e| e.to_proto())
            .collect();
        Ok(Response::new(ListEntriesResponse { entries }))
    }

    async fn delete_entry(
        &self,
        req: Request<EntryId>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let caller = self.authorize(&req)?;
        let state = self.state.clone();
        let id = req.into_inner().id;
        blocking(move || state.delete_entry(&caller, &id)).await?;
        Ok(Response::new(DeleteResponse {}))
    }

    async fn generate_token(
        &self,
        req: Request<GenerateTokenRequest>,
    ) -> Result<Response<GenerateTokenResponse>, Status> {
        let caller = self.authorize(&req)?;
        let r = req.into_inner();
        let id =
            if r.spiffe_id.is_empty() {
                None
            } else {
                Some(sigil_core::ids::parse_spiffe_id(&r.spiffe_id).map_err(|e| {
                    Status::invalid_argument(format!("invalid field `spiffe_id`: {e}"))
                })?)
            };
        if r.ttl_seconds <= 0 {
            return Err(Status::invalid_argument(
                "invalid field `ttl`: must be positive",
            ));
        }
        let ttl = Duration::from_secs(r.ttl_seconds as u64);
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(
                "invalid field `ttl`: at most 7 days",
            ));
        }
        let state = self.state.clone();
        let id2 = id.clone();
        let (token, expires_at) = blocking(move || state.generate_token(&caller, id2, ttl)).await?;
        Ok(Response::new(GenerateTokenResponse {
            token,
            spiffe_id: id.map(|i| i.to_string()).unwrap_or_default(),
            expires_at,
        }))
    }

    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(ListAgentsResponse {
            agents: self
                .state
                .list_agents()?
                .iter()
                .map(|a| self.agent_proto(a))
                .collect(),
        }))
    }

    async fn get_agent(&self, req: Request<AgentId>) -> Result<Response<Agent>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(self.agent_proto(
            &self.state.get_agent(&req.into_inner().spiffe_id)?,
        )))
    }

    async fn evict_agent(&self, req: Request<AgentId>) -> Result<Response<DeleteResponse>, Status> {
        let caller = self.authorize(&req)?;
        let id = req.into_inner().spiffe_id;
        let state = self.state.clone();
        blocking(move || state.evict_agent(&caller, &id)).await?;
        Ok(Response::new(DeleteResponse {}))
    }

    async fn ban_agent(&self, req: Request<AgentId>) -> Result<Response<Agent>, Status> {
        let caller = self.authorize(&req)?;
        let id = req.into_inner().spiffe_id;
        let state = self.state.clone();
        let a = blocking(move || state.ban_agent(&caller, &id)).await?;
        Ok(Response::new(a.to_proto()))
    }

    async fn get_bundle(&self, req: Request<GetBundleRequest>) -> Result<Response<Bundle>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(Bundle {
            trust_domain: self.state.trust_domain().to_string(),
            x509_authorities: self.state.bundle(),
            sequence: self.state.bundle_sequence(),
            jwt_bundle: self.state.jwt_bundle(),
            wit_bundle: self.state.wit_bundle(),
        }))
    }

    async fn set_federated_bundle(
        &self,
        req: Request<SetFederatedBundleRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let caller = self.authorize(&req)?;
        let r = req.into_inner();
        let td = parse_td(&r.trust_domain)?;
        let b = r
            .bundle
            .ok_or_else(|| Status::invalid_argument("invalid field `bundle`: missing"))?;
        // Every rule for a federated bundle is applied by the registry.
        let state = self.state.clone();
        blocking(move || state.set_federated_bundle(&caller, &td, b)).await?;
        Ok(Response::new(DeleteResponse {}))
    }

    async fn list_federated_bundles(
        &self,
        req: Request<ListFederatedBundlesRequest>,
    ) -> Result<Response<ListFederatedBundlesResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(ListFederatedBundlesResponse {
            bundles: self.state.federated_bundles().into_iter().collect(),
        }))
    }

    async fn create_kill(&self, req: Request<CreateKillRequest>) -> Result<Response<Kill>, Status> {
        let caller = self.authorize(&req)?;
        let r = req.into_inner();
        let target = target_from_proto(r.target)?;
        let state = self.state.clone();
        let k = blocking(move || state.create_kill(&caller, target, &r.reason)).await?;
        Ok(Response::new(kill_to_proto(&k)))
    }

    async fn list_kills(
        &self,
        req: Request<ListKillsRequest>,
    ) -> Result<Response<ListKillsResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(ListKillsResponse {
            kills: self.state.list_kills()?.iter().map(kill_to_proto).collect(),
        }))
    }

    async fn lift_kill(&self, req: Request<KillId>) -> Result<Response<Kill>, Status> {
        let caller = self.authorize(&req)?;
        let id = req.into_inner().id;
        let state = self.state.clone();
        let k = blocking(move || state.lift_kill(&caller, &id)).await?;
        Ok(Response::new(kill_to_proto(&k)))
    }

    async fn export_audit(
        &self,
        req: Request<ExportAuditRequest>,
    ) -> Result<Response<ExportAuditResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let limit = r.limit.clamp(1, MAX_AUDIT_PAGE) as usize;
        let state = self.state.clone();
        let records = blocking(move || state.audit_export_page(r.since, limit)).await?;
        Ok(Response::new(ExportAuditResponse {
            lines: records.iter().map(|r| r.to_jsonl_line()).collect(),
        }))
    }

    async fn get_audit_key(
        &self,
        req: Request<GetAuditKeyRequest>,
    ) -> Result<Response<GetAuditKeyResponse>, Status> {
        self.authorize(&req)?;
        let key = self
            .state
            .audit_public_key()
            .ok_or_else(|| Status::unavailable("the audit key is not loaded"))?;
        Ok(Response::new(GetAuditKeyResponse {
            public_key_pem: key.to_pem(),
            key_id: key.key_id(),
        }))
    }

    async fn query_audit(
        &self,
        req: Request<QueryAuditRequest>,
    ) -> Result<Response<QueryAuditResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let id = |field: &str, v: &str| -> Result<Option<sigil_core::SpiffeId>, Status> {
            if v.is_empty() {
                return Ok(None);
            }
            sigil_core::SpiffeId::new(v).map(Some).map_err(|e| {
                Status::invalid_argument(format!("invalid field `{field}`: {v:?}: {e}"))
            })
        };
        let q = crate::state::AuditQuery {
            spiffe_id: id("spiffe_id", &r.spiffe_id)?,
            agent_id: id("agent_id", &r.agent_id)?,
            serial: if r.serial.is_empty() {
                None
            } else {
                Some(crate::state::normalize_serial(&r.serial).map_err(Status::from)?)
            },
            jti: (!r.jti.is_empty()).then_some(r.jti),
            since_time: (r.since_time != 0).then_some(r.since_time),
        };
        let limit = r.limit.clamp(1, MAX_AUDIT_PAGE) as usize;
        let state = self.state.clone();
        let (records, truncated) = blocking(move || state.query_audit(&q, limit)).await?;
        Ok(Response::new(QueryAuditResponse {
            lines: records.iter().map(|r| r.to_jsonl_line()).collect(),
            truncated,
        }))
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<TrustDomainId>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let caller = self.authorize(&req)?;
        let td = parse_td(&req.into_inner().trust_domain)?;
        let state = self.state.clone();
        blocking(move || state.delete_federated_bundle(&caller, &td)).await?;
        Ok(Response::new(DeleteResponse {}))
    }
}

/// The wire form of a kill.
fn kill_to_proto(k: &KillRecord) -> Kill {
    Kill {
        id: k.id.clone(),
        target: Some(target_to_proto(&k.target)),
        reason: k.reason.clone(),
        caller: k.caller.clone(),
        created_at: k.created_at,
    }
}

fn target_to_proto(t: &KillTarget) -> PbKillTarget {
    let target = match t {
        KillTarget::SpiffeId(id) => Target::SpiffeId(id.to_string()),
        KillTarget::Entry(id) => Target::EntryId(id.clone()),
        KillTarget::Agent(id) => Target::AgentId(id.to_string()),
        KillTarget::Selector(s) => Target::Selector(s.to_string()),
    };
    PbKillTarget {
        target: Some(target),
    }
}

/// Validates a kill target from the wire; errors name the field.
fn target_from_proto(t: Option<PbKillTarget>) -> Result<KillTarget, Status> {
    let id = |field: &str, v: &str| {
        sigil_core::ids::parse_spiffe_id(v)
            .map_err(|e| Status::invalid_argument(format!("invalid field `{field}`: {v:?}: {e}")))
    };
    match t.and_then(|t| t.target) {
        None => Err(Status::invalid_argument(
            "invalid field `target`: exactly one of spiffe_id, entry, agent or selector is required",
        )),
        Some(Target::SpiffeId(v)) => Ok(KillTarget::SpiffeId(id("spiffe_id", &v)?)),
        Some(Target::AgentId(v)) => Ok(KillTarget::Agent(id("agent", &v)?)),
        Some(Target::EntryId(v)) if v.is_empty() => {
            Err(Status::invalid_argument("invalid field `entry`: empty"))
        }
        Some(Target::EntryId(v)) => Ok(KillTarget::Entry(v)),
        Some(Target::Selector(v)) => v
            .parse()
            .map(KillTarget::Selector)
            .map_err(|e| Status::invalid_argument(format!("invalid field `selector`: {e}"))),
    }
}

/// Accepts `example.org` or `spiffe://example.org`.
fn parse_td(s: &str) -> Result<sigil_core::TrustDomain, Status> {
    sigil_core::TrustDomain::new(s)
        .map_err(|e| Status::invalid_argument(format!("invalid field `id`: {s:?}: {e}")))
}

/// The health check's view of the datastore, as sent.
fn datastore_health_pb(d: crate::state::DatastoreHealth) -> DatastoreHealth {
    let (change_feed, events_seen, events_head) = match d.events {
        Some((seen, head)) => (true, seen, head),
        None => (false, 0, 0),
    };
    DatastoreHealth {
        kind: d.kind.into(),
        target: d.target,
        reachable: d.error.is_none(),
        error: d.error.unwrap_or_default(),
        schema_version: d.schema_version,
        change_feed,
        events_seen,
        events_head,
    }
}
