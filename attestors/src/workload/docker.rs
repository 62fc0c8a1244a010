//! The `docker` workload attestor: asks the Docker Engine API (over its
//! Unix socket; podman's Docker-compatible socket works the same) about the
//! container the caller's cgroup names, and turns the answer into
//! `docker:*` and `container:*` selectors.
//!
//! Selectors: `container:id:<64 hex>`, `container:runtime:docker|podman`,
//! `docker:image_id:<image as the container was created from, e.g.
//! registry/app:1.2>`, `docker:image_config_digest:<the image ID,
//! sha256:…, i.e. the digest of its config>`, `docker:container_name:<name
//! without the leading />`, `docker:label:<key>:<value>` for every label,
//! and `docker:env:<name>:<value>` only for the environment variable names
//! listed in the config (environment often holds secrets).
//!
//! Only a container that the Engine reports as running yields selectors.
//! Answers are cached per container id for `cache_ttl`: a container's
//! labels, image and environment cannot change while it exists, and a
//! stopped container's processes are gone, so they cannot present the
//! cached answer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sigil_core::selector::Selector;

use super::cgroup::{Runtime, container_from_cgroup};
use super::{BoxFuture, Workload, WorkloadAttestError, WorkloadAttestor};

/// Largest container inspect answer read (a container with many labels
/// and a long environment is a few tens of KiB).
const MAX_BODY: usize = 4 << 20;
/// Most containers whose answers are cached.
const CACHE_MAX: usize = 4096;

/// Settings of `[workload_attestor.docker]`.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// The Engine API socket (`/var/run/docker.sock`).
    pub socket_path: PathBuf,
    /// Environment variable names that become `docker:env:` selectors.
    pub env: Vec<String>,
    /// How long a container's metadata is reused.
    pub cache_ttl: Duration,
    /// Deadline for one attestation.
    pub timeout: Duration,
}

/// The answer for one container: its selectors, or "not a running
/// container of this engine" (empty).
type Answer = Arc<Vec<Selector>>;

/// One Engine request shared by every caller that needs the same
/// container while it is in flight.
type InFlight = Arc<tokio::sync::OnceCell<Result<Answer, WorkloadAttestError>>>;

/// The docker attestor.
#[derive(Debug)]
pub struct DockerAttestor {
    cfg: DockerConfig,
    cache: Mutex<HashMap<String, (Instant, Answer)>>,
    /// Lookups in progress, by container id: the processes of a container
    /// that connect at once cost one Engine request, not one each.
    inflight: Mutex<HashMap<String, InFlight>>,
}

/// The parts of `GET /containers/{id}/json` used.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspect {
    id: String,
    #[serde(default)]
    name: String,
    /// The image ID (`sha256:` + digest of the image config).
    #[serde(default)]
    image: String,
    #[serde(default)]
    config: Option<InspectConfig>,
    #[serde(default)]
    state: Option<InspectState>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectConfig {
    /// The image reference the container was created from.
    #[serde(default)]
    image: String,
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectState {
    #[serde(default)]
    running: bool,
}

impl DockerAttestor {
    /// An attestor for `cfg` (no connection is made until a call needs one).
    pub fn new(cfg: DockerConfig) -> Self {
        Self {
            cfg,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, id: &str, now: Instant) -> Option<Answer> {
        let cache = self.cache.lock().ok()?;
        let (at, answer) = cache.get(id)?;
        (now.saturating_duration_since(*at) < self.cfg.cache_ttl).then(|| answer.clone())
    }

    fn remember(&self, id: &str, answer: Answer, now: Instant) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX && !cache.contains_key(id) {
                let ttl = self.cfg.cache_ttl;
                cache.retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(id.to_string(), (now, answer));
        }
    }

    /// `GET path` on the Engine socket: `Ok(None)` for 404.
    async fn get(&self, path: &str) -> Result<Option<Bytes>, WorkloadAttestError> {
        let sock = &self.cfg.socket_path;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            WorkloadAttestError::Unavailable(format!(
                "docker socket {}: {what}: {e}",
                sock.display()
            ))
        };
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| unavailable("connect", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable("handshake", &e))?;
        // The connection task ends when `sender` is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| unavailable("request", &e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unavailable("request", &e))?;
        let status = resp.status();
        if status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(unavailable("answer", &status));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unavailable("body", &e))?
            .to_bytes();
        Ok(Some(body))
    }

    async fn lookup(&self, id: &str, runtime: Runtime) -> Result<Answer, WorkloadAttestError> {
        let Some(body) = self.get(&format!("/containers/{id}/json")).await? else {
            return Ok(Arc::new(Vec::new()));
        };
        let inspect: Inspect = serde_json::from_slice(&body).map_err(|e| {
            WorkloadAttestError::Unavailable(format!("docker: unexpected inspect answer: {e}"))
        })?;
        if inspect.id != id {
            return Err(WorkloadAttestError::Unavailable(format!(
                "docker: asked for container {id}, got {}",
                inspect.id
            )));
        }
        Ok(Arc::new(selectors_for(&inspect, runtime, &self.cfg.env)))
    }
}

/// The selectors of a running container (none if it is not running).
fn selectors_for(c: &Inspect, runtime: Runtime, env_names: &[String]) -> Vec<Selector> {
    if !c.state.as_ref().is_some_and(|s| s.running) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut add = |kind: &str, value: String| match Selector::new(kind, &value) {
        Ok(s) => out.push(s),
        // Values no entry could carry (too long, control characters).
        Err(e) => tracing::debug!(container = %c.id, error = %e, "docker selector skipped"),
    };
    add("container", format!("id:{}", c.id));
    add("container", format!("runtime:{}", runtime.as_str()));
    if !c.image.is_empty() {
        add("docker", format!("image_config_digest:{}", c.image));
    }
    let name = c.name.trim_start_matches('/');
    if !name.is_empty() {
        add("docker", format!("container_name:{name}"));
    }
    if let Some(cfg) = &c.config {
        if !cfg.image.is_empty() {
            add("docker", format!("image_id:{}", cfg.image));
        }
        for (k, v) in cfg.labels.iter().flatten() {
            add("docker", format!("label:{k}:{v}"));
        }
        for kv in cfg.env.iter().flatten() {
            if let Some((k, v)) = kv.split_once('=')
                && env_names.iter().any(|n| n == k)
            {
                add("docker", format!("env:{k}:{v}"));
            }
        }
    }
    out
}

impl WorkloadAttestor for DockerAttestor {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    fn attest<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> BoxFuture<'a, Result<Vec<Selector>, WorkloadAttestError>> {
        Box::pin(async move {
            let Some(c) = container_from_cgroup(&workload.cgroup) else {
                return Ok(Vec::new());
            };
            // containerd and CRI-O containers are not the Engine's.
            let runtime = match c.runtime {
                Some(Runtime::Containerd | Runtime::Crio) => return Ok(Vec::new()),
                Some(r) => r,
                None => Runtime::Docker,
            };
            let now = Instant::now();
            if let Some(a) = self.cached(&c.id, now) {
                return Ok(a.as_ref().clone());
            }
            let cell: InFlight = match self.inflight.lock() {
                Ok(mut m) => m.entry(c.id.clone()).or_default().clone(),
                Err(_) => Arc::default(),
            };
            // If the caller that started the request gives up (deadline),
            // the next waiter runs it instead.
            let result = cell
                .get_or_init(|| self.lookup(&c.id, runtime))
                .await
                .clone();
            if let Ok(mut m) = self.inflight.lock()
                && m.get(&c.id).is_some_and(|x| Arc::ptr_eq(x, &cell))
            {
                m.remove(&c.id);
            }
            // Answers are cached, failures are not (the next call asks again).
            let answer = result?;
            self.remember(&c.id, answer.clone(), now);
            Ok(answer.as_ref().clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged from a real `GET /containers/{id}/json` of Docker 20.10.
    const INSPECT: &str = r#"{
      "Id": "ba429f5ac3107fb9ffe62c973a37323ff28a62beb284280297ee168195327a77",
      "Created": "2026-12-01T22:10:41.1Z",
      "Path": "/bin/sleep", "Args": ["30"],
      "State": {"Status": "running", "Running": true, "Paused": false, "Pid": 818, "ExitCode": 0},
      "Image": "sha256:64b8af77e9cd25d71c1f4e5f2f22d0de6179b37b015c7bde13ae096e9e21c636",
      "Name": "/interesting_hertz",
      "HostConfig": {"NetworkMode": "none"},
      "Config": {"Hostname": "ba429f5ac310", "Env": ["PATH=/usr/bin", "MODE=prod", "SECRET=x"],
                 "Cmd": ["/bin/sleep", "30"], "Image": "sigil-try:1",
                 "Labels": {"team": "sec", "app": "triage"}}
    }"#;

    fn texts(v: &[Selector]) -> Vec<String> {
        let mut t: Vec<String> = v.iter().map(ToString::to_string).collect();
        t.sort();
        t
    }

    #[test]
    fn inspect_answer_becomes_selectors_with_only_listed_env() {
        let c: Inspect = serde_json::from_str(INSPECT).unwrap();
        let got = texts(&selectors_for(&c, Runtime::Docker, &["MODE".into()]));
        assert_eq!(
            got,
            vec![
                "container:id:ba429f5ac3107fb9ffe62c973a37323ff28a62beb284280297ee168195327a77",
                "container:runtime:docker",
                "docker:container_name:interesting_hertz",
                "docker:env:MODE:prod",
                "docker:image_config_digest:sha256:64b8af77e9cd25d71c1f4e5f2f22d0de6179b37b015c7bde13ae096e9e21c636",
                "docker:image_id:sigil-try:1",
                "docker:label:app:triage",
                "docker:label:team:sec",
            ]
        );
    }

    #[test]
    fn a_stopped_container_and_null_fields_give_nothing_or_less() {
        let stopped = INSPECT.replace("\"Running\": true", "\"Running\": false");
        let c: Inspect = serde_json::from_str(&stopped).unwrap();
        assert!(selectors_for(&c, Runtime::Docker, &[]).is_empty());
        let bare: Inspect = serde_json::from_str(
            r#"{"Id":"x","Name":"/n","Image":"","State":{"Running":true},
                "Config":{"Image":"i","Labels":null,"Env":null}}"#,
        )
        .unwrap();
        assert_eq!(
            texts(&selectors_for(&bare, Runtime::Podman, &["A".into()])),
            vec![
                "container:id:x",
                "container:runtime:podman",
                "docker:container_name:n",
                "docker:image_id:i"
            ]
        );
    }

    /// A stand-in Engine on a Unix socket that answers every inspect with
    /// INSPECT after `delay`, counting requests (for the concurrency
    /// property only; the real Engine is exercised by the end-to-end tests).
    async fn slow_engine(
        dir: &std::path::Path,
        delay: Duration,
    ) -> (PathBuf, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let sock = dir.join("engine.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let h = h.clone();
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from_static(INSPECT.as_bytes())),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        (sock, hits)
    }

    #[tokio::test]
    async fn concurrent_callers_of_one_container_share_one_engine_request() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (sock, hits) = slow_engine(dir.path(), Duration::from_millis(200)).await;
        let a = Arc::new(DockerAttestor::new(DockerConfig {
            socket_path: sock,
            env: vec![],
            cache_ttl: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        }));
        let id = "ba429f5ac3107fb9ffe62c973a37323ff28a62beb284280297ee168195327a77";
        let w = Arc::new(Workload {
            pid: 1,
            uid: 0,
            cgroup: format!("0::/system.slice/docker-{id}.scope\n"),
            exe_sha256: None,
        });
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (a, w) = (a.clone(), w.clone());
                tokio::spawn(async move { a.attest(&w).await })
            })
            .collect();
        for t in tasks {
            let got = t.await.unwrap().unwrap();
            assert!(
                got.iter().any(|s| s.as_str() == "docker:label:team:sec"),
                "{got:?}"
            );
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // Then served from the cache.
        a.attest(&w).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dead_socket_is_an_error_not_an_empty_answer() {
        let dir = tempfile::tempdir().unwrap();
        let a = DockerAttestor::new(DockerConfig {
            socket_path: dir.path().join("none.sock"),
            env: vec![],
            cache_ttl: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        });
        let id = "ab".repeat(32);
        let w = Workload {
            pid: 1,
            uid: 0,
            cgroup: format!("0::/docker/{id}\n"),
            exe_sha256: None,
        };
        let e = a.attest(&w).await.unwrap_err();
        assert!(e.to_string().contains("none.sock"), "{e}");
        // Not in a container: no question asked, nothing to say.
        let host = Workload {
            cgroup: "0::/user.slice\n".into(),
            ..w
        };
        assert_eq!(a.attest(&host).await.unwrap(), vec![]);
    }
}
