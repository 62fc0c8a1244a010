//! HTTP endpoints for verifiers outside the SPIFFE Workload API:
//!
//! - the **bundle endpoint** (SPIFFE Federation): this trust domain's bundle
//!   as a SPIFFE bundle document at `/`, over TLS with profile `https_spiffe`
//!   (the server's own SVID) or `https_web` (a Web PKI certificate);
//! - the **bundle endpoint client**: for each `[[federation]]`, fetches the
//!   foreign bundle, authenticating the endpoint by SPIFFE ID against the
//!   foreign bundle we already hold (`https_spiffe`) or by configured Web
//!   PKI roots (`https_web`), and refreshes it on its `spiffe_refresh_hint`;
//! - **OIDC discovery**: `/.well-known/openid-configuration` and `/keys`, so
//!   that off-the-shelf JWT libraries verify JWT-SVIDs (plain HTTP: put a TLS
//!   terminator in front in production).

use crate::error::StartupError;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use sigil_core::tls::{ServerTrust, SvidCertResolver, client_config_http1};
use sigil_proto::common::FederatedBundle;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{EndpointProfile, FederationConfig};
use crate::state::ServerState;

/// Most bytes accepted from a foreign bundle endpoint.
const MAX_BUNDLE_BYTES: usize = 1 << 20;

type Handler = Arc<dyn Fn(&str) -> Response<Full<Bytes>> + Send + Sync>;

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn not_found() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// Serves GET requests with `handler` on `listener`, over TLS if given,
/// within the limits of [`crate::limits::http_endpoint`].
async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, handler: Handler) {
    use crate::limits::{Guarded, admit, caps, http_endpoint as lim};
    let limiter = sigil_core::limits::ConnLimiter::new(caps(
        lim::MAX_CONNECTIONS,
        lim::MAX_CONNECTIONS_PER_IP,
    ));
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(permit) = admit(&limiter, peer, "http endpoint") else {
            continue;
        };
        let tls = tls.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let activity = sigil_core::limits::Activity::new(std::time::Instant::now());
            let conn_peer = crate::limits::ConnPeer {
                addr: peer,
                certs: None,
                activity: activity.clone(),
            };
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                let call = activity.begin();
                async move {
                    let _call = call;
                    if req.method() != http::Method::GET {
                        let mut r =
                            Response::new(Full::new(Bytes::from_static(b"method not allowed\n")));
                        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                        return Ok::<_, std::convert::Infallible>(r);
                    }
                    Ok(handler(req.uri().path()))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(lim::HEADER_READ_TIMEOUT)
                .max_buf_size(lim::MAX_BUF);
            let result = match tls {
                Some(acc) => {
                    match tokio::time::timeout(crate::limits::HANDSHAKE_TIMEOUT, acc.accept(sock))
                        .await
                    {
                        Ok(Ok(s)) => {
                            let io = Guarded::new(s, conn_peer, permit, lim::IDLE_TIMEOUT);
                            builder.serve_connection(TokioIo::new(io), svc).await
                        }
                        _ => return,
                    }
                }
                None => {
                    let io = Guarded::new(sock, conn_peer, permit, lim::IDLE_TIMEOUT);
                    builder.serve_connection(TokioIo::new(io), svc).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "endpoint connection ended");
            }
        });
    }
}

/// The SPIFFE bundle document of this trust domain: X.509 authorities
/// (`use: x509-svid`), JWT-SVID authorities (`use: jwt-svid`) and WIT-SVID
/// authorities (`use: wit-svid`). The OIDC `/keys` document has the JWT
/// keys only, so no OIDC verifier ever accepts a WIT.
pub fn bundle_document(state: &ServerState, refresh_hint: Duration) -> Value {
    let jwks: Value = serde_json::from_slice(&state.jwt_bundle()).unwrap_or(json!({"keys": []}));
    let jwt_keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    sigil_core::bundle::spiffe_bundle(
        &state.bundle(),
        &jwt_keys,
        state.bundle_sequence(),
        refresh_hint.as_secs(),
    )
    .map(|mut doc| {
        let wit: Value = serde_json::from_slice(&state.wit_bundle()).unwrap_or(json!({"keys": []}));
        if let Some(keys) = wit.get("keys").and_then(Value::as_array) {
            sigil_core::bundle::add_wit_authorities(&mut doc, keys);
        }
        doc
    })
    .unwrap_or_else(|e| json!({"error": e.to_string()}))
}

/// Starts the bundle endpoint.
pub async fn start_bundle_endpoint(
    state: Arc<ServerState>,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    refresh_hint: Duration,
) -> Result<(), StartupError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind {
            what: "bundle_endpoint",
            addr,
            source,
        })?;
    let handler: Handler = Arc::new(move |path| match path {
        "/" => json_response(&bundle_document(&state, refresh_hint)),
        _ => not_found(),
    });
    tracing::info!(%addr, "bundle endpoint listening");
    tokio::spawn(serve(listener, Some(TlsAcceptor::from(tls)), handler));
    Ok(())
}

/// Starts the OIDC discovery endpoint.
pub async fn start_oidc(
    state: Arc<ServerState>,
    addr: SocketAddr,
    issuer: String,
) -> Result<(), StartupError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind {
            what: "oidc",
            addr,
            source,
        })?;
    let handler: Handler = Arc::new(move |path| match path {
        "/.well-known/openid-configuration" => json_response(&json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/keys"),
            "authorization_endpoint": "",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": published_algs(&state),
        })),
        "/keys" => {
            // OIDC verifiers look for `use: sig` keys.
            let jwks: Value =
                serde_json::from_slice(&state.jwt_bundle()).unwrap_or(json!({"keys": []}));
            let keys: Vec<Value> = jwks
                .get("keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|k| {
                    let mut k = k.clone();
                    k["use"] = json!("sig");
                    k["alg"] = json!(jwk_alg(&k));
                    k
                })
                .collect();
            json_response(&json!({ "keys": keys }))
        }
        _ => not_found(),
    });
    tracing::info!(%addr, "OIDC discovery listening");
    tokio::spawn(serve(listener, None, handler));
    Ok(())
}

/// The `alg` of every published JWT key (a key type change takes effect
/// at the next rotation, so old and new may both be in use).
fn published_algs(state: &ServerState) -> Vec<&'static str> {
    let jwks: Value = serde_json::from_slice(&state.jwt_bundle()).unwrap_or(json!({"keys": []}));
    let mut algs: Vec<&'static str> = jwks
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(jwk_alg)
        .collect();
    algs.sort_unstable();
    algs.dedup();
    algs
}

fn jwk_alg(k: &Value) -> &'static str {
    match (k["kty"].as_str(), k["crv"].as_str()) {
        (Some("RSA"), _) => "RS256",
        (_, Some("P-384")) => "ES384",
        _ => "ES256",
    }
}

/// Fetches a foreign bundle once.
async fn fetch_bundle(
    state: &ServerState,
    f: &FederationConfig,
) -> Result<sigil_core::bundle::ParsedBundle, String> {
    let trust = match f.profile {
        EndpointProfile::HttpsSpiffe => {
            let known = state
                .federated_bundles()
                .get(f.trust_domain.as_str())
                .map(|b| b.x509_authorities.clone())
                .unwrap_or_default();
            if known.is_empty() {
                return Err(format!(
                    "no bundle for {} yet: bootstrap it once with `sigil-server bundle set`",
                    f.trust_domain
                ));
            }
            let expected = f
                .endpoint_spiffe_id
                .clone()
                .ok_or("endpoint_spiffe_id missing")?;
            ServerTrust::Spiffe {
                bundle: Arc::new(RwLock::new(known)),
                expected,
            }
        }
        EndpointProfile::HttpsWeb => {
            let path = f.ca_bundle_path.as_ref().ok_or("ca_bundle_path missing")?;
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            ServerTrust::WebPki {
                roots: sigil_core::x509::pem_to_certs(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            }
        }
    };
    let body = https_get(&f.url, trust, MAX_BUNDLE_BYTES).await?;
    sigil_core::bundle::parse_spiffe_bundle(&body).map_err(|e| e.to_string())
}

/// GETs `url` over HTTPS (HTTP/1.1, 10 s connect and request timeouts)
/// with the server trust `trust`; the body is bounded to `max` bytes and
/// [`BODY_TIMEOUT`].
async fn https_get(url: &http::Uri, trust: ServerTrust, max: usize) -> Result<Bytes, String> {
    let host = url
        .host()
        .ok_or("url has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_u16().unwrap_or(443);
    let cfg = client_config_http1(trust, Arc::new(SvidCertResolver::default()))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let name =
        ServerName::try_from(host.clone()).map_err(|e| format!("server name {host:?}: {e}"))?;
    let tls = TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::get(path)
        .header(http::header::HOST, host.as_str())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "request timed out".to_string())?
        .map_err(|e| format!("HTTP: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    bounded_body(resp.into_body(), max, BODY_TIMEOUT).await
}

/// How long a foreign endpoint has to send its whole response body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Collects `body`, refusing more than `max` bytes or a body not complete
/// `within` (an endpoint trickling its body must not hold the fetch for ever).
async fn bounded_body<B>(body: B, max: usize, within: Duration) -> Result<Bytes, String>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let collected = tokio::time::timeout(within, http_body_util::Limited::new(body, max).collect())
        .await
        .map_err(|_| format!("body: not complete within {within:?}"))?
        .map_err(|e| format!("body: {e}"))?;
    Ok(collected.to_bytes())
}

/// [`https_get`] verifying the endpoint against the PEM roots in
/// `ca_bundle_path` (Web PKI rules, no system roots): trusted issuers'
/// JWKS URLs.
pub async fn https_get_web_pki(
    url: &http::Uri,
    ca_bundle_path: &std::path::Path,
    max: usize,
) -> Result<Bytes, String> {
    let text = std::fs::read_to_string(ca_bundle_path)
        .map_err(|e| format!("{}: {e}", ca_bundle_path.display()))?;
    let roots = sigil_core::x509::pem_to_certs(&text)
        .map_err(|e| format!("{}: {e}", ca_bundle_path.display()))?;
    https_get(url, ServerTrust::WebPki { roots }, max).await
}

/// Keeps one foreign bundle fresh, forever.
pub async fn federation_loop(state: Arc<ServerState>, f: FederationConfig) {
    let mut backoff =
        sigil_core::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
            .jittered();
    loop {
        match fetch_bundle(&state, &f).await {
            Ok(p) => {
                backoff.reset();
                let hint = Duration::from_secs(p.refresh_hint.unwrap_or(300).clamp(1, 3600));
                let jwt_bundle = if p.jwt_authorities.is_empty() {
                    vec![]
                } else {
                    sigil_core::jwt::jwks(&p.jwt_authorities)
                };
                // Validity and the rollback rule are checked by the
                // registry, as for `bundle set`.
                let b = FederatedBundle {
                    x509_authorities: p.x509_authorities,
                    jwt_bundle,
                    sequence: p.sequence.unwrap_or(0),
                };
                match state.set_federated_bundle(
                    &crate::state::Caller::server(crate::state::ServerTask::Federation),
                    &f.trust_domain,
                    b,
                ) {
                    Ok(()) => {
                        tracing::debug!(trust_domain = %f.trust_domain, "federated bundle refreshed")
                    }
                    Err(e) => {
                        tracing::warn!(trust_domain = %f.trust_domain, error = %e, "refused federated bundle")
                    }
                }
                tokio::time::sleep(hint).await;
            }
            Err(e) => {
                tracing::warn!(trust_domain = %f.trust_domain, url = %f.url, error = %e, "bundle endpoint fetch failed");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use tokio_stream::StreamExt;

    fn frames(
        parts: Vec<&'static [u8]>,
    ) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> {
        tokio_stream::iter(
            parts
                .into_iter()
                .map(|p| Ok(Frame::data(Bytes::from_static(p)))),
        )
    }

    #[tokio::test]
    async fn a_foreign_body_is_bounded_in_size_and_time() {
        let t = Duration::from_millis(200);
        // Complete and small: taken.
        let ok = bounded_body(StreamBody::new(frames(vec![b"{\"keys\"", b": []}"])), 64, t).await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"{\"keys\": []}"));
        // Too long: refused, whether it would end or not.
        let big = bounded_body(
            StreamBody::new(frames(vec![&[b' '; 40], &[b' '; 40]])),
            64,
            t,
        )
        .await
        .unwrap_err();
        assert!(big.contains("length limit exceeded"), "{big}");
        // A first byte, then nothing: refused once `within` passes.
        let trickle = frames(vec![b"{"]).chain(tokio_stream::pending());
        let start = std::time::Instant::now();
        let slow = bounded_body(StreamBody::new(trickle), 64, t)
            .await
            .unwrap_err();
        assert!(slow.contains("not complete within"), "{slow}");
        assert!(start.elapsed() >= t);
    }
}
