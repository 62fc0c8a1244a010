//! Output: one [`Record`] per measured configuration, printed as a human
//! table and, with `--json`, as one JSON object per line whose first key is
//! `"scenario"`. [`render`] turns the JSON lines of a full run into the
//! markdown figures table of docs/PERFORMANCE.md.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;

/// One line of results.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) scenario: String,
    pub(crate) fields: Vec<(String, Value)>,
}

/// A float rounded to 3 decimals (JSON `null` if not finite).
pub(crate) fn num(x: f64) -> Value {
    if x.is_finite() {
        Value::from((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

impl Record {
    pub(crate) fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            fields: Vec::new(),
        }
    }

    /// Appends (or replaces) a field.
    pub(crate) fn with(mut self, key: &str, v: impl Into<Value>) -> Self {
        let v = v.into();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.fields.push((key.to_string(), v)),
        }
        self
    }

    /// A float field rounded to 3 decimals.
    pub(crate) fn f(self, key: &str, x: f64) -> Self {
        self.with(key, num(x))
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// The JSON line, `"scenario"` first, fields in insertion order.
    pub(crate) fn json(&self) -> String {
        let mut s = format!("{{\"scenario\":{}", Value::from(self.scenario.as_str()));
        for (k, v) in &self.fields {
            s.push(',');
            s.push_str(&Value::from(k.as_str()).to_string());
            s.push(':');
            s.push_str(&v.to_string());
        }
        s.push('}');
        s
    }

    fn from_json(line: &str) -> Option<Record> {
        // serde_json's map is sorted; keep the file's key order by scanning
        // the object's keys in order of appearance.
        let v: Value = serde_json::from_str(line).ok()?;
        let obj = v.as_object()?;
        let scenario = obj.get("scenario")?.as_str()?.to_string();
        let mut keys: Vec<(usize, &String)> = obj
            .keys()
            .filter(|k| k.as_str() != "scenario")
            .map(|k| (line.find(&format!("\"{k}\":")).unwrap_or(usize::MAX), k))
            .collect();
        keys.sort();
        Some(Record {
            scenario,
            fields: keys
                .into_iter()
                .map(|(_, k)| (k.clone(), obj[k].clone()))
                .collect(),
        })
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints progress on stderr with the time since the harness started.
pub(crate) fn progress(msg: impl std::fmt::Display) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:7.2}s] {msg}");
}

/// Collects records and prints them.
pub(crate) struct Reporter {
    json: bool,
    records: Vec<Record>,
}

impl Reporter {
    pub(crate) fn new(json: bool) -> Self {
        Self {
            json,
            records: Vec::new(),
        }
    }

    /// Records a result; with `--json` prints its line at once.
    pub(crate) fn emit(&mut self, r: Record) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", r.json());
            let _ = out.flush();
        }
        self.records.push(r);
    }

    /// Prints the table of every record of `scenario` (stdout, or stderr
    /// with `--json`).
    pub(crate) fn table(&self, scenario: &str) {
        let rows: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| r.scenario == scenario)
            .collect();
        let text = table_text(scenario, &rows);
        if self.json {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    }
}

fn table_text(title: &str, rows: &[&Record]) -> String {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        for (k, _) in &r.fields {
            if !cols.contains(k) {
                cols.push(k.clone());
            }
        }
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| r.get(c).map(cell).unwrap_or_else(|| "-".into()))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|row| row[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: &[String]| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut s = format!("\n== {title}\n{}\n", line(&cols));
    for row in &cells {
        s.push_str(&line(row));
        s.push('\n');
    }
    s.push('\n');
    s
}

/// `sigil-bench report`: markdown from JSON lines.
#[derive(clap::Args)]
pub(crate) struct ReportArgs {
    /// JSON lines written by `sigil-bench all --json`.
    #[arg(long)]
    input: PathBuf,
    /// Replace the text between `<!-- figures:begin -->` and
    /// `<!-- figures:end -->` in this file instead of printing.
    #[arg(long)]
    update: Option<PathBuf>,
}

const BEGIN: &str = "<!-- figures:begin -->";
const END: &str = "<!-- figures:end -->";

pub(crate) fn render(a: &ReportArgs) -> crate::Result<()> {
    let text = std::fs::read_to_string(&a.input)
        .map_err(|e| format!("--input {}: {e}", a.input.display()))?;
    let records: Vec<Record> = text.lines().filter_map(Record::from_json).collect();
    let md = markdown(&records);
    match &a.update {
        None => print!("{md}"),
        Some(path) => {
            let doc = std::fs::read_to_string(path)
                .map_err(|e| format!("--update {}: {e}", path.display()))?;
            let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
                return Err(format!("{} lacks the {BEGIN} / {END} markers", path.display()).into());
            };
            if e < b {
                return Err(format!("{}: {END} before {BEGIN}", path.display()).into());
            }
            let new = format!("{}{BEGIN}\n{md}{}", &doc[..b], &doc[e..]);
            std::fs::write(path, new).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "-",
    }
}

/// The figures table: machine line, then one row per figure.
fn markdown(records: &[Record]) -> String {
    let mut s = String::new();
    if let Some(m) = records.iter().find(|r| r.scenario == "meta") {
        let g = |k: &str| m.get(k).map(cell).unwrap_or_else(|| "?".into());
        let date = g("date");
        let date = date.get(..16).unwrap_or(&date).replace('T', " ");
        s.push_str(&format!(
            "Measured {date} UTC on `{}` ({} cores, {} GiB RAM, Linux {}), commit `{}`, {} build, command `{}`.\n\n",
            g("cpu"),
            g("nproc"),
            g("mem_gib"),
            g("kernel"),
            g("commit"),
            g("profile"),
            g("command"),
        ));
    }
    s.push_str("| Scenario | Figure | Measured | Goal | Verdict |\n|---|---|---|---|---|\n");
    let mut row = |sc: &str, fig: String, val: String, goal: &str, ok: Option<bool>| {
        s.push_str(&format!(
            "| `{sc}` | {fig} | {val} | {goal} | {} |\n",
            verdict(ok)
        ));
    };
    for r in records {
        let f = |k: &str| r.get_f64(k);
        let sh = |k: &str| f(k).map(fmt_num).unwrap_or_else(|| "-".into());
        match r.scenario.as_str() {
            "sign-limit" => {
                row(
                    "sign-limit",
                    "ECDSA P-256 signatures/s, one core".into(),
                    sh("signs_per_sec"),
                    "reference",
                    None,
                );
                row(
                    "sign-limit",
                    "ECDSA P-256 verifications/s, one core".into(),
                    sh("verifies_per_sec"),
                    "reference",
                    None,
                );
            }
            "mint" => {
                let ratio = f("ratio_to_sign_limit");
                row(
                    "mint",
                    "SVIDs/s through `MintX509Svids` (server pinned to one core), issuance audited (one record per batch)".into(),
                    format!(
                        "{} (ratio {})",
                        sh("svids_per_sec"),
                        sh("ratio_to_sign_limit")
                    ),
                    "ratio ≥ 0.8",
                    ratio.map(|x| x >= 0.8),
                );
                row(
                    "mint",
                    "same, issuance audit off (baseline)".into(),
                    format!(
                        "{} (ratio {})",
                        sh("no_audit_svids_per_sec"),
                        sh("no_audit_ratio")
                    ),
                    "reference",
                    None,
                );
                row(
                    "mint",
                    "same, with `verify_csr_signatures = true` (every CSR's signature checked)"
                        .into(),
                    format!(
                        "{} (ratio {})",
                        sh("verify_csr_svids_per_sec"),
                        sh("verify_csr_ratio")
                    ),
                    "reference",
                    None,
                );
                let ir = f("inprocess_ratio");
                row(
                    "mint",
                    "SVIDs/s in-process `Ca::sign_svid`, one core".into(),
                    format!(
                        "{} (ratio {}; {} µs per SVID, {} µs per signature)",
                        sh("inprocess_svids_per_sec"),
                        sh("inprocess_ratio"),
                        sh("inprocess_us_per_svid"),
                        sh("sign_us")
                    ),
                    "ratio ≥ 0.8",
                    ir.map(|x| x >= 0.8),
                );
                row(
                    "mint",
                    "same, verifying each CSR's signature".into(),
                    format!(
                        "{} (ratio {})",
                        sh("inprocess_verify_csr_svids_per_sec"),
                        sh("inprocess_verify_csr_ratio")
                    ),
                    "reference",
                    None,
                );
            }
            "fetch" => {
                let c = f("clients").unwrap_or(0.0);
                let p99 = f("p99_us");
                let open = r.get("mode").and_then(Value::as_str) == Some("open");
                let goal = if c >= 1000.0 { "p99 < 1 ms" } else { "-" };
                let ok = if c >= 1000.0 {
                    p99.map(|p| p < 1000.0)
                } else {
                    None
                };
                let how = if open {
                    format!("open loop, {} fetches/s offered", sh("offered_per_sec"))
                } else {
                    "closed loop".to_string()
                };
                row(
                    "fetch",
                    format!(
                        "FetchX509SVID, {c} client{}, {how}: p50 / p99 / max µs, fetches/s",
                        if c == 1.0 { "" } else { "s" }
                    ),
                    format!(
                        "{} / {} / {}, {}/s",
                        sh("p50_us"),
                        sh("p99_us"),
                        sh("max_us"),
                        sh("per_sec")
                    ),
                    goal,
                    ok,
                );
            }
            "kill" => {
                let p99 = f("p99_ms");
                row(
                    "kill",
                    format!(
                        "kill → affected workload stream updated, {} kills ({} agent kills), {} agents, {} entries: p50 / p99 ms",
                        sh("kills"),
                        sh("agent_kills"),
                        sh("agents"),
                        sh("entries")
                    ),
                    format!(
                        "{} / {} (agent kills: {} / {})",
                        sh("p50_ms"),
                        sh("p99_ms"),
                        sh("agent_p50_ms"),
                        sh("agent_p99_ms")
                    ),
                    "p99 < 1 s",
                    p99.map(|p| p < 1000.0),
                );
                let crl = f("crl_refused_p99_ms");
                row(
                    "kill (CRL)",
                    format!(
                        "kill → example mTLS service refuses the killed client's unexpired certificate (CRL), {} kills: p50 / p99 ms",
                        sh("crl_kills")
                    ),
                    format!(
                        "{} / {}",
                        sh("crl_refused_p50_ms"),
                        sh("crl_refused_p99_ms")
                    ),
                    "p99 < 1 s",
                    crl.map(|p| p < 1000.0),
                );
            }
            "propagation" => {
                let p99 = f("p99_ms");
                row(
                    "propagation",
                    format!(
                        "entry change → workload stream, {} changes, {} agents, {} entries: p50 / p99 ms",
                        sh("changes"),
                        sh("agents"),
                        sh("entries")
                    ),
                    format!(
                        "{} / {} (from the call's start: {} / {})",
                        sh("p50_ms"),
                        sh("p99_ms"),
                        sh("from_call_p50_ms"),
                        sh("from_call_p99_ms")
                    ),
                    "p99 < 200 ms",
                    p99.map(|p| p < 200.0),
                );
            }
            "scale" => match r.get("case").and_then(Value::as_str) {
                Some("server") => {
                    row(
                        "scale",
                        format!(
                            "server RSS, {} entries, {} agents syncing",
                            sh("entries"),
                            sh("agents")
                        ),
                        format!("{} MB", sh("server_rss_mb")),
                        "-",
                        None,
                    );
                    row(
                        "scale",
                        format!(
                            "fresh agent sync ({} own entries of {})",
                            sh("agent_entries"),
                            sh("entries")
                        ),
                        format!("{} ms", sh("agent_sync_ms")),
                        "-",
                        None,
                    );
                    let g = f("sync_growth_ratio");
                    row(
                        "scale",
                        "fresh-sync time growth, total entries ×10, own entries fixed: median (fastest)".into(),
                        format!(
                            "{} ({}): {} → {} ms",
                            sh("sync_growth_ratio"),
                            sh("sync_growth_ratio_min"),
                            sh("sync_ms_at_10pct_entries"),
                            sh("sync_ms_at_full_entries")
                        ),
                        "flat (≤ 1.5)",
                        g.map(|x| x <= 1.5),
                    );
                    row(
                        "scale",
                        format!(
                            "entry change with {} agents connected: server CPU, change → probe p50, bytes sent (delta) vs full snapshot",
                            sh("agents")
                        ),
                        format!(
                            "{} ms, {} ms, {} B vs {} B",
                            sh("server_cpu_ms_per_change"),
                            sh("change_to_probe_p50_ms"),
                            sh("change_bytes"),
                            sh("snapshot_bytes")
                        ),
                        "-",
                        None,
                    );
                    row(
                        "scale",
                        format!(
                            "rotation storm: {} agents renew {} SVIDs at once; peak signing queue",
                            sh("agents"),
                            sh("storm_svids")
                        ),
                        format!(
                            "{} batches ({} CSRs) waiting at peak; {} SVIDs/s; call p50 {} ms, max {} ms; admin API max {} ms",
                            sh("peak_signing_queue"),
                            sh("peak_signing_queue_csrs"),
                            sh("storm_svids_per_sec"),
                            sh("storm_call_p50_ms"),
                            sh("storm_call_max_ms"),
                            sh("storm_admin_max_ms")
                        ),
                        "bounded, server responsive",
                        None,
                    );
                }
                Some("agent") => {
                    let n = f("agent_entries").unwrap_or(0.0);
                    let synced = r.get("synced").and_then(Value::as_bool);
                    let rss = f("agent_rss_mb");
                    let (goal, ok) = if (n - 1000.0).abs() < 0.5 {
                        ("< 30 MB", rss.map(|x| x < 30.0))
                    } else {
                        ("syncs fully", synced)
                    };
                    row(
                        "scale",
                        format!(
                            "real agent with {} entries: RSS, start → synced, start → all SVIDs",
                            fmt_num(n)
                        ),
                        if synced == Some(true) {
                            format!(
                                "{} MB, synced in {} ms, {} SVIDs in {} ms",
                                sh("agent_rss_mb"),
                                sh("agent_sync_ms"),
                                sh("svids"),
                                sh("all_svids_ms")
                            )
                        } else {
                            format!(
                                "**did not sync** ({}), RSS {} MB",
                                r.get("error").map(cell).unwrap_or_default(),
                                sh("agent_rss_mb")
                            )
                        },
                        goal,
                        ok,
                    );
                }
                _ => {}
            },
            "startup" => row(
                "startup",
                "agent restart (stored identity) → first SVID: p50 / max ms".into(),
                format!(
                    "{} / {} (first start with a join token: {})",
                    sh("first_svid_ms"),
                    sh("max_ms"),
                    sh("attest_first_svid_ms")
                ),
                "-",
                None,
            ),
            "task" => row(
                "task",
                "task start → task X.509-SVID in hand, p50 / p99 ms, next to a plain FetchX509SVID"
                    .into(),
                format!(
                    "{} / {} (plain fetch {} / {})",
                    sh("task_start_p50_ms"),
                    sh("task_start_p99_ms"),
                    sh("fetch_x509_p50_ms"),
                    sh("fetch_x509_p99_ms")
                ),
                "-",
                None,
            ),
            _ => {}
        }
    }
    s.push('\n');
    s
}
