//! Workload attestors: selectors for the process at the other end of a
//! Workload API connection.
//!
//! - [`unix`] — always on: uid/gid/user/group/path/sha256 from the kernel
//!   and /proc, with the peer pinned by a pidfd.
//! - [`cgroup`] — which container and pod a process is in, from
//!   `/proc/<pid>/cgroup` (used by the container attestors).
//! - [`docker`] — `docker:*` and `container:*` from the Docker Engine API.
//! - [`k8s`] — `k8s:*` and `container:*` from the kubelet's `/pods` (HTTPS).
//! - [`systemd`] — `systemd:*` from the cgroup path and the unit files.
//! - `ima` (feature `tpm`) — `ima:sha256:*` for executables listed in an
//!   IMA log that replays to the TPM's PCR 10.
//! - [`config`] — the `[workload_attestor.*]` tables of agent.toml.
//!
//! Every attestor other than `unix` implements [`WorkloadAttestor`]; an
//! [`AttestorSet`] runs `unix` and then all enabled attestors concurrently,
//! each under its own deadline, and merges their selectors. An attestor
//! that fails or times out contributes nothing and is named in
//! [`Attested::failed`], so the caller can refuse to treat the set as
//! complete.

pub mod cgroup;
pub mod config;
pub mod docker;
#[cfg(feature = "tpm")]
pub mod ima;
pub mod k8s;
pub mod systemd;
pub mod unix;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sigil_core::selector::{Selector, SelectorSet};

use self::unix::{AttestError, Peer, UnixAttestor, UnixNeeds};

/// A boxed, sendable future (what [`WorkloadAttestor::attest`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Facts about a verified peer that every attestor may use. Built by
/// [`AttestorSet::attest`] only after the unix attestor succeeded, and the
/// cgroup file was read while the pidfd showed the process alive, so it
/// describes the process that connected.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Process ID of the peer.
    pub pid: i32,
    /// Effective uid at connect time.
    pub uid: u32,
    /// Contents of `/proc/<pid>/cgroup`.
    pub cgroup: String,
    /// The `unix:sha256` digest of its executable, when the unix attestor
    /// gave one (none when the binary changed after the process started).
    pub exe_sha256: Option<String>,
}

/// Why one attestor produced no selectors for a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadAttestError {
    /// The runtime or service behind the attestor could not be asked or
    /// gave an unusable answer (Docker down, kubelet refusing the token).
    #[error("{0}")]
    Unavailable(String),
    /// The attestor did not answer within its deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A source of selectors for verified peers (`docker`, `k8s`, `systemd`).
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// The attestor's name, as in `[workload_attestor.<kind>]`.
    fn kind(&self) -> &'static str;

    /// How long one call may take before it counts as failed.
    fn timeout(&self) -> Duration;

    /// The selectors this attestor vouches for, for `workload`. `Ok(vec![])`
    /// means "nothing to say" (e.g. the process is in no container); an
    /// error means "could not tell", which makes the whole set incomplete.
    fn attest<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> BoxFuture<'a, Result<Vec<Selector>, WorkloadAttestError>>;

    /// Whether [`Workload::exe_sha256`] must be known for this attestor to
    /// answer (the IMA attestor), so the unix attestor derives it on every
    /// call even when no entry names a `unix:sha256`.
    fn needs_exe_digest(&self) -> bool {
        false
    }
}

/// The result of attesting one caller.
#[derive(Debug, Clone, Default)]
pub struct Attested {
    /// All selectors of every attestor that answered.
    pub selectors: SelectorSet,
    /// Attestors that failed or timed out, with why. Non-empty means the
    /// set is incomplete: it must not be served as the caller's identity.
    pub failed: Vec<(&'static str, WorkloadAttestError)>,
}

/// `unix` plus the attestors enabled in the config.
#[derive(Debug, Default)]
pub struct AttestorSet {
    unix: Arc<UnixAttestor>,
    others: Vec<Arc<dyn WorkloadAttestor>>,
    /// What the unix attestor derives on every call whatever the entries
    /// use: the binary's digest when an attestor needs it.
    floor: UnixNeeds,
}

impl AttestorSet {
    /// `unix` and `others`, which run in this order for every call.
    pub fn new(others: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        let floor = UnixNeeds {
            groups: false,
            exe: others.iter().any(|a| a.needs_exe_digest()),
        };
        Self {
            unix: Arc::new(UnixAttestor::new()),
            others,
            floor,
        }
    }

    /// Names of the enabled attestors, `unix` first.
    pub fn kinds(&self) -> Vec<&'static str> {
        std::iter::once("unix")
            .chain(self.others.iter().map(|a| a.kind()))
            .collect()
    }

    /// Attests `peer`. Fails (no identity at all) only when the unix
    /// attestor fails or the process is gone; any other attestor's failure
    /// or timeout is reported in [`Attested::failed`] with one log line.
    /// Each attestor runs as its own task under its own deadline, so a slow
    /// runtime API delays only the callers that need it, by at most that
    /// deadline.
    pub async fn attest(&self, peer: Arc<Peer>) -> Result<Attested, AttestError> {
        self.attest_for(peer, UnixNeeds::ALL).await
    }

    /// [`AttestorSet::attest`], with the unix attestor deriving its costlier
    /// selectors only as far as `needs` asks (see [`UnixNeeds`]; an
    /// attestor that needs the binary's digest widens it).
    pub async fn attest_for(
        &self,
        peer: Arc<Peer>,
        needs: UnixNeeds,
    ) -> Result<Attested, AttestError> {
        let needs = needs.union(self.floor);
        let pid = peer.pid;
        let mut selectors = match self.unix.attest_cached_for(&peer, needs) {
            Ok(Some(s)) => s,
            Ok(None) => {
                let unix = self.unix.clone();
                let p = peer.clone();
                tokio::task::spawn_blocking(move || unix.attest_for(&p, needs))
                    .await
                    .map_err(|_| AttestError::Proc(pid, "attestation task failed".into()))??
            }
            Err(e) => return Err(e),
        };
        let mut failed = Vec::new();
        if self.others.is_empty() {
            return Ok(Attested { selectors, failed });
        }
        let cgroup = unix::read_proc(pid, "cgroup")
            .map_err(|e| AttestError::Proc(pid, format!("cgroup: {e}")))?;
        if !peer.is_alive() {
            return Err(AttestError::ProcessGone(pid));
        }
        let workload = Arc::new(Workload {
            pid,
            uid: peer.uid,
            cgroup: String::from_utf8_lossy(&cgroup).into_owned(),
            exe_sha256: selectors
                .iter()
                .find_map(|s| s.as_str().strip_prefix("unix:sha256:"))
                .map(str::to_string),
        });
        let mut tasks = Vec::with_capacity(self.others.len());
        for a in &self.others {
            let a = a.clone();
            let w = workload.clone();
            let kind = a.kind();
            let task = tokio::spawn(async move {
                let limit = a.timeout();
                match tokio::time::timeout(limit, a.attest(&w)).await {
                    Ok(r) => r,
                    Err(_) => Err(WorkloadAttestError::Timeout(limit)),
                }
            });
            tasks.push((kind, task));
        }
        for (kind, task) in tasks {
            let result = task.await.unwrap_or_else(|_| {
                Err(WorkloadAttestError::Unavailable(
                    "attestor task failed".into(),
                ))
            });
            match result {
                Ok(found) => {
                    for s in found {
                        selectors.insert(s);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        attestor = kind,
                        pid,
                        error = %e,
                        "workload attestor failed: no {kind} selectors, the caller is refused until it answers"
                    );
                    failed.push((kind, e));
                }
            }
        }
        Ok(Attested { selectors, failed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[derive(Debug)]
    struct Fake {
        kind: &'static str,
        delay: Duration,
        answer: Result<Vec<&'static str>, &'static str>,
    }

    impl WorkloadAttestor for Fake {
        fn kind(&self) -> &'static str {
            self.kind
        }
        fn timeout(&self) -> Duration {
            Duration::from_millis(300)
        }
        fn attest<'a>(
            &'a self,
            _: &'a Workload,
        ) -> BoxFuture<'a, Result<Vec<Selector>, WorkloadAttestError>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                match &self.answer {
                    Ok(v) => Ok(v.iter().map(|s| s.parse().unwrap()).collect()),
                    Err(e) => Err(WorkloadAttestError::Unavailable((*e).into())),
                }
            })
        }
    }

    #[tokio::test]
    async fn merges_answers_and_reports_failures_and_timeouts_without_waiting_for_them() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Arc::new(Peer::from_socket(&a).unwrap());
        let set = AttestorSet::new(vec![
            Arc::new(Fake {
                kind: "docker",
                delay: Duration::ZERO,
                answer: Ok(vec!["docker:label:team:sec", "container:runtime:docker"]),
            }),
            Arc::new(Fake {
                kind: "k8s",
                delay: Duration::from_secs(60),
                answer: Ok(vec!["k8s:ns:default"]),
            }),
            Arc::new(Fake {
                kind: "systemd",
                delay: Duration::ZERO,
                answer: Err("cannot read unit files"),
            }),
        ]);
        assert_eq!(set.kinds(), vec!["unix", "docker", "k8s", "systemd"]);
        let start = Instant::now();
        let got = set.attest(peer).await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        let texts: Vec<String> = got.selectors.iter().map(ToString::to_string).collect();
        assert!(
            texts.contains(&"docker:label:team:sec".to_string()),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|s| s.starts_with("unix:uid:")),
            "{texts:?}"
        );
        assert!(!texts.iter().any(|s| s.starts_with("k8s:")), "{texts:?}");
        let failed: Vec<&str> = got.failed.iter().map(|(k, _)| *k).collect();
        assert_eq!(failed, vec!["k8s", "systemd"]);
        assert!(matches!(got.failed[0].1, WorkloadAttestError::Timeout(_)));
    }

    #[tokio::test]
    async fn a_peer_named_by_pid_attests_like_a_socket_peer() {
        let me = std::process::id() as i32;
        let by_pid = Peer::from_pid(me).unwrap();
        assert_eq!(by_pid.uid, nix::unistd::geteuid().as_raw());
        assert!(by_pid.is_alive());
        let (a, _b) = UnixStream::pair().unwrap();
        let by_socket = Peer::from_socket(&a).unwrap();
        let set = AttestorSet::new(vec![]);
        let x = set.attest(Arc::new(by_pid)).await.unwrap().selectors;
        let y = set.attest(Arc::new(by_socket)).await.unwrap().selectors;
        assert_eq!(x, y);
        assert!(Peer::from_pid(0).is_err());
        assert!(Peer::from_pid(-1).is_err());
    }
}
