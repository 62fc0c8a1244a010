//! `sigil-server task list|end`: the operator's view of task-scoped
//! identities (`proto/sigil/task.proto`, `TaskAdminApi` on the admin
//! socket). `--output json` prints flat objects with RFC 3339 times
//! (`null` when there is none), like the governance commands.

use clap::Subcommand;
use sigil_proto::task::task_admin_api_client::TaskAdminApiClient;
use sigil_proto::task::{ListTasksRequest, TaskId};

use super::render::{self, print_task, task_json};
use super::{AdminArgs, CliError, OutputArgs, admin_channel, check_id};

/// `sigil-server task ...`.
#[derive(Subcommand)]
pub enum TaskCmd {
    /// List tasks, running and ended (newest first).
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only tasks whose own or whose entry's SPIFFE ID is this.
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// End a task now: its identity is killed (CRL, streams, JWT validation).
    End {
        #[command(flatten)]
        admin: AdminArgs,
        /// The task ID.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Runs `sigil-server task ...`.
pub async fn task(cmd: TaskCmd) -> Result<(), CliError> {
    match cmd {
        TaskCmd::List {
            admin,
            spiffe_id,
            out,
        } => {
            check_id("--spiffe-id", spiffe_id.as_ref())?;
            let v = TaskAdminApiClient::new(admin_channel(&admin).await?)
                .list_tasks(ListTasksRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tasks;
            render::many(
                &out,
                "",
                &v,
                |n| format!("Found {}", render::count(n, "task", "tasks")),
                task_json,
                print_task,
            )
        }
        TaskCmd::End { admin, id, out } => {
            let t = TaskAdminApiClient::new(admin_channel(&admin).await?)
                .end_task(TaskId { id })
                .await?
                .into_inner();
            render::one(
                &out,
                &t,
                "Task ended; its identity is killed.",
                task_json,
                print_task,
            )
        }
    }
}
