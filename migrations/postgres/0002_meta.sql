-- Small shared records beside the jobs (schedules, API keys, the audit log, queue settings,
-- worker registrations, webhook endpoints): a JSON value per (collection, key) with a version
-- for optimistic concurrency.
CREATE TABLE conveyor.meta (
    collection text        NOT NULL,
    key        text        NOT NULL COLLATE "C",
    value      jsonb       NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (collection, key)
);

CREATE INDEX meta_expiry ON conveyor.meta (expires_at) WHERE expires_at IS NOT NULL;

-- Token buckets shared by every process on the database (rate limits).
CREATE TABLE conveyor.rate_buckets (
    bucket     text             PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at timestamptz      NOT NULL
);
