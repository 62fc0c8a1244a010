//! Operator subcommands: gRPC calls to the admin socket and their output,
//! human-readable by default and `--output json` for tools.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sigil_core::duration::parse_field;
use sigil_core::entry::MAX_TTL;
use sigil_core::ids::parse_spiffe_id;
use sigil_core::rfc3339;
use sigil_core::x509::certs_to_pem;
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::{
    Agent, AgentId, EntryId, GenerateTokenRequest, GetBundleRequest, HealthRequest,
    ListAgentsRequest, ListEntriesRequest, UpdateEntryRequest,
};
use sigil_proto::admin::{ListFederatedBundlesRequest, SetFederatedBundleRequest, TrustDomainId};
use sigil_proto::common::{Entry as PbEntry, FederatedBundle};
use tonic::transport::{Channel, Endpoint};

use crate::config::DEFAULT_ADMIN_SOCKET;

#[derive(Args, Clone)]
pub struct AdminArgs {
    /// Path to the server's admin socket.
    #[arg(long, env = "SIGIL_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
    admin_socket: PathBuf,
}

#[derive(Copy, Clone, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Pretty,
    Json,
}

#[derive(Args, Clone)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Pretty)]
    pub(crate) output: Output,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Generate a single-use join token.
    Generate {
        #[command(flatten)]
        admin: AdminArgs,
        /// SPIFFE ID the attested agent will get.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Token lifetime (at most 7d).
        #[arg(long, default_value = "600s", allow_hyphen_values = true)]
        ttl: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Args)]
pub struct EntryFields {
    /// SPIFFE ID the workload receives.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Agent (or node-alias) SPIFFE ID this entry is delivered to.
    #[arg(long)]
    parent_id: Option<String>,
    /// Selector type:key:value; repeat for several.
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X.509-SVID TTL (e.g. 300s, 5m; at most 30d).
    #[arg(long, allow_hyphen_values = true)]
    x509_ttl: Option<String>,
    /// JWT-SVID TTL (at most 30d).
    #[arg(long, allow_hyphen_values = true)]
    jwt_ttl: Option<String>,
    /// DNS SAN; repeat for several.
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    /// Hint delivered with the SVID.
    #[arg(long)]
    hint: Option<String>,
    /// Trust domain whose bundle the workload receives; repeat for several.
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
    /// Admin identity (reserved).
    #[arg(long)]
    admin: bool,
    /// Downstream identity (reserved).
    #[arg(long)]
    downstream: bool,
    /// Node-alias entry.
    #[arg(long)]
    node: bool,
    /// Who owns this identity.
    #[arg(long)]
    owner: Option<String>,
    /// RFC 3339 time after which the entry is no longer served (must be in
    /// the future).
    #[arg(long, allow_hyphen_values = true)]
    expires_at: Option<String>,
    /// What this identity is for (shown to operators and in reviews).
    #[arg(long)]
    description: Option<String>,
    /// Issue nothing to an agent until an approver grants its request
    /// (`--require-approval false` turns it off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    require_approval: Option<bool>,
    /// Static JWT-SVID claim KEY=VALUE; repeat for several (replaces all
    /// of the entry's claims on update).
    #[arg(long = "jwt-claim")]
    jwt_claims: Vec<String>,
    /// Allow task identities of at most this lifetime (e.g. 15m; at most
    /// the entry's X.509-SVID TTL). See `sigil-server task`.
    #[arg(long, allow_hyphen_values = true)]
    task_ttl_max: Option<String>,
    /// OAuth scope the workload may delegate on a user's behalf (token
    /// exchange); repeat for several (replaces all on update).
    #[arg(long = "delegable-scope")]
    delegable_scopes: Vec<String>,
}

#[derive(Subcommand)]
pub enum EntryCmd {
    /// Create an entry.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List entries.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only entries with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only entries with this parent.
        #[arg(long)]
        parent_id: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show one entry.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Update fields of an entry; fields not given are kept.
    Update {
        #[command(flatten)]
        admin: AdminArgs,
        id: String,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete an entry.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        id: String,
    },
    /// Access review: entries that need attention, each with its reasons.
    Review {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        review: crate::governance_cli::ReviewArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
pub enum AgentCmd {
    /// List attested agents.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show one agent.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        spiffe_id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Evict an agent: it must attest again.
    Evict {
        #[command(flatten)]
        admin: AdminArgs,
        spiffe_id: String,
    },
    /// Ban an agent: it may not renew, sync or re-attest.
    Ban {
        #[command(flatten)]
        admin: AdminArgs,
        spiffe_id: String,
    },
    /// Access review: agents that need attention, each with its reasons.
    Review {
        #[command(flatten)]
        admin: AdminArgs,
        /// Flag agents not seen for this long.
        #[arg(long, alias = "not-seen-for", default_value = "30d")]
        unused_for: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Copy, Clone, ValueEnum, PartialEq, Eq)]
pub enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Print this trust domain's bundle.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Set (create or replace) a federated trust domain's bundle.
    Set {
        #[command(flatten)]
        admin: AdminArgs,
        /// Trust domain ID, e.g. spiffe://other.org.
        #[arg(long)]
        id: String,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// File holding the bundle; `-` for standard input.
        #[arg(long)]
        path: PathBuf,
    },
    /// List federated bundles.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Delete a federated bundle.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// Trust domain ID, e.g. spiffe://other.org.
        #[arg(long)]
        id: String,
    },
}

pub(crate) async fn connect(a: &AdminArgs) -> Result<AdminApiClient<Channel>, String> {
    Ok(AdminApiClient::new(admin_channel(a).await?))
}

/// A channel to the admin socket (every admin-socket service: the admin
/// API, the task service).
pub(crate) async fn admin_channel(a: &AdminArgs) -> Result<Channel, String> {
    let path = a.admin_socket.clone();
    if !path.exists() {
        return Err(format!(
            "admin socket {} does not exist (is the server running? set --admin-socket or SIGIL_ADMIN_SOCKET)",
            path.display()
        ));
    }
    let ch = Endpoint::from_static("http://admin.sigil")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| {
            format!(
                "cannot connect to admin socket {}: {e}",
                a.admin_socket.display()
            )
        })?;
    Ok(ch)
}

pub(crate) fn status(e: tonic::Status) -> String {
    e.message().to_string()
}

/// Longest join token lifetime (the server enforces the same).
const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

fn secs_from(flag: &str, v: &Option<String>) -> Result<i64, String> {
    match v {
        None => Ok(0),
        Some(s) => {
            let d = parse_field(flag, s, MAX_TTL).map_err(|e| e.to_string())?;
            i64::try_from(d.as_secs()).map_err(|_| format!("{flag}: out of range"))
        }
    }
}

/// Refuses a SPIFFE ID used only as a lookup key (too long, bad syntax)
/// before connecting, naming the flag. IDs that are stored (entries,
/// tokens) are validated by the server, whose errors name the field.
fn check_id(flag: &str, v: Option<&String>) -> Result<(), String> {
    match v {
        Some(s) => parse_spiffe_id(s)
            .map(|_| ())
            .map_err(|e| format!("{flag}: {e}")),
        None => Ok(()),
    }
}

impl EntryFields {
    /// Builds the wire entry plus the names of the fields that were given.
    fn to_proto(&self) -> Result<(PbEntry, Vec<String>), String> {
        let mut set = Vec::new();
        let mut mark = |present: bool, f: &str| {
            if present {
                set.push(f.to_string());
            }
        };
        mark(self.spiffe_id.is_some(), "spiffe_id");
        mark(self.parent_id.is_some(), "parent_id");
        mark(!self.selectors.is_empty(), "selectors");
        mark(self.x509_ttl.is_some(), "x509_svid_ttl");
        mark(self.jwt_ttl.is_some(), "jwt_svid_ttl");
        mark(!self.dns_names.is_empty(), "dns_names");
        mark(self.hint.is_some(), "hint");
        mark(!self.federates_with.is_empty(), "federates_with");
        mark(self.admin, "admin");
        mark(self.downstream, "downstream");
        mark(self.node, "node");
        mark(self.owner.is_some(), "owner");
        mark(self.expires_at.is_some(), "expires_at");
        mark(self.description.is_some(), "description");
        mark(self.require_approval.is_some(), "require_approval");
        mark(!self.jwt_claims.is_empty(), "jwt_claims");
        mark(self.task_ttl_max.is_some(), "task_ttl_max");
        mark(!self.delegable_scopes.is_empty(), "delegable_scopes");
        let mut jwt_claims = std::collections::BTreeMap::new();
        for c in &self.jwt_claims {
            let Some((k, v)) = c.split_once('=') else {
                return Err(format!(
                    "invalid entry field `jwt_claim`: {c:?} is not KEY=VALUE"
                ));
            };
            if jwt_claims.insert(k.to_string(), v.to_string()).is_some() {
                return Err(format!(
                    "invalid entry field `jwt_claim`: claim {k:?} is given twice"
                ));
            }
        }
        let expires_at = match &self.expires_at {
            None => 0,
            Some(s) => {
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| format!("--expires-at: {s:?} is not an RFC 3339 time: {e}"))?
                        .unix_timestamp();
                if t <= sigil_core::now_unix() {
                    return Err(format!("--expires-at: {s} is not in the future"));
                }
                t
            }
        };
        let pb = PbEntry {
            spiffe_id: self.spiffe_id.clone().unwrap_or_default(),
            parent_id: self.parent_id.clone().unwrap_or_default(),
            selectors: self.selectors.clone(),
            x509_svid_ttl: secs_from("--x509-ttl", &self.x509_ttl)?,
            jwt_svid_ttl: secs_from("--jwt-ttl", &self.jwt_ttl)?,
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone().unwrap_or_default(),
            federates_with: self.federates_with.clone(),
            admin: self.admin,
            downstream: self.downstream,
            node: self.node,
            owner: self.owner.clone().unwrap_or_default(),
            expires_at,
            description: self.description.clone().unwrap_or_default(),
            require_approval: self.require_approval.unwrap_or(false),
            jwt_claims,
            task_ttl_max: secs_from("--task-ttl-max", &self.task_ttl_max)?,
            delegable_scopes: self.delegable_scopes.clone(),
            ..Default::default()
        };
        Ok((pb, set))
    }
}

pub fn entry_json(e: &PbEntry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "downstream": e.downstream,
        "node": e.node,
        "owner": e.owner,
        "description": e.description,
        "require_approval": e.require_approval,
        "jwt_claims": e.jwt_claims,
        "task_ttl_max": e.task_ttl_max,
        "delegable_scopes": e.delegable_scopes,
        "expires_at": if e.expires_at == 0 { Value::Null } else { json!(rfc3339(e.expires_at)) },
        "revision": e.revision,
        "created_at": rfc3339(e.created_at),
    })
}

pub(crate) fn print_entry(e: &PbEntry) {
    let ttl = |v: i64| {
        if v == 0 {
            "default".to_string()
        } else {
            v.to_string()
        }
    };
    println!("Entry ID         : {}", e.id);
    println!("SPIFFE ID        : {}", e.spiffe_id);
    println!("Parent ID        : {}", e.parent_id);
    println!("Revision         : {}", e.revision);
    println!("X509-SVID TTL    : {}", ttl(e.x509_svid_ttl));
    println!("JWT-SVID TTL     : {}", ttl(e.jwt_svid_ttl));
    for s in &e.selectors {
        println!("Selector         : {s}");
    }
    for d in &e.dns_names {
        println!("DNS name         : {d}");
    }
    for f in &e.federates_with {
        println!("FederatesWith    : {f}");
    }
    if !e.hint.is_empty() {
        println!("Hint             : {}", e.hint);
    }
    if !e.owner.is_empty() {
        println!("Owner            : {}", e.owner);
    }
    if !e.description.is_empty() {
        println!("Description      : {}", e.description);
    }
    for (k, v) in &e.jwt_claims {
        println!("JWT claim        : {k}={v}");
    }
    if !e.delegable_scopes.is_empty() {
        println!("Delegable scopes : {}", e.delegable_scopes.join(" "));
    }
    if e.require_approval {
        println!("Require approval : true");
    }
    if e.task_ttl_max != 0 {
        println!("Task TTL max     : {}", e.task_ttl_max);
    }
    if e.expires_at != 0 {
        println!("Expires at       : {}", rfc3339(e.expires_at));
    }
    if e.node {
        println!("Node             : true");
    }
    if e.admin {
        println!("Admin            : true");
    }
    if e.downstream {
        println!("Downstream       : true");
    }
    println!();
}

pub(crate) fn print_json(v: &Value) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

pub(crate) fn agent_json(a: &Agent) -> Value {
    json!({
        "last_seen_at": if a.last_seen_at == 0 { Value::Null } else { json!(rfc3339(a.last_seen_at)) },
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "selectors": a.selectors,
        "serial": a.serial,
        "previous_serial": a.previous_serial,
        "svid_expires_at": rfc3339(a.svid_expires_at),
        "last_attested_at": rfc3339(a.last_attested_at),
        "banned": a.banned,
        "created_at": rfc3339(a.created_at),
    })
}

fn print_agent(a: &Agent) {
    println!("SPIFFE ID         : {}", a.spiffe_id);
    println!("Attestation type  : {}", a.attestation_type);
    println!("Expiration time   : {}", rfc3339(a.svid_expires_at));
    println!("Serial number     : {}", a.serial);
    println!("Last attested     : {}", rfc3339(a.last_attested_at));
    if a.last_seen_at != 0 {
        println!("Last seen         : {}", rfc3339(a.last_seen_at));
    }
    println!("Banned            : {}", a.banned);
    for s in &a.selectors {
        println!("Selector          : {s}");
    }
    println!();
}

pub async fn healthcheck(a: &AdminArgs, verbose: bool, out: &OutputArgs) -> Result<(), String> {
    let mut c = connect(a).await?;
    let h = c
        .health(HealthRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let s = h.signing.unwrap_or_default();
    let ds = h.datastore.unwrap_or_default();
    // Up but unable to reach its datastore: reported, and a failure.
    let unhealthy = (!ds.reachable).then(|| format!("datastore {}: {}", ds.target, ds.error));
    if out.output == Output::Json {
        let (datastore, cluster) = crate::health_cli::json_fields(&ds, &h.cluster_servers);
        print_json(&json!({
            "healthy": unhealthy.is_none(),
            "datastore": datastore,
            "cluster_servers": cluster,
            "trust_domain": h.trust_domain,
            "entries": h.entries,
            "agents": h.agents,
            "signing": {
                "free_slots": s.free_slots,
                "waiting_calls": s.waiting_calls,
                "waiting_csrs": s.waiting_csrs,
                "peak_calls": s.peak_calls,
                "peak_csrs": s.peak_csrs,
                "svids_signed": s.svids_signed,
            },
        }))?;
        return unhealthy.map_or(Ok(()), Err);
    }
    match &unhealthy {
        None => println!("Server is healthy."),
        Some(_) => println!("Server is up, but its datastore is unreachable."),
    }
    if verbose {
        println!("Trust domain     : {}", h.trust_domain);
        println!("Entries          : {}", h.entries);
        println!("Agents           : {}", h.agents);
        println!("SVIDs signed     : {}", s.svids_signed);
        println!(
            "Signing queue    : {} batches ({} CSRs) waiting, peak {} batches ({} CSRs), {} free slots",
            s.waiting_calls, s.waiting_csrs, s.peak_calls, s.peak_csrs, s.free_slots
        );
        crate::health_cli::print_verbose(&ds, &h.cluster_servers);
    }
    unhealthy.map_or(Ok(()), Err)
}

pub async fn token(cmd: TokenCmd) -> Result<(), String> {
    let TokenCmd::Generate {
        admin,
        spiffe_id,
        ttl,
        out,
    } = cmd;
    let ttl = parse_field("--ttl", &ttl, MAX_TOKEN_TTL).map_err(|e| e.to_string())?;
    let mut c = connect(&admin).await?;
    let r = c
        .generate_token(GenerateTokenRequest {
            spiffe_id: spiffe_id.unwrap_or_default(),
            ttl_seconds: ttl.as_secs() as i64,
        })
        .await
        .map_err(status)?
        .into_inner();
    if out.output == Output::Json {
        return print_json(
            &json!({"value": r.token, "spiffe_id": r.spiffe_id, "expires_at": rfc3339(r.expires_at)}),
        );
    }
    println!("Token: {}", r.token);
    Ok(())
}

pub async fn entry(cmd: EntryCmd) -> Result<(), String> {
    match cmd {
        EntryCmd::Create { admin, fields, out } => {
            let (pb, _) = fields.to_proto()?;
            if pb.spiffe_id.is_empty() {
                return Err("--spiffe-id is required".into());
            }
            if pb.parent_id.is_empty() {
                return Err("--parent-id is required".into());
            }
            let e = connect(&admin)
                .await?
                .create_entry(pb)
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(&entry_json(&e));
            }
            println!("Entry created.\n");
            print_entry(&e);
        }
        EntryCmd::List {
            admin,
            spiffe_id,
            parent_id,
            out,
        } => {
            check_id("--parent-id", parent_id.as_ref())?;
            let r = connect(&admin)
                .await?
                .list_entries(ListEntriesRequest {
                    by_spiffe_id: spiffe_id.unwrap_or_default(),
                    by_parent_id: parent_id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(
                    &json!({"entries": r.entries.iter().map(entry_json).collect::<Vec<_>>()}),
                );
            }
            println!(
                "Found {} entr{}\n",
                r.entries.len(),
                if r.entries.len() == 1 { "y" } else { "ies" }
            );
            r.entries.iter().for_each(print_entry);
        }
        EntryCmd::Show { admin, id, out } => {
            let e = connect(&admin)
                .await?
                .get_entry(EntryId { id })
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(&entry_json(&e));
            }
            print_entry(&e);
        }
        EntryCmd::Update {
            admin,
            id,
            fields,
            out,
        } => {
            let (mut pb, set_fields) = fields.to_proto()?;
            if set_fields.is_empty() {
                return Err("nothing to update: give at least one field flag".into());
            }
            pb.id = id;
            let e = connect(&admin)
                .await?
                .update_entry(UpdateEntryRequest {
                    entry: Some(pb),
                    set_fields,
                })
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(&entry_json(&e));
            }
            println!("Entry updated.\n");
            print_entry(&e);
        }
        EntryCmd::Review { admin, review, out } => {
            return crate::governance_cli::entry_review(&admin, &review, &out).await;
        }
        EntryCmd::Delete { admin, id } => {
            connect(&admin)
                .await?
                .delete_entry(EntryId { id: id.clone() })
                .await
                .map_err(status)?;
            println!("Deleted entry with ID: {id}");
        }
    }
    Ok(())
}

pub async fn agent(cmd: AgentCmd) -> Result<(), String> {
    if let AgentCmd::Show { spiffe_id, .. }
    | AgentCmd::Evict { spiffe_id, .. }
    | AgentCmd::Ban { spiffe_id, .. } = &cmd
    {
        check_id("SPIFFE_ID", Some(spiffe_id))?;
    }
    match cmd {
        AgentCmd::Review {
            admin,
            unused_for,
            out,
        } => {
            return crate::governance_cli::agent_review(&admin, &unused_for, &out).await;
        }
        AgentCmd::List { admin, out } => {
            let r = connect(&admin)
                .await?
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(
                    &json!({"agents": r.agents.iter().map(agent_json).collect::<Vec<_>>()}),
                );
            }
            println!(
                "Found {} attested agent{}:\n",
                r.agents.len(),
                if r.agents.len() == 1 { "" } else { "s" }
            );
            r.agents.iter().for_each(print_agent);
        }
        AgentCmd::Show {
            admin,
            spiffe_id,
            out,
        } => {
            let a = connect(&admin)
                .await?
                .get_agent(AgentId { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(&agent_json(&a));
            }
            print_agent(&a);
        }
        AgentCmd::Evict { admin, spiffe_id } => {
            connect(&admin)
                .await?
                .evict_agent(AgentId { spiffe_id })
                .await
                .map_err(status)?;
            println!("Agent evicted successfully");
        }
        AgentCmd::Ban { admin, spiffe_id } => {
            connect(&admin)
                .await?
                .ban_agent(AgentId { spiffe_id })
                .await
                .map_err(status)?;
            println!("Agent banned successfully");
        }
    }
    Ok(())
}

fn render_bundle(
    format: BundleFormat,
    x509: &[Vec<u8>],
    jwks: &[u8],
    sequence: u64,
) -> Result<String, String> {
    match format {
        BundleFormat::Pem => Ok(certs_to_pem(x509.iter().map(Vec::as_slice))),
        BundleFormat::Spiffe => {
            let jwt_keys: Vec<Value> = if jwks.is_empty() {
                vec![]
            } else {
                serde_json::from_slice::<Value>(jwks)
                    .map_err(|e| e.to_string())?
                    .get("keys")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            };
            let doc = sigil_core::bundle::spiffe_bundle(x509, &jwt_keys, sequence, 300)
                .map_err(|e| e.to_string())?;
            serde_json::to_string_pretty(&doc)
                .map(|s| s + "\n")
                .map_err(|e| e.to_string())
        }
    }
}

fn read_input(path: &PathBuf) -> Result<Vec<u8>, String> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| format!("--path -: {e}"))?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| format!("--path {}: {e}", path.display()))
    }
}

pub async fn bundle(cmd: BundleCmd) -> Result<(), String> {
    match cmd {
        BundleCmd::Show { admin, format } => {
            let b = connect(&admin)
                .await?
                .get_bundle(GetBundleRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print!(
                "{}",
                render_bundle(format, &b.x509_authorities, &b.jwt_bundle, b.sequence)?
            );
        }
        BundleCmd::Set {
            admin,
            id,
            format,
            path,
        } => {
            let data = read_input(&path)?;
            let bundle = match format {
                BundleFormat::Pem => {
                    let text = String::from_utf8(data)
                        .map_err(|_| "--path: not a PEM text file".to_string())?;
                    let certs = sigil_core::x509::pem_to_certs(&text)
                        .map_err(|e| format!("--path: {e}"))?;
                    FederatedBundle {
                        x509_authorities: certs,
                        jwt_bundle: vec![],
                        sequence: 0,
                    }
                }
                BundleFormat::Spiffe => {
                    let p = sigil_core::bundle::parse_spiffe_bundle(&data)
                        .map_err(|e| format!("--path: {e}"))?;
                    let jwt_bundle = if p.jwt_authorities.is_empty() {
                        vec![]
                    } else {
                        sigil_core::jwt::jwks(&p.jwt_authorities)
                    };
                    FederatedBundle {
                        x509_authorities: p.x509_authorities,
                        jwt_bundle,
                        sequence: p.sequence.unwrap_or(0),
                    }
                }
            };
            connect(&admin)
                .await?
                .set_federated_bundle(SetFederatedBundleRequest {
                    trust_domain: id,
                    bundle: Some(bundle),
                })
                .await
                .map_err(status)?;
            println!("bundle set.");
        }
        BundleCmd::List { admin, format } => {
            let r = connect(&admin)
                .await?
                .list_federated_bundles(ListFederatedBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let mut tds: Vec<_> = r.bundles.into_iter().collect();
            tds.sort_by(|a, b| a.0.cmp(&b.0));
            for (td, b) in tds {
                println!("****************************************");
                println!("* spiffe://{td}");
                println!("****************************************");
                print!(
                    "{}",
                    render_bundle(format, &b.x509_authorities, &b.jwt_bundle, b.sequence)?
                );
                println!();
            }
        }
        BundleCmd::Delete { admin, id } => {
            connect(&admin)
                .await?
                .delete_federated_bundle(TrustDomainId { trust_domain: id })
                .await
                .map_err(status)?;
            println!("bundle deleted.");
        }
    }
    Ok(())
}
