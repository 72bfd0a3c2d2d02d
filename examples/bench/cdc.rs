//! The logical-decoding peer, "outbox table + CDC" (Debezium's outbox
//! pattern): the application INSERTs into a plain table in its
//! transaction, wal2json decodes the WAL, pg_recvlogical streams it, and
//! a relay (relay.rs, `cdc`) POSTs each insert. Decoding needs
//! `wal_level = logical`, which the main bench cluster must not get (it
//! would change what the other peers are measured on), so CDC has a
//! cluster of its own with the main one's other settings.

use crate::drain::counting_receiver;
use crate::plot::median;
use crate::relay;
use crate::write_path::pgbench;
use outbox_testkit::cluster::{bindir, pg_config, server_dir, Cluster};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether Debian's postgresql-15-wal2json is installed.
pub fn available() -> bool {
    pg_config("--pkglibdir").join("wal2json.so").exists()
}

/// The CDC cluster: the bench cluster's settings plus logical decoding;
/// the outbox table, the business table, and slot `cdc`. (The outbox
/// library is preloaded, as on every kit cluster; its extension is not
/// created here.)
pub fn start() -> Cluster {
    let mut conf = vec![
        "fsync = on",
        "shared_buffers = '256MB'",
        "max_connections = 200",
        "wal_level = logical",
        "max_replication_slots = 4",
        "max_wal_senders = 4",
    ];
    conf.extend(allow_wal2json());
    let cluster = Cluster::start_in(&server_dir(&std::env::temp_dir(), "outbox-bench-cdc"), &conf);
    let mut db = cluster.connect();
    db.batch_execute(
        "CREATE TABLE cdc_outbox (id bigserial PRIMARY KEY, key text NOT NULL, payload jsonb NOT NULL);
         CREATE TABLE orders (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL);",
    )
    .unwrap();
    fresh_slot(&mut db);
    cluster
}

/// PostgreSQL 15.19 and later decode only with the output plugins listed
/// in `output_plugin_libraries` (by default pgoutput and test_decoding);
/// earlier servers do not know the setting and would not start with it.
fn allow_wal2json() -> Option<&'static str> {
    let out = Command::new(bindir().join("postgres")).arg("--describe-config").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("output_plugin_libraries\t"))
        .then_some("output_plugin_libraries = 'pgoutput, test_decoding, wal2json'")
}

/// Drop slot `cdc` and create it anew, at the current end of WAL: every
/// measurement starts with one, before its first write. A slot kept
/// across runs would replay the tail of the last run into the next:
/// pg_recvlogical confirms only every status interval (10 s), confirms
/// what it wrote to the pipe rather than what the relay posted, and
/// confirms nothing when it is killed (as it is at a run's end). A new
/// slot has nothing old and misses nothing written after it.
pub fn fresh_slot(db: &mut postgres::Client) {
    // The walsender of a relay just killed may hold the slot a moment longer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) =
        db.batch_execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cdc'")
    {
        assert!(Instant::now() < deadline, "slot cdc stays in use: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    db.batch_execute("SELECT pg_create_logical_replication_slot('cdc', 'wal2json')").unwrap();
}

/// pgbench's tps for `script` on the CDC cluster, the median of 3
/// rounds, while the CDC relay follows (`cdc-follow`, posting to a
/// counting receiver): decoding captures every write, and the walsender,
/// pg_recvlogical and the relay take their share of the cores as they
/// would in production.
pub fn write_tps(cdc: &Cluster, script: &Path, clients: usize, secs: u64) -> f64 {
    let mut db = cdc.connect();
    fresh_slot(&mut db);
    let rx = counting_receiver();
    let mut follower = relay::command(cdc, &rx, "cdc-follow").spawn().expect("the CDC relay runs");
    let mut tps: Vec<f64> = (0..3).map(|_| pgbench(cdc, script, clients, secs)).collect();
    let _ = follower.kill();
    let _ = follower.wait();
    let written: i64 = db.query_one("SELECT count(*) FROM orders", &[]).unwrap().get(0);
    assert!(rx.count() > 0, "the CDC relay posted nothing: decoding did not capture the writes");
    println!("   (CDC relay: posted {} of the {written} rows written, by the end)", rx.count());
    db.batch_execute("TRUNCATE orders").unwrap();
    median(&mut tps)
}
