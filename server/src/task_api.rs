//! The server's two task services (`proto/sigil/task.proto`):
//! [`TaskAgentService`] on the agent API listener, behind the same
//! [`crate::agent_api::Gate`] as the agent API (every call authenticated by
//! the agent's X.509-SVID), and [`TaskAdminService`] on the admin socket
//! (the admin API's caller check). The rules are in
//! [`crate::state::ServerState::start_task`] and its neighbours
//! (`state/tasks.rs`); this is the wire edge.

use std::sync::Arc;

use sigil_core::SpiffeId;
use sigil_core::ids::parse_spiffe_id;
use sigil_proto::task::task_admin_api_server::{TaskAdminApi, TaskAdminApiServer};
use sigil_proto::task::task_agent_api_server::{TaskAgentApi, TaskAgentApiServer};
use sigil_proto::task::{
    AgentMintTaskSvidRequest, AgentStartTaskRequest, AgentTaskSvid, ListTasksRequest,
    ListTasksResponse, Task, TaskId,
};
use tonic::{Request, Response, Status};

use crate::admin_api::AdminService;
use crate::agent_api::Authenticated;
use crate::blocking;
use crate::datastore::TaskRecord;
use crate::state::{ServerState, TaskQuery, TaskSvid, end_reason};

/// A task's wire form.
pub fn task_to_proto(t: &TaskRecord) -> Task {
    Task {
        id: t.id.clone(),
        name: t.name.clone(),
        entry_id: t.entry_id.clone(),
        entry_spiffe_id: t.entry_spiffe_id.to_string(),
        agent_id: t.agent_id.to_string(),
        spiffe_id: t.spiffe_id.to_string(),
        started_at: t.started_at,
        deadline: t.deadline,
        ended_at: t.ended_at.unwrap_or(0),
        end_reason: t.end_reason.clone(),
        started_by: t.started_by.clone(),
        ended_by: t.ended_by.clone(),
        kill_id: t.kill_id.clone(),
        owner: t.owner.clone(),
    }
}

fn svid_to_proto(s: TaskSvid) -> AgentTaskSvid {
    AgentTaskSvid {
        task: Some(task_to_proto(&s.task)),
        svid_chain: s.chain,
        jwt_svid: s.jwt.unwrap_or_default(),
    }
}

/// Checks requested audiences: none (no JWT-SVID), or within the JWT-SVID
/// bounds.
fn check_audience(a: &[String]) -> Result<(), Status> {
    if a.is_empty() {
        return Ok(());
    }
    sigil_core::jwt::check_audiences(a)
        .map_err(|e| Status::invalid_argument(format!("invalid field `audience`: {e}")))
}

/// `TaskAgentApi`: served to agents.
pub struct TaskAgentService {
    state: Arc<ServerState>,
}

impl TaskAgentService {
    pub fn new(state: Arc<ServerState>) -> TaskAgentApiServer<Self> {
        TaskAgentApiServer::new(Self { state })
            .max_decoding_message_size(crate::limits::MAX_MESSAGE)
    }
}

fn agent_of<T>(req: &Request<T>) -> Result<SpiffeId, Status> {
    req.extensions()
        .get::<Authenticated>()
        .map(|a| a.id.clone())
        .ok_or_else(|| Status::unauthenticated("an agent X.509-SVID (mTLS) is required"))
}

#[tonic::async_trait]
impl TaskAgentApi for TaskAgentService {
    async fn start_task(
        &self,
        req: Request<AgentStartTaskRequest>,
    ) -> Result<Response<AgentTaskSvid>, Status> {
        let agent = agent_of(&req)?;
        let r = req.into_inner();
        check_audience(&r.audience)?;
        let state = self.state.clone();
        let s = blocking(move || {
            state.start_task(
                &agent,
                &r.entry_id,
                &r.task_name,
                r.ttl_seconds,
                &r.csr,
                &r.audience,
            )
        })
        .await?;
        Ok(Response::new(svid_to_proto(s)))
    }

    async fn mint_task_svid(
        &self,
        req: Request<AgentMintTaskSvidRequest>,
    ) -> Result<Response<AgentTaskSvid>, Status> {
        let agent = agent_of(&req)?;
        let r = req.into_inner();
        check_audience(&r.audience)?;
        let state = self.state.clone();
        let s =
            blocking(move || state.mint_task_svid(&agent, &r.task_id, &r.csr, &r.audience)).await?;
        Ok(Response::new(svid_to_proto(s)))
    }

    async fn get_task(&self, req: Request<TaskId>) -> Result<Response<Task>, Status> {
        let agent = agent_of(&req)?;
        let id = req.into_inner().id;
        let state = self.state.clone();
        let t = blocking(move || state.task_for_agent(&agent, &id)).await?;
        Ok(Response::new(task_to_proto(&t)))
    }

    async fn end_task(&self, req: Request<TaskId>) -> Result<Response<Task>, Status> {
        let agent = agent_of(&req)?;
        let id = req.into_inner().id;
        let state = self.state.clone();
        let t = blocking(move || state.end_task_for_agent(&agent, &id)).await?;
        Ok(Response::new(task_to_proto(&t)))
    }
}

/// `TaskAdminApi`: served on the admin socket.
pub struct TaskAdminService {
    state: Arc<ServerState>,
    admin: AdminService,
}

impl TaskAdminService {
    pub fn new(state: Arc<ServerState>) -> TaskAdminApiServer<Self> {
        TaskAdminApiServer::new(Self {
            admin: AdminService::new(state.clone()),
            state,
        })
    }
}

#[tonic::async_trait]
impl TaskAdminApi for TaskAdminService {
    async fn list_tasks(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        self.admin.authorize(&req)?;
        let r = req.into_inner();
        let spiffe_id =
            if r.spiffe_id.is_empty() {
                None
            } else {
                Some(parse_spiffe_id(&r.spiffe_id).map_err(|e| {
                    Status::invalid_argument(format!("invalid field `spiffe_id`: {e}"))
                })?)
            };
        let state = self.state.clone();
        let tasks = blocking(move || state.list_tasks(&TaskQuery { spiffe_id })).await?;
        Ok(Response::new(ListTasksResponse {
            tasks: tasks.iter().map(task_to_proto).collect(),
        }))
    }

    async fn end_task(&self, req: Request<TaskId>) -> Result<Response<Task>, Status> {
        let caller = self.admin.authorize(&req)?;
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("invalid field `id`: required"));
        }
        let state = self.state.clone();
        let t = blocking(move || state.end_task(&caller, &id, end_reason::OPERATOR)).await?;
        Ok(Response::new(task_to_proto(&t)))
    }
}
