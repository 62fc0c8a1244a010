//! `sigil-server task list|end`: the operator's view of task-scoped
//! identities (`proto/sigil/task.proto`, `TaskAdminApi` on the admin
//! socket). `--output json` prints flat objects with RFC 3339 times
//! (`null` when there is none), like the governance commands.

use clap::Subcommand;
use serde_json::{Value, json};
use sigil_core::ids::parse_spiffe_id;
use sigil_core::rfc3339;
use sigil_proto::task::task_admin_api_client::TaskAdminApiClient;
use sigil_proto::task::{ListTasksRequest, Task, TaskId};

use crate::cli::{AdminArgs, Output, OutputArgs, admin_channel, print_json, status};

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

fn time_or_null(t: i64) -> Value {
    if t == 0 {
        Value::Null
    } else {
        json!(rfc3339(t))
    }
}

/// `running` or `ended`.
fn state(t: &Task) -> &'static str {
    if t.ended_at == 0 { "running" } else { "ended" }
}

fn task_json(t: &Task) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "state": state(t),
        "spiffe_id": t.spiffe_id,
        "entry_id": t.entry_id,
        "entry_spiffe_id": t.entry_spiffe_id,
        "owner": t.owner,
        "agent_id": t.agent_id,
        "started_at": time_or_null(t.started_at),
        "deadline": time_or_null(t.deadline),
        "ended_at": time_or_null(t.ended_at),
        "end_reason": if t.end_reason.is_empty() { Value::Null } else { json!(t.end_reason) },
        "started_by": t.started_by,
        "ended_by": if t.ended_by.is_empty() { Value::Null } else { json!(t.ended_by) },
        "kill_id": if t.kill_id.is_empty() { Value::Null } else { json!(t.kill_id) },
    })
}

fn print_task(t: &Task) {
    println!("Task ID          : {}", t.id);
    println!("Name             : {}", t.name);
    println!("State            : {}", state(t));
    println!("SPIFFE ID        : {}", t.spiffe_id);
    println!("Entry            : {} ({})", t.entry_id, t.entry_spiffe_id);
    if !t.owner.is_empty() {
        println!("Owner            : {}", t.owner);
    }
    println!("Agent            : {}", t.agent_id);
    println!("Started at       : {}", rfc3339(t.started_at));
    println!("Deadline         : {}", rfc3339(t.deadline));
    if t.ended_at != 0 {
        println!(
            "Ended at         : {} ({})",
            rfc3339(t.ended_at),
            t.end_reason
        );
        println!("Ended by         : {}", t.ended_by);
    }
    if !t.kill_id.is_empty() {
        println!("Kill             : {}", t.kill_id);
    }
    println!();
}

pub async fn task(cmd: TaskCmd) -> Result<(), String> {
    match cmd {
        TaskCmd::List {
            admin,
            spiffe_id,
            out,
        } => {
            if let Some(id) = &spiffe_id {
                parse_spiffe_id(id).map_err(|e| format!("--spiffe-id: {e}"))?;
            }
            let v = TaskAdminApiClient::new(admin_channel(&admin).await?)
                .list_tasks(ListTasksRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .tasks;
            if out.output == Output::Json {
                return print_json(&Value::Array(v.iter().map(task_json).collect()));
            }
            println!(
                "Found {} task{}\n",
                v.len(),
                if v.len() == 1 { "" } else { "s" }
            );
            v.iter().for_each(print_task);
        }
        TaskCmd::End { admin, id, out } => {
            let t = TaskAdminApiClient::new(admin_channel(&admin).await?)
                .end_task(TaskId { id })
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(&task_json(&t));
            }
            println!("Task ended; its identity is killed.\n");
            print_task(&t);
        }
    }
    Ok(())
}
