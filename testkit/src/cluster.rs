//! A throwaway PostgreSQL cluster with outbox preloaded, on a free loopback
//! port. As root, every server command runs as the `postgres` user.
//!
//! The server stops when the cluster is dropped (also when its test
//! panics: the data directory is then kept, the server is not), and when
//! the test process ends without dropping it (see [`Sentinel`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
    keep: bool,
    /// Environment the server runs with (besides ours).
    env: Vec<(String, String)>,
    sentinel: Sentinel,
}

fn is_root() -> bool {
    // SAFETY: no arguments, no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// A directory `pg_config` reports (`--bindir`, `--pkglibdir`, ...), from
/// $PG_CONFIG or Debian's PostgreSQL 15.
pub fn pg_config(flag: &str) -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config).arg(flag).output().expect("pg_config runs");
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// Where the server programs are.
pub fn bindir() -> PathBuf {
    pg_config("--bindir")
}

/// Where a test binary puts its clusters and other server files:
/// `outbox-tests-<pid>` in the temp dir (testkit/leftovers.sh looks there).
pub fn tests_dir() -> PathBuf {
    std::env::temp_dir().join(format!("outbox-tests-{}", std::process::id()))
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
        let parent = tests_dir();
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
            keep: std::env::var_os("OUTBOX_KEEP").is_some(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            sentinel: Sentinel::start(&bindir, &dir.join("data")),
            bindir,
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
        let standby = Cluster {
            sentinel: Sentinel::start(&self.bindir, &dir.join("data")),
            dir,
            port,
            bindir: self.bindir.clone(),
            keep: self.keep,
            env: self.env.clone(),
        };
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
        let deadline = Instant::now() + crate::WAIT;
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

    /// The pid of the outbox worker of database `postgres`, once it runs
    /// (connecting anew while the server is down); `None` after `timeout`.
    pub fn worker_pid_within(&self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(pid) =
                try_connect(self.port).and_then(|mut db| crate::outbox::query_worker_pid(&mut db).ok().flatten())
            {
                return Some(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl().args(["-w", "-m", "immediate", "stop"]).output();
        self.sentinel.release();
        if std::thread::panicking() || self.keep {
            eprintln!("cluster kept at {} (server.log there)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connect to database `postgres` on loopback `port` as `postgres`, once
/// (within 2 s); `None` if the server does not answer.
pub fn try_connect(port: u16) -> Option<postgres::Client> {
    postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2))
        .connect(postgres::NoTls)
        .ok()
}

/// As [`try_connect`], for a server that must be there.
pub fn connect_port(port: u16) -> postgres::Client {
    try_connect(port).unwrap_or_else(|| panic!("connect to port {port}"))
}

/// Stops a cluster's server when the test process ends, however it ends.
///
/// `pg_ctl start` detaches the server (it is no child of ours, so no
/// parent-death signal reaches it), and `Drop` does not run when the
/// process is killed, aborts, or leaks the cluster. So, before the server
/// starts, a shell starts as the server user and blocks reading a pipe
/// whose only writer is this process: at end of file (the pipe is closed
/// by [`Sentinel::release`] or by the kernel when this process ends) it
/// stops the server, `-m immediate`.
struct Sentinel(Option<Child>);

impl Sentinel {
    fn start(bindir: &Path, data: &Path) -> Sentinel {
        let child = as_server_user(Path::new("/bin/sh"))
            .arg("-c")
            .arg(r#"read -r line; exec "$0" -D "$1" -w -t 60 -m immediate stop >/dev/null 2>&1"#)
            .arg(bindir.join("pg_ctl"))
            .arg(data)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the cluster's sentinel");
        Sentinel(Some(child))
    }

    /// Close the pipe and wait until the sentinel has stopped the server
    /// (if it still ran).
    fn release(&mut self) {
        if let Some(mut child) = self.0.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}
