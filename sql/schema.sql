-- outbox: tables and roles. Runs first when the extension is created.
--
-- Storage model (see docs/design.md, "Storage model"):
--   * events are immutable rows written by outbox_emit in the caller's
--     transaction and never updated;
--   * the worker takes "ticks": snapshots of which transactions had
--     committed. The events of batch N are those visible in tick N and not in
--     tick N-1, so a transaction that commits late simply lands in a later
--     batch (no gaps) and an open transaction elsewhere delays nothing but
--     itself (no stalls);
--   * each endpoint keeps one progress row: the last tick it finished plus a
--     position inside the next batch.

-- Roles. Rights granted in one database must not reach another, and a role
-- someone else prepared must not be taken over: the writer and admin roles
-- belong to one database each (names from outbox.writer_role and
-- outbox.admin_role, by default outbox_writer and outbox_admin), and a role
-- that already exists is adopted only when outbox created it for this
-- database (a reinstall), nobody but superusers administers it, and it holds
-- no rights in another database. outbox_worker is the background worker's
-- own role, shared by every database (only the worker's code runs as it);
-- nobody may be a member of it. See docs/security.md.
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
    saved  text := pg_catalog.current_setting('search_path');
    hint   text := 'Set outbox.writer_role and outbox.admin_role to roles for this database before CREATE EXTENSION '
                   '(SET, or ALTER DATABASE ... SET), or drop the existing role.';
BEGIN
    -- Only built-in functions and operators, whatever someone created in
    -- the extension's schema (an operator of exactly matching types would
    -- win over a built-in one that needs a cast).
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF writer = admin OR 'outbox_worker' IN (writer, admin) THEN
        RAISE EXCEPTION 'outbox: the writer, admin and worker roles must be three different roles'
            USING ERRCODE = 'invalid_parameter_value', HINT = hint;
    END IF;
    FOR r IN SELECT v.name, v.kind FROM (VALUES (writer, 'writer'), (admin, 'admin'), ('outbox_worker', 'worker')) AS v(name, kind)
    LOOP
        marker := CASE r.kind WHEN 'worker' THEN 'outbox worker role'
                              ELSE pg_catalog.format('outbox %s role of database %s', r.kind, pg_catalog.quote_ident(db)) END;
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles AS a WHERE a.rolname = r.name) THEN
            IF r.kind = 'worker' THEN
                -- Background workers need LOGIN before PostgreSQL 17; it has no
                -- password.
                EXECUTE pg_catalog.format('CREATE ROLE %I %s NOINHERIT', r.name,
                    CASE WHEN pg_catalog.current_setting('server_version_num')::pg_catalog.int4 < 170000
                         THEN 'LOGIN' ELSE 'NOLOGIN' END);
            ELSE
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r.name);
            END IF;
            EXECUTE pg_catalog.format('COMMENT ON ROLE %I IS %L', r.name, marker);
            CONTINUE;
        END IF;
        -- Adopt an existing role only when it is safe to.
        IF pg_catalog.shobj_description((SELECT a.oid FROM pg_catalog.pg_roles AS a WHERE a.rolname = r.name),
                                        'pg_authid') IS DISTINCT FROM marker THEN
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
    END LOOP;
    PERFORM pg_catalog.set_config('search_path', saved, true);
END
$roles$;

CREATE SCHEMA IF NOT EXISTS outbox;

-- Events live in two tables used in turn: outbox_emit writes into the
-- current one; once every endpoint is past everything the other one holds,
-- the worker empties it with TRUNCATE and later makes it current again
-- (PgQ's table rotation). No event row is ever updated or deleted one by
-- one, and the space comes back at once.
CREATE TABLE outbox.events_0 (
    txid       bigint      NOT NULL,  -- top-level xid8 of the emitting transaction
    n          integer     NOT NULL,  -- emit order inside that transaction
    id         uuid        NOT NULL,  -- stable identity, sent with every delivery
    topic      text        NOT NULL,
    key        text,                  -- ordering key (aggregate id); NULL: unordered
    type       text,
    payload    jsonb       NOT NULL,
    headers    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- bytes the event takes once read (payload uncompressed, key, type,
    -- headers): what the worker counts against its memory window
    size       integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (txid, n)
)
-- Emptied by TRUNCATE, never updated or deleted from: vacuuming them would
-- be wasted work (anti-wraparound vacuum still runs if ever needed).
WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false);
CREATE TABLE outbox.events_1 (LIKE outbox.events_0 INCLUDING ALL)
WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false);

CREATE VIEW outbox.events AS
    SELECT * FROM outbox.events_0
    UNION ALL
    SELECT * FROM outbox.events_1;

-- Which events table is current, and what the other one may still hold.
CREATE TABLE outbox.rotation (
    slot        smallint    PRIMARY KEY CHECK (slot IN (0, 1)),
    current     boolean     NOT NULL,
    since       timestamptz NOT NULL DEFAULT pg_catalog.now(),  -- became current
    -- For the table that is not current: every event it holds has a txid
    -- below this (a transaction id taken after the switch was published).
    left_txid   bigint,
    empty       boolean     NOT NULL DEFAULT true
);
INSERT INTO outbox.rotation (slot, current, empty) VALUES (0, true, false), (1, false, true);

-- A tick is a snapshot taken by the worker: xmin, xmax and the in-progress
-- list, as 64-bit transaction ids (src/worker/ticks.rs).
CREATE TABLE outbox.ticks (
    id         bigint      PRIMARY KEY,
    snap_xmin  bigint      NOT NULL,
    snap_xmax  bigint      NOT NULL,
    snap_xip   bigint[]    NOT NULL,
    -- The batch's transactions in commit order (NULL only in ticks of
    -- version 0.1.0, whose large batches were not ordered).
    commit_order bigint[],
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- How many of them were ordered by commit timestamp or transaction id
    -- because the worker did not see them commit (see docs/design.md).
    -- Columns added after 0.1.0 come last, where ALTER TABLE ADD COLUMN
    -- puts them: an updated database has the same tables as a new one.
    inexact    integer     NOT NULL DEFAULT 0
);

-- Tick 0 is this transaction's snapshot, with this transaction in progress:
-- every transaction that was running (and may emit once the extension
-- exists) and this one are in later batches.
INSERT INTO outbox.ticks (id, snap_xmin, snap_xmax, snap_xip)
SELECT 0, pg_catalog.pg_snapshot_xmin(s)::text::bigint, pg_catalog.pg_snapshot_xmax(s)::text::bigint,
       ARRAY(SELECT x::text::bigint FROM pg_catalog.pg_snapshot_xip(s) AS x
             UNION SELECT pg_catalog.pg_current_xact_id()::text::bigint)
FROM pg_catalog.pg_current_snapshot() AS s;

CREATE TABLE outbox.endpoints (
    id              integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text        NOT NULL UNIQUE,
    url             text        NOT NULL,
    kind            text        NOT NULL,
    topics          text[]      NOT NULL,
    options         jsonb       NOT NULL DEFAULT '{}',
    paused          boolean     NOT NULL DEFAULT false,
    disabled_reason text,       -- set by the worker, e.g. when the endpoint answered 410 Gone
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    resumed_at      timestamptz -- resume_endpoint: waiting events are tried again at once
);

-- Per-endpoint progress and health, written by the worker in short
-- transactions (one row per endpoint, never one per event).
CREATE TABLE outbox.progress (
    endpoint_id     integer     PRIMARY KEY REFERENCES outbox.endpoints (id) ON DELETE CASCADE,
    -- batches up to this tick are finished; NULL until the worker has seen
    -- the endpoint and started it after start_xid (below)
    tick            bigint,
    after_rank      bigint,                -- inside batch tick+1: finished up to (after_rank, after_n),
    after_n         integer,               -- rank as in ticks.commit_order (or the txid)
    delivered       bigint      NOT NULL DEFAULT 0,
    failed_attempts bigint      NOT NULL DEFAULT 0,
    in_flight       integer     NOT NULL DEFAULT 0,
    retrying        integer     NOT NULL DEFAULT 0,
    last_success_at timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    latency_p50_ms  double precision,
    latency_p99_ms  double precision,
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- the transaction that created the endpoint (src/worker/store.rs,
    -- start_new_endpoints)
    start_xid       bigint,
    -- batches read whose commit order came from commit timestamps or
    -- transaction ids (docs/design.md, "Commit order")
    inexact_batches bigint      NOT NULL DEFAULT 0
);

-- Tables whose changes are captured by outbox.capture().
CREATE TABLE outbox.captures (
    tbl         regclass    PRIMARY KEY,
    topic       text        NOT NULL,
    key_columns text[]      NOT NULL,
    operations  text[]      NOT NULL,
    columns     text[],
    condition   text,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- pg_dump keeps what a restored database needs to carry on: endpoints
-- (with their secrets, readable by the admin role only, as before) and
-- captures. Events, ticks, progress and dead letters belong to the source
-- database's delivery history and are not dumped: a restored database
-- starts clean, and its worker gives every endpoint without progress a
-- fresh start (src/worker/store.rs). See docs/operations.md.
SELECT pg_catalog.pg_extension_config_dump('outbox.endpoints', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.endpoints_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.captures', '');

-- Endpoint topic globs ('orders.*', 'invoice?') as LIKE patterns, so that
-- both the worker and the stats view filter in SQL with an index-free LIKE.
CREATE FUNCTION outbox._like_patterns(globs text[]) RETURNS text[]
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

-- Events taken out of the stream for one endpoint: those that failed for
-- a while and held up the worker's window, the events of their key queued
-- behind them, and dead letters. A copy of the event, so table rotation
-- never has to wait for them. Rows of one key are delivered in `seq` order.
CREATE SEQUENCE outbox.parked_seq;
CREATE TABLE outbox.parked (
    endpoint_id     integer     NOT NULL REFERENCES outbox.endpoints (id) ON DELETE CASCADE,
    event_id        uuid        NOT NULL,
    seq             bigint      NOT NULL DEFAULT nextval('outbox.parked_seq'),
    batch           bigint      NOT NULL,  -- original position in the stream
    rank            bigint      NOT NULL,
    txid            bigint      NOT NULL,
    n               integer     NOT NULL,
    topic           text        NOT NULL,
    key             text,
    type            text,
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    -- pending: to be delivered; dead: given up, see outbox.dead_letters.
    state           text        NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    -- Only the head of a lane (its first pending row; a dead first row
    -- blocks it under on_dead = block) has one: when it is tried next.
    next_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    parked_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    failed_at       timestamptz,
    PRIMARY KEY (endpoint_id, event_id)
);
CREATE INDEX parked_lane ON outbox.parked (endpoint_id, key, seq);
-- Heads due for an attempt, when more lanes are parked than the worker
-- holds in memory.
CREATE INDEX parked_due ON outbox.parked (endpoint_id, next_attempt_at) WHERE state = 'pending';
