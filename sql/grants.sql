-- Privileges. Runs last, when every object exists.
--   outbox_writer: may call outbox_emit, nothing else.
--   outbox_admin:  manages endpoints and captures, reads stats and secrets;
--                  is also a writer.
-- Tables are written only through the extension's functions (SECURITY
-- DEFINER where a role needs more than it is granted).

GRANT outbox_writer TO outbox_admin;

REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
GRANT USAGE ON SCHEMA outbox TO outbox_writer, outbox_admin;

REVOKE ALL ON FUNCTION outbox_emit(text, jsonb, text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_emit(text, jsonb, text, text, jsonb) TO outbox_writer;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox TO outbox_admin;
GRANT SELECT ON outbox.endpoints, outbox.progress, outbox.captures, outbox.stats,
    outbox.dead_letters TO outbox_admin;
-- outbox.capture runs with the caller's rights (creating a trigger needs
-- ownership of the table), so it records its configuration itself.
GRANT INSERT, UPDATE, DELETE ON outbox.captures TO outbox_admin;

SELECT outbox._installed();
