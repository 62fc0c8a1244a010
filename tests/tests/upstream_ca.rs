//! End-to-end: the trust domain's CA inside an enterprise PKI
//! (`[upstream_authority]`). An upstream root and issuing CA are made with
//! the `openssl` CLI; the real server issues its CAs under the issuing CA,
//! the agent (which trusts only the upstream root) attests and syncs over
//! that chain, and a workload's X.509-SVID fetched through the agent with
//! the `spiffe` crate verifies with `openssl verify` against the root
//! alone — before and after a forced CA rotation, with the bundle exactly
//! the upstream root throughout. Bad upstream files fail the start naming
//! the key and leave `data_dir` unwritten. Two servers sharing PostgreSQL
//! and the upstream serve the same bundle, and chains verify across a
//! failover.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sigil_tests::{Cluster, Scratch, bin, eventually, my_uid_selector, openssl, pki};

const LONG: Duration = Duration::from_secs(45);
const WORKLOAD: &str = "spiffe://example.org/upstream-workload";

const CA_EXT: &str = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n";

/// An upstream PKI in `dir`: `root.pem`/`root.key` (self-signed) and
/// `issuing.pem`/`issuing.key` (a CA the root signed), both P-256, the
/// issuing key PKCS#8 and mode `key_mode`.
fn make_upstream(dir: &Path, key_mode: u32) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-days",
            "2",
            "-subj",
            "/O=Example Corp/CN=Example Root CA",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    fs::write(dir.join("ca.ext"), CA_EXT).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "issuing.key",
            "-out",
            "issuing.csr",
            "-subj",
            "/O=Example Corp/CN=Example Issuing CA",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "issuing.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ca.ext",
            "-out",
            "issuing.pem",
        ],
    );
    fs::set_permissions(
        dir.join("issuing.key"),
        fs::Permissions::from_mode(key_mode),
    )
    .unwrap();
}

fn upstream_toml(cert: &Path, key: &Path, bundle: &Path) -> String {
    format!(
        "[upstream_authority]\ncert_path = \"{}\"\nkey_path = \"{}\"\nbundle_path = \"{}\"\n",
        cert.display(),
        key.display(),
        bundle.display()
    )
}

fn der_certs(pem_text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_text)
        .unwrap()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

fn to_pem(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// The workload's X.509 context through the agent: its chain (leaf
/// first) and its own trust domain's bundle.
async fn fetch(c: &Cluster) -> Option<(Vec<Vec<u8>>, Vec<Vec<u8>>)> {
    let client = spiffe::WorkloadApiClient::connect_to(&c.api_addr())
        .await
        .ok()?;
    let ctx = client.fetch_x509_context().await.ok()?;
    let svid = ctx.default_svid()?;
    if svid.spiffe_id().to_string() != WORKLOAD {
        return None;
    }
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let td = spiffe::TrustDomain::new("example.org").ok()?;
    let bundle = ctx
        .bundle_set()
        .get(&td)?
        .authorities()
        .iter()
        .map(|a| a.as_ref().to_vec())
        .collect();
    Some((chain, bundle))
}

/// `openssl verify -CAfile root.pem -untrusted chain.pem leaf.pem` over
/// the chain written to files in `dir` (tagged `n`): its stdout.
fn openssl_verify(dir: &Path, root: &Path, chain: &[Vec<u8>], n: &str) -> String {
    let leaf = dir.join(format!("leaf{n}.pem"));
    let rest = dir.join(format!("chain{n}.pem"));
    fs::write(&leaf, to_pem(&chain[..1])).unwrap();
    fs::write(&rest, to_pem(&chain[1..])).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(&rest)
        .arg(&leaf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "openssl verify {n}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn svids_chain_to_the_upstream_root_across_a_rotation() {
    let pki_dir = Scratch::new("upstream-pki");
    let d = &pki_dir.0;
    // 0400: read-only for the owner is private enough too.
    make_upstream(d, 0o400);
    let (root, issuing, key) = (
        d.join("root.pem"),
        d.join("issuing.pem"),
        d.join("issuing.key"),
    );
    let root_der = der_certs(&fs::read_to_string(&root).unwrap());
    let issuing_der = der_certs(&fs::read_to_string(&issuing).unwrap());
    // A 24 s CA: the next one is published at ~12 s and signs from ~20 s.
    let mut c = Cluster::start_with(&format!(
        "ca_ttl = \"24s\"\ndefault_x509_svid_ttl = \"4s\"\nagent_svid_ttl = \"6s\"\n{}",
        upstream_toml(&issuing, &key, &root)
    ));
    // The bundle is exactly the upstream root.
    let shown = c.server_ok(&["bundle", "show"]);
    assert_eq!(der_certs(&shown), root_der, "bundle show:\n{shown}");
    // The agent bootstraps from that bundle: attestation, sync and minting
    // all run over the server's chain (server SVID, Sigil CA, issuing CA)
    // and the agent's (likewise), verified against the root only.
    c.start_agent("spiffe://example.org/test-agent");
    c.create_entry(WORKLOAD, &["--selector", &my_uid_selector()]);
    let (chain, bundle) = eventually("the workload's SVID", LONG, || fetch(&c)).await;
    assert_eq!(bundle, root_der, "Workload API bundle");
    // leaf, Sigil CA, issuing CA; never the root.
    assert_eq!(chain.len(), 3, "chain length");
    assert_eq!(chain[2], issuing_der[0], "the upstream CA ends the chain");
    assert!(!chain.contains(&root_der[0]));
    let first_ca = chain[1].clone();
    let (_, sigil_ca) = x509_parser::parse_x509_certificate(&first_ca).unwrap();
    assert!(sigil_ca.is_ca());
    assert_eq!(
        sigil_ca.issuer().to_string(),
        "O=Example Corp, CN=Example Issuing CA"
    );
    let out = openssl_verify(d, &root, &chain, "0");
    assert!(out.trim_end().ends_with(": OK"), "{out}");
    // The agent's written files verify the same way.
    let written = c.dir.0.join("written");
    let w = sigil_tests::agent_fetch_x509(&c.api_addr(), Some(&written));
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));

    // Force a rotation: wait for an SVID signed by the next Sigil CA.
    let (chain2, bundle2) = eventually("an SVID from the next Sigil CA", LONG, || async {
        fetch(&c)
            .await
            .filter(|(ch, _)| ch.len() == 3 && ch[1] != first_ca)
    })
    .await;
    assert_eq!(bundle2, root_der, "the bundle is unchanged by rotation");
    assert_eq!(chain2[2], issuing_der[0]);
    let out = openssl_verify(d, &root, &chain2, "1");
    assert!(out.trim_end().ends_with(": OK"), "{out}");
    assert_eq!(
        der_certs(&c.server_ok(&["bundle", "show"])),
        root_der,
        "bundle show after rotation"
    );
    // The agent's own SVID is renewed every ~3 s over the same chain: it
    // still syncs after the rotation (a fresh workload SVID arrives).
    let (chain3, _) = eventually("an SVID after the rotation", LONG, || async {
        fetch(&c)
            .await
            .filter(|(ch, _)| ch[0] != chain2[0] && ch[1] != first_ca)
    })
    .await;
    openssl_verify(d, &root, &chain3, "2");
    // A restart keeps the CA made under the upstream authority.
    c.stop_agent();
    c.stop_server();
    c.start_server();
    assert_eq!(der_certs(&c.server_ok(&["bundle", "show"])), root_der);
    let logs = fs::read_to_string(c.dir.0.join("server.log")).unwrap();
    assert!(
        !logs.contains("retiring a stored X.509 CA"),
        "a restart with the same upstream must keep its CAs"
    );
}

/// Runs `sigil-server run` on `toml` and waits (bounded) for it to exit:
/// its exit success and stderr.
fn start_fails(dir: &Path, toml: &str) -> (bool, String) {
    let cfg = dir.join("server.toml");
    fs::write(&cfg, toml).unwrap();
    let mut child = Command::new(bin("sigil-server"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sigil-server kept running with a bad [upstream_authority]");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_upstream_files_fail_the_start_naming_the_key_and_write_nothing() {
    let s = Scratch::new("upstream-bad");
    let d = &s.0;
    make_upstream(d, 0o600);
    // A certificate that is not a CA, signed by the same root.
    pki::make_server_cert(d, "root", "leafy", "DNS:leafy.example.org");
    fs::set_permissions(d.join("leafy.key"), fs::Permissions::from_mode(0o600)).unwrap();
    // A root that did not issue the issuing CA.
    pki::make_ca(d, "other");
    // The issuing key at mode 0644.
    fs::copy(d.join("issuing.key"), d.join("open.key")).unwrap();
    fs::set_permissions(d.join("open.key"), fs::Permissions::from_mode(0o644)).unwrap();
    // The root's key with the issuing CA's certificate.
    fs::set_permissions(d.join("root.key"), fs::Permissions::from_mode(0o600)).unwrap();
    let p = |n: &str| -> PathBuf { d.join(n) };
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "missing certificate",
            upstream_toml(&p("absent.pem"), &p("issuing.key"), &p("root.pem")),
            &["upstream_authority.cert_path", "absent.pem"],
        ),
        (
            "missing key",
            upstream_toml(&p("issuing.pem"), &p("absent.key"), &p("root.pem")),
            &["upstream_authority.key_path", "absent.key"],
        ),
        (
            "missing bundle",
            upstream_toml(&p("issuing.pem"), &p("issuing.key"), &p("absent-root.pem")),
            &["upstream_authority.bundle_path", "absent-root.pem"],
        ),
        (
            "key of another certificate",
            upstream_toml(&p("issuing.pem"), &p("root.key"), &p("root.pem")),
            &["upstream_authority.key_path", "does not match"],
        ),
        (
            "certificate that is not a CA",
            upstream_toml(&p("leafy.pem"), &p("leafy.key"), &p("root.pem")),
            &["upstream_authority.cert_path", "not a CA"],
        ),
        (
            "key readable by others",
            upstream_toml(&p("issuing.pem"), &p("open.key"), &p("root.pem")),
            &["upstream_authority.key_path", "0600"],
        ),
        (
            "bundle without the issuing root",
            upstream_toml(&p("issuing.pem"), &p("issuing.key"), &p("other.pem")),
            &["upstream_authority.bundle_path", "no root"],
        ),
    ];
    for (what, table, needles) in cases {
        let data = d.join(format!("data-{}", what.replace(' ', "-")));
        let toml = format!(
            "trust_domain = \"example.org\"\nbind_port = 0\ndata_dir = \"{}\"\nadmin_socket = \"{}/admin.sock\"\n{table}",
            data.display(),
            data.display()
        );
        let (ok, err) = start_fails(d, &toml);
        assert!(!ok, "{what}: the server started");
        for n in needles {
            assert!(err.contains(n), "{what}: {n:?} missing from: {err}");
        }
        assert!(
            !err.contains("BEGIN"),
            "{what}: the error must not carry key material: {err}"
        );
        assert!(
            !data.exists(),
            "{what}: data_dir {} was created",
            data.display()
        );
    }
}

/// Two servers on one PostgreSQL with the same `[upstream_authority]`:
/// each issues its own Sigil CA under the upstream CA, both publish only
/// the root, so both serve the bundle `[root]`; an agent that fails over
/// from A to B gets SVIDs whose chains (B's Sigil CA) verify against the
/// root alone.
#[tokio::test]
async fn two_servers_under_one_upstream_serve_the_root_and_chains_verify_across_failover() {
    let Some(pg) = sigil_tests::pg::start("upstream-ha") else {
        return;
    };
    pg.create_db("sigil");
    let pki_dir = Scratch::new("upstream-ha-pki");
    let d = &pki_dir.0;
    make_upstream(d, 0o600);
    let (root, issuing, key) = (
        d.join("root.pem"),
        d.join("issuing.pem"),
        d.join("issuing.key"),
    );
    let root_der = der_certs(&fs::read_to_string(&root).unwrap());
    let pw = d.join("pgpass");
    pg.write_password_file(&pw);
    let section = format!(
        "default_x509_svid_ttl = \"4s\"\n[datastore]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\npool_size = 4\n{}",
        pg.url("sigil"),
        pw.display(),
        upstream_toml(&issuing, &key, &root)
    );
    let mut a = Cluster::start_with(&section);
    let b = Cluster::start_with(&section);
    for c in [&a, &b] {
        assert_eq!(der_certs(&c.server_ok(&["bundle", "show"])), root_der);
    }
    let servers = format!(
        "servers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n",
        a.port, b.port
    );
    a.start_agent_with("spiffe://example.org/test-agent", &servers);
    a.create_entry(WORKLOAD, &["--selector", &my_uid_selector()]);
    let (chain_a, bundle) = eventually("the SVID from A", LONG, || fetch(&a)).await;
    assert_eq!(bundle, root_der);
    openssl_verify(d, &root, &chain_a, "a");
    // kill -9 A: the agent (its own SVID issued by A's CA) moves to B,
    // whose CA signs the renewed SVIDs (every ~2 s) from then on.
    let pid = a.server_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (chain_b, bundle_b) = eventually("an SVID from B's CA", LONG, || async {
        fetch(&a)
            .await
            .filter(|(ch, _)| ch.len() == 3 && ch[1] != chain_a[1])
    })
    .await;
    assert_eq!(bundle_b, root_der, "the bundle after failover");
    openssl_verify(d, &root, &chain_b, "b");
    a.stop_server();
}
