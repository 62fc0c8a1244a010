//! End-to-end: task-scoped identities (issue 11 §2) through the real
//! binaries. The task's workload is `sigil-agent api task ...` (a process
//! of the `sigil-agent` binary, matched by `unix:path`); the test process
//! itself is a second workload with an entry of its own (its own binary's
//! path), calling the task service with its own gRPC client. Checked with
//! independent tools: openssl (URI SAN, chain, CRL), x509-parser
//! (lifetime), the JWT decoded by hand, the agent's ValidateJWTSVID.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use sigil_proto::WORKLOAD_API_HEADER;
use sigil_proto::task::task_api_client::TaskApiClient;
use sigil_proto::task::{EndTaskRequest, FetchTaskSvidRequest, StartTaskRequest};
use sigil_tests::{Cluster, bin, eventually, path_selector};
use x509_parser::prelude::{FromDer, X509Certificate};

const LONG: Duration = Duration::from_secs(20);
const ENTRY: &str = "spiffe://example.org/ai/summarizer";

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `sigil-agent api task ARGS --socket ADDR`, as a separate process.
fn task_cli(c: &Cluster, args: &[&str]) -> Output {
    Command::new(bin("sigil-agent"))
        .args(["api", "task"])
        .args(args)
        .args(["--socket", &c.api_addr()])
        .output()
        .unwrap()
}

/// The value after `label:` in the CLI's output.
fn field(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .map(|v| v.trim_start_matches(':').trim().to_string())
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
}

/// Starts a task through the CLI once the agent serves the entry.
async fn start(c: &Cluster, name: &str, ttl: &str, extra: &[&str]) -> (String, String, String) {
    eventually("a task starts", LONG, || async {
        let mut args = vec!["start", "--name", name, "--ttl", ttl];
        args.extend_from_slice(extra);
        let o = task_cli(c, &args);
        if o.status.success() {
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            Some((field(&out, "Task ID"), field(&out, "SPIFFE ID"), out))
        } else {
            let t = text(&o);
            assert!(
                t.contains("not synced") || t.contains("no identity issued"),
                "start refused: {t}"
            );
            None
        }
    })
    .await
}

/// The claims of a compact JWS, decoded by hand.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl").args(args).output().unwrap()
}

/// (URI SAN, notBefore, notAfter) of the first certificate in a PEM file.
fn cert_facts(pem_path: &Path) -> (String, i64, i64) {
    let pem = pem::parse(std::fs::read(pem_path).unwrap()).unwrap();
    let (_, cert) = X509Certificate::from_der(pem.contents()).unwrap();
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap();
    (
        san,
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    )
}

fn tasks_json(c: &Cluster) -> Vec<Value> {
    json(&c.server_ok(&["task", "list", "--output", "json"]))
        .as_array()
        .unwrap()
        .clone()
}

fn task_row(c: &Cluster, id: &str) -> Value {
    tasks_json(c)
        .into_iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("task {id} not listed"))
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        WORKLOAD_API_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// The selector of this test process's own binary.
fn own_selector() -> String {
    let p = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    format!("unix:path:{}", p.display())
}

fn scratch(c: &Cluster, name: &str) -> PathBuf {
    let d = c.dir.0.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_identity_is_issued_owned_by_its_process_and_killed_when_it_ends() {
    let c = Cluster::with_agent();
    c.create_entry(
        ENTRY,
        &[
            "--selector",
            &path_selector("sigil-agent"),
            "--x509-ttl",
            "10m",
            "--task-ttl-max",
            "5m",
            "--owner",
            "team-ml",
            "--jwt-claim",
            "env=prod",
        ],
    );
    let show = c.server_ok(&["entry", "list", "--spiffe-id", ENTRY]);
    assert!(show.contains("Task TTL max     : 300"), "{show}");
    // The test process: another workload, with an entry that allows tasks.
    c.create_entry(
        "spiffe://example.org/other",
        &["--selector", &own_selector(), "--task-ttl-max", "5m"],
    );

    // Start: asked for 4m, capped to nothing less (4m < 5m < 10m).
    let dir = scratch(&c, "task1");
    let (id, spiffe_id, out) = start(
        &c,
        "summarize-q3",
        "4m",
        &["--audience", "svc-db", "--write", dir.to_str().unwrap()],
    )
    .await;
    assert_eq!(spiffe_id, format!("{ENTRY}/task/{id}"), "{out}");
    let (san, nb, na) = cert_facts(&dir.join("svid.pem"));
    assert_eq!(san, spiffe_id);
    assert!(
        na - nb <= 240 + 60 && na - nb >= 200,
        "lifetime {}s for a 4m task",
        na - nb
    );
    let o = openssl(&[
        "x509",
        "-in",
        dir.join("svid.pem").to_str().unwrap(),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        text(&o).contains(&format!("URI:{spiffe_id}")),
        "{}",
        text(&o)
    );
    let o = openssl(&[
        "verify",
        "-CAfile",
        dir.join("bundle.pem").to_str().unwrap(),
        dir.join("svid.pem").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "openssl verify: {}", text(&o));

    // The JWT-SVID: the task's ID, its name, the entry's owner and claims.
    let jwt = std::fs::read_to_string(dir.join("jwt.txt")).unwrap();
    let cl = claims(&jwt);
    assert_eq!(cl["sub"], spiffe_id.as_str());
    assert_eq!(cl["sigil_task"]["id"], id.as_str());
    assert_eq!(cl["sigil_task"]["name"], "summarize-q3");
    assert_eq!(cl["sigil_owner"], "team-ml");
    assert_eq!(cl["env"], "prod");
    let row = task_row(&c, &id);
    assert!(cl["exp"].as_i64().unwrap() <= na.max(0) + 1);
    assert_eq!(row["state"], "running");
    assert_eq!(row["name"], "summarize-q3");
    assert_eq!(row["owner"], "team-ml");
    assert_eq!(row["spiffe_id"], spiffe_id.as_str());
    assert_eq!(row["end_reason"], Value::Null);
    let validate = |token: &str| {
        Command::new(bin("sigil-agent"))
            .args([
                "api",
                "validate",
                "jwt",
                "--audience",
                "svc-db",
                "--token",
                token,
            ])
            .args(["--socket", &c.api_addr()])
            .output()
            .unwrap()
    };
    let o = validate(&jwt);
    assert!(o.status.success(), "valid while running: {}", text(&o));

    // Renewal by the owning process.
    let dir2 = scratch(&c, "task1-renewed");
    let o = task_cli(&c, &["fetch", &id, "--write", dir2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(cert_facts(&dir2.join("svid.pem")).0, spiffe_id);

    // Another process (other selectors): no start under the entry, no
    // fetch, no end of the task.
    let mut other = TaskApiClient::new(sigil_proto::unix::channel(&c.api_socket()).await.unwrap());
    let st = other
        .start_task(with_header(StartTaskRequest {
            task_name: "hijack".into(),
            ttl_seconds: 60,
            entry_spiffe_id: ENTRY.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    let st = other
        .fetch_task_svid(with_header(FetchTaskSvidRequest {
            task_id: id.clone(),
            audience: vec![],
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    let st = other
        .end_task(with_header(EndTaskRequest {
            task_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    // Without the security header: InvalidArgument, as the Workload API.
    let st = other
        .end_task(tonic::Request::new(EndTaskRequest {
            task_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    // Its own entry lets it start a task of its own.
    let own = other
        .start_task(with_header(StartTaskRequest {
            task_name: "own".into(),
            ttl_seconds: 60,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        own.task
            .unwrap()
            .spiffe_id
            .starts_with("spiffe://example.org/other/task/")
    );
    assert_eq!(task_row(&c, &id)["state"], "running", "nothing ended it");

    // EndTask: the identity is killed.
    let o = task_cli(&c, &["end", &id]);
    assert!(o.status.success(), "{}", text(&o));
    let o = task_cli(&c, &["fetch", &id]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("PermissionDenied") && text(&o).contains("ended"),
        "{}",
        text(&o)
    );
    let row = task_row(&c, &id);
    assert_eq!(row["state"], "ended");
    assert_eq!(row["end_reason"], "ended");
    let kill_id = row["kill_id"].as_str().unwrap().to_string();
    assert!(c.server_ok(&["kill", "list"]).contains(&kill_id));
    // The CRL the agent hands out lists both SVIDs of the task.
    let crl_dir = scratch(&c, "crl");
    eventually("the CRL revokes the task's SVIDs", LONG, || async {
        let _ = std::fs::remove_file(crl_dir.join("crl.pem"));
        let o = task_cli(
            &c,
            &[
                "start",
                "--name",
                "probe",
                "--ttl",
                "10s",
                "--write",
                crl_dir.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        let revoked = [&dir, &dir2].iter().all(|d| {
            let o = openssl(&[
                "verify",
                "-crl_check",
                "-CAfile",
                d.join("bundle.pem").to_str().unwrap(),
                "-CRLfile",
                crl_dir.join("crl.pem").to_str().unwrap(),
                d.join("svid.pem").to_str().unwrap(),
            ]);
            !o.status.success() && text(&o).contains("revoked")
        });
        revoked.then_some(())
    })
    .await;
    // Its JWT-SVID no longer validates.
    eventually("the task's JWT-SVID is refused", LONG, || async {
        (!validate(&jwt).status.success()).then_some(())
    })
    .await;
    // Ending it again changes nothing.
    let o = task_cli(&c, &["end", &id]);
    assert!(
        !o.status.success() && text(&o).contains("already ended"),
        "{}",
        text(&o)
    );

    // The operator ends any task.
    let (id2, _, _) = start(&c, "second", "2m", &[]).await;
    let out = c.server_ok(&["task", "end", &id2, "--output", "json"]);
    let t = json(&out);
    assert_eq!(t["end_reason"], "operator");
    assert!(t["ended_by"].as_str().unwrap().starts_with("admin uid="));
    let o = task_cli(&c, &["fetch", &id2]);
    assert!(
        !o.status.success() && text(&o).contains("ended"),
        "{}",
        text(&o)
    );
    let o = c.server_cli(&["task", "end", "no-such-task"]);
    assert!(
        !o.status.success() && text(&o).contains("no task"),
        "{}",
        text(&o)
    );

    // A task past its deadline issues nothing and is recorded as ended.
    let (id3, _, out3) = start(&c, "short", "2s", &[]).await;
    let deadline = task_row(&c, &id3)["deadline"].as_str().unwrap().to_string();
    assert!(out3.contains(&format!("Deadline:\t\t{deadline}")), "{out3}");
    eventually("the task passes its deadline", LONG, || async {
        let o = task_cli(&c, &["fetch", &id3]);
        if o.status.success() {
            return None;
        }
        let t = text(&o);
        assert!(t.contains("deadline") || t.contains("ended"), "{t}");
        Some(())
    })
    .await;
    eventually("the deadline is recorded", LONG, || async {
        (task_row(&c, &id3)["end_reason"] == "deadline").then_some(())
    })
    .await;
    let listed = c.server_ok(&["task", "list", "--spiffe-id", ENTRY]);
    assert!(
        listed.contains(&id) && listed.contains(&id2) && listed.contains(&id3),
        "{listed}"
    );
    assert!(
        !listed.contains("spiffe://example.org/other/task/"),
        "{listed}"
    );

    // Start and end are in the audit trail.
    let q = c.server_ok(&[
        "audit",
        "query",
        "--spiffe-id",
        &spiffe_id,
        "--output",
        "json",
    ]);
    for kind in [
        "\"task_started\"",
        "\"task_ended\"",
        "\"kill_created\"",
        "\"x509_svids_issued\"",
    ] {
        assert!(q.contains(kind), "audit query lacks {kind}: {q}");
    }
    let export = c.server_ok(&["audit", "export"]);
    assert!(
        export.contains("\"task_ended\"") && export.contains("\"deadline\""),
        "{export}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_task_input_is_refused_naming_the_field_and_writes_nothing() {
    let c = Cluster::with_agent();
    let entries_before = c.server_ok(&["entry", "list", "--output", "json"]);
    for (args, field) in [
        (vec!["--task-ttl-max", "0"], "--task-ttl-max"),
        (
            vec!["--x509-ttl", "60s", "--task-ttl-max", "5m"],
            "task_ttl_max",
        ),
        (vec!["--task-ttl-max", "30d"], "task_ttl_max"),
        (vec!["--node", "--task-ttl-max", "1m"], "task_ttl_max"),
    ] {
        let mut a = vec![
            "entry",
            "create",
            "--parent-id",
            c.agent_id.as_str(),
            "--spiffe-id",
            "spiffe://example.org/bad",
            "--selector",
            "unix:uid:1",
        ];
        a.extend(args.iter().copied());
        let o = c.server_cli(&a);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(text(&o).contains(field), "{args:?}: {}", text(&o));
    }
    assert_eq!(
        c.server_ok(&["entry", "list", "--output", "json"]),
        entries_before,
        "nothing was written"
    );

    c.create_entry(
        ENTRY,
        &[
            "--selector",
            &path_selector("sigil-agent"),
            "--task-ttl-max",
            "1m",
        ],
    );
    c.create_entry(
        "spiffe://example.org/plain",
        &["--selector", &path_selector("sigil-agent")],
    );
    // Wait until the agent serves the entry (a good start), then refuse.
    let (first, _, _) = start(&c, "ok", "1m", &[]).await;
    let audit_before = c.server_ok(&["audit", "export"]).lines().count();
    for (args, field) in [
        (vec!["start", "--name", "x", "--ttl", "0"], "--ttl"),
        (vec!["start", "--name", "", "--ttl", "1m"], "task_name"),
        (
            vec![
                "start",
                "--name",
                "x",
                "--ttl",
                "1m",
                "--entry",
                "spiffe://example.org/nope",
            ],
            "entry_spiffe_id",
        ),
        (
            vec![
                "start",
                "--name",
                "x",
                "--ttl",
                "1m",
                "--entry",
                "spiffe://example.org/plain",
            ],
            "task_ttl_max",
        ),
        (vec!["fetch", "no-such-task"], "no task"),
        (vec!["end", ""], "task_id"),
    ] {
        let o = task_cli(&c, &args);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(text(&o).contains(field), "{args:?}: {}", text(&o));
    }
    let tasks = tasks_json(&c);
    assert_eq!(tasks.len(), 1, "only the good task: {tasks:?}");
    assert_eq!(tasks[0]["id"], first.as_str());
    // The server may have written periodic records meanwhile (none here
    // without checkpoints due), but no task record.
    let export = c.server_ok(&["audit", "export"]);
    assert_eq!(export.matches("\"task_started\"").count(), 1, "{export}");
    assert!(export.lines().count() >= audit_before);
    // The capped lifetime: asked for 1m, entry allows 1m.
    let row = &tasks[0];
    assert_eq!(row["state"], "running");
}
