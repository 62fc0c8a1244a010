//! The `k8s` workload attestor: finds the caller's pod (by the pod UID in
//! its cgroup path) and container (by the container id) in the kubelet's
//! authenticated `GET /pods` answer, over HTTPS with the node's bearer token
//! and the kubelet's CA, and turns them into `k8s:*` and `container:*`
//! selectors.
//!
//! Selectors: `k8s:ns:`, `k8s:sa:`, `k8s:pod-name:`, `k8s:pod-uid:`,
//! `k8s:pod-label:K:V`, `k8s:pod-owner:KIND:NAME`, `k8s:container-name:`,
//! `k8s:container-image:` (the image as in the pod spec/status and, when the
//! kubelet reports it, the resolved image ID), `k8s:node-name:`, and
//! `container:id:`, `container:runtime:` (from the status's
//! `containerd://…`, `cri-o://…`, `docker://…`).
//!
//! The PodList is cached for `cache_ttl`; a pod or container not yet in the
//! cached list makes one fresh request (new pods appear at once). A
//! container not in the kubelet's answer, or not running, yields nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use sigil_core::selector::Selector;

use super::cgroup::container_from_cgroup;
use super::{BoxFuture, Workload, WorkloadAttestError, WorkloadAttestor};

/// Largest PodList read (a node with a few hundred pods is a few MiB).
const MAX_BODY: usize = 32 << 20;

/// Settings of `[workload_attestor.k8s]`.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    /// `https://host:port` of the kubelet (default `https://127.0.0.1:10250`).
    pub kubelet_url: http::Uri,
    /// File with the bearer token (re-read for every request: it rotates).
    pub token_path: PathBuf,
    /// PEM CA certificate(s) that issued the kubelet's serving certificate.
    pub ca_path: PathBuf,
    /// How long a PodList is reused.
    pub cache_ttl: Duration,
    /// Deadline for one attestation.
    pub timeout: Duration,
}

/// The k8s attestor.
#[derive(Debug)]
pub struct K8sAttestor {
    cfg: K8sConfig,
    pods: Mutex<Option<(Instant, Arc<PodList>)>>,
}

/// The parts of a v1 PodList used.
#[derive(Debug, Deserialize)]
pub struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: Meta,
    #[serde(default)]
    spec: Option<PodSpec>,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    owner_references: Option<Vec<Owner>>,
}

#[derive(Debug, Deserialize)]
struct Owner {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: String,
    #[serde(default)]
    node_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default, rename = "imageID")]
    image_id: String,
    #[serde(default, rename = "containerID")]
    container_id: String,
    #[serde(default)]
    state: Option<ContainerState>,
}

#[derive(Debug, Deserialize)]
struct ContainerState {
    #[serde(default)]
    running: Option<serde_json::Value>,
}

/// Splits `containerd://<id>` into (`containerd`, `<id>`).
fn split_container_id(s: &str) -> Option<(&'static str, &str)> {
    let (scheme, id) = s.split_once("://")?;
    let runtime = match scheme {
        "containerd" => "containerd",
        "cri-o" => "crio",
        "docker" => "docker",
        _ => return None,
    };
    Some((runtime, id))
}

impl PodList {
    /// Parses a PodList JSON document.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("unexpected kubelet answer: {e}"))
    }

    /// The selectors of container `container_id` in pod `pod_uid`, or
    /// `None` when the list does not (yet) have that running container.
    pub fn selectors_for(&self, pod_uid: &str, container_id: &str) -> Option<Vec<Selector>> {
        let pod = self.items.iter().find(|p| p.metadata.uid == pod_uid)?;
        let status = pod.status.as_ref()?;
        let (runtime, c) = status
            .container_statuses
            .iter()
            .chain(&status.init_container_statuses)
            .chain(&status.ephemeral_container_statuses)
            .find_map(|c| {
                let (rt, id) = split_container_id(&c.container_id)?;
                (id == container_id).then_some((rt, c))
            })?;
        if c.state.as_ref().is_none_or(|s| s.running.is_none()) {
            return None;
        }
        let mut out = Vec::new();
        let mut add = |kind: &str, v: String| {
            if let Ok(s) = Selector::new(kind, &v) {
                out.push(s);
            }
        };
        let m = &pod.metadata;
        add("k8s", format!("ns:{}", m.namespace));
        add("k8s", format!("pod-name:{}", m.name));
        add("k8s", format!("pod-uid:{}", m.uid));
        for (k, v) in m.labels.iter().flatten() {
            add("k8s", format!("pod-label:{k}:{v}"));
        }
        for o in m.owner_references.iter().flatten() {
            add("k8s", format!("pod-owner:{}:{}", o.kind, o.name));
        }
        if let Some(spec) = &pod.spec {
            if !spec.service_account_name.is_empty() {
                add("k8s", format!("sa:{}", spec.service_account_name));
            }
            if !spec.node_name.is_empty() {
                add("k8s", format!("node-name:{}", spec.node_name));
            }
        }
        add("k8s", format!("container-name:{}", c.name));
        if !c.image.is_empty() {
            add("k8s", format!("container-image:{}", c.image));
        }
        if !c.image_id.is_empty() && c.image_id != c.image {
            add("k8s", format!("container-image:{}", c.image_id));
        }
        add("container", format!("id:{container_id}"));
        add("container", format!("runtime:{runtime}"));
        Some(out)
    }
}

impl K8sAttestor {
    /// An attestor for `cfg`; nothing is read until a call needs it.
    pub fn new(cfg: K8sConfig) -> Self {
        Self {
            cfg,
            pods: Mutex::new(None),
        }
    }

    fn tls(&self) -> Result<rustls::ClientConfig, WorkloadAttestError> {
        let bad = |e: String| {
            WorkloadAttestError::Unavailable(format!(
                "k8s ca_path {}: {e}",
                self.cfg.ca_path.display()
            ))
        };
        let pem_text = std::fs::read(&self.cfg.ca_path).map_err(|e| bad(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for block in pem::parse_many(&pem_text).map_err(|e| bad(e.to_string()))? {
            if block.tag() == "CERTIFICATE" {
                roots
                    .add(CertificateDer::from(block.into_contents()))
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(bad("no CERTIFICATE in the file".into()));
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
    }

    async fn fetch(&self) -> Result<PodList, WorkloadAttestError> {
        let url = &self.cfg.kubelet_url;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            WorkloadAttestError::Unavailable(format!("kubelet {url}: {what}: {e}"))
        };
        let token = std::fs::read_to_string(&self.cfg.token_path).map_err(|e| {
            WorkloadAttestError::Unavailable(format!(
                "k8s token_path {}: {e}",
                self.cfg.token_path.display()
            ))
        })?;
        let token = token.trim();
        let host = url.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port_u16().unwrap_or(10250);
        let name =
            ServerName::try_from(host.to_string()).map_err(|e| unavailable("host name", &e))?;
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| unavailable("connect", &e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(self.tls()?))
            .connect(name, tcp)
            .await
            .map_err(|e| unavailable("TLS", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unavailable("handshake", &e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get("/pods")
            .header(
                http::header::HOST,
                url.authority().map_or(host, |a| a.as_str()),
            )
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| unavailable("request", &e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unavailable("request", &e))?;
        if !resp.status().is_success() {
            return Err(unavailable("answer", &resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unavailable("body", &e))?
            .to_bytes();
        PodList::from_json(&body).map_err(|e| unavailable("pods", &e))
    }

    fn cached(&self, now: Instant) -> Option<Arc<PodList>> {
        let guard = self.pods.lock().ok()?;
        let (at, list) = guard.as_ref()?;
        (now.saturating_duration_since(*at) < self.cfg.cache_ttl).then(|| list.clone())
    }
}

impl WorkloadAttestor for K8sAttestor {
    fn kind(&self) -> &'static str {
        "k8s"
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
            let Some(pod_uid) = c.pod_uid else {
                return Ok(Vec::new());
            };
            let now = Instant::now();
            if let Some(list) = self.cached(now)
                && let Some(found) = list.selectors_for(&pod_uid, &c.id)
            {
                return Ok(found);
            }
            let list = Arc::new(self.fetch().await?);
            if let Ok(mut guard) = self.pods.lock() {
                *guard = Some((Instant::now(), list.clone()));
            }
            Ok(list.selectors_for(&pod_uid, &c.id).unwrap_or_default())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_id_schemes() {
        assert_eq!(
            split_container_id("containerd://abc"),
            Some(("containerd", "abc"))
        );
        assert_eq!(split_container_id("cri-o://abc"), Some(("crio", "abc")));
        assert_eq!(split_container_id("docker://abc"), Some(("docker", "abc")));
        assert_eq!(split_container_id("rkt://abc"), None);
        assert_eq!(split_container_id("abc"), None);
    }
}
