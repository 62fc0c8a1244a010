//! `task`: task start to task SVID in hand, next to a plain FetchX509SVID
//! in the same run (issue 11 §2).
//!
//! One server and one agent; the bench process is the workload (its uid's
//! entry allows tasks: `task_ttl_max` 10m). Each sample is, sequentially on
//! one Unix-socket connection: `StartTask` (agent: attest the caller, new
//! P-256 key and CSR; server: authorize, sign the X.509-SVID, store the
//! task with its audit records in one transaction) until the response with
//! the SVID arrives; the plain fetch is a FetchX509SVID stream's first
//! message (a cached SVID), measured alternately with the task starts so
//! that both see the same load. `--jwt` also asks each task for a
//! JWT-SVID. Tasks are not ended (ending is a kill, measured by `kill`).

use std::time::{Duration, Instant};

use sigil_proto::task::StartTaskRequest;
use sigil_proto::task::task_api_client::TaskApiClient;

use crate::Result;
use crate::clients::{admin, unix_channel, workload};
use crate::harness::{Agent, Bins, Scratch, Server, TD, my_uid_selector};
use crate::report::{Record, Reporter, progress};
use crate::stats::Samples;

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// Task starts measured (default 200; 20 with --quick).
    #[arg(long)]
    samples: Option<usize>,
    /// Also mint a JWT-SVID with every task.
    #[arg(long)]
    jwt: bool,
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        sigil_proto::WORKLOAD_API_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let n = a.samples.unwrap_or(if quick { 20 } else { 200 }).max(1);
    let bins = Bins::locate()?;
    let scratch = Scratch::new("task")?;
    let server = Server::start(&bins, &scratch.0, None).await?;
    let mut agent = Agent::configure(&server, &scratch.0, "agent-0")?;
    let mut e = admin::entry(
        &format!("spiffe://{TD}/bench/task"),
        &agent.spiffe_id,
        &[my_uid_selector()],
    );
    e.task_ttl_max = 600;
    admin::create_many(&server.admin, vec![e], 1).await?;
    agent.start(&bins, &server).await?;
    agent.wait_ready(1, 1, Duration::from_secs(60)).await?;
    progress(format!(
        "task: {n} task starts and {n} plain fetches, alternating"
    ));

    let mut tasks = TaskApiClient::new(unix_channel(&agent.socket).await?);
    let mut fetch = workload::connect(&agent.socket).await?;
    let audience = if a.jwt {
        vec!["bench".to_string()]
    } else {
        vec![]
    };
    let (mut start_t, mut fetch_t) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // One warm-up of each (connections, caches).
    for i in 0..=n {
        let t0 = Instant::now();
        let s = tasks
            .start_task(with_header(StartTaskRequest {
                task_name: format!("bench-{i}"),
                ttl_seconds: 300,
                audience: audience.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        let took = t0.elapsed();
        if s.x509_svid.is_empty() || (a.jwt && s.jwt_svid.is_empty()) {
            return Err("a task start returned no SVID".into());
        }
        let t0 = Instant::now();
        let msg = fetch
            .fetch_x509svid(workload::x509_request())
            .await?
            .into_inner()
            .message()
            .await?
            .ok_or("fetch stream ended")?;
        let fetched = t0.elapsed();
        if msg.svids.is_empty() {
            return Err("a plain fetch returned no SVID".into());
        }
        if i > 0 {
            start_t.push(took);
            fetch_t.push(fetched);
        }
    }
    let s = Samples::from_durations(start_t);
    let f = Samples::from_durations(fetch_t);
    rep.emit(
        Record::new("task")
            .f("task_start_p50_ms", s.q_ms(0.5))
            .f("task_start_p99_ms", s.q_ms(0.99))
            .f("fetch_x509_p50_ms", f.q_ms(0.5))
            .f("fetch_x509_p99_ms", f.q_ms(0.99))
            .with("samples", s.len())
            .with("jwt", a.jwt),
    );
    rep.table("task");
    Ok(())
}
