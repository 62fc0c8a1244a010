//! Delegation settings of server.toml, and the keys of the issuers they
//! trust:
//!
//! ```toml
//! max_delegation_depth = 4          # actors in one chain (1-16, default 4)
//!
//! [[trusted_issuer]]
//! issuer = "https://idp.example.com"   # the tokens' `iss`, compared exactly
//! audience = "sigil"                   # must be in the tokens' `aud`
//! jwks_file = "/etc/sigil/idp-jwks.json"
//! # or: jwks_url = "https://idp.example.com/jwks", ca_bundle_path = "/etc/sigil/idp-roots.pem",
//! #     jwks_refresh = "5m"
//! ```
//!
//! Subject tokens of these issuers may be exchanged for delegation tokens
//! (see `state::delegation`). Unknown keys are refused naming the key, as in
//! the rest of server.toml. A JWKS file is read at start and again when a
//! token names a key ID it lacks (at most every [`RELOAD_MIN`]); a JWKS URL
//! is fetched over HTTPS (the federation client: rustls, the PEM roots of
//! `ca_bundle_path`, no system roots) at start and every `jwks_refresh`.
//! Either way the document is bounded to [`MAX_JWKS_BYTES`], and a document
//! that does not parse leaves the previous keys in place.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sigil_core::duration::parse_field;
use sigil_core::jwt::JwtBundle;

/// Default `max_delegation_depth`.
pub const DEFAULT_MAX_DELEGATION_DEPTH: u32 = 4;
/// Largest `max_delegation_depth`.
pub const MAX_DELEGATION_DEPTH: u32 = 16;
/// Most `[[trusted_issuer]]` sections.
pub const MAX_TRUSTED_ISSUERS: usize = 32;
/// Largest JWKS document read from a file or a URL.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Default and bounds of `jwks_refresh`.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
const MAX_JWKS_REFRESH: Duration = Duration::from_secs(86_400);
/// A JWKS file is re-read for an unknown key ID at most this often.
pub const RELOAD_MIN: Duration = Duration::from_secs(5);

/// One `[[trusted_issuer]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrustedIssuer {
    issuer: String,
    audience: String,
    #[serde(default)]
    jwks_file: Option<PathBuf>,
    #[serde(default)]
    jwks_url: Option<String>,
    #[serde(default)]
    ca_bundle_path: Option<PathBuf>,
    #[serde(default)]
    jwks_refresh: Option<String>,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS document on disk.
    File(PathBuf),
    /// A JWKS document fetched over HTTPS.
    Url {
        url: http::Uri,
        /// PEM roots the endpoint's certificate must chain to.
        ca_bundle_path: PathBuf,
        refresh: Duration,
    },
}

/// A validated `[[trusted_issuer]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedIssuerConfig {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// The audience its tokens must name.
    pub audience: String,
    pub jwks: JwksSource,
}

/// The delegation keys of server.toml, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationConfig {
    pub trusted_issuers: Vec<TrustedIssuerConfig>,
    /// Most actors in one chain (`act` nesting) of an issued token.
    pub max_delegation_depth: u32,
}

impl Default for DelegationConfig {
    fn default() -> Self {
        Self {
            trusted_issuers: Vec::new(),
            max_delegation_depth: DEFAULT_MAX_DELEGATION_DEPTH,
        }
    }
}

type KeyError = (&'static str, String);

/// Validates the delegation keys. `own_issuer` is the server's
/// `jwt_issuer`: no trusted issuer may claim it. Errors name the key.
pub fn validate(
    raw: Vec<RawTrustedIssuer>,
    max_depth: Option<u32>,
    own_issuer: Option<&str>,
) -> Result<DelegationConfig, KeyError> {
    let max_delegation_depth = max_depth.unwrap_or(DEFAULT_MAX_DELEGATION_DEPTH);
    if !(1..=MAX_DELEGATION_DEPTH).contains(&max_delegation_depth) {
        return Err((
            "max_delegation_depth",
            format!("{max_delegation_depth} is not in 1-{MAX_DELEGATION_DEPTH}"),
        ));
    }
    if raw.len() > MAX_TRUSTED_ISSUERS {
        return Err((
            "trusted_issuer",
            format!(
                "{} sections exceed the maximum of {MAX_TRUSTED_ISSUERS}",
                raw.len()
            ),
        ));
    }
    let mut trusted_issuers: Vec<TrustedIssuerConfig> = Vec::with_capacity(raw.len());
    for r in raw {
        let issuer = r.issuer.trim().to_string();
        let uri: http::Uri = issuer.parse().map_err(|e| {
            (
                "trusted_issuer.issuer",
                format!("{:?} is not a URL: {e}", r.issuer),
            )
        })?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() || issuer != r.issuer {
            return Err((
                "trusted_issuer.issuer",
                format!(
                    "{:?} must be an https:// URL (as in the tokens' iss)",
                    r.issuer
                ),
            ));
        }
        if own_issuer == Some(issuer.as_str()) {
            return Err((
                "trusted_issuer.issuer",
                format!("{issuer:?} is this server's own jwt_issuer"),
            ));
        }
        if trusted_issuers.iter().any(|t| t.issuer == issuer) {
            return Err((
                "trusted_issuer.issuer",
                format!("{issuer:?} is listed twice"),
            ));
        }
        if r.audience.is_empty() || r.audience.len() > sigil_core::jwt::MAX_AUDIENCE_LEN {
            return Err((
                "trusted_issuer.audience",
                format!("must be 1-{} bytes", sigil_core::jwt::MAX_AUDIENCE_LEN),
            ));
        }
        let jwks = match (r.jwks_file, r.jwks_url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err((
                    "trusted_issuer.jwks_file",
                    format!("{issuer}: set exactly one of jwks_file and jwks_url"),
                ));
            }
            (Some(f), None) => {
                if !f.is_absolute() {
                    return Err((
                        "trusted_issuer.jwks_file",
                        format!("{:?} must be an absolute path", f.display().to_string()),
                    ));
                }
                if r.ca_bundle_path.is_some() || r.jwks_refresh.is_some() {
                    return Err((
                        "trusted_issuer.ca_bundle_path",
                        "ca_bundle_path and jwks_refresh go with jwks_url only".into(),
                    ));
                }
                JwksSource::File(f)
            }
            (None, Some(u)) => {
                let url: http::Uri = u.parse().map_err(|e| {
                    (
                        "trusted_issuer.jwks_url",
                        format!("{u:?} is not a URL: {e}"),
                    )
                })?;
                if url.scheme_str() != Some("https") || url.host().is_none() {
                    return Err((
                        "trusted_issuer.jwks_url",
                        format!("{u:?} must be an https:// URL"),
                    ));
                }
                let ca_bundle_path = r.ca_bundle_path.ok_or((
                    "trusted_issuer.ca_bundle_path",
                    "required with jwks_url (no system roots are used)".to_string(),
                ))?;
                if !ca_bundle_path.is_absolute() {
                    return Err((
                        "trusted_issuer.ca_bundle_path",
                        format!(
                            "{:?} must be an absolute path",
                            ca_bundle_path.display().to_string()
                        ),
                    ));
                }
                let refresh = match &r.jwks_refresh {
                    None => DEFAULT_JWKS_REFRESH,
                    Some(v) => parse_field("trusted_issuer.jwks_refresh", v, MAX_JWKS_REFRESH)
                        .map_err(|e| ("trusted_issuer.jwks_refresh", e.detail()))?
                        .max(Duration::from_secs(1)),
                };
                JwksSource::Url {
                    url,
                    ca_bundle_path,
                    refresh,
                }
            }
        };
        trusted_issuers.push(TrustedIssuerConfig {
            issuer,
            audience: r.audience,
            jwks,
        });
    }
    Ok(DelegationConfig {
        trusted_issuers,
        max_delegation_depth,
    })
}

/// One trusted issuer with its current keys.
pub struct TrustedIssuer {
    pub cfg: TrustedIssuerConfig,
    keys: RwLock<JwtBundle>,
    /// When the keys were last (re)loaded, for [`RELOAD_MIN`].
    loaded: RwLock<Option<Instant>>,
}

/// Parses a JWKS document of at most [`MAX_JWKS_BYTES`].
pub fn parse_jwks(doc: &[u8]) -> Result<JwtBundle, String> {
    if doc.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "{} bytes exceed the maximum of {MAX_JWKS_BYTES}",
            doc.len()
        ));
    }
    JwtBundle::from_jwks(doc).map_err(|e| e.to_string())
}

fn read_jwks_file(path: &std::path::Path) -> Result<JwtBundle, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut doc = Vec::new();
    f.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut doc)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    parse_jwks(&doc).map_err(|e| format!("{}: {e}", path.display()))
}

impl TrustedIssuer {
    /// The issuer with no keys yet (a URL source fills them in).
    pub fn new(cfg: TrustedIssuerConfig) -> Self {
        Self {
            cfg,
            keys: RwLock::default(),
            loaded: RwLock::new(None),
        }
    }

    /// Reads a file source's keys; at start, an unreadable file is an
    /// error naming it.
    pub fn load_file(&self) -> Result<(), String> {
        if let JwksSource::File(p) = &self.cfg.jwks {
            let b = read_jwks_file(p)?;
            self.install(b);
        }
        Ok(())
    }

    /// Replaces the keys.
    pub fn install(&self, b: JwtBundle) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = b;
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// The current keys. With `reload` (the token names a key ID the keys
    /// lack), a file source is read again first, at most every
    /// [`RELOAD_MIN`]; a failed read keeps the old keys.
    pub fn keys(&self, reload: bool) -> JwtBundle {
        if reload
            && let JwksSource::File(p) = &self.cfg.jwks
            && self
                .loaded
                .read()
                .map(|l| l.is_none_or(|t| t.elapsed() >= RELOAD_MIN))
                .unwrap_or(true)
        {
            match read_jwks_file(p) {
                Ok(b) => self.install(b),
                Err(e) => {
                    tracing::warn!(issuer = %self.cfg.issuer, error = %e, "re-reading the JWKS file failed; keeping the previous keys");
                    *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
            }
        }
        self.keys.read().map(|k| k.clone()).unwrap_or_default()
    }
}

/// Keeps a URL source's keys fresh, forever (every `jwks_refresh`, with
/// backoff after failures).
pub async fn jwks_refresh_loop(issuer: std::sync::Arc<TrustedIssuer>) {
    let JwksSource::Url {
        url,
        ca_bundle_path,
        refresh,
    } = issuer.cfg.jwks.clone()
    else {
        return;
    };
    let mut backoff =
        sigil_core::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
            .jittered();
    loop {
        let fetched = crate::endpoints::https_get_web_pki(&url, &ca_bundle_path, MAX_JWKS_BYTES)
            .await
            .and_then(|doc| parse_jwks(&doc));
        match fetched {
            Ok(b) => {
                tracing::debug!(issuer = %issuer.cfg.issuer, keys = b.len(), "trusted issuer JWKS refreshed");
                issuer.install(b);
                backoff.reset();
                tokio::time::sleep(refresh).await;
            }
            Err(e) => {
                tracing::warn!(issuer = %issuer.cfg.issuer, url = %url, error = %e, "fetching the trusted issuer's JWKS failed");
                tokio::time::sleep(backoff.next_delay().min(refresh)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<DelegationConfig, KeyError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct T {
            #[serde(default)]
            trusted_issuer: Vec<RawTrustedIssuer>,
            max_delegation_depth: Option<u32>,
        }
        let t: T = toml::from_str(toml_text).map_err(|e| ("toml", e.to_string()))?;
        validate(
            t.trusted_issuer,
            t.max_delegation_depth,
            Some("https://sigil.example"),
        )
    }

    #[test]
    fn a_valid_section_parses() {
        let c = parse(
            "[[trusted_issuer]]\nissuer = \"https://idp.example\"\naudience = \"sigil\"\njwks_file = \"/etc/j.json\"\n\
             [[trusted_issuer]]\nissuer = \"https://idp2.example/realm\"\naudience = \"a\"\njwks_url = \"https://idp2.example/keys\"\nca_bundle_path = \"/r.pem\"\njwks_refresh = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(c.max_delegation_depth, DEFAULT_MAX_DELEGATION_DEPTH);
        assert_eq!(c.trusted_issuers.len(), 2);
        assert_eq!(
            c.trusted_issuers[0].jwks,
            JwksSource::File("/etc/j.json".into())
        );
        assert!(matches!(
            c.trusted_issuers[1].jwks,
            JwksSource::Url { refresh, .. } if refresh == Duration::from_secs(60)
        ));
        assert_eq!(
            parse("max_delegation_depth = 2")
                .unwrap()
                .max_delegation_depth,
            2
        );
    }

    #[test]
    fn each_bad_key_is_named() {
        let base = |extra: &str| {
            format!(
                "[[trusted_issuer]]\nissuer = \"https://idp.example\"\naudience = \"s\"\n{extra}"
            )
        };
        for (text, key) in [
            ("max_delegation_depth = 0".to_string(), "max_delegation_depth"),
            ("max_delegation_depth = 17".to_string(), "max_delegation_depth"),
            (base("jwks_file = \"rel.json\""), "trusted_issuer.jwks_file"),
            (base(""), "trusted_issuer.jwks_file"),
            (
                base("jwks_file = \"/a\"\njwks_url = \"https://x/\""),
                "trusted_issuer.jwks_file",
            ),
            (base("jwks_url = \"http://x/\"\nca_bundle_path = \"/r\""), "trusted_issuer.jwks_url"),
            (base("jwks_url = \"https://x/\""), "trusted_issuer.ca_bundle_path"),
            (
                base("jwks_url = \"https://x/\"\nca_bundle_path = \"/r\"\njwks_refresh = \"2d\""),
                "trusted_issuer.jwks_refresh",
            ),
            (
                "[[trusted_issuer]]\nissuer = \"http://idp\"\naudience = \"s\"\njwks_file = \"/a\"".into(),
                "trusted_issuer.issuer",
            ),
            (
                "[[trusted_issuer]]\nissuer = \"https://sigil.example\"\naudience = \"s\"\njwks_file = \"/a\"".into(),
                "trusted_issuer.issuer",
            ),
            (
                format!("{}\n{}", base("jwks_file = \"/a\""), base("jwks_file = \"/b\"")),
                "trusted_issuer.issuer",
            ),
            (
                "[[trusted_issuer]]\nissuer = \"https://idp\"\naudience = \"\"\njwks_file = \"/a\"".into(),
                "trusted_issuer.audience",
            ),
        ] {
            let (k, why) = parse(&text).unwrap_err();
            assert_eq!(k, key, "{text}: {why}");
        }
        let (_, why) = parse(&base("jwks_file = \"/a\"\nbogus = 1")).unwrap_err();
        assert!(why.contains("bogus"), "{why}");
    }

    #[test]
    fn jwks_documents_are_bounded() {
        let big = vec![b' '; MAX_JWKS_BYTES + 1];
        assert!(parse_jwks(&big).unwrap_err().contains("maximum"));
        assert!(parse_jwks(br#"{"keys":[{"kty":"oct","k":"AA","kid":"x"}]}"#).is_err());
    }
}
