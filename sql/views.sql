-- Health views. Both read with the view owner's rights; access is granted to
-- outbox_admin only (see grants.sql).

-- Committed events an endpoint has not finished yet: those its cursor tick
-- does not cover, minus the part of the next batch already done.
CREATE FUNCTION outbox._backlog(endpoint_id integer, OUT pending bigint, OUT oldest timestamptz)
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

CREATE VIEW outbox.stats AS
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

CREATE VIEW outbox.dead_letters AS
SELECT e.name AS endpoint,
       d.event_id,
       d.topic,
       d.key,
       d.type,
       d.payload,
       d.headers,
       d.created_at,
       d.attempts,
       d.last_status,
       d.last_error,
       d.failed_at
FROM outbox.parked AS d
JOIN outbox.endpoints AS e ON e.id = d.endpoint_id
WHERE d.state = 'dead';
