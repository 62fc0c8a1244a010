//! The deployment image (`deploy/image/build`) built from this workspace's
//! binaries and run under a real Docker Engine: a server container, an
//! agent container sharing its network namespace (both `--network none`
//! otherwise), and workloads in further containers from the same image
//! that fetch their X.509-SVID with `sigil-agent api fetch x509` through
//! the agent's socket directory, bind-mounted from a host temp dir.
//!
//! The agent runs like the Kubernetes DaemonSet in `deploy/k8s`: root,
//! with the host's PID namespace (`--pid host`, the DaemonSet's `hostPID`),
//! since the unix attestor must see the calling process in /proc; a
//! caller in another PID namespace would reach it as pid 0 and be refused.
//!
//! The Engine is found or started by `sigil_tests::docker` (no iptables,
//! no bridge, no registry). Without dockerd the Docker test skips loudly,
//! except in CI, where it fails. The root file system check needs no
//! Docker: it compares what the script puts into the image with what `ldd`
//! says the binaries link.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sigil_tests::docker::{docker, docker_ok, engine};
use sigil_tests::{Scratch, bin, bin_dir, wait_for};

const TD: &str = "example.org";

fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/image/build")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The libraries `ldd` resolves for `exe`, and the dynamic loader.
fn ldd_paths(exe: &Path) -> BTreeSet<PathBuf> {
    let out = Command::new("ldd").arg(exe).output().expect("run ldd");
    assert!(
        out.status.success(),
        "ldd {}: {}",
        exe.display(),
        text(&out)
    );
    let mut libs = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [_, "=>", path, ..] if path.starts_with('/') => {
                libs.insert(PathBuf::from(path));
            }
            [path, ..] if path.starts_with('/') => {
                libs.insert(PathBuf::from(path));
            }
            _ => {}
        }
    }
    libs
}

/// Every regular file under `root` whose name contains `.so`, as the
/// absolute path it has inside the image.
fn shared_objects(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, found: &mut BTreeSet<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, found);
            } else if e.file_name().to_string_lossy().contains(".so") {
                found.insert(Path::new("/").join(p.strip_prefix(root).unwrap()));
            }
        }
    }
    let mut found = BTreeSet::new();
    walk(root, root, &mut found);
    found
}

#[test]
fn image_rootfs_holds_the_binaries_and_exactly_their_libraries() {
    let dir = Scratch::new("image-rootfs");
    let root = dir.0.join("rootfs");
    let out = Command::new(build_script())
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--rootfs-only")
        .arg(&root)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "deploy/image/build failed: {said}");
    // The default tag is the workspace version (this crate shares it).
    let tag = format!("sigil:{}", env!("CARGO_PKG_VERSION"));
    assert!(said.contains(&tag), "default tag {tag} not named: {said}");

    for b in ["sigil-server", "sigil-agent"] {
        let inside = root.join("usr/local/bin").join(b);
        assert_eq!(
            fs::read(&inside).unwrap(),
            fs::read(bin(b)).unwrap(),
            "{} is not the built {b}",
            inside.display()
        );
    }
    // What the binaries and /bin/sh link, plus the TCTI that
    // libtss2-tctildr loads at run time: nothing missing, nothing else.
    let mut want = BTreeSet::new();
    for exe in [bin("sigil-server"), bin("sigil-agent"), "/bin/sh".into()] {
        want.extend(ldd_paths(&exe));
    }
    let tctildr = want
        .iter()
        .find(|p| p.to_string_lossy().contains("libtss2-tctildr"))
        .cloned()
        .expect("sigil-agent links libtss2-tctildr");
    let device = tctildr.with_file_name("libtss2-tcti-device.so.0");
    if device.exists() {
        want.insert(device);
    }
    assert_eq!(shared_objects(&root), want);

    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("sigil:x:65532:65532:")),
        "no non-root sigil user: {passwd}"
    );
    let group = fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("sigil:x:65532:")));
    let tmp = fs::metadata(root.join("tmp")).unwrap().permissions().mode();
    assert_eq!(tmp & 0o7777, 0o1777);
}

/// Containers and the image of one test run, removed on drop (with the
/// containers' logs printed first when the test failed).
struct Run {
    sock: &'static str,
    image: String,
    containers: Vec<String>,
}

impl Run {
    fn docker(&self, args: &[&str]) -> Output {
        docker(self.sock, args)
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        docker_ok(self.sock, args)
    }

    /// `docker run -d --name NAME <opts> IMAGE <args>`.
    fn start(&mut self, name: &str, opts: &[&str], args: &[&str]) {
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(opts);
        all.push(&self.image);
        all.extend_from_slice(args);
        self.containers.push(name.to_string());
        self.docker_ok(&all);
    }

    /// `sigil-server <args>` inside the server container, as its user.
    fn server_cli(&self, server: &str, args: &[&str]) -> String {
        let mut all = vec!["exec", server, "/usr/local/bin/sigil-server"];
        all.extend_from_slice(args);
        self.docker_ok(&all)
    }

    /// `sigil-agent api fetch x509` in a fresh container as `uid`, with
    /// only the socket directory mounted (read-only) and no network.
    fn fetch_as(&self, uid: u32, socket_dir: &Path) -> Output {
        let user = uid.to_string();
        let mount = format!("{}:/spiffe:ro", socket_dir.display());
        self.docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            &user,
            "-v",
            &mount,
            "-e",
            "SPIFFE_ENDPOINT_SOCKET=unix:///spiffe/api.sock",
            "--entrypoint",
            "/usr/local/bin/sigil-agent",
            &self.image,
            "api",
            "fetch",
            "x509",
        ])
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for c in self.containers.iter().rev() {
            if std::thread::panicking() {
                let out = docker(self.sock, &["logs", c]);
                eprintln!("--- docker logs {c}:\n{}", text(&out));
            }
            let _ = docker(self.sock, &["rm", "-f", c]);
        }
        let _ = docker(self.sock, &["rmi", "-f", &self.image]);
    }
}

/// The workload's last answer, printed if the test fails while it is held.
struct LastOutput(String);

impl Drop for LastOutput {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- last workload output:\n{}", self.0);
        }
    }
}

fn write(path: &Path, contents: &str, mode: u32) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn server_and_agent_from_the_image_serve_a_workload_in_another_container() {
    let Some(sock) = engine("deployment image test") else {
        return;
    };
    let pid = std::process::id();
    let mut run = Run {
        sock,
        image: format!("sigil-e2e-image:{pid}"),
        containers: Vec::new(),
    };

    // Build from target/<profile> with the script as an operator runs it.
    let out = Command::new(build_script())
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--tag")
        .arg(&run.image)
        .env("DOCKER_HOST", format!("unix://{sock}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/image/build failed: {}",
        text(&out)
    );
    let config = run.docker_ok(&[
        "image",
        "inspect",
        &run.image,
        "--format",
        "{{.Config.User}} {{json .Config.Entrypoint}}",
    ]);
    assert_eq!(config, r#"sigil ["/usr/local/bin/sigil-server"]"#);

    let dir = Scratch::new("image-run");
    let socket_dir = dir.0.join("socket");
    fs::create_dir(&socket_dir).unwrap();
    fs::set_permissions(&socket_dir, fs::Permissions::from_mode(0o755)).unwrap();

    // The server: the image's own user (sigil) and directories.
    let server = format!("sigil-e2e-img-server-{pid}");
    let server_toml = dir.0.join("server.toml");
    write(
        &server_toml,
        &format!(
            "trust_domain = \"{TD}\"\nbind_address = \"127.0.0.1\"\nbind_port = 8081\n\
             data_dir = \"/var/lib/sigil/server\"\nadmin_socket = \"/run/sigil/server/admin.sock\"\n"
        ),
        0o644,
    );
    let mount = format!("{}:/etc/sigil/server.toml:ro", server_toml.display());
    run.start(
        &server,
        &["--network", "none", "-v", &mount],
        &["run", "--config", "/etc/sigil/server.toml"],
    );
    wait_for(
        "server healthy in its container",
        Duration::from_secs(30),
        || {
            run.docker(&[
                "exec",
                &server,
                "/usr/local/bin/sigil-server",
                "healthcheck",
            ])
            .status
            .success()
        },
    );
    let uid = run.docker_ok(&[
        "exec",
        &server,
        "/bin/sh",
        "-c",
        "while read -r k v _; do [ \"$k\" = Uid: ] && echo \"$v\"; done < /proc/self/status; :",
    ]);
    assert_eq!(uid, "65532", "the server container does not run as sigil");

    // Bootstrap material for the agent, as an operator would fetch it.
    let bundle = run.server_cli(&server, &["bundle", "show"]);
    let agent_id = format!("spiffe://{TD}/image-agent");
    let token_out = run.server_cli(&server, &["token", "generate", "--spiffe-id", &agent_id]);
    let token = token_out
        .lines()
        .find_map(|l| l.strip_prefix("Token:"))
        .map(str::trim)
        .expect("token in output")
        .to_string();
    write(&dir.0.join("bundle.pem"), &format!("{bundle}\n"), 0o644);
    write(&dir.0.join("token"), &format!("{token}\n"), 0o600);
    write(
        &dir.0.join("agent.toml"),
        &format!(
            "trust_domain = \"{TD}\"\nserver_address = \"127.0.0.1\"\nserver_port = 8081\n\
             socket_path = \"/spiffe/api.sock\"\ndata_dir = \"/var/lib/sigil/agent\"\n\
             trust_bundle_path = \"/etc/sigil/bundle.pem\"\n"
        ),
        0o644,
    );

    // The agent: root, the server's network namespace, the host's PIDs.
    let agent = format!("sigil-e2e-img-agent-{pid}");
    let net = format!("container:{server}");
    let m_cfg = format!(
        "{}:/etc/sigil/agent.toml:ro",
        dir.0.join("agent.toml").display()
    );
    let m_bundle = format!(
        "{}:/etc/sigil/bundle.pem:ro",
        dir.0.join("bundle.pem").display()
    );
    let m_token = format!("{}:/etc/sigil/token:ro", dir.0.join("token").display());
    let m_sock = format!("{}:/spiffe", socket_dir.display());
    run.start(
        &agent,
        &[
            "--network",
            &net,
            "--pid",
            "host",
            "--user",
            "0",
            "--entrypoint",
            "/usr/local/bin/sigil-agent",
            "-v",
            &m_cfg,
            "-v",
            &m_bundle,
            "-v",
            &m_token,
            "-v",
            &m_sock,
        ],
        &[
            "run",
            "--config",
            "/etc/sigil/agent.toml",
            "--join-token-file",
            "/etc/sigil/token",
        ],
    );
    wait_for(
        "agent healthy in its container",
        Duration::from_secs(30),
        || {
            run.docker(&["exec", &agent, "/usr/local/bin/sigil-agent", "healthcheck"])
                .status
                .success()
        },
    );
    assert!(
        socket_dir.join("api.sock").exists(),
        "the agent's socket is not in the bind-mounted host directory"
    );

    let workload = format!("spiffe://{TD}/image-workload");
    run.server_cli(
        &server,
        &[
            "entry",
            "create",
            "--parent-id",
            &agent_id,
            "--spiffe-id",
            &workload,
            "--selector",
            "unix:uid:1001",
        ],
    );

    // A workload container as uid 1001 gets the entry's SVID once the
    // entry has reached the agent.
    let mut last = LastOutput(String::new());
    wait_for(
        "uid 1001 in another container fetches its SVID",
        Duration::from_secs(30),
        || {
            let out = run.fetch_as(1001, &socket_dir);
            last.0 = text(&out);
            out.status.success() && last.0.contains(&format!("SPIFFE ID:\t\t{workload}"))
        },
    );
    eprintln!("uid 1001 in a container:\n{}", last.0);

    // Another uid, same socket: no entry selects it.
    let out = run.fetch_as(1002, &socket_dir);
    let said = text(&out);
    assert!(!out.status.success(), "uid 1002 got an SVID: {said}");
    assert!(said.contains("PermissionDenied"), "{said}");
    assert!(!said.contains(&workload), "{said}");
}
