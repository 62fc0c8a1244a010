//! The `systemd` workload attestor: `systemd:id:<unit>` and
//! `systemd:fragment_path:<unit file>` from the process's cgroup.
//!
//! systemd puts every service, scope and slice in a cgroup of its own name
//! (`/system.slice/nginx.service`, `/user.slice/user-1000.slice/
//! user@1000.service/app.slice/foo.service`), and processes cannot leave
//! it without write access to the cgroup tree. The unit is the innermost
//! path segment that is a unit name (`.service` or `.scope`; deeper,
//! delegated sub-cgroups of a unit are skipped over). Its fragment path is
//! the first of the configured unit directories holding `<unit>` (or, for
//! a template instance `foo@bar.service`, `foo@.service`) — the same search
//! order systemd uses; D-Bus is not asked, so the agent works without a
//! system bus. The cgroup v2 (`0::`) path is used, falling back to the v1
//! `name=systemd` hierarchy.

use std::path::PathBuf;
use std::time::Duration;

use sigil_core::selector::{Selector, escape_bytes};

use super::{BoxFuture, Workload, WorkloadAttestError, WorkloadAttestor};

/// Where systemd looks for unit files, highest priority first.
pub const DEFAULT_UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Settings of `[workload_attestor.systemd]`.
#[derive(Debug, Clone)]
pub struct SystemdConfig {
    /// Unit directories searched for fragment paths, in order.
    pub unit_dirs: Vec<PathBuf>,
    /// Deadline for one attestation.
    pub timeout: Duration,
}

/// The systemd attestor.
#[derive(Debug)]
pub struct SystemdAttestor {
    cfg: SystemdConfig,
}

/// The systemd cgroup path of a `/proc/<pid>/cgroup` file.
fn systemd_path(cgroup: &str) -> Option<&str> {
    super::cgroup::unified_path(cgroup)
        .filter(|p| *p != "/")
        .or_else(|| {
            cgroup
                .lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
        })
}

fn is_unit_name(s: &str) -> bool {
    (s.ends_with(".service") || s.ends_with(".scope"))
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:\\".contains(&b))
}

/// The unit a process runs in, from the contents of its cgroup file.
pub fn unit_of(cgroup: &str) -> Option<String> {
    systemd_path(cgroup)?
        .rsplit('/')
        .find(|s| is_unit_name(s))
        .map(str::to_string)
}

impl SystemdAttestor {
    /// An attestor for `cfg`.
    pub fn new(cfg: SystemdConfig) -> Self {
        Self { cfg }
    }

    /// The unit file of `unit` in the configured directories.
    fn fragment(&self, unit: &str) -> Option<PathBuf> {
        let template = unit.split_once('@').and_then(|(prefix, rest)| {
            let suffix = rest.rsplit_once('.').map(|(_, s)| s)?;
            Some(format!("{prefix}@.{suffix}"))
        });
        for dir in &self.cfg.unit_dirs {
            for name in std::iter::once(unit).chain(template.as_deref()) {
                let p = dir.join(name);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }
}

impl WorkloadAttestor for SystemdAttestor {
    fn kind(&self) -> &'static str {
        "systemd"
    }

    fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    fn attest<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> BoxFuture<'a, Result<Vec<Selector>, WorkloadAttestError>> {
        Box::pin(async move {
            let Some(unit) = unit_of(&workload.cgroup) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            if let Ok(s) = Selector::new("systemd", &format!("id:{unit}")) {
                out.push(s);
            }
            // A few stat calls in fixed directories: cheap enough inline.
            if let Some(p) = self.fragment(&unit) {
                use std::os::unix::ffi::OsStrExt;
                let v = escape_bytes(p.as_os_str().as_bytes());
                if let Ok(s) = Selector::new("systemd", &format!("fragment_path:{v}")) {
                    out.push(s);
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_from_real_cgroup_paths() {
        for (cgroup, want) in [
            ("0::/system.slice/nginx.service\n", Some("nginx.service")),
            (
                "0::/system.slice/system-getty.slice/getty@tty1.service\n",
                Some("getty@tty1.service"),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n",
                Some("foo.service"),
            ),
            (
                "0::/user.slice/user-1000.slice/session-3.scope\n",
                Some("session-3.scope"),
            ),
            // delegated sub-cgroup of a unit
            (
                "0::/system.slice/containerd.service/sub/dir\n",
                Some("containerd.service"),
            ),
            // cgroup v1 with systemd's named hierarchy
            (
                "4:memory:/system.slice/cron.service\n1:name=systemd:/system.slice/cron.service\n0::/\n",
                Some("cron.service"),
            ),
            ("0::/\n", None),
            ("0::/docker/abc\n", None),
            ("", None),
        ] {
            assert_eq!(unit_of(cgroup).as_deref(), want, "{cgroup:?}");
        }
    }

    #[tokio::test]
    async fn fragment_paths_follow_the_search_order_and_templates() {
        let high = tempfile::tempdir().unwrap();
        let low = tempfile::tempdir().unwrap();
        std::fs::write(low.path().join("web.service"), "[Service]\n").unwrap();
        std::fs::write(high.path().join("web.service"), "[Service]\n").unwrap();
        std::fs::write(low.path().join("worker@.service"), "[Service]\n").unwrap();
        let a = SystemdAttestor::new(SystemdConfig {
            unit_dirs: vec![high.path().into(), low.path().into()],
            timeout: Duration::from_secs(1),
        });
        let w = |c: &str| Workload {
            pid: 1,
            uid: 0,
            cgroup: c.into(),
            exe_sha256: None,
        };
        let got: Vec<String> = a
            .attest(&w("0::/system.slice/web.service\n"))
            .await
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            vec![
                "systemd:id:web.service".to_string(),
                format!(
                    "systemd:fragment_path:{}/web.service",
                    high.path().display()
                )
            ]
        );
        let got: Vec<String> = a
            .attest(&w("0::/system.slice/worker@3.service\n"))
            .await
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got[1],
            format!(
                "systemd:fragment_path:{}/worker@.service",
                low.path().display()
            )
        );
        // A transient unit without a file: only its id.
        let got = a
            .attest(&w("0::/system.slice/run-r1.scope\n"))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
    }
}
