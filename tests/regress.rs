//! Runs the SQL tests in pgrx-tests/ with PostgreSQL's own pg_regress
//! against a fresh cluster that preloads outbox (`cargo pgrx regress`
//! cannot run as root).
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::cluster::{bindir, server_dir, Cluster};
use std::path::PathBuf;
use std::process::Command;

fn pg_regress() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(pg_config).arg("--pkglibdir").output().expect("pg_config runs");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("pgxs/src/test/regress/pg_regress")
}

#[test]
fn sql_regression_suite() {
    let cluster = Cluster::start("regress", &[]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = server_dir(&std::env::temp_dir().join(format!("outbox-tests-{}", std::process::id())), "regress-out");
    let status = Command::new(pg_regress())
        .current_dir(&root)
        .arg(format!("--inputdir={}", root.join("pgrx-tests").display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!("--schedule={}", root.join("pgrx-tests/schedule").display()))
        .arg(format!("--bindir={}", bindir().display()))
        .args(["--host=127.0.0.1", "--user=postgres", "--dbname=outbox_regress"])
        .arg(format!("--port={}", cluster.port))
        .status()
        .expect("pg_regress runs");
    if !status.success() {
        let diffs = std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default();
        panic!("pg_regress failed; results in {}\n{diffs}", out.display());
    }
}
