-- outbox_emit writes into the caller's transaction, and only there.
CREATE EXTENSION outbox;

SELECT outbox_emit('orders.created', '{"total": 12.5}', 'order-1', 'created', '{"trace": "t-1"}') IS NOT NULL AS emitted;
SELECT topic, key, type, payload, headers, n FROM outbox.events;

-- Defaults: no key, no type, empty headers.
SELECT outbox_emit('orders.created', '[1, 2, 3]') IS NOT NULL AS emitted;
SELECT topic, key, type, payload, headers FROM outbox.events WHERE key IS NULL;

-- The id is a stable UUID (version 7) and is what is stored.
SELECT outbox_emit('ids', '{}') AS id \gset
SELECT count(*) AS stored, substr(:'id', 15, 1) AS version FROM outbox.events WHERE id = :'id';

-- A rolled-back transaction leaves nothing behind.
BEGIN;
SELECT outbox_emit('orders.created', '{"rolled": "back"}') IS NOT NULL AS emitted;
ROLLBACK;
SELECT count(*) AS rolled_back_rows FROM outbox.events WHERE payload ? 'rolled';

-- Nor does an aborted one.
BEGIN;
SELECT outbox_emit('orders.created', '{"aborted": true}') IS NOT NULL AS emitted;
SELECT 1 / 0;
COMMIT;
SELECT count(*) AS aborted_rows FROM outbox.events WHERE payload ? 'aborted';

-- A rolled-back savepoint takes its events with it; the rest commits.
BEGIN;
SELECT outbox_emit('sp', '"before"', 'k') IS NOT NULL AS emitted;
SAVEPOINT s1;
SELECT outbox_emit('sp', '"inside"', 'k') IS NOT NULL AS emitted;
ROLLBACK TO SAVEPOINT s1;
SELECT outbox_emit('sp', '"after"', 'k') IS NOT NULL AS emitted;
COMMIT;
SELECT payload, n FROM outbox.events WHERE topic = 'sp' ORDER BY txid, n;

-- Events of one transaction share its transaction id and keep emit order.
BEGIN;
SELECT count(outbox_emit('batch', to_jsonb(i), 'k')) FROM generate_series(1, 5) AS i;
COMMIT;
SELECT array_agg(payload ORDER BY txid, n) AS in_order, count(DISTINCT txid) AS transactions
FROM outbox.events WHERE topic = 'batch';

-- Large payloads are fine up to outbox.max_payload_size.
SELECT outbox_emit('big', jsonb_build_object('blob', repeat('x', 100000))) IS NOT NULL AS emitted;
