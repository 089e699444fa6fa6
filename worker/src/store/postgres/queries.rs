//! The hot statements of the Postgres store, one `const` each, so their plans can be read
//! (and are checked: `tests/tests/postgres_plans.rs` EXPLAINs each of them) in one place.
//!
//! Rule for every statement here: its only reasonable plan is the right one, whatever the
//! statistics say. Statistics go stale within seconds on a job table (a batch moves
//! thousands of rows between states), and autovacuum's ANALYZE runs at arbitrary points.
//! Once an ANALYZE saw no running job, the completion (then `… WHERE j.id = u.id AND
//! j.state = 'running'`) reached its rows through `jobs_lease_expiry`, the partial index of
//! running jobs, which holds an entry for every job claimed since the last vacuum: it read
//! all of it for every batch, and 37,000 jobs/s fell to 1,000. So:
//!
//! - Rows known by id are reached through the primary key, and the statement says so with
//!   `id = ANY(ARRAY(…))` on the target table. The array comes from a subquery, whose length
//!   the planner does not know and takes as a handful of elements: probing the key for that
//!   many always looks cheaper than reading the table, however many rows the table has and
//!   whatever share of them the statistics put in a state.
//! - A state test on rows known by id is written so that no partial index answers it and the
//!   statistics cannot shrink the row estimate to one (see [`FINISH`]).
//! - Rows found by a condition (due, expired, held by a worker, old enough to prune) are
//!   found in a subquery whose `WHERE` implies one partial index and whose `ORDER BY` is that
//!   index's order, so the scan stops after `LIMIT` rows; then they are changed by id as
//!   above. The indexes: `migrations/postgres/0001_jobs.sql` and `0003_plans.sql`.

/// The tail of the completion statements: one `conveyor_events` notification per 100 of the
/// rows the `finished` CTE changed (`<origin>|<id> <state>,…`, the origin the parameter
/// named; an entry is at most 47 bytes, so a payload stays under NOTIFY's 8000-byte limit),
/// delivered at commit to every process that LISTENs (`migrations/postgres/0004_results.sql`
/// describes the channel). The cross join with the count makes the notifying CTE run (an
/// unreferenced one would not) without changing the rows returned.
macro_rules! announced {
    ($origin:literal) => {
        concat!(
            ",
announced AS (
    SELECT pg_notify('conveyor_events',
                     ",
            $origin,
            " || '|' || string_agg(c.id::text || ' ' || c.state, ','))
    FROM (SELECT id, state, (row_number() OVER () - 1) / 100 AS part FROM finished) c
    GROUP BY c.part)
SELECT f.id, f.queue, f.state
FROM finished f CROSS JOIN (SELECT count(*) AS notifications FROM announced) a"
        )
    };
}

/// Fetch: claims up to `$2` due jobs of queue `$1` for worker `$3`, with a lease of `$4` (an
/// interval). Due-ness, the claim's time and the lease end are on the store's clock
/// (`now()`), never the worker's. The subquery walks `jobs_fetch` in its order (queue,
/// priority, run_at, id) and stops after `$2` rows; the claim then updates them by primary
/// key.
pub const FETCH: &str = "\
WITH next AS (
    SELECT id FROM conveyor.jobs
    WHERE queue = $1 AND state IN ('available','scheduled','retryable') AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
UPDATE conveyor.jobs j
SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
    lease_owner = $3, lease_expires_at = now() + $4
WHERE j.id = ANY(ARRAY(SELECT id FROM next))
RETURNING j.*";

/// Completion: applies a batch of outcomes, one array element per job: id `$1`, the attempt
/// it finished `$2`, next state `$3`, next run_at `$4` (NULL keeps it), finalized_at `$5`,
/// attempt delta `$6`, attempt record `$7` (JSON); `$8` is the store's origin for the
/// notification. Only a job still running the attempt that finished changes. Returns each
/// changed job's id, queue and new state.
///
/// Plan: the jobs by primary key, hashed against the outcomes. "Still running this attempt"
/// is one test, `CASE WHEN state = 'running' THEN attempt END = u.attempt` (NULL, so false,
/// for a job in any other state), rather than `state = 'running' AND attempt = u.attempt`:
/// a plain state test would let the running-jobs index answer it, and after an ANALYZE that
/// saw no running job the planner would take it (one row expected) and read the whole index,
/// or expect one job and re-read the outcomes once per job (quadratic in the batch).
///
/// The same statement announces the changes to every process (the `announced` CTE): no second
/// round trip, and nothing is announced unless the batch commits.
pub const FINISH: &str = concat!(
    "\
WITH finished AS (
UPDATE conveyor.jobs j
SET state = u.state, run_at = coalesce(u.run_at, j.run_at), finalized_at = u.finalized_at,
    attempt = j.attempt + u.delta, attempts = j.attempts || u.record::jsonb,
    lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL
FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::timestamptz[], $5::timestamptz[],
            $6::int4[], $7::text[]) AS u(id, attempt, state, run_at, finalized_at, delta, record)
WHERE j.id = ANY(ARRAY(SELECT unnest($1::uuid[])))
  AND j.id = u.id
  AND CASE WHEN j.state = 'running' THEN j.attempt END = u.attempt
RETURNING j.id, j.queue, j.state)",
    announced!("$8")
);

/// Completion with results: [`FINISH`] for a batch in which some outcome carries a result,
/// with `$8` the results (JSON text; NULL keeps the column) and `$9` the origin. Batches
/// without one use [`FINISH`], so a job without a result costs the completion nothing more.
pub const FINISH_WITH_RESULTS: &str = concat!(
    "\
WITH finished AS (
UPDATE conveyor.jobs j
SET state = u.state, run_at = coalesce(u.run_at, j.run_at), finalized_at = u.finalized_at,
    attempt = j.attempt + u.delta, attempts = j.attempts || u.record::jsonb,
    lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL,
    result = coalesce(u.result::jsonb, j.result)
FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::timestamptz[], $5::timestamptz[],
            $6::int4[], $7::text[], $8::text[])
    AS u(id, attempt, state, run_at, finalized_at, delta, record, result)
WHERE j.id = ANY(ARRAY(SELECT unnest($1::uuid[])))
  AND j.id = u.id
  AND CASE WHEN j.state = 'running' THEN j.attempt END = u.attempt
RETURNING j.id, j.queue, j.state)",
    announced!("$9")
);

/// Announces job state changes to every process: one `conveyor_events` notification per
/// element of `$1` (each `<origin>|` and then `<id> <state>` entries joined by `,`, at most
/// 100 per element, as the completion sends them). For operator actions and promotion, which
/// are not hot enough to fold it into their own statements.
pub const ANNOUNCE: &str = "SELECT pg_notify('conveyor_events', p) FROM unnest($1::text[]) AS p";

/// Progress: the latest report `$2` (JSON text) of job `$1`, only while it runs attempt `$3`.
/// By primary key, with the same state test as [`FINISH`].
pub const REPORT_PROGRESS: &str = "\
UPDATE conveyor.jobs SET progress = $2::jsonb
WHERE id = $1 AND CASE WHEN state = 'running' THEN attempt END = $3";

/// Heartbeat: extends by `$1` (an interval, from the store's `now()`) the lease of each job
/// of `$3` (the ids the worker's runtime holds) that worker `$2` runs, and returns which of
/// them were asked to cancel. The jobs are found by id (`jobs_pkey`) or by owner
/// (`jobs_lease_owner`), never by a walk over every running job. SKIP LOCKED: a row locked
/// now is being completed or rescued; waiting for it could deadlock with a completion batch,
/// and a job that is finishing needs no longer lease. A job skipped now is extended at the
/// next beat.
pub const HEARTBEAT: &str = "\
UPDATE conveyor.jobs SET lease_expires_at = now() + $1
WHERE id = ANY(ARRAY(
    SELECT id FROM conveyor.jobs
    WHERE id = ANY($3::uuid[]) AND lease_owner = $2 AND state = 'running'
    FOR UPDATE SKIP LOCKED))
RETURNING id, cancel_requested_at";

/// Rescue: locks up to `$2` running jobs whose lease ended before `$1`, the longest expired
/// first: a range scan of `jobs_lease_expiry` in its order, never a walk of the primary key
/// in id order hoping to meet expired jobs early.
/// Their outcomes are then written with [`FINISH`] in the same transaction.
pub const RESCUE_EXPIRED: &str = "\
SELECT id, attempt, max_attempts, attempted_at, lease_owner, cancel_requested_at
FROM conveyor.jobs
WHERE state = 'running' AND lease_expires_at < $1
ORDER BY lease_expires_at
LIMIT $2
FOR UPDATE SKIP LOCKED";

/// Promotion: makes up to `$2` scheduled or retryable jobs due at `$1` available, the
/// longest due first, in `jobs_due` order; returns their ids and queues (to announce them
/// and wake their workers).
pub const PROMOTE_DUE: &str = "\
UPDATE conveyor.jobs SET state = 'available'
WHERE id = ANY(ARRAY(
    SELECT id FROM conveyor.jobs
    WHERE state IN ('scheduled','retryable') AND run_at <= $1
    ORDER BY run_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED))
RETURNING id, queue";

/// Prune: deletes up to `$5` finished jobs older than their state's retention (completed
/// before `$1`, cancelled before `$2`, dead before `$3`); a job with an idempotency key also
/// waits until `$4`, the end of its key's window. The `greatest` bound and the order make it
/// a range scan of `jobs_finalized` from the oldest, stopping at the newest job any rule
/// could remove, however many finished jobs are younger.
pub const PRUNE: &str = "\
DELETE FROM conveyor.jobs
WHERE id = ANY(ARRAY(
    SELECT id FROM conveyor.jobs
    WHERE finalized_at < greatest($1::timestamptz, $2::timestamptz, $3::timestamptz)
      AND ((state = 'completed' AND finalized_at < $1)
        OR (state = 'cancelled' AND finalized_at < $2)
        OR (state = 'dead' AND finalized_at < $3))
      AND (idempotency_key IS NULL OR finalized_at < $4)
    ORDER BY finalized_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED))";

/// Enqueue: inserts a batch, one array element per job: id `$1`, queue `$2`, kind `$3`, args
/// `$4` (JSON text), priority `$5`, delay `$6` (microseconds, used when run_at is NULL),
/// max_attempts `$7`, run_at `$8` (NULL: now plus the delay), idempotency key `$9` (NULL:
/// none), tags `$10` and metadata `$11` (JSON text); `$12` is the enqueuing store's origin,
/// set for the transaction so the insert trigger marks its `conveyor_events` notification
/// with it ('' for none: the caller's own transaction). Due time, `created_at` and
/// scheduled-or-available are decided on the store's clock (`now()`: the transaction's
/// start on the caller's transaction). Keys first, in the same statement: a keyed job is
/// inserted only if its key row was, so a key never has two holders. Returns the ids
/// inserted with their state; an id that already exists fails the whole statement (and with
/// it the key rows). Reads no table but through unique indexes (`job_keys` on conflict), so
/// no plan choice depends on statistics.
pub const ENQUEUE: &str = "\
WITH o AS (SELECT set_config('conveyor.origin', $12, true) AS origin),
u AS (
    SELECT u.id, u.queue, u.kind, u.args, u.priority, u.max_attempts,
           coalesce(u.run_at, now() + u.delay_us * interval '1 microsecond') AS run_at,
           u.key, u.tags, u.metadata
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int2[], $6::int8[],
                $7::int4[], $8::timestamptz[], $9::text[], $10::text[], $11::text[])
        AS u(id, queue, kind, args, priority, delay_us, max_attempts, run_at, key, tags,
             metadata)),
k AS (
    INSERT INTO conveyor.job_keys (key, job_id)
    SELECT u.key, u.id FROM u WHERE u.key IS NOT NULL
    ON CONFLICT (key) DO NOTHING
    RETURNING job_id)
INSERT INTO conveyor.jobs (id, queue, kind, args, priority, state, max_attempts, run_at,
                           created_at, idempotency_key, tags, metadata)
SELECT u.id, u.queue, u.kind, u.args::jsonb, u.priority,
       CASE WHEN u.run_at > now() THEN 'scheduled' ELSE 'available' END,
       u.max_attempts, u.run_at, now(), u.key,
       CASE WHEN u.tags = '[]' THEN '{}'::text[]
            ELSE ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb)) END,
       u.metadata::jsonb
FROM u CROSS JOIN o WHERE u.key IS NULL OR u.id IN (SELECT job_id FROM k)
RETURNING id, state";

/// Enqueue, duplicates: the job holding each idempotency key in `$1` (only after an insert
/// found keys taken).
pub const KEY_HOLDERS: &str = "\
SELECT k.key AS idempotency_key, j.id, j.state
FROM conveyor.job_keys k JOIN conveyor.jobs j ON j.id = k.job_id
WHERE k.key = ANY($1)";

/// Enqueue, orphans: frees the keys in `$1` that no job holds any more (pruned since the
/// insert, or removed without the delete trigger, e.g. by TRUNCATE).
pub const FREE_ORPHAN_KEYS: &str = "\
DELETE FROM conveyor.job_keys k
WHERE k.key = ANY($1) AND NOT EXISTS (SELECT 1 FROM conveyor.jobs j WHERE j.id = k.job_id)";
