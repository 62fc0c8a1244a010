//! `[key_manager]`: where the CA and JWT signing keys live — in
//! `<data_dir>/keys.json` (`kind = "disk"`, the default) or in a PKCS#11
//! token (`kind = "pkcs11"`, with `module`, `token_label` and `pin_file`).
//! The PIN file is only named here; it is read (and its owner and mode
//! checked) when the server opens the token, see `crate::key_manager`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, absolute, key_err};

/// The `[key_manager]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeyManager {
    kind: String,
    #[serde(default)]
    module: Option<PathBuf>,
    #[serde(default)]
    token_label: Option<String>,
    #[serde(default)]
    pin_file: Option<PathBuf>,
}

/// Where the signing keys are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KeyManagerKind {
    /// `<data_dir>/keys.json`, private keys included (mode 0600).
    #[default]
    Disk,
    /// A PKCS#11 token: keys.json holds only public parts and object IDs.
    Pkcs11(Pkcs11Config),
}

/// `[key_manager] kind = "pkcs11"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// `module`: the PKCS#11 library (`/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// `token_label`: the label of the token to use.
    pub token_label: String,
    /// `pin_file`: the user PIN, mode 0600 or 0400 (never logged).
    pub pin_file: PathBuf,
}

/// Longest token label PKCS#11 can hold (`CK_TOKEN_INFO.label`).
const MAX_LABEL: usize = 32;

impl RawKeyManager {
    /// Validates the table, naming the key at fault.
    pub(super) fn validate(raw: Option<Self>) -> Result<KeyManagerKind, ConfigError> {
        let Some(raw) = raw else {
            return Ok(KeyManagerKind::Disk);
        };
        match raw.kind.as_str() {
            "disk" => {
                for (key, set) in [
                    ("key_manager.module", raw.module.is_some()),
                    ("key_manager.token_label", raw.token_label.is_some()),
                    ("key_manager.pin_file", raw.pin_file.is_some()),
                ] {
                    if set {
                        return Err(key_err(key, "only allowed with kind = \"pkcs11\""));
                    }
                }
                Ok(KeyManagerKind::Disk)
            }
            "pkcs11" => {
                let module = raw.module.ok_or_else(|| {
                    key_err("key_manager.module", "required with kind = \"pkcs11\"")
                })?;
                absolute("key_manager.module", &module)?;
                let token_label = raw.token_label.ok_or_else(|| {
                    key_err("key_manager.token_label", "required with kind = \"pkcs11\"")
                })?;
                if token_label.is_empty() || token_label.len() > MAX_LABEL {
                    return Err(key_err(
                        "key_manager.token_label",
                        format!("must be 1 to {MAX_LABEL} bytes"),
                    ));
                }
                let pin_file = raw.pin_file.ok_or_else(|| {
                    key_err("key_manager.pin_file", "required with kind = \"pkcs11\"")
                })?;
                absolute("key_manager.pin_file", &pin_file)?;
                Ok(KeyManagerKind::Pkcs11(Pkcs11Config {
                    module,
                    token_label,
                    pin_file,
                }))
            }
            other => Err(key_err(
                "key_manager.kind",
                format!("unknown kind {other:?} (expected \"disk\" or \"pkcs11\")"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ServerConfig;
    use super::*;

    const BASE: &str = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";
    const PKCS11: &str = "[key_manager]\nkind = \"pkcs11\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"sigil\"\npin_file = \"/etc/sigil/pin\"\n";

    fn err(extra: &str) -> String {
        ServerConfig::parse(&format!("{BASE}{extra}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn disk_is_the_default_and_pkcs11_parses() {
        let c = ServerConfig::parse(BASE).unwrap();
        assert_eq!(c.key_manager, KeyManagerKind::Disk);
        let c = ServerConfig::parse(&format!("{BASE}[key_manager]\nkind = \"disk\"\n")).unwrap();
        assert_eq!(c.key_manager, KeyManagerKind::Disk);
        let c = ServerConfig::parse(&format!("{BASE}{PKCS11}")).unwrap();
        assert_eq!(
            c.key_manager,
            KeyManagerKind::Pkcs11(Pkcs11Config {
                module: "/usr/lib/softhsm/libsofthsm2.so".into(),
                token_label: "sigil".into(),
                pin_file: "/etc/sigil/pin".into(),
            })
        );
    }

    #[test]
    fn bad_key_manager_tables_are_refused_naming_the_key() {
        let e = err("[key_manager]\nkind = \"vault\"\n");
        assert!(e.contains("key_manager.kind") && e.contains("vault"), "{e}");
        let e = err(&format!("{PKCS11}slot = 3\n"));
        assert!(e.contains("slot"), "{e}");
        let e = err("[key_manager]\nkind = \"pkcs11\"\ntoken_label = \"t\"\npin_file = \"/p\"\n");
        assert!(
            e.contains("key_manager.module") && e.contains("required"),
            "{e}"
        );
        let e = err(&PKCS11.replace("/usr/lib/softhsm/", ""));
        assert!(e.contains("key_manager.module"), "{e}");
        let e = err(&PKCS11.replace("pin_file = \"/etc/sigil/pin\"\n", ""));
        assert!(e.contains("key_manager.pin_file"), "{e}");
        let e = err(&PKCS11.replace("\"sigil\"", &format!("\"{}\"", "x".repeat(33))));
        assert!(e.contains("key_manager.token_label"), "{e}");
        let e = err("[key_manager]\nkind = \"disk\"\npin_file = \"/p\"\n");
        assert!(e.contains("key_manager.pin_file"), "{e}");
        let e = err(&format!("jwt_key_type = \"rsa-2048\"\n{PKCS11}"));
        assert!(e.contains("jwt_key_type") && e.contains("pkcs11"), "{e}");
    }
}
