//! sigil-core: the pure types and logic of Sigil, with no sockets and no files.
//!
//! - [`duration`] — the `300` / `300s` / `5m` / `1h` duration syntax of the CLI and configs.
//! - [`selector`] — validated `type:key:value` selectors and selector-set matching.
//! - [`entry`] — registration entries, validated from their wire form.
//! - [`x509`] — the CA, X.509-SVID minting from CSRs, SVID inspection.
//! - [`bundle`] — the SPIFFE bundle (JWKS) encoding of trust bundles.
//! - [`jwt`] — JWT-SVID signing, JWKS bundles and validation.
//! - [`signer`] — signing keys held outside the process (a PKCS#11 token).
//! - [`wit`] — WIT-SVIDs (WIMSE workload identity tokens): issuing, the workload key,
//!   verification against `use: wit-svid` keys, and the proof of possession (WPT).
//! - [`tls`] — rustls verifiers that authenticate peers by SPIFFE ID against a bundle.
//! - [`ids`] — well-known SPIFFE IDs (server, agents) and random identifiers.
//! - [`limits`] — connection caps (per peer, total, reserve) and idle tracking.
//! - [`caller`] — who caused a change (admin peer, agent, node, server task).
//! - [`audit`] — the hash-chained, checkpoint-signed audit trail and its verifier.
//!
//! SPIFFE IDs and trust domains are the `spiffe` crate's validated types.

#![warn(missing_docs)]

pub mod audit;
pub mod backoff;
pub mod bundle;
pub mod caller;
pub mod duration;
pub mod entry;
pub mod ids;
pub mod jwt;
pub mod limits;
pub mod selector;
pub mod signer;
pub mod tls;
pub mod wit;
pub mod x509;

pub use spiffe::{SpiffeId, TrustDomain};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Seconds on a clock that is never stepped: the wall clock read at the
/// first call, advanced since by the monotonic clock. A deadline set as
/// "now plus a lifetime" on this clock falls due after that lifetime
/// whatever happens to the system clock meanwhile (an NTP step, an
/// operator's `date -s`), so the agent neither serves an SVID past its
/// lifetime when the clock goes back nor drops fresh ones when it jumps
/// ahead. Only differences of its readings are meaningful.
pub fn steady_unix() -> i64 {
    static START: std::sync::OnceLock<(i64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = START.get_or_init(|| (now_unix(), std::time::Instant::now()));
    wall + at.elapsed().as_secs() as i64
}

/// Unix seconds as RFC 3339 UTC (`2026-11-25T15:04:35Z`), or the number
/// itself if it is out of range.
pub fn rfc3339(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

/// A config parse error with the offending line quoted, so that errors from
/// the TOML layer (wrong type, bad syntax) name the key like the checks that
/// follow parsing do: `line 3 (verify_csr_signatures = "yes"): invalid type`.
/// `span` is the byte range the parser blamed, if it knows one.
pub fn config_error(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let Some(span) = span else {
        return message.trim().to_string();
    };
    let start = span.start.min(text.len());
    let line_no = text.get(..start).map_or(0, |t| t.matches('\n').count()) + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    format!("line {line_no} ({line}): {}", message.trim())
}

/// The values a `log_level` config key accepts (per-module filters go in
/// `SIGIL_LOG`).
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Why a path given in a config file is refused, if it is: empty, or
/// relative (a service's working directory is not part of its
/// configuration). Server and agent configs wrap it with the key's name.
pub fn config_path_problem(p: &std::path::Path) -> Option<String> {
    if p.as_os_str().is_empty() {
        Some("must not be empty".into())
    } else if !p.is_absolute() {
        Some(format!(
            "{:?} must be an absolute path",
            p.display().to_string()
        ))
    } else {
        None
    }
}

/// Why a `log_level` value is refused, if it is.
pub fn log_level_problem(v: &str) -> Option<String> {
    (!LOG_LEVELS.contains(&v)).then(|| {
        format!(
            "{v:?} is not a level (expected one of {}; per-module filters go in SIGIL_LOG)",
            LOG_LEVELS.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_errors_quote_the_line() {
        let text = "a = 1\nkey = \"yes\"\n";
        let at = text.find("\"yes\"").unwrap();
        assert_eq!(
            super::config_error(text, Some(at..at + 5), "invalid type\n"),
            "line 2 (key = \"yes\"): invalid type"
        );
        assert_eq!(
            super::config_error(text, None, "missing field `x`"),
            "missing field `x`"
        );
    }
}
