-- Small shared records beside the jobs (schedules, API keys, the audit log, queue settings,
-- worker registrations, webhook endpoints): a JSON value per (collection, key) with a version
-- for optimistic concurrency. Times are microseconds since the Unix epoch (UTC).
CREATE TABLE meta (
    collection TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (collection, key)
) WITHOUT ROWID;

CREATE INDEX meta_expiry ON meta (expires_at) WHERE expires_at IS NOT NULL;

-- Token buckets shared by every process on the file (rate limits).
CREATE TABLE rate_buckets (
    bucket     TEXT    PRIMARY KEY,
    tokens     REAL    NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
