//! Seed corpora and fixtures for the fuzz targets in `fuzz/`, made from
//! real artefacts: a CA and the SVIDs, CRLs, CSRs, bundles and JWT-SVIDs it
//! and a JWT key sign, x509pop node certificates and proofs, sync messages
//! and entries as the server encodes them, and HTTP/2 streams as gRPC
//! clients send them.
//!
//! Ignored by `cargo test`; `fuzz/gen-seeds` runs it (and adds the
//! configs from deploy/config and TPM structures from swtpm). It writes
//! `fuzz/fixtures/` (the keys the targets verify with) and
//! `fuzz/corpus/<target>/`. Input layouts are those of `fuzz/src/lib.rs`:
//! multi-part inputs are `u16` big-endian length-prefixed parts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a generator run by hand: a panic is a failed run"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use sigil_core::bundle::spiffe_bundle;
use sigil_core::jwt::{JwtKeyType, JwtSigner};
use sigil_core::x509::{Ca, CrlEntry, CsrSignature, SvidInfo, new_key_and_csr};
use sigil_core::{SpiffeId, TrustDomain, now_unix};
use sigil_proto::agent::SyncUpdate;
use sigil_proto::common::{Entry as PbEntry, FederatedBundle};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn write(dir: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let d = fuzz_dir().join(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn seed(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    write(&format!("corpus/{target}"), name, bytes);
}

/// `u16` big-endian length-prefixed parts (the fuzz targets' `parts`).
fn parts(ps: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in ps {
        out.extend_from_slice(&u16::try_from(p.len()).unwrap().to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn pb_entry(n: usize) -> PbEntry {
    PbEntry {
        id: format!("e-{n}"),
        spiffe_id: format!("spiffe://example.org/workload/{n}"),
        parent_id: "spiffe://example.org/sigil/agent/join_token/abc".into(),
        selectors: vec![format!("unix:uid:{n}"), "unix:gid:0".into()],
        x509_svid_ttl: 300,
        dns_names: vec![format!("w{n}.example.org")],
        hint: format!("w{n}"),
        federates_with: vec!["spiffe://other.org".into()],
        jwt_claims: [("team".to_string(), "blue".to_string())].into(),
        revision: n as i64,
        created_at: 1_700_000_000,
        ..Default::default()
    }
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
#[ignore = "writes fuzz/fixtures and fuzz/corpus; run by fuzz/gen-seeds"]
fn generate() {
    let td = TrustDomain::new("example.org").unwrap();
    let now = now_unix();
    write("fixtures", "now", now.to_string());

    // The CA the chain targets trust, and what it signs.
    let (ca, _) = Ca::generate(&td, Duration::from_secs(10 * 365 * 86_400)).unwrap();
    write("fixtures", "ca.der", ca.cert_der());
    let ttl = Duration::from_secs(3600);
    let (csr, _) = new_key_and_csr().unwrap();
    seed("csr", "p256-rcgen", &csr);
    let workload = ca
        .sign_svid(
            &csr,
            CsrSignature::Verify,
            &id("spiffe://example.org/workload"),
            &["w.example.org".into()],
            ttl,
        )
        .unwrap();
    let agent = ca
        .sign_svid(
            &csr,
            CsrSignature::Verify,
            &id("spiffe://example.org/sigil/agent/join_token/abc"),
            &[],
            ttl,
        )
        .unwrap();
    let serial = SvidInfo::from_der(&agent).unwrap().serial;
    let crl = ca
        .sign_crl(
            &[CrlEntry {
                serial,
                revoked_at: now,
            }],
            1,
            now - 10,
            now + 3600,
        )
        .unwrap();
    let empty_crl = ca.sign_crl(&[], 2, now - 10, now + 3600).unwrap();
    seed("svid_chain", "agent", parts(&[&agent]));
    seed("svid_chain", "workload", parts(&[&workload]));
    seed("svid_chain", "agent-revoked", parts(&[&agent, &[], &crl]));
    seed("svid_chain", "agent-crl", parts(&[&agent, &[], &empty_crl]));
    seed(
        "svid_chain",
        "with-intermediate",
        parts(&[&workload, ca.cert_der()]),
    );

    // CSRs of both curves, with a subject and an extension request.
    for (name, alg) in [
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.org".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fuzz");
        seed(
            "csr",
            name,
            params.serialize_request(&key).unwrap().der().as_ref(),
        );
    }

    // JWT-SVIDs and the JWKS they verify with.
    let signer = JwtSigner::generate(JwtKeyType::EcP256, now + 86_400 * 3650).unwrap();
    write("fixtures", "jwt.kid", &signer.kid);
    let jwks = sigil_core::jwt::jwks(std::slice::from_ref(&signer.public_jwk));
    write("fixtures", "jwks.json", &jwks);
    let aud = ["fuzz-audience".to_string()];
    // Valid for years: jsonwebtoken checks `exp` against the real clock.
    let jwt_ttl = Duration::from_secs(4 * 365 * 86_400);
    let tok = signer
        .sign(
            &id("spiffe://example.org/workload"),
            &aud,
            jwt_ttl,
            now,
            None,
        )
        .unwrap();
    seed(
        "jwt",
        "valid",
        parts(&[tok.token.as_bytes(), b"fuzz-audience"]),
    );
    let issued = signer
        .sign(
            &id("spiffe://example.org/workload"),
            &aud,
            jwt_ttl,
            now,
            Some("https://issuer.example.org"),
        )
        .unwrap();
    seed(
        "jwt",
        "issued",
        parts(&[issued.token.as_bytes(), b"fuzz-audience"]),
    );
    seed(
        "jwt",
        "none-alg",
        parts(&[
            b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy93In0.",
            b"a",
        ]),
    );

    // SPIFFE bundles: X.509 + JWT authorities, and a JWKS alone.
    let doc = spiffe_bundle(
        &[ca.cert_der().to_vec()],
        std::slice::from_ref(&signer.public_jwk),
        7,
        300,
    )
    .unwrap();
    let doc = serde_json::to_vec_pretty(&doc).unwrap();
    seed("bundle", "x509-and-jwt", &doc);
    seed("bundle", "jwks", &jwks);
    seed("bundle", "empty", br#"{"keys":[]}"#);

    // x509pop: the root the target trusts, node chains and proofs.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Node CA");
    let root = ca_params.self_signed(&ca_key).unwrap();
    write("fixtures", "x509pop-root.der", root.der());
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    for (name, alg) in [
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
    ] {
        let node_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut leaf = rcgen::CertificateParams::default();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "node-1");
        leaf.subject_alt_names = vec![
            rcgen::SanType::DnsName("node-1.example.org".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://nodes/node-1".try_into().unwrap()),
        ];
        let cert = leaf.signed_by(&node_key, &issuer).unwrap();
        let key = sigil_attestors::x509pop::NodeKey::load(&cert.pem(), &node_key.serialize_pem())
            .unwrap();
        let nonce = b"0123456789abcdef0123456789abcdef";
        let sig = key.sign(nonce).unwrap();
        seed("x509pop", name, parts(&[cert.der(), &[], nonce, &sig]));
    }

    // Entries and sync streams as the server encodes them.
    seed("entry", "full", pb_entry(1).encode_to_vec());
    let mut admin = pb_entry(2);
    admin.admin = true;
    admin.expires_at = now + 86_400;
    admin.description = "an admin entry".into();
    admin.approval_pending = "approval request r-1".into();
    seed("entry", "admin-pending", admin.encode_to_vec());
    let full = SyncUpdate {
        entries: (0..3).map(pb_entry).collect(),
        bundle: vec![ca.cert_der().to_vec()],
        revision: 3,
        jwt_bundle: jwks.clone(),
        federated: [(
            "other.org".to_string(),
            FederatedBundle {
                x509_authorities: vec![ca.cert_der().to_vec()],
                jwt_bundle: jwks.clone(),
                sequence: 2,
            },
        )]
        .into(),
        crl: vec![crl.clone()],
        ..Default::default()
    };
    let chunk = SyncUpdate {
        entries: vec![pb_entry(7)],
        more: true,
        ..Default::default()
    };
    let delta = SyncUpdate {
        entries: vec![pb_entry(4)],
        delta: true,
        removed: vec!["e-0".into()],
        killed_spiffe_ids: vec!["spiffe://example.org/workload/1".into()],
        revision: 4,
        ..Default::default()
    };
    let killed = SyncUpdate {
        agent_killed: true,
        kill_reason: "banned".into(),
        ..Default::default()
    };
    seed("sync", "full", parts(&[&full.encode_to_vec()]));
    seed(
        "sync",
        "chunks-delta-kill",
        parts(&[
            &chunk.encode_to_vec(),
            &full.encode_to_vec(),
            &delta.encode_to_vec(),
            &killed.encode_to_vec(),
        ]),
    );

    // HTTP/2 client streams: preface, SETTINGS, HEADERS with the
    // percent-encoded socket path as :authority (plain, Huffman-coded,
    // padded, with priority, split over CONTINUATION), DATA.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let authority = b"%2Frun%2Fsigil%2Fagent%2Fpublic%2Fapi.sock";
    let mut block = vec![0x83, 0x86, 0x41, authority.len() as u8];
    block.extend_from_slice(authority);
    block.extend_from_slice(&[0x04, 0x0b]);
    block.extend_from_slice(b"/Spiffe/Api");
    block.extend_from_slice(&[0x40, 0x0c]);
    block.extend_from_slice(b"content-type");
    block.extend_from_slice(&[0x10]);
    block.extend_from_slice(b"application/grpc");
    // Literal name ":authority", never indexed, Huffman flag on the value.
    let mut literal = vec![0x10, 0x0a];
    literal.extend_from_slice(b":authority");
    literal.extend_from_slice(&[0x85, 0xa0, 0xe4, 0x1d, 0x13, 0x9d]);
    let settings = h2_frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    let data = h2_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]);
    let mut simple = PREFACE.to_vec();
    simple.extend(&settings);
    simple.extend(h2_frame(0x1, 0x4, 1, &block));
    simple.extend(&data);
    let mut padded_prio = vec![4u8];
    padded_prio.extend_from_slice(&[0, 0, 0, 0, 16]);
    padded_prio.extend_from_slice(&literal);
    padded_prio.extend_from_slice(&[0; 4]);
    let mut fancy = PREFACE.to_vec();
    fancy.extend(&settings);
    fancy.extend(h2_frame(0x1, 0x4 | 0x8 | 0x20, 3, &padded_prio));
    let (a, b) = block.split_at(5);
    fancy.extend(h2_frame(0x1, 0, 5, a));
    fancy.extend(h2_frame(0x9, 0x4, 5, b));
    fancy.extend(h2_frame(0x8, 0, 0, &[0, 0, 0x10, 0]));
    // The target's input: 4 bytes seeding the chunk splits, then the stream.
    for (name, stream) in [("simple", &simple), ("padded-continuation", &fancy)] {
        for (i, split) in [[0u8; 4], [1, 2, 3, 4]].iter().enumerate() {
            let mut input = split.to_vec();
            input.extend_from_slice(stream);
            seed("h2_authority", &format!("{name}-{i}"), input);
        }
    }

    // Text inputs.
    for (i, s) in [
        "spiffe://example.org/workload",
        "spiffe://example.org",
        "spiffe://a-b.c_d.example/x/y.z/-_",
        "spiffe://example.org/sigil/agent/tpm/0123abcd",
        "spiffe://EXAMPLE.org/x",
        "spiffe://example.org//x",
        "spiffe://example.org/x/../y",
        "spiffe://example.org/%41",
        "spiffe://user@example.org:8080/x",
        "https://example.org/x",
        "example.org",
    ]
    .iter()
    .enumerate()
    {
        seed("spiffe_id", &format!("id-{i}"), s);
    }
    for (i, s) in [
        "unix:uid:1000",
        "unix:gid:0",
        "unix:path:/usr/bin/python%FF3",
        "unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "docker:label:com.example.app:web",
        "docker:image_id:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "k8s:ns:default",
        "k8s:sa:default",
        "k8s:pod-label:app:web",
        "systemd:unit:sshd.service",
        "container:id:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "ima:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "tpm:pcr:sha256:7:00",
        "x509pop:subject:cn:node-1",
        "join_token:abc",
        "unix:uid:007",
    ]
    .iter()
    .enumerate()
    {
        seed("selector", &format!("sel-{i}"), s);
    }
    for (i, s) in [
        "300",
        "300s",
        "5m",
        "1h",
        "2d",
        " 7d ",
        "0",
        "-1s",
        "18446744073709551615s",
        "1µ",
    ]
    .iter()
    .enumerate()
    {
        seed("duration", &format!("d-{i}"), s);
    }
}
