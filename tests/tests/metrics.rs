//! End-to-end: `[telemetry] prometheus_port` on the real server and agent.
//! Every scrape is parsed by `prometheus_client` from PyPI (its strict
//! OpenMetrics parser and its classic text parser, tests/python/
//! metrics_parse.py); the counters move when the test does work (an
//! attestation, SVIDs fetched over the `spiffe` crate, a refused call, a
//! kill); `/live` and `/ready` answer, and the agent's `/ready` turns 503
//! once it is cut off from the server past `serve_offline_for`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sigil_tests::{
    Cluster, eventually, fetch_x509_id, http_get, my_uid_selector, py_venv, telemetry_addr,
};

const LONG: Duration = Duration::from_secs(30);
const AGENT: &str = "spiffe://example.org/test-agent";
const TELEMETRY: &str = "[telemetry]\nprometheus_port = 0\n";

/// Sample name -> [(labels, value)], as prometheus_client parsed it.
type Samples = BTreeMap<String, Vec<(Labels, f64)>>;
type Labels = BTreeMap<String, String>;

fn scrape(addr: SocketAddr) -> Samples {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    let Some(venv) = py_venv() else {
        panic!(
            "no Python virtualenv with prometheus_client: run scripts/test once (it creates target/pyvenv)"
        );
    };
    let mut child = Command::new(venv.join("bin/python3"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/metrics_parse.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw: BTreeMap<String, Vec<(Labels, Value)>> = serde_json::from_slice(&out.stdout).unwrap();
    raw.into_iter()
        .map(|(k, v)| {
            let v = v
                .into_iter()
                .map(|(l, x)| (l, x.as_f64().unwrap_or(f64::NAN)))
                .collect();
            (k, v)
        })
        .collect()
}

/// The value of `name` whose labels include every pair of `labels`
/// (summed over the rest), `None` when absent.
fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let rows = s.get(name)?;
    let hits: Vec<f64> = rows
        .iter()
        .filter(|(l, _)| {
            labels
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

fn v(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(s, name, labels).unwrap_or(0.0)
}

#[tokio::test]
async fn server_and_agent_metrics_parse_and_move_and_probes_answer() {
    let mut c = Cluster::start_with(TELEMETRY);
    let server = telemetry_addr(&c.dir.0, "server.log");
    c.start_agent_with(AGENT, &format!("serve_offline_for = \"2s\"\n{TELEMETRY}"));
    let agent = telemetry_addr(&c.dir.0, "agent.log");

    for addr in [server, agent] {
        assert_eq!(http_get(addr, "/live"), (200, "live\n".into()));
        assert_eq!(http_get(addr, "/nope").0, 404);
    }
    assert_eq!(http_get(server, "/ready"), (200, "ready\n".into()));

    let before = scrape(server);
    assert_eq!(
        v(
            &before,
            "sigil_server_node_attestations_total",
            &[("type", "join_token"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(v(&before, "sigil_server_agents", &[]), 1.0);
    assert_eq!(v(&before, "sigil_server_entries", &[]), 0.0);
    assert!(v(&before, "sigil_server_sync_streams", &[]) >= 1.0);

    c.create_entry(
        "spiffe://example.org/metrics-w",
        &["--selector", &my_uid_selector()],
    );
    let api = c.api_addr();
    eventually("the SVID", LONG, || async {
        fetch_x509_id(&api)
            .await
            .ok()
            .filter(|id| id.ends_with("/metrics-w"))
    })
    .await;
    let client = spiffe::WorkloadApiClient::connect_to(&api).await.unwrap();
    client.fetch_jwt_token(["metrics-aud"], None).await.unwrap();
    // A refused call: no audience.
    let refused = client.fetch_jwt_token(Vec::<String>::new(), None).await;
    assert!(refused.is_err());
    c.server_ok(&[
        "kill",
        "--spiffe-id",
        "spiffe://example.org/nobody",
        "--reason",
        "metrics test",
    ]);

    let after = scrape(server);
    let signed = |s: &Samples| v(s, "sigil_server_x509_svids_signed_total", &[]);
    assert!(signed(&after) >= signed(&before) + 1.0, "{after:?}");
    assert!(v(&after, "sigil_server_jwt_svids_signed_total", &[]) >= 1.0);
    // At least the X.509 batch and the JWT-SVID were audited, in at most
    // as many commits as records.
    let records = v(&after, "sigil_server_audit_issuance_records_total", &[]);
    let commits = v(&after, "sigil_server_audit_issuance_commits_total", &[]);
    assert!(records >= 2.0, "{after:?}");
    assert!(commits >= 1.0 && commits <= records, "{after:?}");
    assert!(
        v(
            &after,
            "sigil_server_mint_batch_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    assert_eq!(v(&after, "sigil_server_entries", &[]), 1.0);
    assert_eq!(v(&after, "sigil_server_kills_created_total", &[]), 1.0);
    assert_eq!(v(&after, "sigil_server_kills_in_force", &[]), 1.0);
    assert!(
        v(&after, "sigil_server_sync_updates_sent_total", &[])
            > v(&before, "sigil_server_sync_updates_sent_total", &[])
    );
    assert!(v(&after, "sigil_server_sync_sent_bytes_total", &[]) > 0.0);
    assert!(
        v(
            &after,
            "sigil_server_agent_api_calls_total",
            &[
                ("method", "sigil.agent.AgentApi/MintX509Svids"),
                ("code", "OK")
            ]
        ) >= 1.0
    );
    assert!(value(&after, "sigil_server_signing_queue_csrs", &[]).is_some());
    assert!(value(&after, "sigil_server_datastore_errors_total", &[]).is_some());

    let a = scrape(agent);
    assert!(
        v(
            &a,
            "sigil_agent_workload_api_calls_total",
            &[
                ("method", "SpiffeWorkloadAPI/FetchX509SVID"),
                ("code", "OK")
            ]
        ) >= 1.0,
        "{a:?}"
    );
    assert!(
        v(
            &a,
            "sigil_agent_workload_api_calls_total",
            &[("method", "SpiffeWorkloadAPI/FetchJWTSVID"), ("code", "OK")]
        ) >= 1.0
    );
    assert!(
        v(
            &a,
            "sigil_agent_workload_api_calls_total",
            &[
                ("method", "SpiffeWorkloadAPI/FetchJWTSVID"),
                ("code", "InvalidArgument")
            ]
        ) >= 1.0
    );
    assert!(
        v(
            &a,
            "sigil_agent_workload_api_call_duration_seconds_count",
            &[("method", "SpiffeWorkloadAPI/FetchX509SVID")]
        ) >= 1.0
    );
    assert_eq!(v(&a, "sigil_agent_entries", &[]), 1.0);
    assert_eq!(v(&a, "sigil_agent_cached_svids", &[]), 1.0);
    assert_eq!(v(&a, "sigil_agent_synced", &[]), 1.0);
    let now = sigil_core::now_unix() as f64;
    let next = v(&a, "sigil_agent_next_rotation_timestamp_seconds", &[]);
    // Renewal is due before half of the default one-hour lifetime.
    assert!(
        next > now && next <= now + 1800.0,
        "next rotation {next} vs now {now}"
    );
    assert!(v(&a, "sigil_agent_svid_expiry_timestamp_seconds", &[]) > now);
    assert_eq!(http_get(agent, "/ready"), (200, "ready\n".into()));

    // Cut off past serve_offline_for: the agent is no longer ready, and
    // says why; it stays live.
    c.stop_server();
    eventually("the agent's /ready to fail", LONG, || async {
        let (code, body) = http_get(agent, "/ready");
        (code == 503).then_some(body)
    })
    .await;
    let (_, body) = http_get(agent, "/ready");
    assert!(body.contains("serve_offline_for"), "{body}");
    assert_eq!(http_get(agent, "/live").0, 200);
    assert_eq!(v(&scrape(agent), "sigil_agent_offline", &[]), 1.0);
}

#[test]
fn a_bad_telemetry_key_stops_the_server_naming_it() {
    let c = Cluster::start();
    let cfg = c.dir.0.join("bad.toml");
    let good = std::fs::read_to_string(c.dir.0.join("server.toml")).unwrap();
    std::fs::write(
        &cfg,
        format!("{good}\n[telemetry]\nprometheus_port = 1\nprometheus_host = \"localhost\"\n"),
    )
    .unwrap();
    let out = Command::new(sigil_tests::bin("sigil-server"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("telemetry.prometheus_host"), "{err}");
}
