//! `sigil-server entry create --file entries.json`: many entries from one
//! JSON file, sent in batches of [`MAX_ENTRY_BATCH`], each batch created in
//! one datastore transaction with a result per entry.
//!
//! The file is `{"entries": [ ... ]}` (the shape `entry list --output
//! json` prints) or a bare list. Each entry has the fields of `entry list
//! --output json` except the server-assigned `id`, `revision` and
//! `created_at`; `spiffe_id` and `parent_id` are required. TTLs are
//! seconds or duration strings (`"1h"`), `expires_at` is RFC 3339 or
//! `null`. Unknown fields are refused, naming the entry's index and the
//! field, before anything is sent.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};
use sigil_core::duration::parse_field;
use sigil_core::entry::MAX_TTL;
use sigil_proto::admin::{BatchCreateEntriesRequest, BatchEntryResult};
use sigil_proto::common::Entry as PbEntry;

use super::render::{entry_json, print_json};
use super::{AdminArgs, CliError, Output, OutputArgs, connect, rfc3339_flag};
use crate::state::MAX_ENTRY_BATCH;

/// Largest file read (a 1,000-entry batch is about 0.5 MB of JSON).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The file as written.
#[derive(Deserialize)]
#[serde(untagged)]
enum EntryFile {
    Wrapped { entries: Vec<Value> },
    Bare(Vec<Value>),
}

/// A TTL: seconds, or a duration string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Ttl {
    Secs(i64),
    Text(String),
}

/// One entry of the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    spiffe_id: String,
    parent_id: String,
    #[serde(default)]
    selectors: Vec<String>,
    #[serde(default)]
    x509_svid_ttl: Option<Ttl>,
    #[serde(default)]
    jwt_svid_ttl: Option<Ttl>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    hint: String,
    #[serde(default)]
    federates_with: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    downstream: bool,
    #[serde(default)]
    node: bool,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    require_approval: bool,
    #[serde(default)]
    jwt_claims: BTreeMap<String, String>,
    #[serde(default)]
    task_ttl_max: Option<Ttl>,
    #[serde(default)]
    delegable_scopes: Vec<String>,
    #[serde(default)]
    wit_svid: bool,
}

fn bad(i: usize, reason: impl std::fmt::Display) -> CliError {
    CliError::flag("--file", format!("entries[{i}]: {reason}"))
}

fn ttl_secs(i: usize, field: &'static str, v: Option<Ttl>) -> Result<i64, CliError> {
    match v {
        None => Ok(0),
        Some(Ttl::Secs(n)) if (0..=MAX_TTL.as_secs() as i64).contains(&n) => Ok(n),
        Some(Ttl::Secs(n)) => Err(bad(i, format!("{field}: {n} is out of range"))),
        Some(Ttl::Text(s)) => {
            let d = parse_field(field, &s, MAX_TTL).map_err(|e| bad(i, e))?;
            i64::try_from(d.as_secs()).map_err(|_| bad(i, format!("{field}: out of range")))
        }
    }
}

impl FileEntry {
    fn into_proto(self, i: usize) -> Result<PbEntry, CliError> {
        let expires_at = match &self.expires_at {
            None => 0,
            Some(s) => rfc3339_flag("expires_at", s).map_err(|e| bad(i, e))?,
        };
        Ok(PbEntry {
            x509_svid_ttl: ttl_secs(i, "x509_svid_ttl", self.x509_svid_ttl)?,
            jwt_svid_ttl: ttl_secs(i, "jwt_svid_ttl", self.jwt_svid_ttl)?,
            task_ttl_max: ttl_secs(i, "task_ttl_max", self.task_ttl_max)?,
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors: self.selectors,
            dns_names: self.dns_names,
            hint: self.hint,
            federates_with: self.federates_with,
            admin: self.admin,
            downstream: self.downstream,
            node: self.node,
            owner: self.owner,
            expires_at,
            description: self.description,
            require_approval: self.require_approval,
            jwt_claims: self.jwt_claims.into_iter().collect(),
            delegable_scopes: self.delegable_scopes,
            wit_svid: self.wit_svid,
            ..Default::default()
        })
    }
}

/// Reads and checks the whole file; nothing is sent when any entry of it
/// does not parse.
fn read_entries(path: &Path) -> Result<Vec<PbEntry>, CliError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::flag("--file", format!("{}: {e}", path.display())))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(CliError::flag(
            "--file",
            format!("{} is larger than {MAX_FILE_BYTES} bytes", path.display()),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::flag("--file", format!("{}: {e}", path.display())))?;
    let items = match serde_json::from_str::<EntryFile>(&text) {
        Ok(EntryFile::Wrapped { entries } | EntryFile::Bare(entries)) => entries,
        Err(_) => {
            return Err(CliError::flag(
                "--file",
                format!(
                    "{} is not a JSON list of entries or an object {{\"entries\": [...]}}",
                    path.display()
                ),
            ));
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value::<FileEntry>(v)
                .map_err(|e| bad(i, e))?
                .into_proto(i)
        })
        .collect()
}

/// Creates the file's entries and prints one result per entry; fails
/// (after printing) when any was refused.
pub(super) async fn create_from_file(
    admin: &AdminArgs,
    path: &Path,
    out: &OutputArgs,
) -> Result<(), CliError> {
    let entries = read_entries(path)?;
    let total = entries.len();
    let mut client = connect(admin).await?;
    let mut results: Vec<BatchEntryResult> = Vec::with_capacity(total);
    for chunk in entries.chunks(MAX_ENTRY_BATCH) {
        let r = client
            .batch_create_entries(BatchCreateEntriesRequest {
                entries: chunk.to_vec(),
            })
            .await?
            .into_inner();
        results.extend(r.results);
    }
    let refused = results.iter().filter(|r| r.entry.is_none()).count();
    // Indexes count from the file's start, not the chunk's.
    let rows: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(i, r)| match &r.entry {
            Some(e) => json!({"index": i, "created": true, "entry": entry_json(e)}),
            None => json!({
                "index": i,
                "created": false,
                "code": format!("{:?}", tonic::Code::from(r.code)),
                "error": rebase(&r.error, i),
            }),
        })
        .collect();
    match out.output {
        Output::Json => print_json(&json!({"results": rows}))?,
        Output::Pretty => {
            for (i, r) in results.iter().enumerate() {
                match &r.entry {
                    Some(e) => println!("Created {} {} (entries[{i}])", e.id, e.spiffe_id),
                    None => eprintln!("Refused {}", rebase(&r.error, i)),
                }
            }
            println!("Created {} of {total} entries.", total - refused);
        }
    }
    if refused > 0 {
        return Err(CliError::BatchRefused { refused, total });
    }
    Ok(())
}

/// The server numbers a batch's entries from 0; across several batches the
/// file's index is the one that helps.
fn rebase(error: &str, i: usize) -> String {
    match error.split_once("]: ") {
        Some((head, rest)) if head.starts_with("entries[") => format!("entries[{i}]: {rest}"),
        _ => format!("entries[{i}]: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Vec<PbEntry>, String> {
        let p = std::env::temp_dir().join(format!(
            "sigil-entry-file-{}-{}.json",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&p, text).unwrap();
        let r = read_entries(&p).map_err(|e| e.to_string());
        std::fs::remove_file(&p).unwrap();
        r
    }

    #[test]
    fn both_shapes_parse_and_errors_name_the_entry_and_field() {
        let one = r#"{"spiffe_id":"spiffe://example.org/a","parent_id":"spiffe://example.org/p","selectors":["unix:uid:1"],"x509_svid_ttl":"1h","jwt_svid_ttl":300}"#;
        let bare = file(&format!("[{one}]")).unwrap();
        let wrapped = file(&format!("{{\"entries\":[{one},{one}]}}")).unwrap();
        assert_eq!(bare.len(), 1);
        assert_eq!(wrapped.len(), 2);
        assert_eq!(bare[0].x509_svid_ttl, 3600);
        assert_eq!(bare[0].jwt_svid_ttl, 300);
        for (text, says) in [
            (
                format!("[{one}, {{\"spiffe_id\":\"spiffe://example.org/b\"}}]"),
                "entries[1]: missing field `parent_id`",
            ),
            (
                format!(
                    "[{one}, {one}, {}]",
                    one.replace("\"hint\"", "x")
                        .replace("}", ",\"colour\":\"red\"}")
                ),
                "entries[2]: unknown field `colour`",
            ),
            (
                format!("[{}]", one.replace("\"1h\"", "\"soon\"")),
                "entries[0]: ",
            ),
            (
                format!("[{}]", one.replace("300", "-5")),
                "entries[0]: jwt_svid_ttl: -5 is out of range",
            ),
            ("{\"items\": []}".to_string(), "not a JSON list"),
        ] {
            let e = file(&text).unwrap_err();
            assert!(e.contains("--file") && e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn indexes_are_rebased_to_the_file() {
        assert_eq!(rebase("entries[3]: bad", 1003), "entries[1003]: bad");
        assert_eq!(
            rebase("datastore unavailable", 7),
            "entries[7]: datastore unavailable"
        );
    }
}
