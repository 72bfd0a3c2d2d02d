-- outbox 0.1.0 -> 0.2.0, run by ALTER EXTENSION outbox UPDATE.
--
-- Written by hand: pgrx generates the install script of each version
-- (outbox--0.2.0.sql), not the way from one to the next. Every schema
-- change from now on comes with such a script, and tests/lifecycle.rs
-- checks that an updated database has the catalog of a new one.
--
-- Nothing is lost: events, ticks, progress, parked rows and dead letters
-- stay where they are; the new columns get values that mean what the 0.1.0
-- rows meant. Install the new library and restart the server first (the
-- library is preloaded); until this script has run, applications go on
-- emitting (outbox_emit writes 0.1.0's rows), the admin functions refuse
-- with a hint, and the worker waits. See docs/operations.md, "Upgrades".

\echo Use "ALTER EXTENSION outbox UPDATE" to load this file. \quit

-- Only built-in functions, operators and types, whatever someone created in
-- the extension's schema (an operator of exactly matching types would win
-- over a built-in one that needs a cast): every object of the extension is
-- named with its schema below. ALTER EXTENSION restores the setting after
-- the script.
SET LOCAL search_path = pg_catalog, pg_temp;

-- Roles. 0.1.0 created outbox_writer and outbox_admin for the whole
-- cluster, and its worker ran as a superuser. 0.2.0 gives each database
-- roles of its own (outbox.writer_role, outbox.admin_role) and runs the
-- worker as outbox_worker, a role without rights of its own. The 0.1.0
-- roles are kept, and marked as this database's, when they hold rights in
-- no other database; otherwise the update stops and says how to choose
-- roles for this database, whose rights it then moves to them.
DO $roles$
DECLARE
    db     text := pg_catalog.current_database();
    writer text := coalesce(nullif(pg_catalog.current_setting('outbox.writer_role', true), ''),
                                       'outbox_writer');
    admin  text := coalesce(nullif(pg_catalog.current_setting('outbox.admin_role', true), ''),
                                       'outbox_admin');
    r      record;
    marker text;
    other  text;
    hint   text := 'Set outbox.writer_role and outbox.admin_role to two new roles for this database (ALTER DATABASE ... SET, '
                   'then reconnect; or SET in this session) and run ALTER EXTENSION outbox UPDATE again: the update '
                   'grants them the rights outbox_writer and outbox_admin have here.';
BEGIN
    IF writer = admin OR 'outbox_worker' IN (writer, admin) THEN
        RAISE EXCEPTION 'outbox: the writer, admin and worker roles must be three different roles'
            USING ERRCODE = 'invalid_parameter_value', HINT = hint;
    END IF;
    -- 0.1.0 made outbox_admin a member of outbox_writer: keeping one of
    -- them for this database while the other goes on serving others would
    -- let the other databases' admins emit here.
    IF (writer = 'outbox_writer') <> (admin = 'outbox_admin')
       AND EXISTS (SELECT FROM pg_catalog.pg_roles AS a WHERE a.rolname = 'outbox_writer')
       AND EXISTS (SELECT FROM pg_catalog.pg_roles AS a WHERE a.rolname = 'outbox_admin') THEN
        RAISE EXCEPTION 'outbox: choose new roles for both the writer and the admin of this database, or for neither'
            USING ERRCODE = 'invalid_parameter_value', HINT = hint;
    END IF;
    FOR r IN SELECT v.name, v.kind, v.legacy
             FROM (VALUES (writer, 'writer', 'outbox_writer'), (admin, 'admin', 'outbox_admin'),
                          ('outbox_worker', 'worker', NULL)) AS v(name, kind, legacy)
    LOOP
        marker := CASE r.kind WHEN 'worker' THEN 'outbox worker role'
                              ELSE pg_catalog.format('outbox %s role of database %s', r.kind, pg_catalog.quote_ident(db)) END;
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles AS a WHERE a.rolname = r.name) THEN
            IF r.kind = 'worker' THEN
                EXECUTE pg_catalog.format('CREATE ROLE %I %s NOINHERIT', r.name,
                    CASE WHEN pg_catalog.current_setting('server_version_num')::pg_catalog.int4 < 170000
                         THEN 'LOGIN' ELSE 'NOLOGIN' END);
            ELSE
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r.name);
            END IF;
            EXECUTE pg_catalog.format('COMMENT ON ROLE %I IS %L', r.name, marker);
            CONTINUE;
        END IF;
        -- A 0.1.0 role carries no marker; any other role must carry ours.
        IF pg_catalog.shobj_description((SELECT a.oid FROM pg_catalog.pg_roles AS a WHERE a.rolname = r.name),
                                        'pg_authid') IS DISTINCT FROM marker
           AND NOT (r.legacy IS NOT NULL AND r.name = r.legacy AND pg_catalog.shobj_description(
                        (SELECT a.oid FROM pg_catalog.pg_roles AS a WHERE a.rolname = r.name), 'pg_authid') IS NULL) THEN
            RAISE EXCEPTION 'outbox: role % exists and was not created by outbox for this database', r.name
                USING ERRCODE = 'duplicate_object', HINT = hint;
        END IF;
        IF EXISTS (SELECT FROM pg_catalog.pg_roles AS a WHERE a.rolname = r.name
                   AND (a.rolsuper OR a.rolcreaterole OR a.rolcreatedb OR a.rolreplication OR a.rolbypassrls
                        OR (a.rolcanlogin AND r.kind <> 'worker'))) THEN
            RAISE EXCEPTION 'outbox: role % has attributes outbox does not give it (superuser, login, createrole, ...)', r.name
                USING ERRCODE = 'insufficient_privilege', HINT = 'ALTER ROLE it back, or drop it.';
        END IF;
        IF EXISTS (SELECT FROM pg_catalog.pg_authid AS a WHERE a.rolname = r.name AND a.rolpassword IS NOT NULL) THEN
            RAISE EXCEPTION 'outbox: role % has a password; outbox''s roles have none', r.name
                USING ERRCODE = 'insufficient_privilege', HINT = 'ALTER ROLE it PASSWORD NULL, or drop it.';
        END IF;
        -- What the role may do through other roles: nothing but the admin
        -- role's membership in the writer role, which outbox grants.
        IF EXISTS (SELECT FROM pg_catalog.pg_auth_members AS m
                   JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid
                   WHERE m.member = (SELECT b.oid FROM pg_catalog.pg_roles AS b WHERE b.rolname = r.name)
                     AND NOT (r.kind = 'admin' AND g.rolname = writer)) THEN
            RAISE EXCEPTION 'outbox: role % is a member of roles outbox did not grant it', r.name
                USING ERRCODE = 'insufficient_privilege', HINT = 'Revoke those memberships, or drop the role.';
        END IF;
        IF EXISTS (SELECT FROM pg_catalog.pg_auth_members AS m JOIN pg_catalog.pg_roles AS a ON a.oid = m.member
                   WHERE m.roleid = (SELECT b.oid FROM pg_catalog.pg_roles AS b WHERE b.rolname = r.name)
                     AND NOT a.rolsuper AND (m.admin_option OR r.kind = 'worker')) THEN
            RAISE EXCEPTION 'outbox: role % can be granted by a role that is not a superuser%', r.name,
                CASE r.kind WHEN 'worker' THEN ', or has members' ELSE '' END
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Revoke those memberships (ADMIN OPTION) first: nobody but superusers may hand out outbox''s roles.';
        END IF;
        IF r.kind <> 'worker' THEN
            SELECT d.datname INTO other
            FROM pg_catalog.pg_shdepend AS s JOIN pg_catalog.pg_database AS d ON d.oid = s.dbid
            WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass::pg_catalog.oid
              AND s.refobjid = (SELECT a.oid FROM pg_catalog.pg_roles AS a WHERE a.rolname = r.name)
              AND d.datname <> db
            LIMIT 1;
            IF other IS NOT NULL THEN
                RAISE EXCEPTION 'outbox: role % holds rights in database %; rights of one database must not reach another', r.name, other
                    USING ERRCODE = 'duplicate_object', HINT = hint;
            END IF;
        END IF;
        EXECUTE pg_catalog.format('COMMENT ON ROLE %I IS %L', r.name, marker);
    END LOOP;

    -- Roles chosen for this database take over from 0.1.0's here: the
    -- grants below give them their rights; 0.1.0's lose theirs in this
    -- database. Memberships are cluster-wide and stay as they are: who may
    -- emit here is granted the new writer role by the administrator.
    FOR r IN SELECT v.legacy, v.name
             FROM (VALUES ('outbox_writer', writer), ('outbox_admin', admin)) AS v(legacy, name)
             WHERE v.legacy <> v.name
               AND EXISTS (SELECT FROM pg_catalog.pg_roles AS a WHERE a.rolname = v.legacy)
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM %I', r.legacy);
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM %I', r.legacy);
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %I',
            '@extschema@.outbox_emit(text, jsonb, text, text, jsonb)'::pg_catalog.regprocedure::pg_catalog.text, r.legacy);
        EXECUTE pg_catalog.format('REVOKE ALL ON SCHEMA outbox FROM %I', r.legacy);
        RAISE NOTICE 'outbox: % has no rights in database % any more; % has them', r.legacy, db, r.name
            USING HINT = pg_catalog.format('GRANT %I TO the roles that used %I here.', r.name, r.legacy);
    END LOOP;
END
$roles$;

-- Rotation: 0.1.0 bounded the table left behind by a snapshot's xmax,
-- which a transaction with a higher id could still write into. Every
-- transaction that wrote under 0.1.0's worker ended with the restart that
-- loaded this library, and those since wrote into the current table (no
-- worker switched tables in between): this transaction's id bounds them.
UPDATE outbox.rotation SET left_txid = pg_catalog.pg_current_xact_id()::pg_catalog.text::pg_catalog.int8
WHERE NOT current AND left_txid IS NOT NULL;

-- Ticks: 0.1.0 did not record how it ordered a batch (by the commits it
-- saw, or by commit timestamp or transaction id); its batches count as
-- inexact (outbox.stats.inexact_order_batches). commit_order NULL, for
-- batches it left unordered, is read in transaction id order as before.
ALTER TABLE outbox.ticks ADD COLUMN inexact integer NOT NULL DEFAULT 0;
UPDATE outbox.ticks SET inexact = coalesce(pg_catalog.cardinality(commit_order), 1) WHERE id > 0;

ALTER TABLE outbox.endpoints ADD COLUMN resumed_at timestamptz;

-- Endpoints of 0.1.0 all have a tick; start_xid is for those created from
-- now on (src/worker/store.rs, start_new_endpoints).
ALTER TABLE outbox.progress
    ALTER COLUMN tick DROP NOT NULL,
    ADD COLUMN start_xid bigint,
    ADD COLUMN inexact_batches bigint NOT NULL DEFAULT 0;

-- Only the head of a parked lane carries next_attempt_at in 0.2.0 (0.1.0
-- set it on every pending row): a row becomes due when the row before it
-- was delivered (src/worker/parked.rs).
UPDATE outbox.parked AS p SET next_attempt_at = NULL
WHERE p.state = 'pending'
  AND EXISTS (SELECT FROM outbox.parked AS q
              WHERE q.endpoint_id = p.endpoint_id AND q.key = p.key AND q.seq < p.seq AND q.state = 'pending');
CREATE INDEX parked_due ON outbox.parked (endpoint_id, next_attempt_at) WHERE state = 'pending';

-- Endpoints and captures go into pg_dump's output (docs/operations.md,
-- "Dump and restore").
SELECT pg_catalog.pg_extension_config_dump('outbox.endpoints', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.endpoints_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.captures', '');

CREATE OR REPLACE FUNCTION outbox._like_patterns(globs text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- E'' strings: the same text whatever standard_conforming_strings is.
    SELECT coalesce(array_agg(
               replace(replace(replace(replace(replace(
                   g, E'\\', E'\\\\'), '%', E'\\%'), '_', E'\\_'), '*', '%'), '?', '_')
               ORDER BY ord), '{}')
    FROM unnest(globs) WITH ORDINALITY AS u(g, ord)
$$;

-- outbox_emit, also in schema outbox (docs/security.md).
CREATE FUNCTION outbox.emit(
    topic      text,
    payload    jsonb,
    key        text  DEFAULT NULL,
    event_type text  DEFAULT NULL,
    headers    jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_emit';

COMMENT ON FUNCTION outbox.emit(text, jsonb, text, text, jsonb) IS
'outbox_emit, in schema outbox: call it schema-qualified where others can create functions in the extension''s schema.';

CREATE OR REPLACE FUNCTION outbox._backlog(endpoint_id integer, OUT pending bigint, OUT oldest timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    -- An endpoint the worker has not started yet (tick NULL: the moment
    -- after its creation commits, or no worker runs in this database)
    -- counts the events of transactions that began after the one that
    -- created it: what it will receive, give or take transactions that
    -- overlapped that one.
    SELECT count(*), min(ev.created_at)
    FROM outbox.progress AS p
    JOIN outbox.endpoints AS e ON e.id = p.endpoint_id
    LEFT JOIN outbox.ticks AS lo ON lo.id = p.tick
    LEFT JOIN outbox.ticks AS hi ON hi.id = p.tick + 1
    JOIN outbox.events AS ev
      ON CASE WHEN p.tick IS NULL THEN ev.txid >= p.start_xid
              ELSE ev.txid >= lo.snap_xmax OR ev.txid = ANY (lo.snap_xip) END
     AND ev.topic LIKE ANY (outbox._like_patterns(e.topics))
     AND NOT coalesce(ev.txid < hi.snap_xmax AND NOT ev.txid = ANY (hi.snap_xip)
                      AND (coalesce(array_position(hi.commit_order, ev.txid)::bigint, ev.txid), ev.n)
                          <= (p.after_rank, p.after_n), false)
    WHERE p.endpoint_id = _backlog.endpoint_id
$$;

CREATE OR REPLACE VIEW outbox.stats AS
SELECT e.name AS endpoint,
       e.kind,
       e.url,
       CASE WHEN e.disabled_reason IS NOT NULL THEN 'disabled'
            WHEN e.paused THEN 'paused'
            ELSE 'active' END AS state,
       b.pending + k.pending AS pending,
       p.in_flight,
       p.delivered,
       p.retrying + k.retrying AS retrying,
       p.failed_attempts,
       now() - least(b.oldest, k.oldest) AS oldest_pending_age,
       p.last_success_at,
       p.last_error,
       p.last_error_at,
       k.dead,
       p.latency_p50_ms,
       p.latency_p99_ms,
       e.disabled_reason,
       p.inexact_batches AS inexact_order_batches
FROM outbox.endpoints AS e
JOIN outbox.progress AS p ON p.endpoint_id = e.id
CROSS JOIN LATERAL outbox._backlog(e.id) AS b
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE d.state = 'pending') AS pending,
           count(*) FILTER (WHERE d.state = 'pending' AND d.attempts > 0) AS retrying,
           count(*) FILTER (WHERE d.state = 'dead') AS dead,
           min(d.created_at) FILTER (WHERE d.state = 'pending') AS oldest
    FROM outbox.parked AS d WHERE d.endpoint_id = e.id) AS k
ORDER BY e.name;

-- The capture trigger: C, and no longer SECURITY DEFINER (it runs as the
-- writer of the table; existing triggers keep calling it by name).
CREATE OR REPLACE FUNCTION outbox._capture_row() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_capture_row';

CREATE FUNCTION outbox."_is_capture_trigger"(
	"sql" TEXT,
	"with_when" bool,
	"args" TEXT[]
) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_is_capture_trigger_wrapper';

CREATE OR REPLACE FUNCTION outbox.capture(
    tbl         regclass,
    topic       text   DEFAULT NULL,
    key_columns text[] DEFAULT NULL,
    operations  text[] DEFAULT '{insert,update,delete}',
    columns     text[] DEFAULT NULL,
    condition   text   DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rel      record;
    col      text;
    op       text;
    trg      text;
    stmt     text;
    trg_when text := '';
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RAISE EXCEPTION 'outbox.capture: this server is a hot standby'
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = 'Run it on the primary; the triggers reach standbys through replication.';
    END IF;
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'outbox.capture: table must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the table to capture, e.g. outbox.capture(''public.orders'').';
    END IF;
    SELECT c.relname, c.relkind INTO rel FROM pg_class AS c WHERE c.oid = tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'outbox.capture: % is not a table', tbl
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Only ordinary and partitioned tables can be captured.';
    END IF;

    topic := coalesce(topic, rel.relname);
    PERFORM outbox._check_topic(topic);

    IF key_columns IS NULL THEN
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO key_columns
        FROM pg_index AS i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = tbl AND i.indisprimary;
        IF key_columns IS NULL THEN
            RAISE EXCEPTION 'outbox.capture: % has no primary key', tbl
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Name the ordering key columns: key_columns => ''{col}''.';
        END IF;
    ELSIF cardinality(key_columns) IS DISTINCT FROM array_length(key_columns, 1)
          OR cardinality(key_columns) = 0 THEN
        RAISE EXCEPTION 'outbox.capture: key_columns must be a non-empty list of column names'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Leave key_columns out to use the primary key.';
    END IF;

    IF columns IS NOT NULL AND cardinality(columns) = 0 THEN
        RAISE EXCEPTION 'outbox.capture: columns must not be empty'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Leave columns out (NULL) to capture every column.';
    END IF;

    FOREACH col IN ARRAY key_columns || coalesce(columns, '{}') LOOP
        IF col IS NULL OR NOT EXISTS (
            SELECT FROM pg_attribute AS a
            WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
        ) THEN
            RAISE EXCEPTION 'outbox.capture: column % does not exist in %', coalesce(quote_ident(col), 'NULL'), tbl
                USING ERRCODE = 'undefined_column',
                      HINT = 'key_columns and columns name columns of the captured table.';
        END IF;
    END LOOP;

    IF operations IS NULL OR cardinality(operations) = 0
       OR EXISTS (SELECT FROM unnest(operations) AS o WHERE o IS NULL OR o NOT IN ('insert', 'update', 'delete'))
       OR (SELECT count(DISTINCT o) FROM unnest(operations) AS o) <> cardinality(operations) THEN
        RAISE EXCEPTION 'outbox.capture: invalid operations %', coalesce(operations::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'operations is a list drawn from insert, update and delete, each at most once.';
    END IF;

    IF condition IS NOT NULL THEN
        trg_when := format('WHEN (%s) ', condition);
    END IF;

    -- Capturing again replaces the previous configuration.
    PERFORM outbox._drop_capture_triggers(tbl);

    FOREACH op IN ARRAY operations LOOP
        trg := 'outbox_capture_' || op;
        stmt := format('CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW %sEXECUTE FUNCTION outbox._capture_row(%L, %L, %L)',
                       trg, upper(op), tbl, trg_when, topic, key_columns, coalesce(columns::text, ''));
        BEGIN
            -- A condition is an expression, never more SQL: the statement
            -- must parse as this one CREATE TRIGGER, calling our function
            -- with our arguments, before it runs.
            IF NOT outbox._is_capture_trigger(stmt, condition IS NOT NULL,
                                              ARRAY[topic, key_columns::text, coalesce(columns::text, '')]) THEN
                RAISE EXCEPTION 'outbox.capture: condition is not a single boolean expression'
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'condition is a boolean SQL expression over NEW and OLD, e.g. ''NEW.status <> OLD.status''.';
            END IF;
            EXECUTE stmt;
        EXCEPTION WHEN syntax_error OR undefined_column OR undefined_function OR invalid_object_definition
                       OR feature_not_supported OR datatype_mismatch OR undefined_table THEN
            RAISE EXCEPTION 'outbox.capture: invalid condition for % on %: %', op, tbl, SQLERRM
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'condition is a boolean SQL expression over NEW and OLD; NEW does not exist for delete, OLD not for insert. Capture such operations with separate calls.';
        END;
    END LOOP;

    INSERT INTO outbox.captures AS c (tbl, topic, key_columns, operations, columns, condition)
    VALUES (tbl, topic, key_columns, operations, columns, condition)
    ON CONFLICT ON CONSTRAINT captures_pkey DO UPDATE
        SET topic = excluded.topic, key_columns = excluded.key_columns,
            operations = excluded.operations, columns = excluded.columns,
            condition = excluded.condition, created_at = now();
END
$fn$;

CREATE OR REPLACE FUNCTION outbox._drop_capture_triggers(tbl regclass) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    trg     text;
    dropped integer := 0;
BEGIN
    FOR trg IN
        SELECT t.tgname FROM pg_trigger AS t
        WHERE t.tgrelid = tbl AND t.tgfoid = 'outbox._capture_row()'::regprocedure
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trg, tbl);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$fn$;

CREATE OR REPLACE FUNCTION outbox.uncapture(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    dropped integer;
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RAISE EXCEPTION 'outbox.uncapture: this server is a hot standby'
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = 'Run it on the primary; the triggers reach standbys through replication.';
    END IF;
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'outbox.uncapture: table must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    dropped := outbox._drop_capture_triggers(tbl);
    DELETE FROM outbox.captures AS c WHERE c.tbl = uncapture.tbl;
    IF dropped = 0 AND NOT FOUND THEN
        RAISE EXCEPTION 'outbox.uncapture: % is not captured', tbl
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT tbl FROM outbox.captures lists the captured tables.';
    END IF;
END
$fn$;

-- Events: the bytes an event takes once read, which the worker counts
-- against its memory window (0.1.0 counted rows only), measured as
-- outbox_emit measures them (uncompressed payload and headers, topic, key
-- and type). Last but the privileges: adding the column locks the events
-- tables until the update commits, and emitters wait that long.
ALTER TABLE outbox.events_0 ADD COLUMN size integer NOT NULL DEFAULT 0;
ALTER TABLE outbox.events_1 ADD COLUMN size integer NOT NULL DEFAULT 0;
UPDATE outbox.events_0
SET size = pg_catalog.pg_column_size(payload::pg_catalog.text::pg_catalog.jsonb) + pg_catalog.octet_length(topic)
           + coalesce(pg_catalog.octet_length(key), 0) + coalesce(pg_catalog.octet_length(type), 0)
           + pg_catalog.pg_column_size(headers::pg_catalog.text::pg_catalog.jsonb);
UPDATE outbox.events_1
SET size = pg_catalog.pg_column_size(payload::pg_catalog.text::pg_catalog.jsonb) + pg_catalog.octet_length(topic)
           + coalesce(pg_catalog.octet_length(key), 0) + coalesce(pg_catalog.octet_length(type), 0)
           + pg_catalog.pg_column_size(headers::pg_catalog.text::pg_catalog.jsonb);

-- The view lists the tables' columns as they were when it was created.
CREATE OR REPLACE VIEW outbox.events AS
    SELECT * FROM outbox.events_0
    UNION ALL
    SELECT * FROM outbox.events_1;

-- Privileges, as a new installation has them (sql/grants.sql).
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
