//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory and `pg_ctl start` on a free port (TCP on 127.0.0.1 with a
//! password, and a Unix socket in the same directory with trust for the
//! harness's own `createdb`/`psql`), stopped and removed on drop. As root,
//! the server runs as the `postgres` user (initdb refuses root).
//!
//! The server binaries are found in `SIGIL_PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/*/bin`, else `PATH`. Missing binaries fail the
//! test; `SIGIL_SKIP_PG=1` skips instead (printing SKIP), except in CI.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The password of the `postgres` role in every harness cluster.
pub const PASSWORD: &str = "sigil-test-password";

/// A running PostgreSQL server.
pub struct Postgres {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    run_as_postgres: bool,
    running: bool,
}

fn find_bindir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SIGIL_PG_BINDIR") {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

/// Starts a server, or returns `None` (after printing SKIP) when the
/// binaries are missing and `SIGIL_SKIP_PG=1` is set outside CI. Panics
/// when the binaries are missing otherwise, or the server does not start.
pub fn start(tag: &str) -> Option<Postgres> {
    let skip = std::env::var("SIGIL_SKIP_PG").is_ok_and(|v| v == "1");
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    if skip && !ci {
        eprintln!("SKIP {tag}: SIGIL_SKIP_PG=1 (PostgreSQL tests not run)");
        return None;
    }
    let Some(bindir) = find_bindir() else {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in SIGIL_PG_BINDIR, \
             /usr/lib/postgresql/*/bin or PATH: install postgresql (scripts/install-deps test){}",
            if ci {
                ""
            } else {
                ", or set SIGIL_SKIP_PG=1 to skip these tests locally"
            }
        );
    };
    Some(Postgres::start_in(tag, bindir))
}

impl Postgres {
    fn start_in(tag: &str, bindir: PathBuf) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("sigil-pg-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        let run_as_postgres = nix::unistd::geteuid().is_root();
        let pwfile = root.join("pwfile");
        fs::write(&pwfile, PASSWORD).unwrap();
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).unwrap();
        if run_as_postgres {
            let user = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("running as root, the harness needs the `postgres` user (installed with postgresql)");
            for p in [&root, &pwfile] {
                nix::unistd::chown(p.as_path(), Some(user.uid), Some(user.gid)).unwrap();
            }
        }
        let mut pg = Postgres {
            root,
            bindir,
            port: 0,
            run_as_postgres,
            running: false,
        };
        let data = pg.data_dir();
        pg.run_ok(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        pg.start_server();
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bindir.join(tool);
        if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run_ok(&self, tool: &str, args: &[&str]) -> Output {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(&self.root)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        out
    }

    /// Starts the server (again, after [`Postgres::stop`]) on the same
    /// port, or on a free one the first time.
    pub fn start_server(&mut self) {
        if self.port == 0 {
            self.port = crate::free_port();
        }
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.root.display()
        );
        let data = self.data_dir();
        let log = self.root.join("server.log");
        self.run_ok(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        self.running = true;
    }

    /// Stops the server at once (`-m immediate`, like a crash).
    pub fn stop(&mut self) {
        self.stop_mode("immediate");
    }

    /// Stops the server with `pg_ctl stop -m MODE` (`fast`: clients are
    /// disconnected, the server shuts down cleanly; `immediate`: a crash).
    pub fn stop_mode(&mut self, mode: &str) {
        if self.running {
            let data = self.data_dir();
            self.run_ok(
                "pg_ctl",
                &["-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"],
            );
            self.running = false;
        }
    }

    /// Creates database `name` and returns its URL (user `postgres`, no
    /// password in it: see [`PASSWORD`]).
    pub fn create_db(&self, name: &str) -> String {
        let port = self.port.to_string();
        let sock = self.root.display().to_string();
        self.run_ok(
            "createdb",
            &["-h", &sock, "-p", &port, "-U", "postgres", name],
        );
        self.url(name)
    }

    /// `postgres://postgres@127.0.0.1:PORT/name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL in database `db` with psql; returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let sock = self.root.display().to_string();
        let out = self.run_ok(
            "psql",
            &[
                "-h",
                &sock,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A `[datastore]` section for database `db`, with the password in a
    /// 0600 file written at `password_file`.
    pub fn datastore_section(&self, db: &str, password_file: &Path) -> String {
        self.write_password_file(password_file);
        format!(
            "[datastore]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\npool_size = 4\n",
            self.url(db),
            password_file.display()
        )
    }

    /// Writes [`PASSWORD`] to `path` with mode 0600.
    pub fn write_password_file(&self, path: &Path) {
        fs::write(path, format!("{PASSWORD}\n")).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Turns TLS on with `cert_pem`/`key_pem` as the server's certificate
    /// and key, and makes TCP connections require it (every `host` line of
    /// pg_hba.conf becomes `hostssl`, so a client without TLS is refused);
    /// restarts the server if it runs. Called again, it swaps the
    /// certificate.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) {
        let data = self.data_dir();
        let (crt, key) = (data.join("server.crt"), data.join("server.key"));
        fs::write(&crt, cert_pem).unwrap();
        fs::write(&key, key_pem).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        if self.run_as_postgres {
            let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            for p in [&crt, &key] {
                nix::unistd::chown(p.as_path(), Some(user.uid), Some(user.gid)).unwrap();
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).unwrap();
        if !text.contains("\nssl = on\n") {
            text.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            fs::write(&conf, text).unwrap();
        }
        let hba = data.join("pg_hba.conf");
        let rules: String = fs::read_to_string(&hba)
            .unwrap()
            .lines()
            .map(|l| match l.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{l}\n"),
            })
            .collect();
        fs::write(&hba, rules).unwrap();
        if self.running {
            self.stop_mode("fast");
            self.start_server();
        }
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data_dir();
            let _ = self
                .command("pg_ctl")
                .args([
                    "-D",
                    data.to_str().unwrap_or(""),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ])
                .current_dir(&self.root)
                .output();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}
