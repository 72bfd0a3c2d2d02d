-- Privileges. Runs last, when every object exists. The roles (created or
-- adopted in schema.sql) are named by outbox.writer_role and
-- outbox.admin_role at CREATE EXTENSION.
--   writer:         may call outbox_emit, nothing else.
--   admin:          manages endpoints and captures, reads stats and secrets;
--                   is also a writer.
--   outbox_worker:  the background worker: reads and writes the outbox
--                   tables it keeps, nothing else (see docs/security.md).
-- Tables are written only through the extension's functions (SECURITY
-- DEFINER where a role needs more than it is granted) and by the worker.

REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.outbox_emit(text, jsonb, text, text, jsonb) FROM PUBLIC;

DO $grants$
DECLARE
    writer text := coalesce(nullif(pg_catalog.current_setting('outbox.writer_role', true), ''),
                                       'outbox_writer');
    admin  text := coalesce(nullif(pg_catalog.current_setting('outbox.admin_role', true), ''),
                                       'outbox_admin');
    saved  text := pg_catalog.current_setting('search_path');
    -- @extschema@ is substituted quoted as needed: used as a name, never
    -- quoted again (regprocedure prints it qualified once the search_path
    -- below is set).
    emit   pg_catalog.regprocedure := '@extschema@.outbox_emit(text, jsonb, text, text, jsonb)'::pg_catalog.regprocedure;
    home   pg_catalog.oid := '@extschema@'::pg_catalog.regnamespace::pg_catalog.oid;
BEGIN
    -- Built-in operators only (see the roles block in schema.sql).
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXECUTE pg_catalog.format('GRANT %I TO %I', writer, admin);

    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA outbox TO %I, %I, outbox_worker', writer, admin);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', emit, writer);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION outbox.emit(text, jsonb, text, text, jsonb) TO %I', writer);

    -- outbox_emit is called unqualified: whoever may create functions in
    -- its schema can put one in its place for callers who do not qualify
    -- it. Say so when that is someone other than a superuser.
    IF EXISTS (SELECT FROM pg_catalog.pg_namespace AS n
               JOIN pg_catalog.pg_roles AS o ON o.oid = n.nspowner
               WHERE n.oid = home
                 AND NOT (o.rolsuper OR (o.rolname = 'pg_database_owner' AND (
                     SELECT d.rolsuper FROM pg_catalog.pg_database AS db
                     JOIN pg_catalog.pg_roles AS d ON d.oid = db.datdba
                     WHERE db.datname = pg_catalog.current_database()))))
       OR EXISTS (SELECT FROM pg_catalog.pg_roles AS r
                  WHERE NOT r.rolsuper AND NOT pg_catalog.starts_with(r.rolname::pg_catalog.text, 'pg_')
                    AND pg_catalog.has_schema_privilege(r.oid, home, 'CREATE'))
    THEN
        RAISE WARNING 'outbox: outbox_emit is in schema %, where roles that are not superusers can create functions',
                      '@extschema@'
            USING HINT = 'Such a role can take over calls of outbox_emit that are not schema-qualified. '
                         'Call outbox.emit(...) instead, or create the extension in a schema only superusers control.';
    END IF;

    EXECUTE pg_catalog.format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox TO %I', admin);
    EXECUTE pg_catalog.format('GRANT SELECT ON outbox.endpoints, outbox.progress, outbox.captures, outbox.stats,
                                   outbox.dead_letters TO %I', admin);
    -- outbox.capture runs with the caller's rights (creating a trigger needs
    -- ownership of the table), so it records its configuration itself.
    EXECUTE pg_catalog.format('GRANT INSERT, UPDATE, DELETE ON outbox.captures TO %I', admin);

    -- The worker (see docs/security.md for why each is needed).
    EXECUTE pg_catalog.format('GRANT CONNECT ON DATABASE %I TO outbox_worker', pg_catalog.current_database());
    PERFORM pg_catalog.set_config('search_path', saved, true);
END
$grants$;

-- Monitoring: PostgreSQL's own role for monitoring tools reads the health
-- view's names, states, counts, ages and latencies, and nothing else of the
-- extension: not the URL (webhook URLs often carry their token in the path
-- or query), not error texts or disabled reasons (an endpoint's words).
-- Monitoring roles are cluster-wide by nature, as pg_stat_activity is.
GRANT USAGE ON SCHEMA outbox TO pg_monitor;
GRANT SELECT (endpoint, kind, state, pending, in_flight, delivered, retrying, failed_attempts, oldest_pending_age,
              last_success_at, last_error_at, dead, latency_p50_ms, latency_p99_ms, inexact_order_batches)
    ON outbox.stats TO pg_monitor;
GRANT EXECUTE ON FUNCTION outbox._backlog(integer) TO pg_monitor;

GRANT SELECT, TRUNCATE ON outbox.events_0, outbox.events_1 TO outbox_worker;
GRANT SELECT ON outbox.events TO outbox_worker;
GRANT SELECT, INSERT, DELETE ON outbox.ticks TO outbox_worker;
GRANT SELECT, UPDATE ON outbox.rotation TO outbox_worker;
GRANT SELECT, UPDATE (disabled_reason, updated_at) ON outbox.endpoints TO outbox_worker;
GRANT SELECT, INSERT, UPDATE ON outbox.progress TO outbox_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.parked TO outbox_worker;
GRANT USAGE ON SEQUENCE outbox.parked_seq TO outbox_worker;
GRANT EXECUTE ON FUNCTION outbox._like_patterns(text[]) TO outbox_worker;

SELECT outbox._installed();
