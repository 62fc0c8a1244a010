//! `sigil-agent api task start|fetch|end`: the task service
//! (`proto/sigil/task.proto`) on the Workload API socket, called as any
//! workload would call it. `start` and `fetch` print the task and its
//! SVID's validity and, with `--write DIR`, write `svid.pem`, `svid.key`,
//! `bundle.pem` (and `crl.pem`, `jwt.txt` when there are any) as
//! `api fetch x509 --write` does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use sigil_core::rfc3339;
use sigil_core::x509::{SvidInfo, certs_to_pem};
use sigil_proto::task::task_api_client::TaskApiClient;
use sigil_proto::task::{EndTaskRequest, FetchTaskSvidRequest, StartTaskRequest, Task, TaskSvid};

use crate::cli::{SocketArgs, grpc_err, socket_path, split_der, with_header, write_file};

/// Longest task lifetime the CLI asks for (the server caps it further).
const MAX_TASK_TTL: Duration = Duration::from_secs(30 * 86_400);

#[derive(Subcommand)]
pub enum TaskCmd {
    /// Start a task: prints its ID and SPIFFE ID.
    Start {
        #[command(flatten)]
        socket: SocketArgs,
        /// What the task is.
        #[arg(long)]
        name: String,
        /// How long it may run (e.g. 10m); capped at the entry's
        /// --task-ttl-max and X.509-SVID TTL.
        #[arg(long)]
        ttl: String,
        /// Also get a JWT-SVID for this audience; repeat for several.
        #[arg(long)]
        audience: Vec<String>,
        /// The entry's SPIFFE ID, if the process has several that allow tasks.
        #[arg(long)]
        entry: Option<String>,
        /// Write svid.pem, svid.key and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch a fresh SVID of a running task (renewal).
    Fetch {
        #[command(flatten)]
        socket: SocketArgs,
        /// The task ID.
        id: String,
        /// Also get a JWT-SVID for this audience; repeat for several.
        #[arg(long)]
        audience: Vec<String>,
        /// Write svid.pem, svid.key and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// End a task: its identity is killed.
    End {
        #[command(flatten)]
        socket: SocketArgs,
        /// The task ID.
        id: String,
    },
}

async fn client(socket: &SocketArgs) -> Result<TaskApiClient<tonic::transport::Channel>, String> {
    let path = socket_path(socket.socket.as_deref())?;
    Ok(TaskApiClient::new(sigil_proto::unix::channel(&path).await?))
}

pub async fn run(cmd: TaskCmd) -> Result<(), String> {
    match cmd {
        TaskCmd::Start {
            socket,
            name,
            ttl,
            audience,
            entry,
            write,
        } => {
            let ttl = sigil_core::duration::parse_field("--ttl", &ttl, MAX_TASK_TTL)
                .map_err(|e| e.to_string())?;
            let s = client(&socket)
                .await?
                .start_task(with_header(StartTaskRequest {
                    task_name: name,
                    ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                    audience,
                    entry_spiffe_id: entry.unwrap_or_default(),
                }))
                .await
                .map_err(grpc_err)?
                .into_inner();
            show(&s, write.as_deref())
        }
        TaskCmd::Fetch {
            socket,
            id,
            audience,
            write,
        } => {
            let s = client(&socket)
                .await?
                .fetch_task_svid(with_header(FetchTaskSvidRequest {
                    task_id: id,
                    audience,
                }))
                .await
                .map_err(grpc_err)?
                .into_inner();
            show(&s, write.as_deref())
        }
        TaskCmd::End { socket, id } => {
            let t = client(&socket)
                .await?
                .end_task(with_header(EndTaskRequest { task_id: id }))
                .await
                .map_err(grpc_err)?
                .into_inner();
            println!(
                "Task {} ended; its identity {} is killed.",
                t.id, t.spiffe_id
            );
            Ok(())
        }
    }
}

fn show_task(t: &Task) {
    println!("Task ID:\t\t{}", t.id);
    println!("Task name:\t\t{}", t.name);
    println!("SPIFFE ID:\t\t{}", t.spiffe_id);
    println!("Deadline:\t\t{}", rfc3339(t.deadline));
}

fn show(s: &TaskSvid, write: Option<&Path>) -> Result<(), String> {
    let t = s.task.as_ref().ok_or("the agent returned no task")?;
    show_task(t);
    let chain = split_der(&s.x509_svid)?;
    let bundle = split_der(&s.bundle)?;
    let leaf = chain.first().ok_or("empty SVID chain")?;
    let info = SvidInfo::from_der(leaf).map_err(|e| e.to_string())?;
    println!("SVID Valid After:\t{}", rfc3339(info.not_before));
    println!("SVID Valid Until:\t{}", rfc3339(info.not_after));
    if !s.jwt_svid.is_empty() {
        println!("JWT-SVID:\n\t{}", s.jwt_svid);
    }
    let Some(dir) = write else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", s.x509_svid_key.clone()));
    let files: [(&str, Vec<u8>, u32); 3] = [
        (
            "svid.pem",
            certs_to_pem(chain.iter().map(Vec::as_slice)).into_bytes(),
            0o644,
        ),
        ("svid.key", key_pem.into_bytes(), 0o600),
        (
            "bundle.pem",
            certs_to_pem(bundle.iter().map(Vec::as_slice)).into_bytes(),
            0o644,
        ),
    ];
    for (name, data, mode) in files {
        write_file(&dir.join(name), &data, mode)?;
        println!("Writing {} to file {}", name, dir.join(name).display());
    }
    if !s.crl.is_empty() {
        let text: String = s
            .crl
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("X509 CRL", c.clone())))
            .collect();
        write_file(&dir.join("crl.pem"), text.as_bytes(), 0o644)?;
    }
    if !s.jwt_svid.is_empty() {
        write_file(&dir.join("jwt.txt"), s.jwt_svid.as_bytes(), 0o600)?;
    }
    Ok(())
}
