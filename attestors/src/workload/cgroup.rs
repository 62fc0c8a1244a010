//! Which container (and Kubernetes pod) a process runs in, from the cgroup
//! path the kernel reports in `/proc/<pid>/cgroup`.
//!
//! The cgroup path is set by the container runtime when the container
//! starts and a process inside an unprivileged container cannot move itself
//! to another cgroup, so it is the kernel's account of which container a
//! process belongs to (see SECURITY.md for the limits: a privileged
//! container, or one given write access to the host's cgroupfs, can).
//!
//! Both cgroup versions and both cgroup drivers are understood:
//!
//! | runtime | cgroupfs driver | systemd driver |
//! |---|---|---|
//! | Docker | `/docker/<id>` | `/system.slice/docker-<id>.scope` |
//! | containerd (CRI) | `/kubepods/<qos>/pod<uid>/<id>` | `…-pod<uid>.slice/cri-containerd-<id>.scope` |
//! | CRI-O | `/kubepods/<qos>/pod<uid>/crio-<id>` | `…-pod<uid>.slice/crio-<id>.scope` |
//! | podman | `/libpod_parent/libpod-<id>` | `/machine.slice/libpod-<id>.scope[/container]` |
//!
//! Container ids are 64 lowercase hex digits; the monitor processes of CRI-O
//! and podman (`crio-conmon-<id>`, `libpod-conmon-<id>`) are not the
//! container and yield nothing. When containers nest (a kind node, Docker
//! in Docker) the innermost container is reported.

/// A container runtime, as far as the cgroup path tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Docker Engine (also cri-dockerd under Kubernetes).
    Docker,
    /// containerd through its CRI plugin.
    Containerd,
    /// CRI-O.
    Crio,
    /// podman.
    Podman,
}

impl Runtime {
    /// The `container:runtime:` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::Podman => "podman",
        }
    }
}

/// The container a process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// 64 lowercase hex digits.
    pub id: String,
    /// The runtime, when the path names it (the cgroupfs driver under
    /// Kubernetes does not).
    pub runtime: Option<Runtime>,
    /// The Kubernetes pod's UID (with dashes), when under `kubepods`.
    pub pod_uid: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<prefix><id>` or `<prefix><id>.scope` with a 64-hex id.
fn scoped<'a>(segment: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = segment.strip_prefix(prefix)?;
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
    is_container_id(id).then_some(id)
}

/// A pod UID from `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_>.slice`
/// (systemd, dashes escaped as underscores).
fn pod_uid(segment: &str) -> Option<String> {
    let raw = if let Some(s) = segment.strip_suffix(".slice") {
        let (_, uid) = s.rsplit_once("-pod")?;
        if !s.starts_with("kubepods") {
            return None;
        }
        uid.replace('_', "-")
    } else {
        segment.strip_prefix("pod")?.to_string()
    };
    let ok = raw.len() == 36
        && raw
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase() || b == b'-');
    ok.then_some(raw)
}

/// The container in one cgroup path (the part after `N:controllers:`).
pub fn container_in_path(path: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segments.iter().enumerate().rev() {
        let parent = i.checked_sub(1).map(|p| segments[p]);
        let found = if seg.starts_with("crio-conmon-") || seg.starts_with("libpod-conmon-") {
            return None;
        } else if let Some(id) = scoped(seg, "docker-") {
            Some((id, Some(Runtime::Docker)))
        } else if let Some(id) = scoped(seg, "cri-containerd-") {
            Some((id, Some(Runtime::Containerd)))
        } else if let Some(id) = scoped(seg, "crio-") {
            Some((id, Some(Runtime::Crio)))
        } else if let Some(id) = scoped(seg, "libpod-") {
            Some((id, Some(Runtime::Podman)))
        } else if is_container_id(seg) {
            let runtime = match parent {
                Some("docker") => Some(Runtime::Docker),
                _ => None,
            };
            Some((*seg, runtime))
        } else {
            None
        };
        if let Some((id, runtime)) = found {
            let in_pod = segments[..i].iter().any(|s| s.starts_with("kubepods"));
            let pod_uid = if in_pod {
                segments[..i].iter().rev().find_map(|s| pod_uid(s))
            } else {
                None
            };
            // A bare id outside kubepods and not under /docker is no
            // container this module knows (could be any cgroup name).
            if runtime.is_none() && pod_uid.is_none() {
                return None;
            }
            return Some(ContainerRef {
                id: id.to_string(),
                runtime,
                pod_uid,
            });
        }
    }
    None
}

/// The container named by the contents of a `/proc/<pid>/cgroup` file:
/// the first line (in file order) whose path names one. Lines are
/// `hierarchy-ID:controllers:path`; the path may itself contain `:`.
pub fn container_from_cgroup(contents: &str) -> Option<ContainerRef> {
    contents.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, _, path) = (parts.next()?, parts.next()?, parts.next()?);
        container_in_path(path)
    })
}

/// The cgroup v2 path of a process (the `0::` line), if it has one.
pub fn unified_path(contents: &str) -> Option<&str> {
    contents.lines().find_map(|l| l.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3c5c8e5d2f6f4b3e9a1b7c0d8e2f4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f";
    const POD: &str = "2f1c7a52-8a4b-4bd6-9e1c-2f0a6d7b3e41";
    const POD_: &str = "2f1c7a52_8a4b_4bd6_9e1c_2f0a6d7b3e41";

    /// (what, file contents, expected runtime, pod uid?)
    fn cases() -> Vec<(&'static str, String, Option<Runtime>, bool)> {
        vec![
            (
                "docker, cgroup v1, cgroupfs driver",
                format!(
                    "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n10:cpu,cpuacct:/docker/{ID}\n\
                     1:name=systemd:/docker/{ID}\n0::/system.slice/containerd.service\n"
                ),
                Some(Runtime::Docker),
                false,
            ),
            (
                "docker, cgroup v1, systemd driver",
                format!(
                    "11:devices:/system.slice/docker-{ID}.scope\n\
                     4:memory:/system.slice/docker-{ID}.scope\n\
                     1:name=systemd:/system.slice/docker-{ID}.scope\n"
                ),
                Some(Runtime::Docker),
                false,
            ),
            (
                "docker, cgroup v2, systemd driver",
                format!("0::/system.slice/docker-{ID}.scope\n"),
                Some(Runtime::Docker),
                false,
            ),
            (
                "docker, cgroup v2, cgroupfs driver",
                format!("0::/docker/{ID}\n"),
                Some(Runtime::Docker),
                false,
            ),
            (
                "kubernetes + containerd, cgroup v2, systemd driver",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/cri-containerd-{ID}.scope\n"
                ),
                Some(Runtime::Containerd),
                true,
            ),
            (
                "kubernetes + containerd, cgroup v1, cgroupfs driver",
                format!(
                    "12:hugetlb:/kubepods/besteffort/pod{POD}/{ID}\n\
                     11:memory:/kubepods/besteffort/pod{POD}/{ID}\n\
                     1:name=systemd:/kubepods/besteffort/pod{POD}/{ID}\n"
                ),
                None,
                true,
            ),
            (
                "kubernetes guaranteed QoS, cgroup v2, cgroupfs driver",
                format!("0::/kubepods/pod{POD}/{ID}\n"),
                None,
                true,
            ),
            (
                "kubernetes + CRI-O, cgroup v2, systemd driver",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/crio-{ID}.scope\n"
                ),
                Some(Runtime::Crio),
                true,
            ),
            (
                "kubernetes + CRI-O, cgroup v1, cgroupfs driver",
                format!("9:memory:/kubepods/burstable/pod{POD}/crio-{ID}\n"),
                Some(Runtime::Crio),
                true,
            ),
            (
                "kubernetes + cri-dockerd, cgroup v1, systemd driver",
                format!("5:cpuset:/kubepods.slice/kubepods-pod{POD_}.slice/docker-{ID}.scope\n"),
                Some(Runtime::Docker),
                true,
            ),
            (
                "podman rootful, cgroup v2, systemd driver",
                format!("0::/machine.slice/libpod-{ID}.scope/container\n"),
                Some(Runtime::Podman),
                false,
            ),
            (
                "podman rootless, cgroup v2, systemd driver",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope\n"
                ),
                Some(Runtime::Podman),
                false,
            ),
            (
                "podman, cgroup v1, cgroupfs driver",
                format!("7:memory:/libpod_parent/libpod-{ID}\n"),
                Some(Runtime::Podman),
                false,
            ),
            (
                // Read from /proc/<pid>/cgroup of a container started by
                // Docker 20.10 (Debian 12 docker.io) on a hybrid v1/v2 host.
                "docker 20.10, hybrid cgroup v1 + v2, cgroupfs driver (real)",
                format!(
                    "9:name=systemd:/docker/{ID}\n8:pids:/docker/{ID}\n7:blkio:/docker/{ID}\n\
                     6:freezer:/docker/{ID}\n5:devices:/docker/{ID}\n4:memory:/docker/{ID}\n\
                     3:cpuset:/docker/{ID}\n2:cpuacct:/docker/{ID}\n1:cpu:/docker/{ID}\n0::/docker/{ID}\n"
                ),
                Some(Runtime::Docker),
                false,
            ),
            (
                "kind node: kubernetes inside docker (innermost wins)",
                format!(
                    "0::/docker/{}/kubepods/besteffort/pod{POD}/{ID}\n",
                    "ab".repeat(32)
                ),
                None,
                true,
            ),
        ]
    }

    #[test]
    fn every_runtime_and_driver() {
        for (what, contents, runtime, in_pod) in cases() {
            let got = container_from_cgroup(&contents).unwrap_or_else(|| panic!("{what}: none"));
            assert_eq!(got.id, ID, "{what}");
            assert_eq!(got.runtime, runtime, "{what}");
            assert_eq!(got.pod_uid.as_deref(), in_pod.then_some(POD), "{what}");
        }
    }

    #[test]
    fn processes_outside_containers_and_monitors_yield_nothing() {
        for contents in [
            "0::/user.slice/user-1000.slice/session-3.scope\n".to_string(),
            "0::/system.slice/sshd.service\n".to_string(),
            "0::/\n".to_string(),
            "12:pids:/user.slice\n1:name=systemd:/init.scope\n".to_string(),
            format!("0::/machine.slice/libpod-conmon-{ID}.scope\n"),
            format!("0::/kubepods.slice/kubepods-pod{POD_}.slice/crio-conmon-{ID}.scope\n"),
            // a 64-hex directory name that no runtime made
            format!("0::/system.slice/{ID}\n"),
            // too short, uppercase, not hex
            "0::/docker/abc123\n".to_string(),
            format!("0::/docker/{}\n", ID.to_uppercase()),
            "".to_string(),
            "garbage without colons\n".to_string(),
        ] {
            assert_eq!(container_from_cgroup(&contents), None, "{contents:?}");
        }
    }

    #[test]
    fn unified_path_is_the_v2_line() {
        assert_eq!(
            unified_path("12:pids:/x\n0::/system.slice/a.service\n"),
            Some("/system.slice/a.service")
        );
        assert_eq!(unified_path("12:pids:/x\n"), None);
    }
}
