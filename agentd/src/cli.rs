//! Workload-side subcommands: `api fetch x509` through the Workload API
//! (as any workload would call it) and `healthcheck` on the admin socket.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Subcommand};
use sigil_core::rfc3339;
use sigil_core::x509::{SvidInfo, certs_to_pem};
use sigil_proto::WORKLOAD_API_HEADER;
use sigil_proto::admin::HealthRequest;
use sigil_proto::admin::agent_admin_api_client::AgentAdminApiClient;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest,
};
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{DEFAULT_ADMIN_SOCKET, DEFAULT_SOCKET_PATH};

#[derive(Subcommand)]
pub enum ApiCmd {
    /// Fetch from the Workload API.
    #[command(subcommand)]
    Fetch(FetchCmd),
    /// Validate through the Workload API.
    #[command(subcommand)]
    Validate(ValidateCmd),
    /// Operator introspection over the agent admin socket.
    #[command(subcommand)]
    Debug(DebugCmd),
    /// Task-scoped identities (start, fetch, end).
    #[command(subcommand)]
    Task(crate::task_cli::TaskCmd),
    /// Exchange a user's token for a delegation token (RFC 8693).
    Delegate(crate::delegation_api::DelegateArgs),
}

#[derive(Subcommand)]
pub enum DebugCmd {
    /// What a process attests to and which entries it matches.
    Selectors(crate::debug_selectors::DebugSelectorsArgs),
}

#[derive(Subcommand)]
pub enum TpmCmd {
    /// Print the EK hash the server allow-lists (`[tpm] ek_hashes`).
    EkHash {
        /// TCTI of the TPM, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321.
        #[arg(long, default_value = "device:/dev/tpmrm0")]
        tcti: String,
    },
}

/// `sigil-agent tpm ek-hash`: reads the EK from the TPM and prints its hash.
pub async fn tpm(cmd: TpmCmd) -> Result<(), String> {
    let TpmCmd::EkHash { tcti } = cmd;
    let hash = tokio::task::spawn_blocking(move || {
        let mut t = sigil_attestors::node::tpm::AgentTpm::open(&tcti)
            .map_err(|e| format!("--tcti {tcti:?}: {e}"))?;
        let ev = t.evidence().map_err(|e| e.to_string())?;
        sigil_attestors::node::tpm::ek_hash(&ev.ek_public).map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| "TPM task failed".to_string())??;
    println!("{hash}");
    Ok(())
}

#[derive(Subcommand)]
pub enum ValidateCmd {
    /// Validate a JWT-SVID for an audience.
    Jwt {
        #[command(flatten)]
        socket: SocketArgs,
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        token: String,
    },
}

#[derive(Args, Clone)]
pub struct SocketArgs {
    /// Workload API socket (unix:/path, unix:///path or /path).
    /// Defaults to SPIFFE_ENDPOINT_SOCKET, then the built-in path.
    #[arg(long)]
    pub(crate) socket: Option<String>,
}

#[derive(Subcommand)]
pub enum FetchCmd {
    /// Fetch X.509-SVIDs and the bundle.
    X509 {
        #[command(flatten)]
        socket: SocketArgs,
        /// Write svid.pem, svid.key and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch JWT-SVIDs for an audience, and the JWT bundles.
    Jwt {
        #[command(flatten)]
        socket: SocketArgs,
        /// Audience; repeat for several.
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Fetch WIT-SVIDs (with their private keys) and the WIT bundle.
    Wit {
        #[command(flatten)]
        socket: SocketArgs,
        /// Write wit.jwt and wit.key.jwk (mode 0600) and wit_bundle.json
        /// into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

/// Resolves the socket path from the flag, SPIFFE_ENDPOINT_SOCKET, or the default.
pub fn socket_path(flag: Option<&str>) -> Result<PathBuf, String> {
    let raw = match flag {
        Some(s) => s.to_string(),
        None => std::env::var("SPIFFE_ENDPOINT_SOCKET")
            .unwrap_or_else(|_| DEFAULT_SOCKET_PATH.to_string()),
    };
    let path = if let Some(rest) = raw.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(format!(
                "socket {raw:?}: unix:// addresses must not have an authority (use unix:///path)"
            ));
        }
        rest
    } else if let Some(rest) = raw.strip_prefix("unix:") {
        rest
    } else if raw.starts_with('/') {
        raw.as_str()
    } else {
        return Err(format!("socket {raw:?}: expected unix:///path"));
    };
    Ok(PathBuf::from(path))
}

/// Where the join token for `sigil-agent run` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `--join-token` (visible in `/proc/PID/cmdline`).
    Flag,
    /// `--join-token-file`.
    File,
    /// `SIGIL_JOIN_TOKEN`.
    Env,
}

/// Longest join token file read, in bytes (tokens are 32 hex digits).
const MAX_TOKEN_FILE: usize = 4096;

/// Picks the join token: `--join-token`, else `--join-token-file`, else the
/// `SIGIL_JOIN_TOKEN` value `env` (the config's `join_token` comes after all
/// of these). The file is a secret: a regular file owned by the agent's uid
/// or root with no group/other bits; surrounding whitespace is dropped.
pub fn join_token(
    flag: Option<String>,
    file: Option<&Path>,
    env: Option<std::ffi::OsString>,
) -> Result<Option<(String, TokenSource)>, String> {
    let nonempty = |t: String, what: &str| {
        let t = t.trim().to_string();
        if t.is_empty() {
            Err(format!("{what}: the join token is empty"))
        } else if t.len() > 256 || t.chars().any(|c| c.is_control()) {
            Err(format!(
                "{what}: not a join token (at most 256 printable characters)"
            ))
        } else {
            Ok(t)
        }
    };
    if let Some(t) = flag {
        return Ok(Some((nonempty(t, "--join-token")?, TokenSource::Flag)));
    }
    if let Some(p) = file {
        let what = format!("--join-token-file {}", p.display());
        let bytes = sigil_fs::read_private_file(p, sigil_fs::Links::Follow)
            .map_err(|e| format!("--join-token-file: {e}"))?;
        if bytes.len() > MAX_TOKEN_FILE {
            return Err(format!("{what}: larger than {MAX_TOKEN_FILE} bytes"));
        }
        let text = String::from_utf8(bytes).map_err(|_| format!("{what}: not UTF-8 text"))?;
        return Ok(Some((nonempty(text, &what)?, TokenSource::File)));
    }
    match env {
        None => Ok(None),
        Some(v) => {
            let v = v
                .into_string()
                .map_err(|_| "SIGIL_JOIN_TOKEN: not UTF-8 text".to_string())?;
            Ok(Some((nonempty(v, "SIGIL_JOIN_TOKEN")?, TokenSource::Env)))
        }
    }
}

async fn uds_channel(path: &Path) -> Result<Channel, String> {
    sigil_proto::unix::channel(path).await
}

/// Splits concatenated DER certificates.
pub(crate) fn split_der(b: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    sigil_core::x509::split_der_certs(b).map_err(|e| format!("bad certificate in response: {e}"))
}

pub(crate) fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        WORKLOAD_API_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

pub(crate) fn grpc_err(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

pub async fn api(cmd: ApiCmd) -> Result<(), String> {
    match cmd {
        ApiCmd::Debug(DebugCmd::Selectors(args)) => crate::debug_selectors::run(args).await,
        ApiCmd::Task(cmd) => crate::task_cli::run(cmd).await,
        ApiCmd::Delegate(args) => crate::delegation_api::delegate(args).await,
        ApiCmd::Fetch(FetchCmd::X509 { socket, write }) => fetch_x509(socket, write).await,
        ApiCmd::Fetch(FetchCmd::Wit { socket, write }) => {
            let path = socket_path(socket.socket.as_deref())?;
            crate::wit_api::fetch_cli(uds_channel(&path).await?, write).await
        }
        ApiCmd::Fetch(FetchCmd::Jwt {
            socket,
            audience,
            spiffe_id,
        }) => {
            if let Some(id) = &spiffe_id {
                sigil_core::ids::parse_spiffe_id(id).map_err(|e| format!("--spiffe-id: {e}"))?;
            }
            let path = socket_path(socket.socket.as_deref())?;
            let mut client = SpiffeWorkloadApiClient::new(uds_channel(&path).await?);
            let r = client
                .fetch_jwtsvid(with_header(JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(grpc_err)?
                .into_inner();
            for s in &r.svids {
                println!("token({}):\n\t{}", s.spiffe_id, s.svid);
                if !s.hint.is_empty() {
                    println!("hint({}):\n\t{}", s.spiffe_id, s.hint);
                }
            }
            let mut bundles = client
                .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
                .await
                .map_err(grpc_err)?
                .into_inner();
            if let Some(b) = bundles.message().await.map_err(grpc_err)? {
                let mut tds: Vec<_> = b.bundles.into_iter().collect();
                tds.sort();
                for (td, jwks) in tds {
                    println!("bundle({td}):\n\t{}", String::from_utf8_lossy(&jwks));
                }
            }
            Ok(())
        }
        ApiCmd::Validate(ValidateCmd::Jwt {
            socket,
            audience,
            token,
        }) => {
            let path = socket_path(socket.socket.as_deref())?;
            let mut client = SpiffeWorkloadApiClient::new(uds_channel(&path).await?);
            let r = client
                .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                    audience,
                    svid: token,
                }))
                .await
                .map_err(grpc_err)?
                .into_inner();
            println!("SVID is valid.");
            println!("SPIFFE ID : {}", r.spiffe_id);
            if let Some(c) = r.claims {
                let mut keys: Vec<_> = c.fields.keys().cloned().collect();
                keys.sort();
                println!("Claims    : {}", keys.join(", "));
            }
            Ok(())
        }
    }
}

async fn fetch_x509(socket: SocketArgs, write: Option<PathBuf>) -> Result<(), String> {
    let path = socket_path(socket.socket.as_deref())?;
    let start = Instant::now();
    let mut client = SpiffeWorkloadApiClient::new(uds_channel(&path).await?);
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .map_err(grpc_err)?
        .into_inner();
    let resp = stream
        .message()
        .await
        .map_err(grpc_err)?
        .ok_or("the Workload API closed the stream without an SVID")?;
    let elapsed = start.elapsed();
    println!(
        "Received {} svid{} after {:.3}ms\n",
        resp.svids.len(),
        if resp.svids.len() == 1 { "" } else { "s" },
        elapsed.as_secs_f64() * 1000.0
    );
    for (i, s) in resp.svids.iter().enumerate() {
        let chain = split_der(&s.x509_svid)?;
        let bundle = split_der(&s.bundle)?;
        let leaf = chain.first().ok_or("empty SVID chain")?;
        let info = SvidInfo::from_der(leaf).map_err(|e| e.to_string())?;
        println!("SPIFFE ID:\t\t{}", s.spiffe_id);
        if !s.hint.is_empty() {
            println!("Hint:\t\t\t{}", s.hint);
        }
        println!("SVID Valid After:\t{}", rfc3339(info.not_before));
        println!("SVID Valid Until:\t{}", rfc3339(info.not_after));
        for (n, ca) in bundle.iter().enumerate() {
            if let Ok((_, c)) = X509Certificate::from_der(ca) {
                println!(
                    "CA #{} Valid After:\t{}",
                    n + 1,
                    rfc3339(c.validity().not_before.timestamp())
                );
                println!(
                    "CA #{} Valid Until:\t{}",
                    n + 1,
                    rfc3339(c.validity().not_after.timestamp())
                );
            }
        }
        println!();
        if let Some(dir) = &write {
            let suffix = if i == 0 {
                String::new()
            } else {
                format!(".{i}")
            };
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", s.x509_svid_key.clone()));
            write_file(
                &dir.join(format!("svid{suffix}.pem")),
                certs_to_pem(chain.iter().map(Vec::as_slice)).as_bytes(),
                0o644,
            )?;
            write_file(
                &dir.join(format!("svid{suffix}.key")),
                key_pem.as_bytes(),
                0o600,
            )?;
            write_file(
                &dir.join(format!("bundle{suffix}.pem")),
                certs_to_pem(bundle.iter().map(Vec::as_slice)).as_bytes(),
                0o644,
            )?;
            println!(
                "Writing SVID #{i} to file {}",
                dir.join(format!("svid{suffix}.pem")).display()
            );
            println!(
                "Writing key #{i} to file {}",
                dir.join(format!("svid{suffix}.key")).display()
            );
            println!(
                "Writing bundle #{i} to file {}\n",
                dir.join(format!("bundle{suffix}.pem")).display()
            );
        }
    }
    // The CRLs of the trust domain's CAs, for `openssl verify -crl_check`
    // and relying parties that read files.
    if let Some(dir) = &write
        && !resp.crl.is_empty()
    {
        let text: String = resp
            .crl
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("X509 CRL", c.clone())))
            .collect();
        let path = dir.join("crl.pem");
        write_file(&path, text.as_bytes(), 0o644)?;
        println!(
            "Writing {} CRL(s) to file {}",
            resp.crl.len(),
            path.display()
        );
    }
    Ok(())
}

pub async fn healthcheck(admin_socket: Option<PathBuf>, verbose: bool) -> Result<(), String> {
    let path = admin_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    let mut c = AgentAdminApiClient::new(uds_channel(&path).await?);
    let h = c
        .agent_health(HealthRequest {})
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    if !h.synced {
        return Err("agent is up but has not synced with the server yet".into());
    }
    // Every slot but the reserve taken: only uids holding few connections
    // are still served.
    let saturated = h.workload_connections_max > 0
        && h.workload_connections
            >= h.workload_connections_max
                .saturating_sub(h.workload_connections_reserve);
    if saturated {
        return Err(format!(
            "the Workload API is saturated: {} of {} connections open (the last {} are reserved for uids holding few connections); {} refused since start",
            h.workload_connections,
            h.workload_connections_max,
            h.workload_connections_reserve,
            h.workload_connections_refused
        ));
    }
    println!("Agent is healthy.");
    if h.workload_uids_at_cap > 0 {
        println!(
            "Warning: {} uid(s) at the per-uid cap of {} Workload API connections; {} connections refused since start.",
            h.workload_uids_at_cap,
            h.workload_connections_per_uid_max,
            h.workload_connections_refused
        );
    }
    if verbose {
        println!(
            "SPIFFE ID: {}\nEntries: {}\nSVIDs: {}\nAgent SVID valid until: {}",
            h.spiffe_id,
            h.entries,
            h.svids,
            rfc3339(h.agent_svid_expires_at)
        );
        println!(
            "Workload API connections: {} open of {} (per uid {}, reserve {}), busiest uid {}, uids at cap {}, refused {}",
            h.workload_connections,
            h.workload_connections_max,
            h.workload_connections_per_uid_max,
            h.workload_connections_reserve,
            h.workload_busiest_uid_connections,
            h.workload_uids_at_cap,
            h.workload_connections_refused
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(
            socket_path(Some("unix:///run/a.sock")).unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            socket_path(Some("unix:/run/a.sock")).unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            socket_path(Some("/run/a.sock")).unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert!(socket_path(Some("unix://host/run/a.sock")).is_err());
        assert!(socket_path(Some("tcp://1.2.3.4:5")).is_err());
    }

    #[test]
    fn join_token_sources_and_their_checks() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("sigil-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        let f = d.join("token");
        std::fs::write(&f, "abc123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = Some(std::ffi::OsString::from("fromenv"));
        assert_eq!(
            join_token(Some("flag".into()), Some(&f), env.clone()).unwrap(),
            Some(("flag".into(), TokenSource::Flag))
        );
        assert_eq!(
            join_token(None, Some(&f), env.clone()).unwrap(),
            Some(("abc123".into(), TokenSource::File))
        );
        assert_eq!(
            join_token(None, None, env).unwrap(),
            Some(("fromenv".into(), TokenSource::Env))
        );
        assert_eq!(join_token(None, None, None).unwrap(), None);
        let e = join_token(None, None, Some("  ".into())).unwrap_err();
        assert!(e.contains("SIGIL_JOIN_TOKEN"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = join_token(None, Some(&f), None).unwrap_err();
        assert!(e.contains("--join-token-file") && e.contains("0644"), "{e}");
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = join_token(None, Some(&f), None).unwrap_err();
            assert!(e.contains("uid 65534"), "{e}");
        }
        let e = join_token(None, Some(&d.join("missing")), None).unwrap_err();
        assert!(
            e.contains("--join-token-file") && e.contains("missing"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
