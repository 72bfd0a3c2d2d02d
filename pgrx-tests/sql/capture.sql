-- outbox.capture turns row changes into events in the same transaction.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE EXTENSION IF NOT EXISTS outbox;
TRUNCATE outbox.events_0, outbox.events_1;

CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric, note text);
SELECT outbox.capture('orders');
SELECT tbl, topic, key_columns, operations, columns, condition FROM outbox.captures;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'orders'::regclass ORDER BY tgname;

INSERT INTO orders VALUES (1, 'ada', 10, NULL), (2, 'bob', 20, NULL);
UPDATE orders SET total = 11 WHERE id = 1;
DELETE FROM orders WHERE id = 2;
BEGIN;
INSERT INTO orders VALUES (3, 'rolled', 0, NULL);
ROLLBACK;
SELECT topic, key, type, payload FROM outbox.events ORDER BY txid, n;
TRUNCATE outbox.events_0, outbox.events_1;

-- Chosen columns, operations, a condition and a composite key.
SELECT outbox.capture('orders', topic => 'orders.big', key_columns => '{customer,id}',
                      operations => '{insert,update}', columns => '{id,total}',
                      condition => 'NEW.total >= 100');
INSERT INTO orders VALUES (4, 'cy', 50, NULL), (5, 'di', 500, 'x');
UPDATE orders SET note = 'only note changed', total = 500 WHERE id = 5;
UPDATE orders SET total = 600 WHERE id = 5;
DELETE FROM orders WHERE id = 5;
SELECT topic, key, type, payload FROM outbox.events ORDER BY txid, n;
TRUNCATE outbox.events_0, outbox.events_1;

SELECT outbox.uncapture('orders');
INSERT INTO orders VALUES (6, 'ed', 1000, NULL);
SELECT count(*) AS events_after_uncapture FROM outbox.events;
SELECT count(*) AS captures FROM outbox.captures;

-- Hostile names are quoted, never executed.
CREATE TABLE "we""ird; DROP TABLE orders; --" ("id; DROP TABLE orders" int PRIMARY KEY, "Val" text);
SELECT outbox.capture('"we""ird; DROP TABLE orders; --"', topic => 'weird');
INSERT INTO "we""ird; DROP TABLE orders; --" VALUES (7, 'v');
SELECT key, payload -> 'after' AS after FROM outbox.events;
SELECT count(*) AS orders_still_there FROM orders;
SELECT outbox.uncapture('"we""ird; DROP TABLE orders; --"');

-- Bad input.
CREATE TABLE no_pk (a int, b text);
SELECT outbox.capture('no_pk');
SELECT outbox.capture('no_pk', key_columns => '{missing}');
SELECT outbox.capture('no_pk', key_columns => '{a}', columns => '{b,"nope; --"}');
SELECT outbox.capture('no_pk', key_columns => '{a}', operations => '{insert,truncate}');
SELECT outbox.capture('no_pk', key_columns => '{a}', operations => '{}');
SELECT outbox.capture('no_pk', key_columns => '{a}', topic => 'bad topic');
SELECT outbox.capture('no_pk', key_columns => '{a}', operations => '{delete}', condition => 'NEW.a > 1');
SELECT outbox.capture('no_pk', key_columns => '{a}', condition => 'true) EXECUTE FUNCTION pg_catalog.now() --');
SELECT outbox.capture(NULL);
CREATE VIEW v AS SELECT 1 AS x;
SELECT outbox.capture('v');
SELECT outbox.uncapture('no_pk');
SELECT count(*) AS triggers_left FROM pg_trigger WHERE tgrelid = 'no_pk'::regclass;
