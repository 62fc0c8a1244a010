//! `sigil-server entry create|list|show|update|delete|review`: registration
//! entries. Flags are checked here and named in errors; the server validates
//! the entry itself and its errors name the field.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use sigil_core::duration::parse_field;
use sigil_core::entry::MAX_TTL;
use sigil_proto::admin::{EntryId, ListEntriesRequest, UpdateEntryRequest};
use sigil_proto::common::Entry as PbEntry;

use super::render::{self, entry_json, print_entry};
use super::{AdminArgs, CliError, OutputArgs, check_id, connect, rfc3339_flag};

/// The entry fields `create` and `update` take.
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
    /// Let the entry's workloads fetch WIT-SVIDs (WIMSE workload identity
    /// tokens) over the Workload API (`--wit-svid false` turns it off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    wit_svid: Option<bool>,
}

/// `sigil-server entry ...`.
#[derive(Subcommand)]
pub enum EntryCmd {
    /// Create an entry.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        /// Create every entry of this JSON file instead (`{"entries":
        /// [...]}` or a bare list; see docs/OPERATOR-GUIDE.md), 1,000 per
        /// datastore transaction, each with its own result.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
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
        review: super::governance::ReviewArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// A TTL flag in seconds (0 when not given: the server's default).
fn secs_from(flag: &'static str, v: &Option<String>) -> Result<i64, CliError> {
    match v {
        None => Ok(0),
        Some(s) => {
            let d = parse_field(flag, s, MAX_TTL)?;
            i64::try_from(d.as_secs()).map_err(|_| CliError::flag(flag, "out of range"))
        }
    }
}

/// `--jwt-claim KEY=VALUE` flags as a map; a claim given twice is refused.
fn jwt_claims(flags: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    let mut claims = BTreeMap::new();
    for c in flags {
        let Some((k, v)) = c.split_once('=') else {
            return Err(CliError::field(
                "jwt_claim",
                format!("{c:?} is not KEY=VALUE"),
            ));
        };
        if claims.insert(k.to_string(), v.to_string()).is_some() {
            return Err(CliError::field(
                "jwt_claim",
                format!("claim {k:?} is given twice"),
            ));
        }
    }
    Ok(claims)
}

impl EntryFields {
    /// Builds the wire entry plus the names of the fields that were given.
    fn to_proto(&self) -> Result<(PbEntry, Vec<String>), CliError> {
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
        mark(self.wit_svid.is_some(), "wit_svid");
        let expires_at = match &self.expires_at {
            None => 0,
            Some(s) => {
                let t = rfc3339_flag("--expires-at", s)?;
                if t <= sigil_core::now_unix() {
                    return Err(CliError::flag(
                        "--expires-at",
                        format!("{s} is not in the future"),
                    ));
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
            jwt_claims: jwt_claims(&self.jwt_claims)?,
            task_ttl_max: secs_from("--task-ttl-max", &self.task_ttl_max)?,
            delegable_scopes: self.delegable_scopes.clone(),
            wit_svid: self.wit_svid.unwrap_or(false),
            ..Default::default()
        };
        Ok((pb, set))
    }
}

/// Runs `sigil-server entry ...`.
pub async fn entry(cmd: EntryCmd) -> Result<(), CliError> {
    match cmd {
        EntryCmd::Create {
            admin,
            file: Some(file),
            fields,
            out,
        } => {
            if !fields.to_proto()?.1.is_empty() {
                return Err(CliError::flag(
                    "--file",
                    "give the entries in the file or as flags, not both",
                ));
            }
            super::entry_file::create_from_file(&admin, &file, &out).await
        }
        EntryCmd::Create {
            admin,
            file: None,
            fields,
            out,
        } => {
            let (pb, _) = fields.to_proto()?;
            if pb.spiffe_id.is_empty() {
                return Err(CliError::Missing("--spiffe-id"));
            }
            if pb.parent_id.is_empty() {
                return Err(CliError::Missing("--parent-id"));
            }
            let e = connect(&admin).await?.create_entry(pb).await?.into_inner();
            render::one(&out, &e, "Entry created.", entry_json, print_entry)
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
                .await?
                .into_inner();
            render::many(
                &out,
                "entries",
                &r.entries,
                |n| format!("Found {}", render::count(n, "entry", "entries")),
                entry_json,
                print_entry,
            )
        }
        EntryCmd::Show { admin, id, out } => {
            let e = connect(&admin)
                .await?
                .get_entry(EntryId { id })
                .await?
                .into_inner();
            render::one(&out, &e, "", entry_json, print_entry)
        }
        EntryCmd::Update {
            admin,
            id,
            fields,
            out,
        } => {
            let (mut pb, set_fields) = fields.to_proto()?;
            if set_fields.is_empty() {
                return Err(CliError::Usage(
                    "nothing to update: give at least one field flag",
                ));
            }
            pb.id = id;
            let e = connect(&admin)
                .await?
                .update_entry(UpdateEntryRequest {
                    entry: Some(pb),
                    set_fields,
                })
                .await?
                .into_inner();
            render::one(&out, &e, "Entry updated.", entry_json, print_entry)
        }
        EntryCmd::Review { admin, review, out } => {
            super::governance::entry_review(&admin, &review, &out).await
        }
        EntryCmd::Delete { admin, id } => {
            connect(&admin)
                .await?
                .delete_entry(EntryId { id: id.clone() })
                .await?;
            println!("Deleted entry with ID: {id}");
            Ok(())
        }
    }
}
