-- A job's result (what its handler returned when it completed) and the latest progress its
-- running attempt reported ({attempt, percent, message, updated_at}). Both live in the
-- job's row, so they go when the job is pruned; both NULL until written (adding a NULL
-- column rewrites nothing), so a job that never reports either costs nothing more to claim
-- or complete.
ALTER TABLE conveyor.jobs ADD COLUMN IF NOT EXISTS result jsonb;
ALTER TABLE conveyor.jobs ADD COLUMN IF NOT EXISTS progress jsonb;

-- Job state changes for every process on the database (`GET /v1/jobs/{id}?wait=`, the
-- `/v1/jobs/events` stream): one notification on `conveyor_events` per statement and per
-- 100 changed rows, `<id> <state>` entries joined by ','. Sent at commit, so a rolled-back
-- change announces nothing. 100 entries stay well under NOTIFY's 8000-byte payload limit
-- (an entry is at most 47 bytes), so a large batch can never fail on its notification.
CREATE FUNCTION conveyor.notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR payload IN
            SELECT string_agg(c.id::text || ' ' || c.state, ',')
            FROM (SELECT id, state, (row_number() OVER () - 1) / 100 AS part FROM inserted) c
            GROUP BY c.part
        LOOP
            PERFORM pg_notify('conveyor_events', payload);
        END LOOP;
    ELSE
        FOR payload IN
            SELECT string_agg(c.id::text || ' ' || c.state, ',')
            FROM (SELECT n.id, n.state, (row_number() OVER () - 1) / 100 AS part
                  FROM changed n JOIN previous o ON o.id = n.id
                  WHERE n.state <> o.state OR n.attempt <> o.attempt) c
            GROUP BY c.part
        LOOP
            PERFORM pg_notify('conveyor_events', payload);
        END LOOP;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_events_inserted
    AFTER INSERT ON conveyor.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.notify_changed();

CREATE TRIGGER jobs_events_updated
    AFTER UPDATE ON conveyor.jobs
    REFERENCING OLD TABLE AS previous NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.notify_changed();
