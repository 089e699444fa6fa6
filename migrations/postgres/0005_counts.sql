-- Jobs per queue and state without counting rows: `queue_stats` (the queue overview, the
-- dashboard, `conveyor queues`) and state-only counts read these instead of grouping the job
-- table, which takes time in proportion to the jobs kept (0.3 s at a million).
--
-- Triggers keep them in the same transaction as the change, whichever way it is made (the
-- store, `conveyor.enqueue`, an operator's SQL), so a count is exact at any snapshot. They are
-- statement triggers that append one row per (queue, state) the statement changed to
-- `job_count_deltas`: appending never waits on another transaction, where incrementing a
-- shared counter row would make every claim and completion queue behind each other. The
-- store folds the deltas into `job_counts` from time to time (`conveyor.fold_job_counts`);
-- a reader adds both.
CREATE TABLE IF NOT EXISTS conveyor.job_counts (
    queue text   NOT NULL,
    state text   NOT NULL,
    n     bigint NOT NULL,
    PRIMARY KEY (queue, state)
);

CREATE TABLE IF NOT EXISTS conveyor.job_count_deltas (
    queue text   NOT NULL,
    state text   NOT NULL,
    n     bigint NOT NULL
);

CREATE OR REPLACE FUNCTION conveyor.count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conveyor.job_count_deltas (queue, state, n)
        SELECT queue, state, count(*) FROM inserted GROUP BY queue, state;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION conveyor.count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conveyor.job_count_deltas (queue, state, n)
        SELECT queue, state, -count(*) FROM deleted GROUP BY queue, state;
    RETURN NULL;
END
$$;

-- Every update passes here (Postgres refuses transition tables on a trigger with a column
-- list), so updates that change no state (heartbeats, progress) add nothing: their old and
-- new rows cancel out.
CREATE OR REPLACE FUNCTION conveyor.count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conveyor.job_count_deltas (queue, state, n)
        SELECT queue, state, sum(d) FROM (
            SELECT queue, state, -1 AS d FROM old_rows
            UNION ALL
            SELECT queue, state, 1 AS d FROM new_rows
        ) c
        GROUP BY queue, state
        HAVING sum(d) <> 0;
    RETURN NULL;
END
$$;

-- Moves the committed deltas into the totals in one statement. Rows appended by
-- transactions still open are not visible to it and wait for the next fold; two folds at
-- once cannot move a row twice (the second finds it deleted).
CREATE OR REPLACE FUNCTION conveyor.fold_job_counts() RETURNS bigint LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM conveyor.job_count_deltas RETURNING queue, state, n
    ), sums AS (
        SELECT queue, state, sum(n)::bigint AS n FROM moved GROUP BY queue, state
    ), written AS (
        INSERT INTO conveyor.job_counts AS c (queue, state, n)
            SELECT queue, state, n FROM sums
        ON CONFLICT (queue, state) DO UPDATE SET n = c.n + excluded.n
        RETURNING 1
    )
    SELECT count(*) FROM written
$$;

-- TRUNCATE removes every job without row triggers: the totals go with them.
CREATE OR REPLACE FUNCTION conveyor.count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM conveyor.job_count_deltas;
    DELETE FROM conveyor.job_counts;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS jobs_count_insert ON conveyor.jobs;
DROP TRIGGER IF EXISTS jobs_count_truncate ON conveyor.jobs;
DROP TRIGGER IF EXISTS jobs_count_update ON conveyor.jobs;
DROP TRIGGER IF EXISTS jobs_count_delete ON conveyor.jobs;

-- The totals start from the jobs already stored. The table is locked against writes first,
-- so no change slips between the count and the triggers that take over from it.
LOCK TABLE conveyor.jobs IN SHARE ROW EXCLUSIVE MODE;
DELETE FROM conveyor.job_counts;
DELETE FROM conveyor.job_count_deltas;
INSERT INTO conveyor.job_counts (queue, state, n)
    SELECT queue, state, count(*) FROM conveyor.jobs GROUP BY queue, state;

CREATE TRIGGER jobs_count_insert
    AFTER INSERT ON conveyor.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_inserted();
CREATE TRIGGER jobs_count_update
    AFTER UPDATE ON conveyor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_updated();
CREATE TRIGGER jobs_count_delete
    AFTER DELETE ON conveyor.jobs
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_deleted();
CREATE TRIGGER jobs_count_truncate
    AFTER TRUNCATE ON conveyor.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_truncated();
