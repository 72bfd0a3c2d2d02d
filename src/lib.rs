//! `outbox`: the transactional outbox inside PostgreSQL.
//!
//! Applications call `outbox_emit(...)` in their own transaction; a
//! background worker delivers the committed events to HTTP endpoints and
//! Kafka. docs/design.md describes the design and this layout.
//!
//! * Postgres side (main thread only: SPI, latches, `ereport`):
//!   [`write`] (everything that runs in the application's transaction),
//!   [`admin`] (endpoint management SQL API), [`worker`] (the launcher and
//!   the per-database workers), [`utility_hook`], [`shmem`], [`guc`],
//!   [`search_path`], [`installation`].
//! * Network side (tokio threads, never a Postgres call): [`net`], with
//!   [`egress`] (which addresses it may reach).
//! * Plain logic shared by both, testable without a server: [`config`]
//!   (endpoint configuration and event limits), [`event`], [`schedule`]
//!   (per-key ordering, windows and retries), [`error`].

use pgrx::prelude::*;

pgrx::pg_module_magic!(name, version);

mod admin;
mod config;
mod egress;
mod error;
mod event;
mod guc;
mod installation;
mod net;
mod schedule;
mod search_path;
mod shmem;
mod utility_hook;
mod worker;
mod write;

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/views.sql", name = "views", requires = ["schema"]);
extension_sql_file!(
    "../sql/capture.sql",
    name = "capture",
    requires = ["schema", "capture_row", admin::outbox::_check_topic, admin::outbox::_is_capture_trigger]
);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    // Shared memory and the background workers exist only when the library
    // is preloaded; a backend that loads it later gets the SQL functions and
    // a clear error from outbox_emit (see write/emit.rs).
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        worker::register_all();
        utility_hook::install();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn emit_writes_one_row_in_the_callers_transaction() {
        let id =
            Spi::get_one::<pgrx::Uuid>("SELECT outbox_emit('orders', '{\"a\":1}', 'k1', 'created', '{\"x\":\"y\"}')")
                .unwrap()
                .unwrap();
        let (topic, key) = Spi::get_two_with_args::<String, String>(
            "SELECT topic, key FROM outbox.events WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(topic.as_deref(), Some("orders"));
        assert_eq!(key.as_deref(), Some("k1"));
    }

    #[pg_test]
    fn emit_numbers_events_in_emit_order_within_a_transaction() {
        Spi::run("SELECT outbox_emit('t', to_jsonb(i)) FROM generate_series(1, 5) AS i").unwrap();
        let in_order = Spi::get_one::<bool>(
            "SELECT array_agg(payload::int ORDER BY txid, n) = '{1,2,3,4,5}' FROM outbox.events
             WHERE txid = pg_current_xact_id()::text::bigint",
        )
        .unwrap();
        assert_eq!(in_order, Some(true));
    }

    #[pg_test]
    fn emit_ids_are_distinct_uuid_v7() {
        let distinct = Spi::get_one::<i64>(
            "SELECT count(DISTINCT id) FROM (SELECT outbox_emit('t', '{}') AS id FROM generate_series(1, 100)) s",
        )
        .unwrap();
        assert_eq!(distinct, Some(100));
        let version = Spi::get_one::<String>("SELECT substr(outbox_emit('t', '{}')::text, 15, 1)").unwrap();
        assert_eq!(version.as_deref(), Some("7"));
    }

    /// The worker takes a tick's snapshot without a statement: it is the
    /// one `pg_current_snapshot()` gives (64-bit ids). Taken between two
    /// that agree, so a transaction of the cluster's own worker starting
    /// or ending in between cannot fail the test.
    #[pg_test]
    fn the_workers_snapshot_is_pg_current_snapshot() {
        Spi::run("SELECT pg_current_xact_id()").unwrap();
        let sql = || {
            let text = Spi::get_one::<String>("SELECT pg_current_snapshot()::text").unwrap().unwrap();
            crate::worker::ticks::parse_snapshot(&text).unwrap()
        };
        for _ in 0..100 {
            let before = sql();
            let ours = crate::worker::ticks::current_snapshot();
            if sql() == before {
                assert_eq!(ours, before);
                assert!(ours.1 > 3, "normal xids");
                return;
            }
        }
        panic!("the cluster never held still for three snapshots");
    }

    /// The worker's row reader gives what pgrx's does, for values kept in
    /// the row, NULLs, and text compressed or stored apart (the reader's
    /// other path), and refuses a column of another type.
    #[pg_test]
    fn the_workers_row_reader_reads_every_kind_of_value() {
        use crate::worker::rows;
        Spi::run(
            "CREATE TEMP TABLE r (compressed text, apart text);
             ALTER TABLE r ALTER apart SET STORAGE EXTERNAL;
             INSERT INTO r VALUES (repeat('ab', 50000), repeat('é', 5000))",
        )
        .unwrap();
        let read = Spi::connect_mut(|client| {
            let table = client.update(
                "SELECT 7::int8, -3::int4, true, 2.5::float8, '2000-01-01 00:00:01+00'::timestamptz,
                        'kept ✓'::text, NULL::text, compressed, apart FROM r",
                None,
                &[],
            )?;
            rows::each(table, |row| {
                assert!(row.i32(1).is_err(), "a bigint is not read as an integer");
                assert!(row.text(10).is_err() && row.text(0).is_err(), "no such column");
                Ok((
                    (row.i64(1)?, row.i32(2)?, row.bool(3)?, row.f64(4)?, row.timestamptz(5)?),
                    (row.text(6)?, row.text(7)?, row.text(8)?, row.text(9)?),
                ))
            })
        })
        .unwrap();
        assert_eq!(read.len(), 1);
        let (numbers, texts) = &read[0];
        assert_eq!(*numbers, (Some(7), Some(-3), Some(true), Some(2.5), Some(1_000_000)));
        assert_eq!(texts.0.as_deref(), Some("kept ✓"));
        assert_eq!(texts.1, None);
        assert_eq!(texts.2.as_deref(), Some("ab".repeat(50_000).as_str()));
        assert_eq!(texts.3.as_deref(), Some("é".repeat(5_000).as_str()));
        let stored =
            Spi::get_two::<i32, i32>("SELECT pg_column_size(compressed), pg_column_size(apart) FROM r").unwrap();
        assert!(stored.0.unwrap() < 10_000, "the first value is compressed: {stored:?}");
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'outbox'"]
    }
}
