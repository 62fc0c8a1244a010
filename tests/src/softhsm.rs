//! A throwaway SoftHSM2 token for tests and benchmarks: its own
//! `softhsm2.conf` and token directory under a scratch directory,
//! initialized with `softhsm2-util --init-token --free`. Processes that
//! should see it get `SOFTHSM2_CONF` from [`SoftHsm::env`].
//!
//! The module is `/usr/lib/softhsm/libsofthsm2.so` (Debian's `softhsm2`)
//! unless `SIGIL_TEST_PKCS11_MODULE` names another.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `softhsm2` puts the module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The PKCS#11 module to test with.
pub fn module() -> PathBuf {
    std::env::var_os("SIGIL_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_MODULE.into())
}

/// Whether SoftHSM2 is installed (module and `softhsm2-util`).
pub fn available() -> bool {
    module().exists()
        && Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// One initialized token in `<dir>/tokens`, configured by `<dir>/softhsm2.conf`.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub label: String,
    pub pin: String,
    /// The PIN in a file of mode 0600, as `[key_manager] pin_file` wants it.
    pub pin_file: PathBuf,
}

impl SoftHsm {
    /// Creates and initializes a token labelled `label` with user PIN `pin`.
    pub fn new(dir: &Path, label: &str, pin: &str) -> SoftHsm {
        let tokens = dir.join("tokens");
        fs::create_dir_all(&tokens).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
        let conf = dir.join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = INFO\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm {
            conf,
            label: label.into(),
            pin: pin.into(),
            pin_file: dir.join("pin"),
        };
        let out = hsm
            .util()
            .args(["--init-token", "--free", "--label", label, "--pin", pin])
            .args(["--so-pin", "so-secret-1234"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(&hsm.pin_file, format!("{pin}\n")).unwrap();
        fs::set_permissions(&hsm.pin_file, fs::Permissions::from_mode(0o600)).unwrap();
        hsm
    }

    /// `softhsm2-util` with this token's configuration.
    pub fn util(&self) -> Command {
        let mut c = Command::new("softhsm2-util");
        c.env("SOFTHSM2_CONF", &self.conf);
        c
    }

    /// The environment a process needs to see this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".into(), self.conf.display().to_string())]
    }

    /// The `[key_manager]` table for this token.
    pub fn key_manager_toml(&self) -> String {
        format!(
            "[key_manager]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n",
            module().display(),
            self.label,
            self.pin_file.display()
        )
    }
}
