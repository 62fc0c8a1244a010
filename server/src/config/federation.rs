//! Federation sections: `[bundle_endpoint]` (serve this trust domain's
//! bundle), `[[federation]]` (foreign bundle endpoints to poll) and `[oidc]`
//! (OpenID Connect discovery for JWT-SVID verifiers).

use std::path::PathBuf;

use serde::Deserialize;
use sigil_core::TrustDomain;

use super::{ConfigError, MAX_REFRESH_HINT, absolute, duration, key_err};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBundleEndpoint {
    #[serde(default = "super::default_bind_address")]
    address: String,
    port: u16,
    #[serde(default = "default_profile")]
    profile: String,
    #[serde(default)]
    cert_path: Option<PathBuf>,
    #[serde(default)]
    key_path: Option<PathBuf>,
    #[serde(default)]
    refresh_hint: Option<String>,
}

fn default_profile() -> String {
    "https_spiffe".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFederation {
    trust_domain: String,
    bundle_endpoint_url: String,
    #[serde(default = "default_profile")]
    profile: String,
    #[serde(default)]
    endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    ca_bundle_path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOidc {
    #[serde(default = "super::default_bind_address")]
    address: String,
    port: u16,
    pub(super) issuer: String,
}

/// How a bundle endpoint authenticates itself (SPIFFE Federation §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// TLS with the server's own X.509-SVID.
    HttpsSpiffe,
    /// TLS with a Web PKI certificate.
    HttpsWeb,
}

/// `[bundle_endpoint]`: serve this trust domain's bundle to federated peers.
#[derive(Debug, Clone)]
pub struct BundleEndpointConfig {
    pub addr: std::net::SocketAddr,
    pub profile: EndpointProfile,
    /// https_web: PEM certificate chain and key.
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
    pub refresh_hint: Duration,
}

/// `[[federation]]`: a foreign trust domain whose bundle endpoint we poll.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    pub trust_domain: TrustDomain,
    pub url: http::Uri,
    pub profile: EndpointProfile,
    /// https_spiffe: the SPIFFE ID the endpoint must present.
    pub endpoint_spiffe_id: Option<sigil_core::SpiffeId>,
    /// https_web: PEM roots to verify the endpoint with.
    pub ca_bundle_path: Option<PathBuf>,
}

/// `[oidc]`: OpenID Connect discovery for JWT-SVID verifiers.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub addr: std::net::SocketAddr,
    pub issuer: String,
}

fn profile(key: &'static str, v: &str) -> Result<EndpointProfile, ConfigError> {
    match v {
        "https_spiffe" => Ok(EndpointProfile::HttpsSpiffe),
        "https_web" => Ok(EndpointProfile::HttpsWeb),
        other => Err(key_err(
            key,
            format!("unknown profile {other:?} (expected https_spiffe or https_web)"),
        )),
    }
}

fn socket_addr(
    key: &'static str,
    address: &str,
    port: u16,
) -> Result<std::net::SocketAddr, ConfigError> {
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| key_err(key, format!("{address:?} is not an IP address")))?;
    Ok(std::net::SocketAddr::new(ip, port))
}

impl RawBundleEndpoint {
    /// Validates `[bundle_endpoint]`.
    pub(super) fn validate(self) -> Result<BundleEndpointConfig, ConfigError> {
        let b = self;
        let profile = profile("bundle_endpoint.profile", &b.profile)?;
        if profile == EndpointProfile::HttpsWeb && (b.cert_path.is_none() || b.key_path.is_none()) {
            return Err(key_err(
                "bundle_endpoint.cert_path",
                "https_web needs cert_path and key_path",
            ));
        }
        let refresh_hint = match &b.refresh_hint {
            Some(v) => duration("bundle_endpoint.refresh_hint", v, MAX_REFRESH_HINT)?,
            None => Duration::from_secs(300),
        };
        for (key, p) in [
            ("bundle_endpoint.cert_path", &b.cert_path),
            ("bundle_endpoint.key_path", &b.key_path),
        ] {
            if let Some(p) = p {
                absolute(key, p)?;
            }
        }
        Ok(BundleEndpointConfig {
            addr: socket_addr("bundle_endpoint.address", &b.address, b.port)?,
            profile,
            cert_path: b.cert_path,
            key_path: b.key_path,
            refresh_hint,
        })
    }
}

impl RawFederation {
    /// Validates one `[[federation]]` table; `own` is the server's trust
    /// domain, which it cannot federate with.
    pub(super) fn validate(self, own: &TrustDomain) -> Result<FederationConfig, ConfigError> {
        let f = self;
        let td = TrustDomain::new(&f.trust_domain).map_err(|e| {
            key_err(
                "federation.trust_domain",
                format!("{:?}: {e}", f.trust_domain),
            )
        })?;
        if td == *own {
            return Err(key_err(
                "federation.trust_domain",
                "cannot federate with the server's own trust domain",
            ));
        }
        let url: http::Uri = f.bundle_endpoint_url.parse().map_err(|e| {
            key_err(
                "federation.bundle_endpoint_url",
                format!("{:?}: {e}", f.bundle_endpoint_url),
            )
        })?;
        if url.scheme_str() != Some("https") || url.host().is_none() {
            return Err(key_err(
                "federation.bundle_endpoint_url",
                format!("{:?} must be an https:// URL", f.bundle_endpoint_url),
            ));
        }
        let profile = profile("federation.profile", &f.profile)?;
        let endpoint_spiffe_id = match (&profile, &f.endpoint_spiffe_id) {
            (EndpointProfile::HttpsSpiffe, Some(id)) => {
                let id = sigil_core::SpiffeId::new(id).map_err(|e| {
                    key_err("federation.endpoint_spiffe_id", format!("{id:?}: {e}"))
                })?;
                if !id.is_member_of(&td) {
                    return Err(key_err(
                        "federation.endpoint_spiffe_id",
                        format!("{id} is not in {td}"),
                    ));
                }
                Some(id)
            }
            (EndpointProfile::HttpsSpiffe, None) => {
                return Err(key_err(
                    "federation.endpoint_spiffe_id",
                    "required for https_spiffe",
                ));
            }
            (EndpointProfile::HttpsWeb, _) => None,
        };
        if profile == EndpointProfile::HttpsWeb && f.ca_bundle_path.is_none() {
            return Err(key_err(
                "federation.ca_bundle_path",
                "required for https_web (no system roots are used)",
            ));
        }
        if let Some(p) = &f.ca_bundle_path {
            absolute("federation.ca_bundle_path", p)?;
        }
        Ok(FederationConfig {
            trust_domain: td,
            url,
            profile,
            endpoint_spiffe_id,
            ca_bundle_path: f.ca_bundle_path,
        })
    }
}

impl RawOidc {
    /// Validates `[oidc]`.
    pub(super) fn validate(&self) -> Result<OidcConfig, ConfigError> {
        let o = self;
        let iss: http::Uri = o
            .issuer
            .parse()
            .map_err(|e| key_err("oidc.issuer", format!("{:?}: {e}", o.issuer)))?;
        if !matches!(iss.scheme_str(), Some("https" | "http")) || iss.host().is_none() {
            return Err(key_err(
                "oidc.issuer",
                format!("{:?} must be an http(s) URL", o.issuer),
            ));
        }
        Ok(OidcConfig {
            addr: socket_addr("oidc.address", &o.address, o.port)?,
            issuer: o.issuer.trim_end_matches('/').to_string(),
        })
    }
}
