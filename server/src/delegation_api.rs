//! `sigil.delegation.DelegationAgentApi`: the agent -> server leg of token
//! exchange, served on the agent API listener next to `AgentApi` (so the
//! same [`crate::agent_api::Gate`] authenticates the agent by its
//! X.509-SVID before the body is read). The work is
//! [`ServerState::exchange_token`]; this service holds the trusted issuers
//! and their keys, and maps errors to gRPC status.

use std::sync::Arc;

use sigil_proto::delegation::delegation_agent_api_server::{
    DelegationAgentApi, DelegationAgentApiServer,
};
use sigil_proto::delegation::{AgentExchangeRequest, ExchangeTokenResponse};
use tonic::{Request, Response, Status};

use crate::agent_api::Authenticated;
use crate::state::{Delegation, ExchangeRequest, ServerState};
use crate::trusted_issuer::TrustedIssuer;

/// The service.
pub struct DelegationService {
    state: Arc<ServerState>,
    issuers: Arc<Vec<Arc<TrustedIssuer>>>,
}

impl DelegationService {
    /// The service over `issuers` (loaded by [`load_issuers`]).
    pub fn new(
        state: Arc<ServerState>,
        issuers: Vec<Arc<TrustedIssuer>>,
    ) -> DelegationAgentApiServer<Self> {
        DelegationAgentApiServer::new(Self {
            state,
            issuers: Arc::new(issuers),
        })
        .max_decoding_message_size(crate::limits::MAX_MESSAGE)
    }
}

/// The trusted issuers of the configuration with their keys: JWKS files
/// are read now (an unreadable or invalid file is an error naming it), and
/// a refresh task is started for every JWKS URL.
pub fn load_issuers(
    state: &ServerState,
) -> Result<Vec<Arc<TrustedIssuer>>, crate::error::StartupError> {
    let mut out = Vec::new();
    for cfg in &state.cfg.delegation.trusted_issuers {
        let t = Arc::new(TrustedIssuer::new(cfg.clone()));
        t.load_file().map_err(|e| crate::error::StartupError::Key {
            key: "trusted_issuer.jwks_file",
            reason: format!("issuer {}: {e}", cfg.issuer),
        })?;
        if matches!(cfg.jwks, crate::trusted_issuer::JwksSource::Url { .. }) {
            tokio::spawn(crate::trusted_issuer::jwks_refresh_loop(t.clone()));
        }
        out.push(t);
    }
    Ok(out)
}

#[tonic::async_trait]
impl DelegationAgentApi for DelegationService {
    async fn exchange_token(
        &self,
        req: Request<AgentExchangeRequest>,
    ) -> Result<Response<ExchangeTokenResponse>, Status> {
        let agent = req
            .extensions()
            .get::<Authenticated>()
            .map(|a| a.id.clone())
            .ok_or_else(|| Status::unauthenticated("an agent X.509-SVID (mTLS) is required"))?;
        let r = req.into_inner();
        let x = ExchangeRequest {
            entry_id: r.entry_id,
            subject_token: r.subject_token,
            subject_token_type: r.subject_token_type,
            audience: r.audience,
            scope: r.scope,
        };
        let state = self.state.clone();
        let issuers = self.issuers.clone();
        let out = crate::blocking(move || {
            let d = Delegation {
                issuers: &issuers,
                max_depth: state.cfg.delegation.max_delegation_depth,
            };
            state.exchange_token(&agent, &x, &d)
        })
        .await?;
        let now = sigil_core::now_unix();
        Ok(Response::new(ExchangeTokenResponse {
            access_token: out.token,
            issued_token_type: crate::state::TOKEN_TYPE_JWT.into(),
            token_type: "N_A".into(),
            expires_in: (out.expires_at - now).max(0),
            scope: out.scope.join(" "),
            spiffe_id: out.spiffe_id.to_string(),
            jti: out.jti,
        }))
    }
}
