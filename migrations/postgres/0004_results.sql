-- A job's result (what its handler returned when it completed) and the latest progress its
-- running attempt reported ({attempt, percent, message, updated_at}). Both live in the
-- job's row, so they go when the job is pruned; both NULL until written (adding a NULL
-- column rewrites nothing), so a job that never reports either costs nothing more to claim
-- or complete.
ALTER TABLE conveyor.jobs ADD COLUMN IF NOT EXISTS result jsonb;
ALTER TABLE conveyor.jobs ADD COLUMN IF NOT EXISTS progress jsonb;

-- Job state changes for every process on the database (`GET /v1/jobs/{id}?wait=`, the
-- `/v1/jobs/events` stream) travel on `conveyor_events` as `<origin>|` and then
-- `<id> <state>` entries joined by ','. The origin names the store (process) that made the
-- changes, which announced them in process already and skips them when they come back; the
-- insert trigger reads it from the transaction's `conveyor.origin` setting (the store's
-- enqueue statement sets it; '' from anything else, e.g. `conveyor.enqueue`).
--
-- Inserted jobs are announced by the insert trigger that already wakes workers (every way of
-- inserting passes it: Rust, `conveyor.enqueue`, bulk), before the wake-up, so a listener
-- hears of a job before a worker claims it. One notification per statement and per
-- 100 jobs: an entry is at most 47 bytes, so a payload stays well under NOTIFY's 8000-byte
-- limit and a large batch can never fail on its notification. Sent at commit: a rolled-back
-- insert announces nothing. Finished attempts and operator actions are announced by the
-- statements that make them (worker/src/store/postgres/queries.rs); claims and heartbeats
-- announce nothing across processes (docs/decisions/0006-job-results-and-events.md).
CREATE OR REPLACE FUNCTION conveyor.notify_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    q text;
    payload text;
BEGIN
    FOR payload IN
        SELECT coalesce(current_setting('conveyor.origin', true), '') || '|'
               || string_agg(c.id::text || ' ' || c.state, ',')
        FROM (SELECT id, state, (row_number() OVER () - 1) / 100 AS part FROM inserted) c
        GROUP BY c.part
    LOOP
        PERFORM pg_notify('conveyor_events', payload);
    END LOOP;
    FOR q IN SELECT DISTINCT queue FROM inserted WHERE state = 'available' LOOP
        PERFORM pg_notify('conveyor_jobs', q);
    END LOOP;
    RETURN NULL;
END
$$;
