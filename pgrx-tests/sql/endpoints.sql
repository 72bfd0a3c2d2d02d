-- Managing endpoints, and who may do it.
CREATE EXTENSION IF NOT EXISTS outbox;

SELECT outbox.create_endpoint('billing', 'https://billing.example.com/hooks',
                              topics => '{orders.*,invoices.?}',
                              options => '{"timeout_ms": 2000, "headers": {"Authorization": "Bearer abc"}}');
SELECT name, url, kind, topics, options, paused FROM outbox.endpoints;
SELECT outbox._like_patterns(topics) FROM outbox.endpoints;

-- alter_endpoint merges options; a JSON null removes a key.
SELECT outbox.alter_endpoint('billing', '{"max_in_flight": 4, "timeout_ms": null}');
SELECT options FROM outbox.endpoints WHERE name = 'billing';
SELECT outbox.alter_endpoint('billing', url => 'https://billing.example.com/v2', topics => '{*}');
SELECT url, topics FROM outbox.endpoints WHERE name = 'billing';

SELECT outbox.pause_endpoint('billing');
SELECT endpoint, state, pending, delivered FROM outbox.stats;
SELECT outbox.resume_endpoint('billing');
SELECT endpoint, state FROM outbox.stats;

-- Pending counts committed events matching the endpoint's topics.
SELECT count(outbox_emit('orders.created', '{}')) FROM generate_series(1, 3);
SELECT endpoint, pending, oldest_pending_age IS NOT NULL AS has_age FROM outbox.stats;

-- Roles: a writer emits and nothing else; an admin manages endpoints.
CREATE ROLE regress_app LOGIN;
GRANT outbox_writer TO regress_app;
CREATE ROLE regress_ops LOGIN;
GRANT outbox_admin TO regress_ops;
CREATE ROLE regress_nobody LOGIN;

SET ROLE regress_app;
SELECT outbox_emit('orders.created', '{"by": "app"}') IS NOT NULL AS emitted;
SELECT outbox.create_endpoint('sneaky', 'http://127.0.0.1:9/');
SELECT outbox.drop_endpoint('billing');
SELECT count(*) FROM outbox.endpoints;
SELECT count(*) FROM outbox.events;
SELECT count(*) FROM outbox.stats;
INSERT INTO outbox.events_0 (txid, n, id, topic, payload, headers) VALUES (1, 1, gen_random_uuid(), 'x', '{}', '{}');
RESET ROLE;

SET ROLE regress_nobody;
SELECT outbox_emit('orders.created', '{}');
RESET ROLE;

SET ROLE regress_ops;
SELECT outbox.create_endpoint('ops-made', 'http://127.0.0.1:9/');
SELECT name, options FROM outbox.endpoints ORDER BY name;
SELECT endpoint FROM outbox.stats ORDER BY endpoint;
UPDATE outbox.endpoints SET url = 'http://evil/';
SELECT outbox.drop_endpoint('ops-made');
RESET ROLE;

SELECT outbox.drop_endpoint('billing');
SELECT count(*) AS endpoints, (SELECT count(*) FROM outbox.progress) AS progress_rows FROM outbox.endpoints;
DROP ROLE regress_app, regress_ops, regress_nobody;
