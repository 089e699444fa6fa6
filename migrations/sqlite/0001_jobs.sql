-- Conveyor's job table on SQLite. Times are microseconds since the Unix epoch (UTC):
-- integers compare and sort fast and need no parsing.
CREATE TABLE jobs (
    id                  BLOB    NOT NULL UNIQUE,
    queue               TEXT    NOT NULL,
    kind                TEXT    NOT NULL,
    args                TEXT    NOT NULL,
    priority            INTEGER NOT NULL DEFAULT 0,
    state               TEXT    NOT NULL CHECK (state IN
                          ('scheduled','available','running','retryable','completed','cancelled','dead')),
    attempt             INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL CHECK (max_attempts >= 1),
    run_at              INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    attempted_at        INTEGER,
    finalized_at        INTEGER,
    lease_owner         TEXT,
    lease_expires_at    INTEGER,
    cancel_requested_at INTEGER,
    idempotency_key     TEXT,
    tags                TEXT    NOT NULL DEFAULT '[]',
    metadata            TEXT    NOT NULL DEFAULT '{}',
    attempts            TEXT    NOT NULL DEFAULT '[]',
    -- finalized_at is set exactly when the job is terminal.
    CHECK ((finalized_at IS NOT NULL) = (state IN ('completed','cancelled','dead')))
);

-- Fetch: the next due jobs of a queue by priority, then run_at.
-- SQLite uses a partial index only when the query repeats its WHERE term exactly, so the
-- store writes these state lists literally and in this order (`WAITING` in sqlite.rs).
CREATE INDEX jobs_fetch ON jobs (queue, priority, run_at, id)
    WHERE state IN ('scheduled','available','retryable');
-- Idempotency: one live holder per key.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Running jobs: rescue by expiry; heartbeats (by owner) filter this small set.
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE state = 'running';
-- Dead letters and cancelled jobs, newest first. Completed jobs are listed through the id
-- index (ids are time-ordered) and pruned through jobs_finalized. Every index here is
-- updated on each state change, so there are as few as the queries need.
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';
CREATE INDEX jobs_cancelled ON jobs (id) WHERE state = 'cancelled';
-- Pruning finished jobs by age.
CREATE INDEX jobs_finalized ON jobs (finalized_at) WHERE finalized_at IS NOT NULL;
