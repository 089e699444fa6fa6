-- Conveyor's job table on Postgres, in its own schema so it never collides with the
-- application's tables when they share a database (transactional enqueue).
CREATE SCHEMA IF NOT EXISTS conveyor;

CREATE TABLE conveyor.jobs (
    id                  uuid        PRIMARY KEY,
    queue               text        NOT NULL,
    kind                text        NOT NULL,
    args                jsonb       NOT NULL,
    priority            smallint    NOT NULL DEFAULT 0,
    state               text        NOT NULL CHECK (state IN
                          ('scheduled','available','running','retryable','completed','cancelled','dead')),
    attempt             integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL CHECK (max_attempts >= 1),
    run_at              timestamptz NOT NULL,
    created_at          timestamptz NOT NULL,
    attempted_at        timestamptz,
    finalized_at        timestamptz,
    lease_owner         text,
    lease_expires_at    timestamptz,
    cancel_requested_at timestamptz,
    idempotency_key     text,
    tags                text[]      NOT NULL DEFAULT '{}',
    metadata            jsonb       NOT NULL DEFAULT '{}',
    attempts            jsonb       NOT NULL DEFAULT '[]',
    -- finalized_at is set exactly when the job is terminal.
    CONSTRAINT jobs_finalized_iff_terminal
        CHECK ((finalized_at IS NOT NULL) = (state IN ('completed','cancelled','dead')))
);

-- Indexes are few on purpose: a claim and a completion each rewrite the row, and every
-- index that holds the row gets a new entry on each rewrite. Per job: an insert and each
-- later rewrite touch two indexes (the primary key and one partial index for the state it
-- enters). Idempotency keys live in their own table for the same reason.
--
-- Fetch: the next due jobs of a queue by priority, then run_at. Also serves listing and
-- counting waiting jobs.
CREATE INDEX jobs_fetch ON conveyor.jobs (queue, priority, run_at, id)
    WHERE state IN ('available','scheduled','retryable');
-- Running jobs: rescue by expiry; heartbeats (by owner) filter this small set.
CREATE INDEX jobs_lease_expiry ON conveyor.jobs (lease_expires_at) WHERE state = 'running';
-- Dead letters and cancelled jobs, newest first. Completed jobs are listed through the
-- primary key (ids are time-ordered) and pruned through jobs_finalized.
CREATE INDEX jobs_failed ON conveyor.jobs (state, id) WHERE state IN ('dead','cancelled');
-- Pruning finished jobs by age.
CREATE INDEX jobs_finalized ON conveyor.jobs (finalized_at) WHERE finalized_at IS NOT NULL;

-- Idempotency: one live holder per key. Written once at enqueue, in the same statement as
-- the job, and never rewritten by claims or completions; the row goes when its job is
-- deleted (the pruner keeps a keyed job until its key window has passed).
CREATE TABLE conveyor.job_keys (
    key    text PRIMARY KEY,
    job_id uuid NOT NULL
);

CREATE FUNCTION conveyor.release_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM conveyor.job_keys k USING deleted d
        WHERE d.idempotency_key IS NOT NULL AND k.key = d.idempotency_key AND k.job_id = d.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_release_keys
    AFTER DELETE ON conveyor.jobs
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.release_keys();

-- Wake-up: one notification per queue per statement that inserts ready jobs, whichever way
-- they were inserted (Rust, the SQL function below, bulk). Delivered at commit, so a job
-- enqueued in a transaction that rolls back wakes nobody.
CREATE FUNCTION conveyor.notify_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT DISTINCT queue FROM inserted WHERE state = 'available' LOOP
        PERFORM pg_notify('conveyor_jobs', q);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON conveyor.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.notify_inserted();

-- Time-ordered UUIDs (version 7) for jobs enqueued from SQL: 48 bits of Unix milliseconds,
-- then random bits, with the version and variant set.
CREATE FUNCTION conveyor.uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- Enqueue from any language, inside the caller's transaction: the job exists iff that
-- transaction commits. Returns the new job's id, or the id of the job that already holds
-- `idempotency_key`.
CREATE FUNCTION conveyor.enqueue(
    queue text,
    kind text,
    args jsonb DEFAULT '{}',
    priority smallint DEFAULT 0,
    max_attempts integer DEFAULT 20,
    run_at timestamptz DEFAULT now(),
    idempotency_key text DEFAULT NULL,
    tags text[] DEFAULT '{}',
    metadata jsonb DEFAULT '{}'
) RETURNS uuid LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id uuid := conveyor.uuid_v7();
    inserted_id uuid;
    now_ts timestamptz := clock_timestamp();
BEGIN
    IF queue !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'invalid queue name %: use 1-128 ASCII letters, digits, ".", "_", "-" or ":"', queue;
    END IF;
    IF kind !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'invalid kind name %: use 1-128 ASCII letters, digits, ".", "_", "-" or ":"', kind;
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'invalid max_attempts %: must be at least 1', max_attempts;
    END IF;
    IF jsonb_typeof(metadata) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'invalid metadata: must be a JSON object, e.g. {"team":"billing"}';
    END IF;
    IF idempotency_key IS NOT NULL AND (length(idempotency_key) = 0 OR octet_length(idempotency_key) > 255) THEN
        RAISE EXCEPTION 'invalid idempotency_key: must be 1 to 255 bytes long';
    END IF;
    LOOP
        IF idempotency_key IS NOT NULL THEN
            INSERT INTO conveyor.job_keys AS k (key, job_id)
                VALUES (enqueue.idempotency_key, new_id)
                ON CONFLICT (key) DO NOTHING
                RETURNING k.job_id INTO inserted_id;
            IF inserted_id IS NULL THEN
                SELECT j.id INTO inserted_id FROM conveyor.job_keys k
                    JOIN conveyor.jobs j ON j.id = k.job_id
                    WHERE k.key = enqueue.idempotency_key;
                IF inserted_id IS NOT NULL THEN
                    RETURN inserted_id;
                END IF;
                -- No job holds the key any more (it was pruned between the two statements,
                -- or its row was removed without the trigger, e.g. by TRUNCATE): free the
                -- key and try again.
                DELETE FROM conveyor.job_keys k WHERE k.key = enqueue.idempotency_key
                    AND NOT EXISTS (SELECT 1 FROM conveyor.jobs j WHERE j.id = k.job_id);
                CONTINUE;
            END IF;
        END IF;
        INSERT INTO conveyor.jobs AS j (id, queue, kind, args, priority, state, max_attempts,
                                        run_at, created_at, idempotency_key, tags, metadata)
        VALUES (new_id, enqueue.queue, enqueue.kind, enqueue.args, enqueue.priority,
                CASE WHEN enqueue.run_at > now_ts THEN 'scheduled' ELSE 'available' END,
                enqueue.max_attempts, enqueue.run_at, now_ts, enqueue.idempotency_key,
                enqueue.tags, enqueue.metadata);
        RETURN new_id;
    END LOOP;
END
$$;
