//! The endpoint management API (schema `outbox`). Admin only: EXECUTE is
//! granted to outbox_admin; the functions run as the extension owner
//! (SECURITY DEFINER) because admins get no write access to the tables.
//!
//! Every change notes itself in the transaction so the worker reloads its
//! endpoints as soon as the change commits (write/commit.rs).

use pgrx::prelude::*;

#[pg_schema]
pub mod outbox {
    use crate::config::{self, ConfigError};
    use crate::error::{OrRaise, SqlError};
    use crate::write::commit;
    use pgrx::datum::TimestampWithTimeZone;
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::Value;

    fn required<T>(value: Option<T>, function: &str, what: &str) -> T {
        value.unwrap_or_else(|| {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("outbox.{function}: {what} must not be null"),
            )
            .hint(format!("\\df outbox.{function} shows the arguments; only those with defaults may be left out."))
            .raise()
        })
    }

    /// Endpoints and dead letters change on the primary only: say so, as
    /// clearly as outbox_emit does (write/emit.rs). And only in tables of
    /// this library's version: after a new library was installed, ALTER
    /// EXTENSION outbox UPDATE comes first.
    fn writable(function: &str) {
        // SAFETY: plain reads of backend state.
        let (standby, read_only) = unsafe { (pg_sys::RecoveryInProgress(), pg_sys::XactReadOnly) };
        if standby {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!("outbox.{function}: this server is a hot standby"),
            )
            .hint("Manage endpoints and dead letters on the primary; a promoted standby delivers to the endpoints it has.")
            .raise();
        }
        if read_only {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!("outbox.{function}: cannot change endpoints or dead letters in a read-only transaction"),
            )
            .hint("Run it in a read-write transaction.")
            .raise();
        }
        let library = crate::installation::LIBRARY_VERSION;
        let (_, installed) = crate::installation::installed();
        if let Some(version) = installed.filter(|v| v != library) {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "outbox.{function}: the extension in this database is version {version}, the installed library \
                     version {library}"
                ),
            )
            .hint("Run ALTER EXTENSION outbox UPDATE first (see docs/operations.md, \"Upgrades\").")
            .raise();
        }
    }

    fn in_function(function: &str) -> impl Fn(ConfigError) -> ConfigError + '_ {
        move |e| e.in_function(&format!("outbox.{function}"))
    }

    fn text_array(values: Vec<Option<String>>, function: &str, what: &str) -> Vec<String> {
        values.into_iter().map(|v| required(v, function, &format!("an element of {what}"))).collect()
    }

    /// Refuse URLs outside `outbox.allowed_hosts`.
    fn check_egress(function: &str, address: &config::Address) {
        let allowed = crate::guc::allowed_hosts().map_err(in_function(function)).or_raise();
        if let Some(host) = address.hosts().into_iter().find(|h| !allowed.allows_host(h)) {
            let e = crate::egress::AllowList::host_refusal(host);
            let mut err = SqlError::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("outbox.{function}: {}", e.message),
            );
            if let Some(h) = e.hint {
                err = err.hint(h);
            }
            err.raise();
        }
    }

    fn unknown_endpoint(function: &str, name: &str) -> ! {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("outbox.{function}: endpoint {name:?} does not exist"),
        )
        .hint("SELECT name FROM outbox.endpoints lists the endpoints.")
        .raise()
    }

    /// Register an endpoint. It receives the events that commit from now on.
    #[pg_extern(security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn create_endpoint(
        name: Option<&str>,
        url: Option<&str>,
        kind: default!(Option<&str>, "'webhook'"),
        topics: default!(Option<Vec<Option<String>>>, "'{*}'"),
        options: default!(Option<JsonB>, "'{}'"),
    ) {
        const F: &str = "create_endpoint";
        writable(F);
        let name = required(name, F, "name");
        let url = required(url, F, "url");
        let kind = required(kind, F, "kind");
        let topics = text_array(required(topics, F, "topics"), F, "topics");
        let options = required(options, F, "options").0;
        let endpoint = config::Endpoint::parse(name, url, kind, &topics, &options).map_err(in_function(F)).or_raise();
        check_egress(F, &endpoint.address);

        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM outbox.endpoints WHERE name = $1)",
            &[name.into()],
        )
        .unwrap_or_default();
        if exists == Some(true) {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("outbox.{F}: endpoint {name:?} already exists"),
            )
            .hint("Use outbox.alter_endpoint to change it, or outbox.drop_endpoint first.")
            .raise();
        }
        // The new endpoint gets every event committed after this
        // transaction: the worker starts it at the last tick that does not
        // see this transaction as committed (worker/store.rs).
        Spi::run_with_args(
            "WITH e AS (
                 INSERT INTO outbox.endpoints (name, url, kind, topics, options)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id)
             INSERT INTO outbox.progress (endpoint_id, tick, start_xid)
             SELECT e.id, NULL, pg_catalog.pg_current_xact_id()::pg_catalog.text::bigint FROM e",
            &[name.into(), url.into(), kind.into(), topics.into(), JsonB(options).into()],
        )
        .expect("insert endpoint");
        commit::note_config_changed();
    }

    /// Change an endpoint. `options` is merged into the stored options (a
    /// JSON null removes a key); `url` and `topics` replace when given.
    #[pg_extern(security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn alter_endpoint(
        name: Option<&str>,
        options: default!(Option<JsonB>, "'{}'"),
        url: default!(Option<&str>, "NULL"),
        topics: default!(Option<Vec<Option<String>>>, "NULL"),
    ) {
        const F: &str = "alter_endpoint";
        writable(F);
        let name = required(name, F, "name");
        let patch = required(options, F, "options").0;
        let row = Spi::connect_mut(|client| {
            let table = client
                .update(
                    "SELECT url, kind, topics, options FROM outbox.endpoints WHERE name = $1 FOR UPDATE",
                    Some(1),
                    &[name.into()],
                )
                .ok()?;
            let row = table.first();
            Some((
                row.get::<String>(1).ok()??,
                row.get::<String>(2).ok()??,
                row.get::<Vec<String>>(3).ok()??,
                row.get::<JsonB>(4).ok()??.0,
            ))
        });
        let Some((old_url, kind, old_topics, old_options)) = row else { unknown_endpoint(F, name) };
        let url = url.map(str::to_string).unwrap_or(old_url);
        let topics = topics.map(|t| text_array(t, F, "topics")).unwrap_or(old_topics);
        let merged: Value = config::merge_options(&old_options, &patch).map_err(in_function(F)).or_raise();
        let endpoint = config::Endpoint::parse(name, &url, &kind, &topics, &merged).map_err(in_function(F)).or_raise();
        check_egress(F, &endpoint.address);
        Spi::run_with_args(
            "UPDATE outbox.endpoints SET url = $2, topics = $3, options = $4, updated_at = pg_catalog.now() WHERE name = $1",
            &[name.into(), url.into(), topics.into(), JsonB(merged).into()],
        )
        .expect("update endpoint");
        commit::note_config_changed();
    }

    /// Remove an endpoint with its progress. Undelivered events for it are
    /// no longer delivered.
    #[pg_extern(security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn drop_endpoint(name: Option<&str>) {
        const F: &str = "drop_endpoint";
        writable(F);
        let name = required(name, F, "name");
        update_endpoint(F, name, "DELETE FROM outbox.endpoints WHERE name = $1 RETURNING id");
    }

    /// Stop delivering to an endpoint; events wait for it.
    #[pg_extern(security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn pause_endpoint(name: Option<&str>) {
        const F: &str = "pause_endpoint";
        writable(F);
        let name = required(name, F, "name");
        update_endpoint(
            F,
            name,
            "UPDATE outbox.endpoints SET paused = true, updated_at = pg_catalog.now() WHERE name = $1 RETURNING id",
        );
    }

    /// Deliver to an endpoint again, also after it was disabled by 410 Gone;
    /// events waiting out a backoff or a Retry-After are tried at once.
    #[pg_extern(security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn resume_endpoint(name: Option<&str>) {
        const F: &str = "resume_endpoint";
        writable(F);
        let name = required(name, F, "name");
        update_endpoint(
            F,
            name,
            "UPDATE outbox.endpoints SET paused = false, disabled_reason = NULL, resumed_at = pg_catalog.now(),
                    updated_at = pg_catalog.now()
             WHERE name = $1 RETURNING id",
        );
    }

    fn update_endpoint(function: &str, name: &str, sql: &str) {
        let id = Spi::get_one_with_args::<i32>(sql, &[name.into()]).ok().flatten();
        if id.is_none() {
            unknown_endpoint(function, name);
        }
        commit::note_config_changed();
    }

    /// Which dead letters a replay or discard is about.
    struct DeadFilter<'a> {
        event_id: Option<pgrx::Uuid>,
        endpoint: Option<&'a str>,
        since: Option<TimestampWithTimeZone>,
        until: Option<TimestampWithTimeZone>,
    }

    const DEAD_MATCH: &str = "p.state = 'dead'
          AND ($1::pg_catalog.uuid IS NULL OR p.event_id = $1)
          AND ($2::pg_catalog.text IS NULL OR p.endpoint_id = (SELECT id FROM outbox.endpoints WHERE name = $2))
          AND ($3::pg_catalog.timestamptz IS NULL OR p.failed_at >= $3)
          AND ($4::pg_catalog.timestamptz IS NULL OR p.failed_at < $4)";

    /// Run `sql` (which uses DEAD_MATCH) for the dead letters `f` selects;
    /// returns how many rows it touched.
    fn on_dead_letters(function: &str, f: DeadFilter, sql: &str) -> i64 {
        writable(function);
        if f.event_id.is_none() && f.endpoint.is_none() && f.since.is_none() && f.until.is_none() {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("outbox.{function}: say which dead letters"),
            )
            .hint(format!(
                "Pass event_id, endpoint, since and/or until, e.g. outbox.{function}(endpoint => 'billing')."
            ))
            .raise();
        }
        if let Some(name) = f.endpoint {
            let exists = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM outbox.endpoints WHERE name = $1)",
                &[name.into()],
            )
            .ok()
            .flatten();
            if exists != Some(true) {
                unknown_endpoint(function, name);
            }
        }
        let count = Spi::get_one_with_args::<i64>(
            &sql.replace("{MATCH}", DEAD_MATCH),
            &[f.event_id.into(), f.endpoint.into(), f.since.into(), f.until.into()],
        )
        .expect("dead letter statement")
        .unwrap_or(0);
        if count > 0 {
            commit::note_config_changed();
        }
        count
    }

    /// Deliver dead letters again (from the start of their key's queue).
    /// Select them by event id, endpoint and/or when they died
    /// (`since <= failed_at < until`). Returns how many.
    #[pg_extern(security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn replay(
        event_id: default!(Option<pgrx::Uuid>, "NULL"),
        endpoint: default!(Option<&str>, "NULL"),
        since: default!(Option<TimestampWithTimeZone>, "NULL"),
        until: default!(Option<TimestampWithTimeZone>, "NULL"),
    ) -> i64 {
        on_dead_letters(
            "replay",
            DeadFilter { event_id, endpoint, since, until },
            "WITH done AS (
                 UPDATE outbox.parked AS p
                 SET state = 'pending', attempts = 0, next_attempt_at = pg_catalog.now(), failed_at = NULL
                 WHERE {MATCH}
                 RETURNING 1)
             SELECT pg_catalog.count(*) FROM done",
        )
    }

    /// Drop dead letters for good; with on_dead = 'block' this lets their
    /// keys go on. Same selection as replay. Returns how many.
    #[pg_extern(security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn discard(
        event_id: default!(Option<pgrx::Uuid>, "NULL"),
        endpoint: default!(Option<&str>, "NULL"),
        since: default!(Option<TimestampWithTimeZone>, "NULL"),
        until: default!(Option<TimestampWithTimeZone>, "NULL"),
    ) -> i64 {
        on_dead_letters(
            "discard",
            DeadFilter { event_id, endpoint, since, until },
            // A lane whose dead head is gone has a new head: give it its
            // next attempt (the worker finds heads by next_attempt_at).
            "WITH done AS (DELETE FROM outbox.parked AS p WHERE {MATCH} RETURNING p.endpoint_id, p.key),
                  heads AS (UPDATE outbox.parked AS h SET next_attempt_at = coalesce(h.next_attempt_at, pg_catalog.now())
                            WHERE h.state = 'pending'
                              AND (h.endpoint_id, h.seq) IN (
                                  SELECT q.endpoint_id, pg_catalog.min(q.seq) FROM outbox.parked AS q
                                  JOIN (SELECT DISTINCT d.endpoint_id, d.key FROM done AS d WHERE d.key IS NOT NULL) AS k
                                    ON q.endpoint_id = k.endpoint_id AND q.key = k.key AND q.state = 'pending'
                                  GROUP BY q.endpoint_id, q.key)
                            RETURNING 1)
             SELECT pg_catalog.count(*) FROM done",
        )
    }

    /// Run by CREATE EXTENSION: a worker that served an earlier
    /// installation in this database must not steer emitters to its table.
    #[pg_extern]
    fn _installed() {
        crate::shmem::forget_events_table(unsafe { pg_sys::MyDatabaseId });
        // ...and make the worker look again once this commits.
        commit::note_config_changed();
    }

    /// Whether `sql` is exactly the CREATE TRIGGER statement capture()
    /// means to run (see capture::is_capture_trigger).
    #[pg_extern(immutable, parallel_safe)]
    fn _is_capture_trigger(sql: &str, with_when: bool, args: Vec<String>) -> bool {
        crate::write::capture::is_capture_trigger(sql, with_when, &args)
    }

    /// Raise an error unless `topic` is a valid topic (used by capture()).
    #[pg_extern(immutable, parallel_safe)]
    fn _check_topic(topic: Option<&str>) {
        let topic = required(topic, "capture", "topic");
        config::check_topic(topic).map_err(in_function("capture")).or_raise();
    }
}
