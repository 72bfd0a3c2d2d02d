//! Sustained load: a paced rate for a long while, sampling delivery, the
//! backlog, the events tables' size and the worker's memory every second.

use crate::drain::counting_receiver;
use crate::latency::paced;
use outbox_testkit::{connect_port, private_mb, Cluster};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Sample {
    pub t: f64,
    pub eps: f64,
    pub backlog: f64,
    pub table_mb: f64,
    pub worker_mb: f64,
}

pub fn sustained(cluster: &Cluster, db: &mut postgres::Client, rate: f64, secs: u64) -> Vec<Sample> {
    let rx = counting_receiver();
    db.execute(
        "SELECT outbox.create_endpoint('sustained', $1, topics => '{sustained}', options => '{\"max_in_flight\": 64}')",
        &[&rx.url("/")],
    )
    .unwrap();
    let pid: i32 =
        db.query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox worker'", &[]).unwrap().get(0);
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let port = cluster.port;
    let sampler = std::thread::spawn(move || {
        let mut c = connect_port(port);
        let mut samples = Vec::new();
        let started = Instant::now();
        let mut last = (0.0, 0i64);
        while !s.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(1));
            let row = c
                .query_one(
                    "SELECT delivered, pending, (pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1'))::float8
                     FROM outbox.stats WHERE endpoint = 'sustained'",
                    &[],
                )
                .unwrap();
            let t = started.elapsed().as_secs_f64();
            let delivered: i64 = row.get(0);
            samples.push(Sample {
                t,
                eps: (delivered - last.1) as f64 / (t - last.0),
                backlog: row.get::<_, i64>(1) as f64,
                table_mb: row.get::<_, f64>(2) / 1e6,
                worker_mb: private_mb(pid),
            });
            last = (t, delivered);
        }
        samples
    });
    let counter = Arc::new(AtomicUsize::new(0));
    let emit =
        "SELECT outbox_emit('sustained', jsonb_build_object('i', $1::bigint), 'key-' || ($1::bigint % 1000))::text";
    paced(cluster, rate, secs, emit, move |row| {
        counter.fetch_add(1, Ordering::Relaxed);
        row.get(0)
    });
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    db.execute("SELECT outbox.drop_endpoint('sustained')", &[]).unwrap();
    samples
}
