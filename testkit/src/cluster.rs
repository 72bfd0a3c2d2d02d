//! A throwaway PostgreSQL cluster with outbox preloaded, on a free loopback
//! port. As root, every server command runs as the `postgres` user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
    keep: bool,
    /// Environment the server runs with (besides ours).
    env: Vec<(String, String)>,
}

fn is_root() -> bool {
    // SAFETY: no arguments, no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// `pg_config --bindir`, from $PG_CONFIG or Debian's PostgreSQL 15.
pub fn bindir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config).arg("--bindir").output().expect("pg_config runs");
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// Run a server-side command, as `postgres` when we are root.
pub fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory the server user may write, under `parent`.
pub fn server_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create cluster dir");
    if is_root() {
        check("chown", Command::new("chown").arg("postgres:postgres").arg(&dir).output().expect("chown runs"));
    }
    dir
}

impl Cluster {
    /// initdb and start a cluster in a fresh directory under the system temp
    /// dir. `conf` lines are appended to postgresql.conf.
    pub fn start(name: &str, conf: &[&str]) -> Cluster {
        Cluster::start_with_env(name, conf, &[])
    }

    /// As `start`, with `env` set in the server's environment.
    pub fn start_with_env(name: &str, conf: &[&str], env: &[(&str, &str)]) -> Cluster {
        let parent = std::env::temp_dir().join(format!("outbox-tests-{}", std::process::id()));
        std::fs::create_dir_all(&parent).unwrap();
        Cluster::start_in_with_env(&server_dir(&parent, name), conf, env)
    }

    pub fn start_in(dir: &Path, conf: &[&str]) -> Cluster {
        Cluster::start_in_with_env(dir, conf, &[])
    }

    fn start_in_with_env(dir: &Path, conf: &[&str], env: &[(&str, &str)]) -> Cluster {
        let bindir = bindir();
        check(
            "initdb",
            as_server_user(&bindir.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C", "-D"])
                .arg(dir.join("data"))
                .output()
                .expect("initdb runs"),
        );
        let port = free_port();
        let mut settings = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'outbox'\nfsync = off\nmax_connections = 50\n\
             log_min_messages = warning\nlog_line_prefix = '%m [%p] %b '\n",
            dir.display()
        );
        for line in conf {
            settings.push_str(line);
            settings.push('\n');
        }
        let conf_path = dir.join("data").join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        existing.push_str(&settings);
        // Written by us (root or not); postgres only needs to read it.
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            port,
            bindir,
            keep: std::env::var_os("OUTBOX_KEEP").is_some(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        cluster.pg_ctl_start();
        cluster
    }

    fn pg_ctl(&self) -> Command {
        let mut c = as_server_user(&self.bindir.join("pg_ctl"));
        c.arg("-D").arg(self.dir.join("data"));
        c
    }

    fn pg_ctl_start(&self) {
        // -l keeps the server off our stdout (a test harness waiting on an
        // inherited pipe would hang).
        check(
            "pg_ctl start",
            self.pg_ctl()
                .args(["-w", "-t", "60", "-l"])
                .arg(self.dir.join("server.log"))
                .arg("start")
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(Stdio::null())
                .output()
                .expect("pg_ctl runs"),
        );
    }

    /// Stop with the given mode (`fast`, `immediate`, `smart`).
    pub fn stop(&self, mode: &str) {
        check("pg_ctl stop", self.pg_ctl().args(["-w", "-t", "60", "-m", mode, "stop"]).output().expect("pg_ctl runs"));
    }

    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// A streaming standby of this cluster (pg_basebackup -R) on a new
    /// loopback port, started.
    pub fn standby(&self, name: &str) -> Cluster {
        let parent = self.dir.parent().expect("clusters live in a directory").to_path_buf();
        let dir = server_dir(&parent, name);
        check(
            "pg_basebackup",
            as_server_user(&self.bindir.join("pg_basebackup"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R", "-c", "fast", "-D"])
                .arg(dir.join("data"))
                .args(["-p", &self.port.to_string()])
                .output()
                .expect("pg_basebackup runs"),
        );
        let port = free_port();
        let conf_path = dir.join("data").join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).expect("read standby postgresql.conf");
        conf.push_str(&format!("port = {port}\nunix_socket_directories = '{}'\n", dir.display()));
        std::fs::write(&conf_path, conf).expect("write standby postgresql.conf");
        let standby = Cluster { dir, port, bindir: self.bindir.clone(), keep: self.keep, env: self.env.clone() };
        standby.pg_ctl_start();
        standby
    }

    /// Promote a standby to primary.
    pub fn promote(&self) {
        check("pg_ctl promote", self.pg_ctl().args(["-w", "promote"]).output().expect("pg_ctl runs"));
    }

    pub fn connect(&self) -> postgres::Client {
        self.connect_db("postgres")
    }

    pub fn connect_db(&self, db: &str) -> postgres::Client {
        self.connect_as(db, "postgres")
    }

    /// Connect to database `db` as login role `user` (trust authentication).
    pub fn connect_as(&self, db: &str, user: &str) -> postgres::Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match postgres::Config::new()
                .host("127.0.0.1")
                .port(self.port)
                .user(user)
                .dbname(db)
                .connect(postgres::NoTls)
            {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect to port {}: {e}", self.port),
            }
        }
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl().args(["-w", "-m", "immediate", "stop"]).output();
        if std::thread::panicking() || self.keep {
            eprintln!("cluster kept at {} (server.log there)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
