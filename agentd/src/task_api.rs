//! The task service on the Workload API socket (`proto/sigil/task.proto`,
//! `TaskApi`): a workload starts a task and gets a short-lived identity of
//! its own for it, `<entry SPIFFE ID>/task/<task ID>`.
//!
//! Every call passes the Workload API's checks first (the security header,
//! then the caller attested by the same [`AttestorSet`], see
//! [`attest_caller`]). A task belongs to the entry it was started under:
//! only a process whose selectors satisfy that entry's — and that the
//! agent may serve (synced, not offline, not waiting for approval) — may
//! fetch, renew or end it; any other process gets PermissionDenied. The
//! server decides everything else (`TaskAgentApi`: the entry allows tasks,
//! the agent is its parent, the task is running and within its deadline)
//! and records it; the agent keeps no task state but a bounded map of task
//! ID to entry ID (a task's entry never changes), falling back to the
//! server's `GetTask`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sigil_attestors::workload::AttestorSet;
use sigil_core::entry::Entry;
use sigil_core::ids::parse_spiffe_id;
use sigil_core::selector::SelectorSet;
use sigil_core::x509::new_key_and_csr;
use sigil_proto::task::task_agent_api_client::TaskAgentApiClient;
use sigil_proto::task::task_api_server::{TaskApi as TaskApiService, TaskApiServer};
use sigil_proto::task::{
    AgentMintTaskSvidRequest, AgentStartTaskRequest, AgentTaskSvid, EndTaskRequest,
    FetchTaskSvidRequest, StartTaskRequest, Task, TaskId, TaskSvid,
};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::cache::Snapshot;
use crate::workload_api::attest_caller;

/// Longest task name, in bytes (the server's bound too).
const MAX_TASK_NAME: usize = 128;

/// Most task-to-entry mappings remembered; past it the map starts afresh
/// (a forgotten task is looked up on the server again).
const MAX_KNOWN_TASKS: usize = 10_000;

/// The task service.
pub struct TaskApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    server: watch::Receiver<Channel>,
    attestors: Arc<AttestorSet>,
    /// Task ID -> entry ID, for tasks seen here.
    known: Mutex<HashMap<String, String>>,
}

impl TaskApi {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        server: watch::Receiver<Channel>,
        attestors: Arc<AttestorSet>,
    ) -> TaskApiServer<Self> {
        TaskApiServer::new(Self {
            snapshots,
            server,
            attestors,
            known: Mutex::new(HashMap::new()),
        })
        .max_decoding_message_size(crate::workload_socket::MAX_MESSAGE)
    }

    fn client(&self) -> TaskAgentApiClient<Channel> {
        TaskAgentApiClient::new(self.server.borrow().clone())
    }

    fn remember(&self, task_id: &str, entry_id: &str) {
        if let Ok(mut m) = self.known.lock() {
            if m.len() >= MAX_KNOWN_TASKS {
                m.clear();
            }
            m.insert(task_id.to_string(), entry_id.to_string());
        }
    }

    /// The entry of task `id`: remembered, or from the server (which
    /// answers only for tasks under this agent's entries).
    async fn entry_of(&self, id: &str) -> Result<String, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "invalid field `task_id`: required",
            ));
        }
        if let Some(e) = self.known.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(e);
        }
        let t = self
            .client()
            .get_task(TaskId { id: id.to_string() })
            .await
            .map_err(relay)?
            .into_inner();
        self.remember(&t.id, &t.entry_id);
        Ok(t.entry_id)
    }

    /// Refuses a caller that may not use a task of `entry_id`.
    fn check_owner(
        &self,
        selectors: &SelectorSet,
        task_id: &str,
        entry_id: &str,
    ) -> Result<Arc<Snapshot>, Status> {
        let snap = self.snapshots.borrow().clone();
        let (servable, _) = snap.servable(selectors);
        if servable.iter().any(|e| e.id == entry_id) {
            Ok(snap)
        } else {
            Err(Status::permission_denied(format!(
                "task {task_id} belongs to an entry this process does not attest to"
            )))
        }
    }

    /// The workload's answer: the server's SVIDs with the key and the
    /// trust material.
    fn answer(snap: &Snapshot, key: Vec<u8>, s: AgentTaskSvid) -> TaskSvid {
        TaskSvid {
            task: s.task,
            x509_svid: s.svid_chain.concat(),
            x509_svid_key: key,
            bundle: snap.bundle.concat.to_vec(),
            jwt_svid: s.jwt_svid,
            crl: snap.trust.crl.iter().map(|c| c.to_vec()).collect(),
        }
    }
}

/// The server's refusal as the workload sees it: the caller's own mistakes
/// and refusals keep their code; anything else is the server being
/// unreachable or failing (retry).
fn relay(s: Status) -> Status {
    match s.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::PermissionDenied
        | Code::FailedPrecondition => Status::new(s.code(), s.message().to_string()),
        _ => Status::unavailable(format!("the server did not answer: {}", s.message())),
    }
}

fn key_and_csr() -> Result<(Vec<u8>, Vec<u8>), Status> {
    new_key_and_csr().map_err(|e| Status::internal(e.to_string()))
}

/// Picks the entry a new task runs under: the one named, or the only one
/// of the caller's servable entries that allows tasks.
fn pick_entry<'a>(
    snap: &'a Snapshot,
    selectors: &SelectorSet,
    named: &str,
) -> Result<&'a Arc<Entry>, Status> {
    if snap.offline {
        return Err(Status::unavailable(
            "this agent has had no contact with the server for longer than serve_offline_for",
        ));
    }
    if !snap.synced {
        return Err(Status::unavailable("the agent has not synced yet; retry"));
    }
    let (servable, pending) = snap.servable(selectors);
    if !named.is_empty() {
        let id = parse_spiffe_id(named).map_err(|e| {
            Status::invalid_argument(format!("invalid field `entry_spiffe_id`: {e}"))
        })?;
        let Some(e) = servable.into_iter().find(|e| e.spiffe_id == id) else {
            return Err(Status::permission_denied(format!(
                "invalid field `entry_spiffe_id`: this process has no identity {id}"
            )));
        };
        if e.task_ttl_max.is_none() {
            return Err(Status::failed_precondition(format!(
                "invalid entry field `task_ttl_max`: entry {} ({}) allows no tasks (it was created without --task-ttl-max)",
                e.id, e.spiffe_id
            )));
        }
        return Ok(e);
    }
    if servable.is_empty() {
        return Err(Status::permission_denied(if pending.is_empty() {
            "no identity issued".to_string()
        } else {
            pending.join("; ")
        }));
    }
    let tasks: Vec<&Arc<Entry>> = servable
        .iter()
        .copied()
        .filter(|e| e.task_ttl_max.is_some())
        .collect();
    match tasks.as_slice() {
        [] => Err(Status::failed_precondition(format!(
            "invalid entry field `task_ttl_max`: no entry of this process allows tasks ({} created without --task-ttl-max)",
            servable
                .iter()
                .map(|e| e.spiffe_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        [one] => Ok(one),
        many => Err(Status::invalid_argument(format!(
            "invalid field `entry_spiffe_id`: this process has {} identities that allow tasks ({}): name one",
            many.len(),
            many.iter()
                .map(|e| e.spiffe_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[tonic::async_trait]
impl TaskApiService for TaskApi {
    async fn start_task(
        &self,
        req: Request<StartTaskRequest>,
    ) -> Result<Response<TaskSvid>, Status> {
        let caller = attest_caller(&self.attestors, &req).await?;
        let r = req.into_inner();
        if r.task_name.trim().is_empty() {
            return Err(Status::invalid_argument(
                "invalid field `task_name`: required (say what the task is)",
            ));
        }
        if r.task_name.len() > MAX_TASK_NAME {
            return Err(Status::invalid_argument(format!(
                "invalid field `task_name`: {} bytes exceed the maximum of {MAX_TASK_NAME}",
                r.task_name.len()
            )));
        }
        if r.ttl_seconds <= 0 {
            return Err(Status::invalid_argument(
                "invalid field `ttl`: must be at least 1 second",
            ));
        }
        if !r.audience.is_empty() {
            sigil_core::jwt::check_audiences(&r.audience)
                .map_err(|e| Status::invalid_argument(format!("invalid field `audience`: {e}")))?;
        }
        let snap = self.snapshots.borrow().clone();
        let entry_id = pick_entry(&snap, &caller.selectors, &r.entry_spiffe_id)?
            .id
            .clone();
        let (csr, key) = key_and_csr()?;
        let s = self
            .client()
            .start_task(AgentStartTaskRequest {
                entry_id: entry_id.clone(),
                task_name: r.task_name,
                ttl_seconds: r.ttl_seconds,
                csr,
                audience: r.audience,
            })
            .await
            .map_err(relay)?
            .into_inner();
        if let Some(t) = &s.task {
            self.remember(&t.id, &entry_id);
            tracing::info!(pid = caller.peer.pid, task = %t.id, spiffe_id = %t.spiffe_id, "task started");
        }
        Ok(Response::new(Self::answer(&snap, key, s)))
    }

    async fn fetch_task_svid(
        &self,
        req: Request<FetchTaskSvidRequest>,
    ) -> Result<Response<TaskSvid>, Status> {
        let caller = attest_caller(&self.attestors, &req).await?;
        let r = req.into_inner();
        if !r.audience.is_empty() {
            sigil_core::jwt::check_audiences(&r.audience)
                .map_err(|e| Status::invalid_argument(format!("invalid field `audience`: {e}")))?;
        }
        let entry_id = self.entry_of(&r.task_id).await?;
        let snap = self.check_owner(&caller.selectors, &r.task_id, &entry_id)?;
        let (csr, key) = key_and_csr()?;
        let s = self
            .client()
            .mint_task_svid(AgentMintTaskSvidRequest {
                task_id: r.task_id,
                csr,
                audience: r.audience,
            })
            .await
            .map_err(relay)?
            .into_inner();
        Ok(Response::new(Self::answer(&snap, key, s)))
    }

    async fn end_task(&self, req: Request<EndTaskRequest>) -> Result<Response<Task>, Status> {
        let caller = attest_caller(&self.attestors, &req).await?;
        let id = req.into_inner().task_id;
        let entry_id = self.entry_of(&id).await?;
        self.check_owner(&caller.selectors, &id, &entry_id)?;
        let t = self
            .client()
            .end_task(TaskId { id: id.clone() })
            .await
            .map_err(relay)?
            .into_inner();
        tracing::info!(pid = caller.peer.pid, task = %id, "task ended");
        Ok(Response::new(t))
    }
}
