-- outbox.capture / outbox.uncapture: change capture on a table through row
-- triggers (outbox._capture_row, src/write/capture.rs) that write an event in the
-- writing transaction, with the writer's rights.
--
-- Identifiers never reach SQL text unquoted: the table goes through regclass
-- output (quoted and schema-qualified, since search_path is pinned), trigger
-- names through %I, and the per-trigger configuration is passed as quoted
-- literals (%L) in the trigger arguments.

CREATE FUNCTION outbox.capture(
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

CREATE FUNCTION outbox._drop_capture_triggers(tbl regclass) RETURNS integer
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

CREATE FUNCTION outbox.uncapture(tbl regclass) RETURNS void
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
