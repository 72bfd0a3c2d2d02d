//! Write path: pgbench scripts for a business INSERT alone, with
//! outbox_emit, with a hand-written outbox INSERT.

use outbox_testkit::cluster::{bindir, Cluster};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn write_scripts(out: &Path) -> Vec<PathBuf> {
    let scripts = [
        ("a_bare.sql", "INSERT INTO orders (status, total) VALUES ('new', 10);"),
        (
            "b_emit.sql",
            "WITH o AS (INSERT INTO orders (status, total) VALUES ('new', 10) RETURNING id)\n\
             SELECT outbox_emit('orders', jsonb_build_object('id', o.id, 'status', 'new', 'total', 10), o.id::text, 'created') FROM o;",
        ),
        (
            "c_handwritten.sql",
            "WITH o AS (INSERT INTO orders (status, total) VALUES ('new', 10) RETURNING id)\n\
             INSERT INTO my_outbox (txid, n, id, topic, key, type, payload, headers)\n\
             SELECT pg_current_xact_id()::text::bigint, 1, gen_random_uuid(), 'orders', o.id::text, 'created',\n\
                    jsonb_build_object('id', o.id, 'status', 'new', 'total', 10), '{}' FROM o;",
        ),
    ];
    scripts
        .iter()
        .map(|(name, sql)| {
            let p = out.join(name);
            std::fs::write(&p, format!("{sql}\n")).unwrap();
            p
        })
        .collect()
}

pub fn pgbench(cluster: &Cluster, script: &Path, clients: usize, secs: u64) -> f64 {
    let out = Command::new(bindir().join("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-n", "-M", "prepared"])
        .args(["-p", &cluster.port.to_string(), "-c", &clients.to_string(), "-j", &clients.min(4).to_string()])
        .args(["-T", &secs.to_string(), "-f"])
        .arg(script)
        .arg("postgres")
        .output()
        .expect("pgbench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr)))
}
