//! `make demo`: a live run of outbox on a throwaway cluster.
//!
//! Starts PostgreSQL with the worker preloaded, a webhook receiver on
//! loopback, captures an `orders` table, runs a small workload (several
//! aggregates, concurrent writers, rolled-back transactions, an endpoint
//! that fails at first), then shows what arrived and the stats view.

use outbox_testkit::cluster::{server_dir, Cluster};
use outbox_testkit::{Receiver, Reply};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let dir = demo_dir();
    println!(
        "== starting PostgreSQL with shared_preload_libraries = 'outbox', track_commit_timestamp = on in {}",
        dir.display()
    );
    let cluster = Cluster::start_in(&dir, &["track_commit_timestamp = on"]);
    let mut db = cluster.connect();

    let receiver = Receiver::start();
    // The endpoint is down for its first three requests: the worker retries
    // with backoff, and holds back only the affected order.
    let failures = Arc::new(AtomicUsize::new(3));
    let f = failures.clone();
    receiver.respond(move |_, _| {
        if f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    });
    println!("== webhook receiver listening on {}", receiver.url("/orders"));

    let setup = format!(
        "CREATE EXTENSION outbox;
         CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, status text NOT NULL, total numeric);
         SELECT outbox.capture('orders', columns => '{{id,status,total}}');
         SELECT outbox.create_endpoint('shop-webhook', '{}', topics => '{{orders}}',
                                       options => '{{\"backoff_base_ms\": 100, \"backoff_max_ms\": 1000}}');",
        receiver.url("/orders")
    );
    println!("== setup SQL:\n{}\n", indent(&setup));
    db.batch_execute(&setup).expect("setup");

    println!(
        "== workload: 3 concurrent writers, 5 orders, each created, updated and paid; 1 in 4 transactions rolls back"
    );
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let mut c = cluster.connect();
            std::thread::spawn(move || {
                let mut committed = 0;
                let mut rolled_back = 0;
                for step in 0..8 {
                    let order = (w * 8 + step) % 5 + 1;
                    let mut tx = c.transaction().unwrap();
                    tx.execute(
                        "INSERT INTO orders VALUES ($1::int, 'customer-' || $1::int, 'created', 10 * $1::int)
                         ON CONFLICT (id) DO UPDATE SET status = CASE orders.status
                             WHEN 'created' THEN 'updated' WHEN 'updated' THEN 'paid' ELSE 'shipped' END,
                             total = orders.total + 1",
                        &[&order],
                    )
                    .unwrap();
                    if step % 4 == 3 {
                        tx.rollback().unwrap();
                        rolled_back += 1;
                    } else {
                        tx.commit().unwrap();
                        committed += 1;
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();
    let (mut committed, mut rolled_back) = (0, 0);
    for w in writers {
        let (c, r) = w.join().unwrap();
        committed += c;
        rolled_back += r;
    }
    println!("   {committed} transactions committed, {rolled_back} rolled back (their events must never arrive)\n");

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let pending: i64 = db.query_one("SELECT pending FROM outbox.stats", &[]).unwrap().get(0);
        let in_flight: i32 = db.query_one("SELECT in_flight FROM outbox.stats", &[]).unwrap().get(0);
        if pending == 0 && in_flight == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    println!("== what the receiver got, per order (aggregate), in arrival order:");
    let mut per_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut acknowledged = 0;
    for (i, r) in receiver.requests().iter().enumerate() {
        let v = r.json();
        let failed = i < 3;
        if !failed {
            acknowledged += 1;
        }
        per_order.entry(v["key"].as_str().unwrap_or("-").to_string()).or_default().push(format!(
            "{}{}",
            v["data"]["after"]["status"].as_str().or(v["type"].as_str()).unwrap_or("?"),
            if failed { " (503, retried)" } else { "" }
        ));
    }
    for (order, statuses) in &per_order {
        println!("   order {order:>2}: {}", statuses.join(" -> "));
    }
    println!("   {} requests, {acknowledged} acknowledged\n", receiver.requests().len());

    println!("== SELECT * FROM outbox.stats:");
    let row = db
        .query_one(
            "SELECT endpoint, state, pending, delivered, failed_attempts, dead, last_error,
                    round(latency_p50_ms::numeric, 1)::text, round(latency_p99_ms::numeric, 1)::text
             FROM outbox.stats",
            &[],
        )
        .unwrap();
    let names = [
        "endpoint",
        "state",
        "pending",
        "delivered",
        "failed_attempts",
        "dead",
        "last_error",
        "latency_p50_ms",
        "latency_p99_ms",
    ];
    for (i, name) in names.iter().enumerate() {
        let value = match i {
            2..=5 => row.get::<_, i64>(i).to_string(),
            _ => row.get::<_, Option<String>>(i).unwrap_or_default(),
        };
        println!("   {name:<16} {value}");
    }
    drop(db);
    drop(cluster);
    println!("\n== cluster stopped and removed");
}

/// target/demo, when the server user can reach it; else the temp dir.
fn demo_dir() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = server_dir(&target, "demo");
    let reachable = outbox_testkit::cluster::as_server_user(std::path::Path::new("test"))
        .arg("-w")
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if reachable {
        dir
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        server_dir(&std::env::temp_dir(), "outbox-demo")
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("   {}", l.trim())).collect::<Vec<_>>().join("\n")
}
