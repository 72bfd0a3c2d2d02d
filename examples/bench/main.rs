//! `make bench`: outbox measured against the alternatives, in one run, on
//! one machine, with the same settings and clients.
//!
//! - write path: pgbench, a business INSERT alone (a), with outbox_emit (b),
//!   with a hand-written INSERT into a plain outbox table (c); and (a)
//!   while logical decoding captures it (CDC, below);
//! - drain: a backlog delivered by the worker over HTTP (one event per
//!   request) and Kafka REST (batched), against the classic
//!   outbox-plus-polling relay (FOR UPDATE SKIP LOCKED) in its own process,
//!   PgQ (one consumer, pgqd ticking), and an outbox table captured by
//!   logical decoding ("outbox table + CDC", Debezium's outbox pattern:
//!   wal2json and pg_recvlogical feeding one relay, on a second cluster
//!   with wal_level = logical);
//! - latency commit to receiver at 1,000 events/s and at 80 % of the
//!   measured maximum, for outbox and the polling relay; PgQ and CDC at
//!   1,000 events/s;
//! - sustained load at 80 % of the maximum (backlog, table size, memory);
//! - scaling over keys and payload sizes.
//!
//! BENCH_SIZE=quick (seconds, a smoke run) or full (what the README
//! reports). Writes target/bench/results.json, raw.csv, latency and
//! throughput plots (SVG).

mod cdc;
mod drain;
mod latency;
mod plot;
mod profile;
mod relay;
mod sustained;
mod write_path;

use drain::{
    capacity, counting_receiver, drain_cdc, drain_kafka_native, drain_kafka_rest, drain_outbox, drain_pgq, drain_relay,
    idle_cpu_pct, kafka_v2_responder, WRITERS,
};
use latency::{latency_cdc, latency_outbox, latency_pgq, latency_relay, settle};
use outbox_testkit::cluster::{server_dir, Cluster};
use outbox_testkit::kafka::Broker;
use plot::{cdf, median, median_of, quantiles, svg_chart};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use sustained::sustained;
use write_path::{pgbench, write_scripts};

struct Size {
    name: &'static str,
    pgbench_secs: u64,
    drain_events: i64,
    latency_secs: u64,
    sustained_secs: u64,
    scaling_events: i64,
    /// Rounds of the comparisons whose ratio moves most between runs (the
    /// HTTP drain against the ordered relay, and latency at 80 %): the
    /// two systems alternate, and the median round is the result.
    rounds: usize,
}

const QUICK: Size = Size {
    name: "quick",
    pgbench_secs: 2,
    // Large enough that a drain's fixed costs (the endpoint's resume, its
    // connections) do not weigh on the rate and CPU per event.
    drain_events: 50_000,
    latency_secs: 4,
    sustained_secs: 30,
    scaling_events: 2_000,
    rounds: 3,
};
const FULL: Size = Size {
    name: "full",
    pgbench_secs: 20,
    drain_events: 100_000,
    latency_secs: 30,
    sustained_secs: 600,
    scaling_events: 100_000,
    rounds: 5,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("relay") {
        relay::main(&args[2..]);
        return;
    }
    let mut size = match std::env::var("BENCH_SIZE").as_deref() {
        Ok("full") => FULL,
        _ => QUICK,
    };
    // For profiling: BENCH_ONLY=drain BENCH_DRAIN_EVENTS=500000 runs one long drain.
    let only = std::env::var("BENCH_ONLY").ok();
    if let Some(n) = std::env::var("BENCH_DRAIN_EVENTS").ok().and_then(|v| v.parse().ok()) {
        size.drain_events = n;
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    println!("== outbox benchmark, size {} ({} cores)", size.name, std::thread::available_parallelism().unwrap());

    // Durable defaults (fsync and synchronous_commit on), as in production.
    let dir = server_dir(&std::env::temp_dir(), "outbox-bench");
    let cluster = Cluster::start_in(
        &dir,
        &[
            "fsync = on",
            "track_commit_timestamp = on",
            "shared_buffers = '256MB'",
            "max_connections = 200",
            "outbox.retention = '10s'",
        ],
    );
    let mut db = cluster.connect();
    db.batch_execute(
        "CREATE EXTENSION outbox;
         CREATE TABLE orders (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL);
         -- What a team writes by hand: the same columns and indexes.
         CREATE TABLE my_outbox (LIKE outbox.events_0 INCLUDING DEFAULTS INCLUDING INDEXES);
         -- The polling relay's table.
         CREATE TABLE relay_outbox (id bigserial PRIMARY KEY, key text, payload jsonb NOT NULL,
                                    created_at timestamptz NOT NULL DEFAULT now(), done boolean NOT NULL DEFAULT false,
                                    part int GENERATED ALWAYS AS (abs(hashtext(key)) % 16) STORED);
         CREATE INDEX relay_outbox_todo ON relay_outbox (id) WHERE NOT done;
         CREATE INDEX relay_outbox_part_todo ON relay_outbox (part, id) WHERE NOT done;",
    )
    .unwrap();

    // PgQ, the queue Skype built for this job, as a peer: a queue, one
    // consumer, and pgqd ticking (Debian's postgresql-15-pgq3 and pgqd;
    // `make bench` installs them). Set to tick on any waiting event.
    let pgqd = db
        .batch_execute(
            "CREATE EXTENSION pgq;
             SELECT pgq.create_queue('bench');
             SELECT pgq.register_consumer('bench', 'relay');
             SELECT pgq.set_queue_config('bench', 'ticker_max_count', '1');
             SELECT pgq.set_queue_config('bench', 'ticker_max_lag', '0');",
        )
        .ok()
        .and_then(|_| relay::start_pgqd(&cluster, &dir));
    if pgqd.is_none() {
        println!("PgQ: not measured (postgresql-15-pgq3 and pgqd are not installed)");
    }
    // CDC (Debian's postgresql-15-wal2json), on a cluster of its own.
    let cdc = cdc::available().then(cdc::start);
    if cdc.is_none() {
        println!("CDC: not measured (postgresql-15-wal2json is not installed)");
    }

    let mut results = serde_json::Map::new();
    let mut raw = String::from("section,label,value\n");

    if only.as_deref() == Some("capacity") {
        println!("capacity: {:.0} events/s", capacity(&cluster, &mut db, 10));
        return;
    }
    if only.as_deref() == Some("idle") {
        let [quiet, paused, down] = idle_cpu_pct(&mut db, 5);
        println!("worker CPU, % of a core: no traffic {quiet:.2}, paused with a backlog {paused:.2}, endpoint down {down:.2}");
        return;
    }
    if only.as_deref() == Some("latency") {
        // BENCH_RATE: another rate than 1,000 events/s (80 % of the
        // capacity, say).
        let rate: f64 = std::env::var("BENCH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(1000.0);
        for _ in 0..2 {
            settle(&mut db);
            let (ours, cpu_us) = latency_outbox(&cluster, &mut db, rate, size.latency_secs);
            settle(&mut db);
            let theirs = latency_relay(&cluster, &mut db, rate, size.latency_secs);
            let (q, r) = (quantiles(&ours.ms), quantiles(&theirs.ms));
            println!(
                "{rate:.0} events/s, p50/p99 ms: outbox {:.2}/{:.2} at {:.0}/s (worker {cpu_us:.1} us/event), \
                 polling relay {:.2}/{:.2} at {:.0}/s",
                q[0], q[2], ours.rate, r[0], r[2], theirs.rate
            );
        }
        return;
    }
    if only.as_deref() == Some("drain") {
        let http = counting_receiver();
        let inflight: i64 = std::env::var("BENCH_IN_FLIGHT").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
        if std::env::var("BENCH_HTTP2").is_ok() {
            let h2 = outbox_testkit::H2Receiver::start();
            let drained = drain_outbox(
                &cluster,
                &mut db,
                &h2.url("/"),
                "webhook",
                json!({"max_in_flight": inflight, "http_version": "2"}),
                size.drain_events,
                1000,
                64,
            );
            println!(
                "outbox, HTTP/2, one event per request, {inflight} in flight: {:.0} events/s, worker CPU {:.1} us/event",
                drained.eps, drained.cpu_us_per_event
            );
        }
        let profiler = std::env::var("BENCH_PROFILE")
            .is_ok()
            .then(|| profile::start(outbox_testkit::worker_pid(&mut db), &out.join("worker_drain.perf")))
            .flatten();
        let drained = drain_outbox(
            &cluster,
            &mut db,
            &http.url("/"),
            "webhook",
            json!({"max_in_flight": inflight}),
            size.drain_events,
            1000,
            64,
        );
        if let Some(p) = profiler {
            let svg = out.join("worker_drain_flamegraph.svg");
            println!("profile: {:?} -> {}", p.finish("outbox worker, HTTP drain", &svg), svg.display());
        }
        println!(
            "outbox, HTTP, one event per request, {inflight} in flight: {:.0} events/s, worker CPU {:.1} us/event, \
             with the database {:.1}",
            drained.eps, drained.cpu_us_per_event, drained.total_cpu_us_per_event
        );
        let relay = drain_relay(&cluster, &mut db, &http, size.drain_events, 1000, "drain-ordered");
        println!(
            "polling relay, ordered: {:.0} events/s, relay CPU {:.1} us/event, with the database {:.1}; \
             outbox/relay {:.2}",
            relay.eps,
            relay.cpu_us_per_event,
            relay.total_cpu_us_per_event,
            drained.eps / relay.eps
        );
        return;
    }

    if only.as_deref() == Some("kafka") {
        let rest = drain_kafka_rest(&cluster, &mut db, &kafka_v2_responder().url("/"), size.drain_events);
        let broker = Broker::start();
        broker.create_topic("drain");
        let native = drain_kafka_native(&cluster, &mut db, &format!("kafka://{}", broker.addr), size.drain_events);
        println!(
            "Kafka REST v2, batched: {:.0} events/s, worker CPU {:.1} us/event; Kafka native: {:.0} events/s, \
             worker CPU {:.1} us/event",
            rest.eps, rest.cpu_us_per_event, native.eps, native.cpu_us_per_event
        );
        return;
    }
    if only.as_deref() == Some("cdc") {
        let Some(cdc) = &cdc else { return };
        let scripts = write_scripts(&out);
        let mut emit: Vec<f64> = (0..3).map(|_| pgbench(&cluster, &scripts[1], 16, size.pgbench_secs)).collect();
        let emit = median(&mut emit);
        let bare_cdc = cdc::write_tps(cdc, &scripts[0], 16, size.pgbench_secs);
        db.batch_execute("TRUNCATE orders").unwrap();
        println!(
            "write, 16 clients: (b) +emit {emit:.0} tps, (a) insert captured by CDC {bare_cdc:.0} tps, ratio {:.3}",
            emit / bare_cdc
        );
        let eps = drain_cdc(cdc, &counting_receiver(), size.drain_events, 1000);
        println!("drain of {} events, outbox table + CDC, one relay: {eps:.0} events/s", size.drain_events);
        let q = quantiles(&latency_cdc(cdc, 1000.0, size.latency_secs).ms);
        println!("1,000 events/s, p50/p99 ms: CDC {:.2}/{:.2}", q[0], q[2]);
        return;
    }

    // 1. Write path.
    println!("\n== write path: transactions/s (pgbench, single-statement transactions)");
    let scripts = write_scripts(&out);
    println!(
        "{:>8} {:>12} {:>12} {:>14} {:>8} {:>8}",
        "clients", "(a) insert", "(b) +emit", "(c) +hand-made", "b/a", "b/c"
    );
    for clients in [1, 4, 16] {
        // Three rounds of a, b, c in turn; the median of each damps the
        // noise of a shared 2-core machine.
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); scripts.len()];
        for _ in 0..3 {
            for (i, s) in scripts.iter().enumerate() {
                runs[i].push(pgbench(&cluster, s, clients, size.pgbench_secs));
            }
        }
        let tps: Vec<f64> = runs.iter_mut().map(|r| median(r)).collect();
        let (a, b, c) = (tps[0], tps[1], tps[2]);
        println!("{clients:>8} {a:>12.0} {b:>12.0} {c:>14.0} {:>8.3} {:>8.3}", b / a, b / c);
        record(&mut results, &format!("write_tps_bare_{clients}"), a);
        record(&mut results, &format!("write_tps_emit_{clients}"), b);
        record(&mut results, &format!("write_tps_handwritten_{clients}"), c);
        if clients == 16 {
            record(&mut results, "write_ratio_vs_bare", b / a);
            record(&mut results, "write_ratio_vs_handwritten", b / c);
            // With CDC the business write is all the application does;
            // decoding captures it on the CDC cluster.
            if let Some(cdc) = &cdc {
                let bare_cdc = cdc::write_tps(cdc, &scripts[0], clients, size.pgbench_secs);
                println!(
                    "{clients:>8} {bare_cdc:>12.0} (a) on the CDC cluster, decoding capturing it; b / that: {:.3}",
                    b / bare_cdc
                );
                record(&mut results, "write_tps_bare_cdc_16", bare_cdc);
                record(&mut results, "write_ratio_vs_cdc", b / bare_cdc);
            }
        }
    }
    db.batch_execute("TRUNCATE orders, my_outbox").unwrap();

    // 2. Drain.
    println!("\n== drain: a backlog of {} events over 1,000 keys", size.drain_events);
    let http = counting_receiver();
    let drain_http = |db: &mut postgres::Client| {
        drain_outbox(&cluster, db, &http.url("/"), "webhook", json!({"max_in_flight": 64}), size.drain_events, 1000, 64)
    };
    let http_drain = drain_http(&mut db);
    let eps_http = http_drain.eps;
    // The same drain again, profiled (perf slows what it watches, so not
    // the one measured above): where the worker's time goes.
    let profiler = profile::start(outbox_testkit::worker_pid(&mut db), &out.join("worker_drain.perf"));
    drain_http(&mut db);
    match profiler
        .map(|p| p.finish("outbox worker, HTTP drain, one event per request", &out.join("worker_drain_flamegraph.svg")))
    {
        Some(Ok((main, net))) => println!(
            "profile: {:.0} % of the worker's samples on its main thread, {:.0} % in its network threads \
             (worker_drain_flamegraph.svg)",
            main * 100.0,
            net * 100.0
        ),
        Some(Err(e)) => println!("profile: none ({e})"),
        None => println!("profile: none (perf is not installed: apt-get install linux-perf)"),
    }
    println!(
        "outbox, HTTP, one event per request:   {eps_http:>10.0} events/s, worker CPU {:.1} us/event, \
         with the database {:.1}",
        http_drain.cpu_us_per_event, http_drain.total_cpu_us_per_event
    );
    // The same over HTTP/2 (h2c, prior knowledge): one connection carries
    // every request in flight.
    let h2 = outbox_testkit::H2Receiver::start();
    let h2_drain = drain_outbox(
        &cluster,
        &mut db,
        &h2.url("/"),
        "webhook",
        json!({"max_in_flight": 64, "http_version": "2"}),
        size.drain_events,
        1000,
        64,
    );
    println!(
        "outbox, HTTP/2, one event per request: {:>10.0} events/s, worker CPU {:.1} us/event",
        h2_drain.eps, h2_drain.cpu_us_per_event
    );
    record(&mut results, "drain_http2_eps", h2_drain.eps);
    record(&mut results, "worker_cpu_us_per_event_http2", h2_drain.cpu_us_per_event);
    record(&mut results, "drain_ratio_http2_vs_http1", h2_drain.eps / eps_http);
    let relay = drain_relay(&cluster, &mut db, &http, size.drain_events, 1000, "drain");
    let eps_relay = relay.eps;
    println!(
        "polling relay, 16 workers, SKIP LOCKED (no per-key order): {eps_relay:>9.0} events/s, relay CPU {:.1} us/event, \
         with the database {:.1}",
        relay.cpu_us_per_event, relay.total_cpu_us_per_event
    );
    let ordered = drain_relay(&cluster, &mut db, &http, size.drain_events, 1000, "drain-ordered");
    let eps_ordered = ordered.eps;
    println!(
        "polling relay, 16 workers, one per key partition (ordered):  {eps_ordered:>9.0} events/s, relay CPU {:.1} \
         us/event, with the database {:.1}",
        ordered.cpu_us_per_event, ordered.total_cpu_us_per_event
    );
    // More rounds of the two, alternating which goes first: on this
    // machine one pair of drains moves by a fifth either way.
    let (mut ours, mut theirs) = (vec![eps_http], vec![eps_ordered]);
    for round in 1..size.rounds {
        let relay_first = round % 2 == 1;
        if relay_first {
            theirs.push(drain_relay(&cluster, &mut db, &http, size.drain_events, 1000, "drain-ordered").eps);
        }
        ours.push(drain_http(&mut db).eps);
        if !relay_first {
            theirs.push(drain_relay(&cluster, &mut db, &http, size.drain_events, 1000, "drain-ordered").eps);
        }
    }
    let mut ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
    println!(
        "rounds, outbox HTTP / ordered relay: {}",
        ours.iter().zip(&theirs).map(|(a, b)| format!("{a:.0}/{b:.0} = {:.2}", a / b)).collect::<Vec<_>>().join(", ")
    );
    results.insert("drain_http_eps_rounds".into(), json!(ours));
    results.insert("drain_polling_ordered_eps_rounds".into(), json!(theirs));
    results.insert("drain_ratio_vs_polling_ordered_rounds".into(), json!(ratios));
    let ratio_ordered = median(&mut ratios);
    println!("ratio outbox HTTP / ordered relay, median of {} rounds: {ratio_ordered:.2}", ours.len());
    record(&mut results, "relay_cpu_us_per_event_ordered", ordered.cpu_us_per_event);
    record(&mut results, "relay_total_cpu_us_per_event_ordered", ordered.total_cpu_us_per_event);
    record(&mut results, "total_cpu_us_per_event_http", http_drain.total_cpu_us_per_event);
    if pgqd.is_some() {
        let eps_pgq = drain_pgq(&cluster, &mut db, &http, size.drain_events, 1000);
        println!("PgQ, one consumer, pgqd ticking:         {eps_pgq:>9.0} events/s");
        record(&mut results, "drain_pgq_eps", eps_pgq);
        record(&mut results, "drain_ratio_vs_pgq", eps_http / eps_pgq);
    }
    if let Some(cdc) = &cdc {
        let eps_cdc = drain_cdc(cdc, &http, size.drain_events, 1000);
        println!("outbox table + CDC, one relay:           {eps_cdc:>9.0} events/s");
        record(&mut results, "drain_cdc_eps", eps_cdc);
        record(&mut results, "drain_ratio_vs_cdc", eps_http / eps_cdc);
    }
    let kafka = kafka_v2_responder();
    let kafka_drain = drain_kafka_rest(&cluster, &mut db, &kafka.url("/"), size.drain_events);
    let eps_kafka = kafka_drain.eps;
    println!(
        "outbox, Kafka REST v2, batched:         {eps_kafka:>9.0} events/s, worker CPU {:.1} us/event",
        kafka_drain.cpu_us_per_event
    );
    // Native Kafka into a real broker (Tansu, memory storage, on this
    // machine), where the REST figure above has no broker behind it.
    let broker = Broker::start();
    broker.create_topic("drain");
    let brokers = format!("kafka://{}", broker.addr);
    let native = drain_kafka_native(&cluster, &mut db, &brokers, size.drain_events);
    println!(
        "outbox, Kafka native, into the broker:  {:>9.0} events/s, worker CPU {:.1} us/event",
        native.eps, native.cpu_us_per_event
    );
    // One key: a hot aggregate. HTTP and Kafka REST by default send one
    // event of a key per round trip; native Kafka (and REST with
    // max_per_key) send runs of the key.
    let one_key = size.drain_events.min(20_000);
    let native_one = drain_outbox(&cluster, &mut db, &brokers, "kafka", json!({}), one_key, 1, 64).eps;
    let rest_one = drain_outbox(
        &cluster,
        &mut db,
        &kafka.url("/"),
        "kafka_rest_v2",
        json!({"batch_size": 500, "max_per_key": 500}),
        one_key,
        1,
        64,
    )
    .eps;
    let http_one = drain_outbox(&cluster, &mut db, &http.url("/"), "webhook", json!({}), one_key.min(5_000), 1, 64).eps;
    println!("one key, {one_key} events: Kafka native {native_one:.0}, Kafka REST (max_per_key 500) {rest_one:.0}, HTTP {http_one:.0} events/s");
    record(&mut results, "drain_kafka_native_eps", native.eps);
    record(&mut results, "worker_cpu_us_per_event_kafka_native", native.cpu_us_per_event);
    record(&mut results, "worker_cpu_us_per_event_http", http_drain.cpu_us_per_event);
    record(&mut results, "worker_cpu_us_per_event_kafka", kafka_drain.cpu_us_per_event);
    record(&mut results, "drain_kafka_native_one_key_eps", native_one);
    record(&mut results, "drain_kafka_rest_one_key_eps", rest_one);
    record(&mut results, "drain_http_one_key_eps", http_one);
    record(&mut results, "drain_ratio_kafka_native_vs_rest", native.eps / eps_kafka);
    println!("ratio outbox HTTP / polling relay:      {:>9.2}", eps_http / eps_relay);
    record(&mut results, "drain_http_eps", eps_http);
    record(&mut results, "drain_polling_eps", eps_relay);
    record(&mut results, "drain_polling_ordered_eps", eps_ordered);
    record(&mut results, "drain_ratio_vs_polling_ordered", ratio_ordered);
    record(&mut results, "drain_kafka_eps", eps_kafka);
    record(&mut results, "drain_ratio_vs_polling", eps_http / eps_relay);

    // Nothing to send: the worker should sleep, not poll.
    let [quiet, paused, down] = idle_cpu_pct(&mut db, size.latency_secs.max(5));
    println!(
        "worker CPU with nothing to send: {quiet:.2} % of a core (no traffic), {paused:.2} % (paused, backlog), \
         {down:.2} % (endpoint down, backing off)"
    );
    record(&mut results, "worker_idle_cpu_pct", quiet);
    record(&mut results, "worker_paused_cpu_pct", paused);
    record(&mut results, "worker_down_cpu_pct", down);

    // The maximum the machine sustains while writing and delivering at
    // once (both compete for its cores).
    let capacity = capacity(&cluster, &mut db, size.latency_secs.max(6));
    println!(
        "\n== capacity, writing and delivering at once ({WRITERS} writers, as fast as they go): {capacity:.0} events/s"
    );
    record(&mut results, "capacity_eps", capacity);

    // 3. Latency.
    println!("\n== latency, commit to receiver");
    let rate80 = capacity * 0.8;
    let mut cdf_series = Vec::new();
    for (label, rate) in [("1k", 1000.0), ("80pct", rate80)] {
        // Rounds alternate which system goes first; each figure below is
        // the median over the rounds (at 80 % one round moves a lot: the
        // cores are saturated).
        let mut rounds = Vec::new();
        for round in 0..size.rounds {
            let mut theirs = None;
            if round % 2 == 1 {
                settle(&mut db);
                theirs = Some(latency_relay(&cluster, &mut db, rate, size.latency_secs));
            }
            settle(&mut db);
            let (ours, cpu_us) = latency_outbox(&cluster, &mut db, rate, size.latency_secs);
            let theirs = theirs.unwrap_or_else(|| {
                settle(&mut db);
                latency_relay(&cluster, &mut db, rate, size.latency_secs)
            });
            let (q, r) = (quantiles(&ours.ms), quantiles(&theirs.ms));
            println!(
                "{:>34} outbox p50/p99 {:.2}/{:.2} ms (written {:.0}/s, worker {cpu_us:.1} us/event), \
                 relay {:.2}/{:.2} ms (written {:.0}/s)",
                format!("round {} at {rate:.0} events/s:", round + 1),
                q[0],
                q[2],
                ours.rate,
                r[0],
                r[2],
                theirs.rate
            );
            if label == "1k" && round == 0 {
                cdf_series.push(("outbox, 1,000 events/s".to_string(), cdf(&ours.ms)));
                cdf_series.push(("polling relay, 1,000 events/s".to_string(), cdf(&theirs.ms)));
            }
            rounds.push(([q, r], [ours.rate, theirs.rate], cpu_us));
        }
        let met =
            rounds.iter().filter(|([q, r], _, _)| q[0] <= 5.0 && q[2] <= 25.0 && q[0] <= r[0] && q[2] <= r[2]).count();
        let cpu_us = median_of(rounds.iter().map(|(_, _, c)| *c));
        println!("{:>34} {cpu_us:.1} us of CPU per event", format!("(the worker at {rate:.0} events/s)"));
        println!("{:>34} {met} of {} rounds within p50 <= 5, p99 <= 25 ms and at most the relay's", "", rounds.len());
        println!("{:>34} {:>8} {:>8} {:>8} {:>8}", "median of the rounds", "p50 ms", "p95 ms", "p99 ms", "max ms");
        record(&mut results, &format!("worker_cpu_us_per_event_lat_{label}"), cpu_us);
        record(&mut results, &format!("lat_{label}_rounds_met"), met as f64);
        results.insert(
            format!("lat_{label}_rounds_p50_p99_ms"),
            json!(rounds.iter().map(|([q, r], _, _)| [q[0], q[2], r[0], r[2]]).collect::<Vec<_>>()),
        );
        // Per system, the median of each quantile, and of the rate written.
        let medians: [([f64; 4], f64); 2] = std::array::from_fn(|i| {
            (
                std::array::from_fn(|k| median_of(rounds.iter().map(|(qs, _, _)| qs[i][k]))),
                median_of(rounds.iter().map(|(_, w, _)| w[i])),
            )
        });
        for (who, (q, written)) in ["outbox", "polling relay"].into_iter().zip(medians) {
            println!(
                "{:>34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}   (written at {:.0}/s)",
                format!("{who} at {rate:.0} events/s"),
                q[0],
                q[1],
                q[2],
                q[3],
                written
            );
            let prefix = if who == "outbox" { format!("lat_{label}") } else { format!("polling_lat_{label}") };
            for (name, v) in ["p50", "p95", "p99", "max"].iter().zip(q) {
                record(&mut results, &format!("{prefix}_{name}_ms"), v);
            }
            // What the writers reached: a run below its rate measured less.
            record(&mut results, &format!("{prefix}_written_per_s"), written);
        }
        if label == "80pct" {
            // The relay's writers do not reach this rate (its 16 workers
            // and their backends take the cores from them): the worker
            // again, at the rate the relay carried, for a comparison at
            // the same load.
            let ([relay, _, relay99, _], carried) = medians[1];
            let mut same = Vec::new();
            for _ in 0..size.rounds {
                settle(&mut db);
                let (ours, _) = latency_outbox(&cluster, &mut db, carried, size.latency_secs);
                let q = quantiles(&ours.ms);
                same.push((q[0], q[2], ours.rate));
            }
            let met = same.iter().filter(|(p50, p99, _)| *p50 <= relay && *p99 <= relay99).count();
            let p50 = median_of(same.iter().map(|s| s.0));
            let p99 = median_of(same.iter().map(|s| s.1));
            println!(
                "{:>34} {:>8.2} {:>17.2}            (rounds: {}; {met} of {} at most the relay's p50 and p99)",
                format!("outbox at {carried:.0} (relay's rate)"),
                p50,
                p99,
                same.iter().map(|(a, b, w)| format!("{a:.2}/{b:.2} at {w:.0}/s")).collect::<Vec<_>>().join(", "),
                same.len()
            );
            record(&mut results, "lat_80pct_relay_carried_per_s", carried);
            record(&mut results, "lat_80pct_at_relay_rate_p50_ms", p50);
            record(&mut results, "lat_80pct_at_relay_rate_p99_ms", p99);
            record(&mut results, "lat_80pct_at_relay_rate_rounds_met", met as f64);
        }
    }
    if pgqd.is_some() {
        settle(&mut db);
        let q = quantiles(&latency_pgq(&cluster, 1000.0, size.latency_secs).ms);
        println!(
            "{:>34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            "PgQ at 1000 events/s (50 ms ticks)", q[0], q[1], q[2], q[3]
        );
        record(&mut results, "lat_1k_pgq_p50_ms", q[0]);
        record(&mut results, "lat_1k_pgq_p99_ms", q[2]);
    }
    if let Some(cdc) = &cdc {
        settle(&mut db);
        let q = quantiles(&latency_cdc(cdc, 1000.0, size.latency_secs).ms);
        println!("{:>34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}", "CDC at 1000 events/s (wal2json)", q[0], q[1], q[2], q[3]);
        record(&mut results, "lat_1k_cdc_p50_ms", q[0]);
        record(&mut results, "lat_1k_cdc_p99_ms", q[2]);
    }
    std::fs::write(
        out.join("latency_cdf.svg"),
        svg_chart("Latency, commit to receiver, 1,000 events/s", "ms", "fraction", &cdf_series, true),
    )
    .unwrap();

    // 4. Sustained load.
    let sustained_rate = rate80;
    println!("\n== sustained: {sustained_rate:.0} events/s (80 % of the maximum) for {} s", size.sustained_secs);
    let samples = sustained(&cluster, &mut db, sustained_rate, size.sustained_secs);
    let growth =
        samples.last().map_or(0.0, |s| s.backlog) - samples.iter().find(|s| s.t >= 5.0).map_or(0.0, |s| s.backlog);
    let rss_max = samples.iter().map(|s| s.worker_mb).fold(0.0, f64::max);
    let table_max = samples.iter().map(|s| s.table_mb).fold(0.0, f64::max);
    println!("backlog growth (end minus start, after 5 s warm-up): {growth:.0} events");
    println!("worker private memory max: {rss_max:.1} MB; events tables max {table_max:.1} MB");
    record(&mut results, "sustained_rate_eps", sustained_rate);
    record(&mut results, "sustained_backlog_growth", growth);
    record(&mut results, "worker_rss_max_mb", rss_max);
    record(&mut results, "sustained_table_max_mb", table_max);
    for s in &samples {
        writeln!(
            raw,
            "sustained,t={:.0}s,{{\"delivered_eps\":{:.0},\"backlog\":{:.0},\"table_mb\":{:.2},\"worker_mb\":{:.1}}}",
            s.t, s.eps, s.backlog, s.table_mb, s.worker_mb
        )
        .unwrap();
    }
    let series = vec![
        ("delivered events/s".to_string(), samples.iter().map(|s| (s.t, s.eps)).collect()),
        ("backlog (events)".to_string(), samples.iter().map(|s| (s.t, s.backlog)).collect()),
    ];
    std::fs::write(
        out.join("sustained_throughput.svg"),
        svg_chart("Sustained load: throughput and backlog", "s", "events", &series, false),
    )
    .unwrap();
    let series = vec![
        ("events tables MB".to_string(), samples.iter().map(|s| (s.t, s.table_mb)).collect()),
        ("worker private MB".to_string(), samples.iter().map(|s| (s.t, s.worker_mb)).collect()),
    ];
    std::fs::write(
        out.join("sustained_size.svg"),
        svg_chart("Sustained load: table size and worker memory", "s", "MB", &series, false),
    )
    .unwrap();

    // 5. Scaling.
    println!("\n== scaling: drain of {} events", size.scaling_events);
    for keys in [1i64, 16, 1024, 100_000] {
        let n = if keys == 1 { size.scaling_events.min(5_000) } else { size.scaling_events };
        let eps =
            drain_outbox(&cluster, &mut db, &http.url("/"), "webhook", json!({"max_in_flight": 64}), n, keys, 64).eps;
        println!("{keys:>7} keys, 64 B payload: {eps:>10.0} events/s");
        record(&mut results, &format!("scaling_keys_{keys}_eps"), eps);
    }
    for bytes in [100, 1024, 16 * 1024] {
        let eps = drain_outbox(
            &cluster,
            &mut db,
            &http.url("/"),
            "webhook",
            json!({"max_in_flight": 64}),
            size.scaling_events,
            1000,
            bytes,
        )
        .eps;
        println!("1000 keys, {bytes:>6} B payload: {eps:>10.0} events/s");
        record(&mut results, &format!("scaling_payload_{bytes}_eps"), eps);
    }

    for (k, v) in &results {
        writeln!(raw, "result,{k},{v}").unwrap();
    }
    results.insert("size".into(), json!(size.name));
    results.insert("cores".into(), json!(std::thread::available_parallelism().map_or(0, |n| n.get())));
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&Value::Object(results)).unwrap()).unwrap();
    std::fs::write(out.join("raw.csv"), raw).unwrap();
    println!(
        "\nwrote {}/results.json, raw.csv, latency_cdf.svg, sustained_throughput.svg, sustained_size.svg",
        out.display()
    );
    drop(db);
    drop(cdc);
    drop(cluster);
}

fn record(results: &mut serde_json::Map<String, Value>, key: &str, value: f64) {
    results.insert(key.into(), json!(value));
}
