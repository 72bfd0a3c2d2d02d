-- Bad input: a clear error with a hint, and nothing changes.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE EXTENSION IF NOT EXISTS outbox;
SELECT count(*) AS events_before FROM outbox.events;

SELECT outbox_emit(NULL, '{}');
SELECT outbox_emit('', '{}');
SELECT outbox_emit('has space', '{}');
SELECT outbox_emit('orders.*', '{}');
SELECT outbox_emit(repeat('x', 250), '{}');
SELECT outbox_emit('t', NULL);
SELECT outbox_emit('t', '{}', headers => '[1]');
SELECT outbox_emit('t', '{}', headers => '{"a": 1}');
SET outbox.max_payload_size = 64;
SELECT outbox_emit('t', jsonb_build_object('blob', repeat('x', 100)));
RESET outbox.max_payload_size;
SELECT count(*) AS events_after FROM outbox.events;

SELECT outbox.create_endpoint(NULL, 'http://127.0.0.1:1/');
SELECT outbox.create_endpoint('e1', NULL);
SELECT outbox.create_endpoint('e1', 'not a url');
SELECT outbox.create_endpoint('e1', 'ftp://127.0.0.1/');
SELECT outbox.create_endpoint('e1', 'http://user:pw@127.0.0.1/');
SELECT outbox.create_endpoint('bad name!', 'http://127.0.0.1:1/');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', kind => 'smtp');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', topics => '{}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', topics => '{"a b"}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', topics => '{NULL}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', options => '[]');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', options => '{"bogus": 1}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', options => '{"timeout_ms": -5}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', options => '{"timeout_ms": "5s"}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', options => '{"backoff_base_ms": 1000, "backoff_max_ms": 10}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', options => '{"headers": {"webhook-id": "x"}}');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/', options => '{"headers": {"x-n": 5}}');
SELECT count(*) AS endpoints FROM outbox.endpoints;

SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:1/');
SELECT outbox.create_endpoint('e1', 'http://127.0.0.1:2/');
SELECT outbox.alter_endpoint('nope', '{}');
SELECT outbox.alter_endpoint('e1', '{"max_in_flight": 0}');
SELECT outbox.alter_endpoint('e1', url => 'gopher://x');
SELECT outbox.drop_endpoint('nope');
SELECT outbox.pause_endpoint('nope');
SELECT outbox.resume_endpoint(NULL);
SELECT name, url, options FROM outbox.endpoints;
SELECT outbox.drop_endpoint('e1');
