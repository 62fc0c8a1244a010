//! The `[workload_attestor.*]` tables of agent.toml: one table per
//! attestor, its presence enables it. Unknown tables and keys are refused
//! by serde, naming them; bad values are refused naming the key.
//!
//! ```toml
//! [workload_attestor.docker]
//! socket_path = "/var/run/docker.sock"   # default
//! env = ["MODE"]                         # env names exposed as docker:env:
//! cache_ttl = "5s"                       # per-container metadata reuse
//! timeout = "2s"                         # per call
//!
//! [workload_attestor.k8s]
//! kubelet_url = "https://127.0.0.1:10250"   # default
//! token_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # default
//! ca_path = "/etc/sigil/kubelet-ca.pem"     # required: the kubelet serving CA
//! cache_ttl = "5s"
//! timeout = "2s"
//!
//! [workload_attestor.systemd]
//! unit_dirs = ["/etc/systemd/system", "/usr/lib/systemd/system"]
//! timeout = "1s"
//!
//! [workload_attestor.ima]
//! log_path = "/sys/kernel/security/ima/binary_runtime_measurements_sha256"  # default
//! tcti = "device:/dev/tpmrm0"                # required: the TPM holding PCR 10
//! timeout = "2s"
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sigil_core::duration::parse_duration;

use super::docker::{DockerAttestor, DockerConfig};
use super::k8s::{K8sAttestor, K8sConfig};
use super::systemd::{DEFAULT_UNIT_DIRS, SystemdAttestor, SystemdConfig};
use super::{AttestorSet, WorkloadAttestor};

/// Longest `timeout` an attestor may be given: callers wait for it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `cache_ttl`.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);

/// `[workload_attestor]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkloadAttestors {
    docker: Option<RawDocker>,
    systemd: Option<RawSystemd>,
    k8s: Option<RawK8s>,
    ima: Option<RawIma>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIma {
    #[serde(default = "default_ima_log")]
    log_path: PathBuf,
    tcti: String,
    #[serde(default)]
    timeout: Option<String>,
}

fn default_ima_log() -> PathBuf {
    "/sys/kernel/security/ima/binary_runtime_measurements_sha256".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawK8s {
    #[serde(default = "default_kubelet_url")]
    kubelet_url: String,
    #[serde(default = "default_token_path")]
    token_path: PathBuf,
    ca_path: PathBuf,
    #[serde(default)]
    cache_ttl: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

fn default_kubelet_url() -> String {
    "https://127.0.0.1:10250".into()
}

fn default_token_path() -> PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    #[serde(default = "default_docker_socket")]
    socket_path: PathBuf,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cache_ttl: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSystemd {
    #[serde(default)]
    unit_dirs: Option<Vec<PathBuf>>,
    #[serde(default)]
    timeout: Option<String>,
}

fn default_docker_socket() -> PathBuf {
    "/var/run/docker.sock".into()
}

/// A bad value in a `[workload_attestor.*]` table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct AttestorConfigError {
    /// The dotted key (`workload_attestor.docker.timeout`).
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn err(key: &'static str, reason: impl ToString) -> AttestorConfigError {
    AttestorConfigError {
        key,
        reason: reason.to_string(),
    }
}

fn duration(
    key: &'static str,
    v: Option<&str>,
    default: Duration,
    max: Duration,
) -> Result<Duration, AttestorConfigError> {
    let Some(v) = v else { return Ok(default) };
    let d = parse_duration(v).map_err(|e| err(key, e))?;
    if d > max {
        return Err(err(
            key,
            format!("{v:?} exceeds the maximum of {}s", max.as_secs()),
        ));
    }
    Ok(d)
}

/// The validated settings of every enabled attestor.
#[derive(Debug, Clone, Default)]
pub struct WorkloadAttestorSettings {
    /// `[workload_attestor.docker]`, if present.
    pub docker: Option<DockerConfig>,
    /// `[workload_attestor.systemd]`, if present.
    pub systemd: Option<SystemdConfig>,
    /// `[workload_attestor.k8s]`, if present.
    pub k8s: Option<K8sConfig>,
    /// `[workload_attestor.ima]`, if present.
    #[cfg(feature = "tpm")]
    pub ima: Option<super::ima::ImaConfig>,
}

impl RawWorkloadAttestors {
    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<WorkloadAttestorSettings, AttestorConfigError> {
        let docker = match &self.docker {
            None => None,
            Some(d) => {
                if !d.socket_path.is_absolute() {
                    return Err(err(
                        "workload_attestor.docker.socket_path",
                        format!("{} is not an absolute path", d.socket_path.display()),
                    ));
                }
                for name in &d.env {
                    if name.is_empty() || name.contains('=') || name.chars().any(char::is_control) {
                        return Err(err(
                            "workload_attestor.docker.env",
                            format!("{name:?} is not an environment variable name"),
                        ));
                    }
                }
                Some(DockerConfig {
                    socket_path: d.socket_path.clone(),
                    env: d.env.clone(),
                    cache_ttl: duration(
                        "workload_attestor.docker.cache_ttl",
                        d.cache_ttl.as_deref(),
                        Duration::from_secs(5),
                        MAX_CACHE_TTL,
                    )?,
                    timeout: duration(
                        "workload_attestor.docker.timeout",
                        d.timeout.as_deref(),
                        Duration::from_secs(2),
                        MAX_TIMEOUT,
                    )?,
                })
            }
        };
        let systemd = match &self.systemd {
            None => None,
            Some(s) => {
                let unit_dirs = s
                    .unit_dirs
                    .clone()
                    .unwrap_or_else(|| DEFAULT_UNIT_DIRS.iter().map(PathBuf::from).collect());
                if let Some(bad) = unit_dirs.iter().find(|d| !d.is_absolute()) {
                    return Err(err(
                        "workload_attestor.systemd.unit_dirs",
                        format!("{} is not an absolute path", bad.display()),
                    ));
                }
                Some(SystemdConfig {
                    unit_dirs,
                    timeout: duration(
                        "workload_attestor.systemd.timeout",
                        s.timeout.as_deref(),
                        Duration::from_secs(1),
                        MAX_TIMEOUT,
                    )?,
                })
            }
        };
        let k8s = match &self.k8s {
            None => None,
            Some(k) => {
                let url: http::Uri = k.kubelet_url.parse().map_err(|e| {
                    err(
                        "workload_attestor.k8s.kubelet_url",
                        format!("{:?}: {e}", k.kubelet_url),
                    )
                })?;
                if url.scheme_str() != Some("https") || url.host().is_none_or(str::is_empty) {
                    return Err(err(
                        "workload_attestor.k8s.kubelet_url",
                        format!("{:?} is not an https://host:port URL", k.kubelet_url),
                    ));
                }
                for (key, p) in [
                    ("workload_attestor.k8s.token_path", &k.token_path),
                    ("workload_attestor.k8s.ca_path", &k.ca_path),
                ] {
                    if !p.is_absolute() {
                        return Err(err(key, format!("{} is not an absolute path", p.display())));
                    }
                }
                Some(K8sConfig {
                    kubelet_url: url,
                    token_path: k.token_path.clone(),
                    ca_path: k.ca_path.clone(),
                    cache_ttl: duration(
                        "workload_attestor.k8s.cache_ttl",
                        k.cache_ttl.as_deref(),
                        Duration::from_secs(5),
                        MAX_CACHE_TTL,
                    )?,
                    timeout: duration(
                        "workload_attestor.k8s.timeout",
                        k.timeout.as_deref(),
                        Duration::from_secs(2),
                        MAX_TIMEOUT,
                    )?,
                })
            }
        };
        #[cfg(feature = "tpm")]
        let ima = match &self.ima {
            None => None,
            Some(i) => {
                if !i.log_path.is_absolute() {
                    return Err(err(
                        "workload_attestor.ima.log_path",
                        format!("{} is not an absolute path", i.log_path.display()),
                    ));
                }
                if i.tcti.trim().is_empty() {
                    return Err(err("workload_attestor.ima.tcti", "must not be empty"));
                }
                Some(super::ima::ImaConfig {
                    log_path: i.log_path.clone(),
                    tcti: i.tcti.clone(),
                    timeout: duration(
                        "workload_attestor.ima.timeout",
                        i.timeout.as_deref(),
                        Duration::from_secs(2),
                        MAX_TIMEOUT,
                    )?,
                })
            }
        };
        #[cfg(not(feature = "tpm"))]
        if self.ima.is_some() {
            return Err(err(
                "workload_attestor.ima",
                "this build has no TPM support (feature `tpm`)",
            ));
        }
        Ok(WorkloadAttestorSettings {
            #[cfg(feature = "tpm")]
            ima,
            docker,
            systemd,
            k8s,
        })
    }
}

impl WorkloadAttestorSettings {
    /// The attestor set: `unix`, then the enabled ones.
    pub fn build(&self) -> AttestorSet {
        let mut others: Vec<Arc<dyn WorkloadAttestor>> = Vec::new();
        if let Some(d) = &self.docker {
            others.push(Arc::new(DockerAttestor::new(d.clone())));
        }
        if let Some(s) = &self.systemd {
            others.push(Arc::new(SystemdAttestor::new(s.clone())));
        }
        if let Some(k) = &self.k8s {
            others.push(Arc::new(K8sAttestor::new(k.clone())));
        }
        #[cfg(feature = "tpm")]
        if let Some(i) = &self.ima {
            others.push(Arc::new(super::ima::ImaAttestor::new(i.clone())));
        }
        AttestorSet::new(others)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        workload_attestor: RawWorkloadAttestors,
    }

    fn parse(s: &str) -> Result<WorkloadAttestorSettings, String> {
        let d: Doc = toml::from_str(s).map_err(|e| e.to_string())?;
        d.workload_attestor.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn tables_enable_attestors_with_defaults() {
        let s = parse("[workload_attestor.docker]\n[workload_attestor.systemd]\n").unwrap();
        let d = s.docker.unwrap();
        assert_eq!(d.socket_path, PathBuf::from("/var/run/docker.sock"));
        assert_eq!(d.cache_ttl, Duration::from_secs(5));
        assert_eq!(s.systemd.unwrap().unit_dirs.len(), DEFAULT_UNIT_DIRS.len());
        let none = parse("").unwrap();
        assert!(none.docker.is_none() && none.systemd.is_none());
        assert_eq!(none.build().kinds(), vec!["unix"]);
    }

    #[test]
    fn the_ima_table_enables_the_ima_attestor() {
        let s = parse("[workload_attestor.ima]\ntcti = \"swtpm:port=2321\"\n").unwrap();
        let ima = s.ima.clone().unwrap();
        assert_eq!(
            ima.log_path,
            PathBuf::from("/sys/kernel/security/ima/binary_runtime_measurements_sha256")
        );
        assert_eq!(ima.timeout, Duration::from_secs(2));
        assert_eq!(s.build().kinds(), vec!["unix", "ima"]);
    }

    #[test]
    fn unknown_tables_keys_and_bad_values_are_named() {
        for (doc, name) in [
            ("[workload_attestor.dokcer]\n", "dokcer"),
            ("[workload_attestor.docker]\nsocket = \"/x\"\n", "socket"),
            (
                "[workload_attestor.docker]\ntimeout = \"soon\"\n",
                "workload_attestor.docker.timeout",
            ),
            (
                "[workload_attestor.docker]\ntimeout = \"1h\"\n",
                "workload_attestor.docker.timeout",
            ),
            (
                "[workload_attestor.docker]\ncache_ttl = \"0s\"\n",
                "workload_attestor.docker.cache_ttl",
            ),
            (
                "[workload_attestor.docker]\nsocket_path = \"run/d.sock\"\n",
                "workload_attestor.docker.socket_path",
            ),
            (
                "[workload_attestor.docker]\nenv = [\"A=B\"]\n",
                "workload_attestor.docker.env",
            ),
            (
                "[workload_attestor.systemd]\nunit_dirs = [\"etc\"]\n",
                "workload_attestor.systemd.unit_dirs",
            ),
            ("[workload_attestor.k8s]\n", "ca_path"),
            (
                "[workload_attestor.k8s]\nca_path = \"/ca.pem\"\nkubelet_url = \"http://node:10250\"\n",
                "workload_attestor.k8s.kubelet_url",
            ),
            (
                "[workload_attestor.k8s]\nca_path = \"ca.pem\"\n",
                "workload_attestor.k8s.ca_path",
            ),
            ("[workload_attestor.ima]\n", "tcti"),
            (
                "[workload_attestor.ima]\ntcti = \"swtpm:port=2321\"\nlog_path = \"ima.log\"\n",
                "workload_attestor.ima.log_path",
            ),
            (
                "[workload_attestor.ima]\ntcti = \" \"\n",
                "workload_attestor.ima.tcti",
            ),
            (
                "[workload_attestor.ima]\ntcti = \"swtpm:port=2321\"\nlog = \"/x\"\n",
                "unknown field `log`",
            ),
        ] {
            let e = parse(doc).unwrap_err();
            assert!(e.contains(name), "{doc:?}: {e}");
        }
    }
}
