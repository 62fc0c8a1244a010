//! `[key_manager] kind = "pkcs11"` against a real SoftHSM2 token (Debian
//! `softhsm2`), each test with its own token directory: the CA and JWT
//! keys are made in the token and never reach data_dir, SVIDs and JWTs
//! they sign verify with openssl and the `spiffe` crate, rotation makes
//! and destroys token keys, a restart finds the same keys, and a wrong
//! PIN, token label or module stops the server naming the key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil_tests::softhsm::{self, SoftHsm};
use sigil_tests::{Cluster, Scratch, bin, eventually, in_ci, my_uid_selector};
use spiffe::{JwtSvid, WorkloadApiClient};

/// SoftHSM2 present, or (outside CI) a skipped test.
fn have_softhsm() -> bool {
    if softhsm::available() {
        return true;
    }
    assert!(
        !in_ci(),
        "SoftHSM2 is missing ({} or softhsm2-util): scripts/install-deps test installs it",
        softhsm::module().display()
    );
    eprintln!("skipped: SoftHSM2 is not installed");
    false
}

/// The token's objects, as `pkcs11-objects` lists them.
fn objects(hsm: &SoftHsm) -> Vec<serde_json::Value> {
    let out = Command::new(bin("pkcs11-objects"))
        .arg(softhsm::module())
        .arg(&hsm.label)
        .arg(&hsm.pin)
        .envs(hsm.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pkcs11-objects: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Sorted IDs of the token's private keys; each must be sensitive and
/// never extractable, and have its public key beside it.
fn private_key_ids(hsm: &SoftHsm) -> Vec<String> {
    key_ids(hsm, true)
}

/// As [`private_key_ids`]; with `paired` false (while the server rotates)
/// what a reader in another process may catch half-made is tolerated: a
/// private key whose public half is not (or no longer) listed, and an
/// object SoftHSM2 has created in its file store but not yet filled in
/// (no `CKA_ID`, every flag still false).
fn key_ids(hsm: &SoftHsm, paired: bool) -> Vec<String> {
    let objs = objects(hsm);
    let mut ids = Vec::new();
    for o in objs.iter().filter(|o| o["class"] == "private_key") {
        if !paired && o["id"] == "" && o["token"] == false {
            continue;
        }
        assert_eq!(o["sensitive"], true, "{o}");
        assert_eq!(o["extractable"], false, "{o}");
        assert_eq!(o["never_extractable"], true, "{o}");
        assert_eq!(o["token"], true, "{o}");
        assert!(
            !paired
                || objs
                    .iter()
                    .any(|p| p["class"] == "public_key" && p["id"] == o["id"]),
            "no public key for {o}"
        );
        ids.push(o["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    ids
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn keys_json(c: &Cluster) -> serde_json::Value {
    serde_json::from_slice(&fs::read(c.dir.0.join("server/keys.json")).unwrap()).unwrap()
}

/// The `token_id`s keys.json names (CAs and JWT keys), sorted.
fn stored_ids(k: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = k["cas"]
        .as_array()
        .unwrap()
        .iter()
        .chain(k["jwt_keys"].as_array().unwrap())
        .map(|e| e["token_id"].as_str().expect("token_id").to_string())
        .collect();
    ids.sort();
    ids
}

/// Fetches the X.509-SVID and bundle with `sigil-agent api fetch x509
/// --write` and checks the chain with `openssl verify`.
fn try_verify(c: &Cluster, out_dir: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(out_dir);
    let out = sigil_tests::agent_fetch_x509(&c.api_addr(), Some(out_dir));
    if !out.status.success() {
        return Err(format!(
            "fetch x509: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(out_dir.join("bundle.pem"))
        .arg(out_dir.join("svid.pem"))
        .output()
        .unwrap();
    if !v.status.success() {
        return Err(format!(
            "openssl verify: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        ));
    }
    Ok(())
}

fn fetch_and_openssl_verify(c: &Cluster, out_dir: &Path) {
    try_verify(c, out_dir).unwrap_or_else(|e| panic!("{e}"));
}

/// A JWT-SVID fetched now, validated against the JWT bundle fetched now
/// (by the `spiffe` crate); returns its `kid`.
async fn jwt_kid(c: &Cluster) -> String {
    let cl = WorkloadApiClient::connect_to(&c.api_addr()).await.unwrap();
    let token = cl.fetch_jwt_token(["aud"], None).await.unwrap();
    let bundles = cl.fetch_jwt_bundles().await.unwrap();
    let jwt = JwtSvid::parse_and_validate(&token, &bundles, &["aud"])
        .unwrap_or_else(|e| panic!("JWT-SVID does not validate: {e}"));
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/svc");
    jwt.key_id().to_string()
}

fn start(hsm: &SoftHsm, extra: &str) -> Cluster {
    let mut c = Cluster::start_with_env(&format!("{extra}{}", hsm.key_manager_toml()), hsm.env());
    c.start_agent("spiffe://example.org/test-agent");
    c.create_entry(
        "spiffe://example.org/svc",
        &["--selector", &my_uid_selector()],
    );
    c
}

#[tokio::test]
async fn keys_live_in_the_token_sign_verifiable_svids_and_survive_a_restart() {
    if !have_softhsm() {
        return;
    }
    let t = Scratch::new("hsm");
    let hsm = SoftHsm::new(&t.0, "sigil-e2e", "4321");
    let mut c = start(&hsm, "");
    let addr = c.api_addr();
    eventually("an X.509-SVID", Duration::from_secs(20), || {
        let a = addr.clone();
        async move { sigil_tests::fetch_x509_id(&a).await.ok() }
    })
    .await;
    fetch_and_openssl_verify(&c, &c.dir.0.join("out"));
    let kid = jwt_kid(&c).await;

    // No CA or JWT private key in data_dir; keys.json names token
    // objects only. (The audit trail's checkpoint key, audit_key.pem, is
    // not a trust-domain key and stays on disk.)
    let data = files(&c.dir.0.join("server"));
    assert!(data.iter().any(|f| f.ends_with("keys.json")));
    for f in data.iter().filter(|f| !f.ends_with("audit_key.pem")) {
        let bytes = fs::read(f).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"PRIVATE KEY"),
            "{} holds a private key",
            f.display()
        );
    }
    let k = keys_json(&c);
    let text = k.to_string();
    assert!(
        !text.contains("key_pem") && !text.contains("pkcs8"),
        "{text}"
    );
    assert_eq!(k["jwt_keys"][0]["kid"], kid.as_str());
    // The token holds exactly the CA and JWT keys keys.json names.
    let ids = private_key_ids(&hsm);
    assert_eq!(ids.len(), 2, "{:?}", objects(&hsm));
    assert_eq!(stored_ids(&k), ids);

    // A restart finds the same keys: same CA in the bundle, same kid.
    let bundle = c.server_ok(&["bundle", "show"]);
    c.stop_server();
    c.start_server();
    assert_eq!(c.server_ok(&["bundle", "show"]), bundle);
    assert_eq!(private_key_ids(&hsm), ids, "no new keys at restart");
    c.restart_agent();
    fetch_and_openssl_verify(&c, &c.dir.0.join("out2"));
    assert_eq!(jwt_kid(&c).await, kid);
}

#[tokio::test]
async fn rotation_makes_new_keys_in_the_token_and_destroys_expired_ones() {
    if !have_softhsm() {
        return;
    }
    let t = Scratch::new("hsm-rot");
    let hsm = SoftHsm::new(&t.0, "sigil-rot", "9876");
    // CAs and JWT keys live 24 s: a successor is published at 12 s,
    // activated at 20 s, and the old key destroyed at 24 s.
    let c = start(
        &hsm,
        "ca_ttl = \"24s\"\ndefault_x509_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"10s\"\n",
    );
    let addr = c.api_addr();
    eventually("an X.509-SVID", Duration::from_secs(20), || {
        let a = addr.clone();
        async move { sigil_tests::fetch_x509_id(&a).await.ok() }
    })
    .await;
    let first_ids = private_key_ids(&hsm);
    let first_kid = jwt_kid(&c).await;
    assert_eq!(first_ids.len(), 2);
    // Wait until both first keys are gone from the token (expired and
    // destroyed), checking along the way that the token never holds
    // more than the published keys.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids = key_ids(&hsm, false);
        let stored = stored_ids(&keys_json(&c));
        assert!(ids.len() <= 4, "{ids:?}");
        if ids.iter().all(|i| !first_ids.contains(i)) && ids == stored {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "first keys not destroyed: token {ids:?}, keys.json {stored:?}, first {first_ids:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The new keys sign SVIDs that verify against the new bundle.
    let out = c.dir.0.join("out-rot");
    eventually(
        "a verifiable SVID after rotation",
        Duration::from_secs(30),
        || {
            let ok = try_verify(&c, &out).is_ok();
            async move { ok.then_some(()) }
        },
    )
    .await;
    assert_ne!(jwt_kid(&c).await, first_kid);
    assert!(private_key_ids(&hsm).len() <= 4);
    let log = fs::read_to_string(c.dir.0.join("server.log")).unwrap();
    assert!(
        log.contains("destroyed an expired key in the token"),
        "{log}"
    );
}

/// Runs `sigil-server run` with `config`, expecting it to fail within 20 s;
/// returns its output.
fn run_failing(dir: &Path, config: &str, hsm: &SoftHsm) -> Output {
    let cfg = dir.join("server.toml");
    fs::write(&cfg, config).unwrap();
    let mut child = Command::new(bin("sigil-server"))
        .args(["run", "--config"])
        .arg(&cfg)
        .envs(hsm.env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("sigil-server kept running with {config}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    out
}

#[test]
fn a_wrong_pin_label_module_or_pin_file_stops_the_server_naming_the_key() {
    if !have_softhsm() {
        return;
    }
    let t = Scratch::new("hsm-bad");
    let hsm = SoftHsm::new(&t.0, "sigil-bad", "1111");
    let d = t.0.join("srv");
    fs::create_dir_all(&d).unwrap();
    let base = format!(
        "trust_domain = \"example.org\"\nbind_port = {}\ndata_dir = \"{}/data\"\nadmin_socket = \"{}/admin.sock\"\n",
        sigil_tests::free_port(),
        d.display(),
        d.display()
    );
    let good = hsm.key_manager_toml();
    let wrong_pin = t.0.join("wrong-pin");
    fs::write(&wrong_pin, "2222\n").unwrap();
    fs::set_permissions(
        &wrong_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let open_pin = t.0.join("open-pin");
    fs::write(&open_pin, "1111\n").unwrap();
    fs::set_permissions(
        &open_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let pin_path = hsm.pin_file.display().to_string();
    let module = softhsm::module().display().to_string();
    let cases = [
        (
            good.replace(&pin_path, &wrong_pin.display().to_string()),
            &["key_manager.pin_file", "refused the login", "PinIncorrect"][..],
        ),
        (
            good.replace(&pin_path, &open_pin.display().to_string()),
            &["key_manager.pin_file", "0600"][..],
        ),
        (
            good.replace("\"sigil-bad\"", "\"no-such-token\""),
            &["key_manager.token_label", "no-such-token", "sigil-bad"][..],
        ),
        (
            good.replace(&module, "/usr/lib/no/libpkcs11.so"),
            &["key_manager.module", "/usr/lib/no/libpkcs11.so"][..],
        ),
        (
            good.replace("pkcs11\"", "hsm\""),
            &["key_manager.kind", "hsm"][..],
        ),
    ];
    for (km, want) in cases {
        let out = run_failing(&d, &format!("{base}{km}"), &hsm);
        let err = String::from_utf8_lossy(&out.stderr);
        for w in want {
            assert!(err.contains(w), "expected {w:?} in: {err}");
        }
        assert!(!err.contains("1111"), "the PIN leaked: {err}");
        assert!(
            !d.join("data/keys.json").exists(),
            "keys.json made despite {err}"
        );
    }
    // Keys made on disk are not silently used (or left) once the token
    // is configured.
    let mut c = Cluster::start_with_env("", hsm.env());
    c.stop_server();
    let cfg = c.dir.0.join("server.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    let before = fs::read(c.dir.0.join("server/keys.json")).unwrap();
    let out = run_failing(&c.dir.0, &format!("{text}{good}"), &hsm);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys.json") && err.contains("private key on disk"),
        "{err}"
    );
    assert_eq!(fs::read(c.dir.0.join("server/keys.json")).unwrap(), before);
    assert!(private_key_ids(&hsm).is_empty());
}
