-- outbox: tables and roles. Runs first when the extension is created.
--
-- Storage model (see ../shared/DESIGN.md, "The shape"):
--   * events are immutable rows written by outbox_emit in the caller's
--     transaction and never updated;
--   * the worker takes "ticks": snapshots of which transactions had
--     committed. The events of batch N are those visible in tick N and not in
--     tick N-1, so a transaction that commits late simply lands in a later
--     batch (no gaps) and an open transaction elsewhere delays nothing but
--     itself (no stalls);
--   * each endpoint keeps one progress row: the last tick it finished plus a
--     position inside the next batch.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_writer') THEN
        CREATE ROLE outbox_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_admin') THEN
        CREATE ROLE outbox_admin NOLOGIN;
    END IF;
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
-- list, as 64-bit transaction ids.
CREATE TABLE outbox.ticks (
    id         bigint      PRIMARY KEY,
    snap_xmin  bigint      NOT NULL,
    snap_xmax  bigint      NOT NULL,
    snap_xip   bigint[]    NOT NULL,
    -- The batch's transactions in commit order; NULL for batches too large
    -- to order (then txid order is used).
    commit_order bigint[],
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Tick 0 sees no event: every event is written by this transaction or a
-- later one, and all of those have ids >= this transaction's.
INSERT INTO outbox.ticks (id, snap_xmin, snap_xmax, snap_xip)
SELECT 0, x, x, '{}'
FROM (SELECT pg_catalog.pg_current_xact_id()::text::bigint AS x) AS me;

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
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Per-endpoint progress and health, written by the worker in short
-- transactions (one row per endpoint, never one per event).
CREATE TABLE outbox.progress (
    endpoint_id     integer     PRIMARY KEY REFERENCES outbox.endpoints (id) ON DELETE CASCADE,
    tick            bigint      NOT NULL,  -- batches up to this tick are finished
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
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
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

-- Endpoint topic globs ('orders.*', 'invoice?') as LIKE patterns, so that
-- both the worker and the stats view filter in SQL with an index-free LIKE.
CREATE FUNCTION outbox._like_patterns(globs text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(
               replace(replace(replace(replace(replace(
                   g, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'), '?', '_')
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
    -- pending: to be delivered (its lane's first row is tried at
    -- next_attempt_at); dead: given up, see outbox.dead_letters.
    state           text        NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    parked_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    failed_at       timestamptz,
    PRIMARY KEY (endpoint_id, event_id)
);
CREATE INDEX parked_lane ON outbox.parked (endpoint_id, key, seq);
