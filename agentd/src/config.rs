//! `agent.toml` (every key in deploy/config/agent.toml), unknown keys refused,
//! `log_level` one of the level names, and every path absolute.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sigil_attestors::workload::config::{RawWorkloadAttestors, WorkloadAttestorSettings};
use sigil_core::TrustDomain;

/// Built-in agent admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil/agent/private/admin.sock";
/// Built-in Workload API socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/run/sigil/agent/public/api.sock";
pub use sigil_core::LOG_LEVELS;

/// Refuses an empty or relative path, naming the key.
fn absolute(key: &'static str, p: &Path) -> Result<(), ConfigError> {
    sigil_core::config_path_problem(p).map_or(Ok(()), |reason| Err(key_err(key, reason)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: String,
    #[serde(default)]
    server_address: Option<String>,
    #[serde(default)]
    server_port: Option<u16>,
    /// Several servers as `host:port` (instead of server_address/port).
    #[serde(default)]
    servers: Option<Vec<String>>,
    #[serde(default)]
    socket_path: Option<PathBuf>,
    #[serde(default)]
    admin_socket: Option<PathBuf>,
    data_dir: PathBuf,
    #[serde(default)]
    trust_bundle_path: Option<PathBuf>,
    #[serde(default)]
    insecure_bootstrap: bool,
    #[serde(default)]
    join_token: Option<String>,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    node_attestor: Option<String>,
    #[serde(default)]
    x509pop: Option<RawX509Pop>,
    #[serde(default)]
    tpm: Option<RawTpm>,
    /// `[workload_attestor.docker]`, `[workload_attestor.systemd]`.
    #[serde(default)]
    workload_attestor: RawWorkloadAttestors,
    #[serde(default)]
    limits: crate::workload_socket::RawLimits,
    #[serde(default)]
    telemetry: sigil_telemetry::RawTelemetry,
    #[serde(default)]
    broker: Option<RawBroker>,
    /// How long SVIDs are served without contact with the server.
    #[serde(default)]
    serve_offline_for: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawX509Pop {
    cert_path: PathBuf,
    key_path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpm {
    #[serde(default = "default_tcti")]
    tcti: String,
    #[serde(default)]
    ima_log_path: Option<PathBuf>,
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}

/// How the agent proves its node's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestor {
    /// A single-use join token (`--join-token`).
    JoinToken,
    /// Possession of a node certificate's key.
    X509Pop {
        cert_path: PathBuf,
        key_path: PathBuf,
    },
    /// TPM 2.0 EK/AK credential activation and PCR quote; with
    /// `ima_log_path`, the binary ima-ng log (SHA-256 bank) goes with every
    /// quote and PCR 10 is quoted.
    Tpm {
        tcti: String,
        ima_log_path: Option<PathBuf>,
    },
}

fn default_port() -> u16 {
    8081
}

/// How the agent authenticates the server before it has a bundle of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// PEM file with the trust domain's CA certificates.
    BundleFile(PathBuf),
    /// Trust the first server answering (loudly logged).
    Insecure,
}

/// One server's address: a host name or IP address and a port. A host
/// name with several addresses is tried address by address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    pub host: String,
    pub port: u16,
}

impl ServerAddress {
    /// Checks a host and port.
    pub fn new(host: &str, port: u16) -> Result<Self, String> {
        if host.is_empty()
            || host.parse::<IpAddr>().is_err()
                && host.contains(|c: char| c.is_whitespace() || c == '/' || c == ':')
        {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
        if port == 0 {
            return Err(format!("{host:?}: port must not be 0"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }

    /// Parses `host:port` (`[v6]:port` for an IPv6 address).
    pub fn parse_host_port(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Self::new(host, port).map_err(|e| format!("{s:?}: {e}"))
    }

    /// `host:port` for connecting (IPv6 addresses in brackets).
    pub fn connect_string(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub trust_domain: TrustDomain,
    /// The servers to talk to, in order of preference (at least one): the
    /// agent uses one at a time and moves to the next when it is lost.
    pub servers: Vec<ServerAddress>,
    pub socket_path: PathBuf,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    pub bootstrap: Bootstrap,
    pub join_token: Option<String>,
    pub log_level: String,
    pub node_attestor: NodeAttestor,
    /// Workload attestors besides `unix`, from `[workload_attestor.*]`.
    pub workload_attestors: WorkloadAttestorSettings,
    /// `[limits]`: Workload API connection caps and idle timeout.
    pub limits: crate::workload_socket::WorkloadLimits,
    /// `[telemetry]`: where `/metrics`, `/ready` and `/live` are served.
    pub telemetry: sigil_telemetry::TelemetryConfig,
    /// `[broker]`: the SPIFFE Broker Endpoint, off when absent.
    pub broker: Option<BrokerConfig>,
    /// `serve_offline_for`: serve cached SVIDs for at most this long after
    /// the sync stream to the server is lost (`None`: until they expire).
    pub serve_offline_for: Option<std::time::Duration>,
}

/// A config error, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Key { key: &'static str, reason: String },
}

fn key_err(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Key {
        key,
        reason: reason.to_string(),
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            ConfigError::Parse(sigil_core::config_error(text, e.span(), e.message()))
        })?;
        let trust_domain = TrustDomain::new(&raw.trust_domain)
            .map_err(|e| key_err("trust_domain", format!("{:?}: {e}", raw.trust_domain)))?;
        let servers = match (raw.servers, raw.server_address) {
            (Some(_), Some(_)) => {
                return Err(key_err(
                    "servers",
                    "cannot be combined with server_address (list every server in servers)",
                ));
            }
            (Some(_), None) if raw.server_port.is_some() => {
                return Err(key_err(
                    "server_port",
                    "cannot be combined with servers (give each server as host:port)",
                ));
            }
            (Some(list), None) => {
                if list.is_empty() {
                    return Err(key_err("servers", "must name at least one host:port"));
                }
                list.iter()
                    .map(|s| ServerAddress::parse_host_port(s).map_err(|e| key_err("servers", e)))
                    .collect::<Result<Vec<_>, _>>()?
            }
            (None, Some(host)) => {
                let port = raw.server_port.unwrap_or_else(default_port);
                if port == 0 {
                    return Err(key_err("server_port", "must not be 0"));
                }
                vec![ServerAddress::new(&host, port).map_err(|e| key_err("server_address", e))?]
            }
            (None, None) => {
                return Err(key_err(
                    "server_address",
                    "missing: set server_address (and server_port) or servers",
                ));
            }
        };
        let bootstrap = match (raw.trust_bundle_path, raw.insecure_bootstrap) {
            (Some(_), true) => {
                return Err(key_err(
                    "insecure_bootstrap",
                    "cannot be combined with trust_bundle_path",
                ));
            }
            (Some(p), false) => Bootstrap::BundleFile(p),
            (None, true) => Bootstrap::Insecure,
            (None, false) => {
                return Err(key_err(
                    "trust_bundle_path",
                    "required unless insecure_bootstrap = true",
                ));
            }
        };
        let node_attestor = match raw.node_attestor.as_deref().unwrap_or("join_token") {
            "join_token" => NodeAttestor::JoinToken,
            "x509pop" => {
                let x = raw.x509pop.ok_or_else(|| key_err("x509pop", "node_attestor = \"x509pop\" needs an [x509pop] table with cert_path and key_path"))?;
                NodeAttestor::X509Pop {
                    cert_path: x.cert_path,
                    key_path: x.key_path,
                }
            }
            "tpm" => {
                let (tcti, ima_log_path) = match raw.tpm {
                    Some(t) => (t.tcti, t.ima_log_path),
                    None => (default_tcti(), None),
                };
                NodeAttestor::Tpm { tcti, ima_log_path }
            }
            other => {
                return Err(key_err(
                    "node_attestor",
                    format!("unknown attestor {other:?} (expected join_token, x509pop or tpm)"),
                ));
            }
        };
        let workload_attestors =
            raw.workload_attestor
                .validate()
                .map_err(|e| ConfigError::Key {
                    key: e.key,
                    reason: e.reason,
                })?;
        absolute("data_dir", &raw.data_dir)?;
        for (key, p) in [
            ("socket_path", &raw.socket_path),
            ("admin_socket", &raw.admin_socket),
        ] {
            if let Some(p) = p {
                absolute(key, p)?;
            }
        }
        if let Bootstrap::BundleFile(p) = &bootstrap {
            absolute("trust_bundle_path", p)?;
        }
        if let NodeAttestor::X509Pop {
            cert_path,
            key_path,
        } = &node_attestor
        {
            absolute("x509pop.cert_path", cert_path)?;
            absolute("x509pop.key_path", key_path)?;
        }
        let serve_offline_for = raw
            .serve_offline_for
            .as_deref()
            .map(|s| match sigil_core::duration::parse_duration(s) {
                Ok(d) if d.is_zero() => Err(key_err(
                    "serve_offline_for",
                    "must be positive (leave it out to serve until the SVIDs expire)",
                )),
                Ok(d) => Ok(d),
                Err(e) => Err(key_err("serve_offline_for", format!("{s:?}: {e}"))),
            })
            .transpose()?;
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if let Some(reason) = sigil_core::log_level_problem(&log_level) {
            return Err(key_err("log_level", reason));
        }
        Ok(AgentConfig {
            trust_domain,
            servers,
            socket_path: raw
                .socket_path
                .unwrap_or_else(|| DEFAULT_SOCKET_PATH.into()),
            admin_socket: raw
                .admin_socket
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            data_dir: raw.data_dir,
            bootstrap,
            join_token: raw.join_token,
            log_level,
            node_attestor,
            workload_attestors,
            serve_offline_for,
            limits: raw
                .limits
                .validate()
                .map_err(|(key, reason)| key_err(key, reason))?,
            telemetry: raw
                .telemetry
                .validate()
                .map_err(|(key, reason)| key_err(key, reason))?,
            broker: raw.broker.map(RawBroker::validate).transpose()?,
        })
    }
}

/// `[broker]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    socket_path: PathBuf,
    authorized_brokers: Vec<String>,
}

/// Most SPIFFE IDs in `broker.authorized_brokers`.
pub const MAX_AUTHORIZED_BROKERS: usize = 64;

/// `[broker]`: the SPIFFE Broker Endpoint (mTLS over a Unix socket).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The endpoint's socket (its directory is created 0700, the socket 0600).
    pub socket_path: PathBuf,
    /// The only brokers served, by the SPIFFE ID of their client X.509-SVID.
    pub authorized_brokers: Vec<sigil_core::SpiffeId>,
}

impl RawBroker {
    fn validate(self) -> Result<BrokerConfig, ConfigError> {
        absolute("broker.socket_path", &self.socket_path)?;
        if self.authorized_brokers.is_empty() {
            return Err(key_err(
                "broker.authorized_brokers",
                "name at least one broker SPIFFE ID (an empty list would serve no one)",
            ));
        }
        if self.authorized_brokers.len() > MAX_AUTHORIZED_BROKERS {
            return Err(key_err(
                "broker.authorized_brokers",
                format!("at most {MAX_AUTHORIZED_BROKERS} IDs"),
            ));
        }
        let authorized_brokers = self
            .authorized_brokers
            .iter()
            .map(|s| {
                sigil_core::SpiffeId::new(s)
                    .map_err(|e| key_err("broker.authorized_brokers", format!("{s:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(BrokerConfig {
            socket_path: self.socket_path,
            authorized_brokers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1\"\ndata_dir = \"/tmp/a\"\n";

    #[test]
    fn servers_lists_several_servers_and_is_exclusive_with_server_address() {
        let head =
            "trust_domain = \"example.org\"\ndata_dir = \"/tmp/a\"\ninsecure_bootstrap = true\n";
        let c = AgentConfig::parse(&format!(
            "{head}servers = [\"10.0.0.1:8081\", \"[::1]:9000\", \"sigil.example.org:8081\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.servers,
            vec![
                ServerAddress::new("10.0.0.1", 8081).unwrap(),
                ServerAddress::new("::1", 9000).unwrap(),
                ServerAddress::new("sigil.example.org", 8081).unwrap(),
            ]
        );
        assert_eq!(c.servers[1].connect_string(), "[::1]:9000");
        for (bad, key) in [
            ("servers = []\n", "servers"),
            ("servers = [\"10.0.0.1\"]\n", "servers"),
            ("servers = [\"10.0.0.1:0\"]\n", "servers"),
            ("servers = [\"10.0.0.1:x\"]\n", "servers"),
            ("servers = [\"a b:1\"]\n", "servers"),
            (
                "servers = [\"10.0.0.1:1\"]\nserver_address = \"10.0.0.2\"\n",
                "servers",
            ),
            (
                "servers = [\"10.0.0.1:1\"]\nserver_port = 1\n",
                "server_port",
            ),
            ("", "server_address"),
        ] {
            let e = AgentConfig::parse(&format!("{head}{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad:?}: {e}");
        }
    }

    #[test]
    fn minimal_config_parses() {
        let c = AgentConfig::parse(&format!("{BASE}insecure_bootstrap = true\n")).unwrap();
        assert_eq!(
            c.servers,
            vec![ServerAddress::new("127.0.0.1", 8081).unwrap()]
        );
        assert_eq!(c.bootstrap, Bootstrap::Insecure);
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
    }

    #[test]
    fn the_tpm_table_takes_an_optional_ima_log_path_and_no_unknown_keys() {
        let tpm = |table: &str| {
            AgentConfig::parse(&format!(
                "{BASE}insecure_bootstrap = true\nnode_attestor = \"tpm\"\n[tpm]\n{table}"
            ))
        };
        let c = tpm("tcti = \"swtpm:port=2321\"\nima_log_path = \"/tmp/ima.log\"\n").unwrap();
        assert_eq!(
            c.node_attestor,
            NodeAttestor::Tpm {
                tcti: "swtpm:port=2321".into(),
                ima_log_path: Some(PathBuf::from("/tmp/ima.log")),
            }
        );
        let c = tpm("").unwrap();
        assert_eq!(
            c.node_attestor,
            NodeAttestor::Tpm {
                tcti: default_tcti(),
                ima_log_path: None,
            }
        );
        let e = tpm("ima_log = \"/tmp/ima.log\"\n").unwrap_err().to_string();
        assert!(e.contains("ima_log"), "{e}");
    }

    #[test]
    fn serve_offline_for_is_a_positive_duration() {
        let ok = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\nserve_offline_for = \"90s\"\n"
        ))
        .unwrap();
        assert_eq!(
            ok.serve_offline_for,
            Some(std::time::Duration::from_secs(90))
        );
        let unset = AgentConfig::parse(&format!("{BASE}insecure_bootstrap = true\n")).unwrap();
        assert_eq!(unset.serve_offline_for, None);
        for bad in ["0s", "soon", "-5m"] {
            let e = AgentConfig::parse(&format!(
                "{BASE}insecure_bootstrap = true\nserve_offline_for = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("serve_offline_for"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\nsocket_pth = \"/x\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("socket_pth"), "{e}");
        let e = AgentConfig::parse(BASE).unwrap_err().to_string();
        assert!(e.contains("trust_bundle_path"), "{e}");
        let e = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\ntrust_bundle_path = \"/b\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("insecure_bootstrap"), "{e}");
    }

    #[test]
    fn workload_attestor_tables() {
        let c = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\n[workload_attestor.docker]\nsocket_path = \"/run/d.sock\"\nenv = [\"MODE\"]\n"
        ))
        .unwrap();
        assert_eq!(c.workload_attestors.build().kinds(), vec!["unix", "docker"]);
        let e = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\n[workload_attestor.kubernetes]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("kubernetes"), "{e}");
        let e = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\n[workload_attestor.docker]\ntimeout = \"forever\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("workload_attestor.docker.timeout"), "{e}");
    }

    #[test]
    fn log_level_must_be_a_level() {
        let e = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\nlog_level = \"bogus\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("`log_level`") && e.contains("bogus"), "{e}");
        let c = AgentConfig::parse(&format!(
            "{BASE}insecure_bootstrap = true\nlog_level = \"debug\"\n"
        ))
        .unwrap();
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn paths_must_be_absolute() {
        let head = "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1\"\n";
        let e = AgentConfig::parse(&format!(
            "{head}data_dir = \"var/agent\"\ninsecure_bootstrap = true\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("`data_dir`") && e.contains("absolute"), "{e}");
        for (line, key) in [
            (
                "insecure_bootstrap = true\nsocket_path = \"api.sock\"",
                "socket_path",
            ),
            (
                "insecure_bootstrap = true\nadmin_socket = \"a.sock\"",
                "admin_socket",
            ),
            ("trust_bundle_path = \"bundle.pem\"", "trust_bundle_path"),
            (
                "insecure_bootstrap = true\nnode_attestor = \"x509pop\"\n[x509pop]\ncert_path = \"/n.pem\"\nkey_path = \"n.key\"",
                "x509pop.key_path",
            ),
        ] {
            let e = AgentConfig::parse(&format!("{BASE}{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains("absolute"),
                "{line}: {e}"
            );
        }
    }
}
