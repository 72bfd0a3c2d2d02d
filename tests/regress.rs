//! Runs the SQL tests in pgrx-tests/ with PostgreSQL's own pg_regress
//! against a fresh cluster that preloads outbox (`cargo pgrx regress`
//! cannot run as root).
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::cluster::{bindir, pg_config, server_dir, tests_dir, Cluster};
use outbox_testkit::die_with_parent;
use std::path::PathBuf;
use std::process::Command;

fn pg_regress() -> PathBuf {
    pg_config("--pkglibdir").join("pgxs/src/test/regress/pg_regress")
}

#[test]
fn sql_regression_suite() {
    let cluster = Cluster::start("regress", &[]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = server_dir(&tests_dir(), "regress-out");
    let status = die_with_parent(&mut Command::new(pg_regress()))
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
