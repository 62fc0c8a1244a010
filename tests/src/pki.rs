//! Throwaway X.509 PKI for tests, made with the `openssl` command: a
//! self-signed P-256 CA and server certificates it signs (for TLS servers
//! the tests stand up: a kubelet stand-in, PostgreSQL).

use std::fs;
use std::path::{Path, PathBuf};

use crate::openssl;

/// A self-signed P-256 CA, `<name>.pem` and `<name>.key` in `dir`, valid
/// for a day; returns the certificate's path.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
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
            &key,
            "-out",
            &pem,
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    dir.join(pem)
}

/// A TLS server certificate `<name>.pem` with key `<name>.key` in `dir`,
/// signed by the CA `<ca>` that [`make_ca`] made there, for the subject
/// alternative names `san` (openssl syntax: `IP:127.0.0.1,DNS:host`);
/// returns the certificate and key PEM.
pub fn make_server_cert(dir: &Path, ca: &str, name: &str, san: &str) -> (String, String) {
    let ext = format!("{name}.ext");
    fs::write(
        dir.join(&ext),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n"
        ),
    )
    .unwrap_or_else(|e| panic!("{ext}: {e}"));
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
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
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ],
    );
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    (read(&pem), read(&key))
}

/// An x509pop node identity: the CA `<ca>.pem`/`<ca>.key` in `dir` (made
/// when missing) and a client certificate `<cn>.pem` with key `<cn>.key`
/// (mode 0600) it signs, with the DNS SAN `<cn>.nodes.example.org`.
pub fn x509pop_node(dir: &Path, ca: &str, cn: &str) {
    if !dir.join(format!("{ca}.pem")).exists() {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &format!("{ca}.key"),
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "1",
                "-subj",
                &format!("/CN={ca}"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{cn}.key"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{cn}.key"),
            "-out",
            &format!("{cn}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(dir.join("node-ext.cnf"), format!("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:{cn}.nodes.example.org\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{cn}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{cn}.pem"),
            "-days",
            "1",
            "-extfile",
            "node-ext.cnf",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join(format!("{cn}.key")),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}
