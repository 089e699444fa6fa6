-- Indexes that fit the hot statements' predicates, so that their plans do not depend on what
-- the statistics say (see worker/src/store/postgres/queries.rs for the statements).
-- IF NOT EXISTS: an operator may build them beforehand with CREATE INDEX CONCURRENTLY, so
-- that the upgrade does not hold writes while each is built (docs/operations.md).

-- Heartbeats: the jobs one worker holds. Without it a heartbeat reads every running job of
-- every worker (and every entry jobs_lease_expiry gathered since the last vacuum).
CREATE INDEX IF NOT EXISTS jobs_lease_owner ON conveyor.jobs (lease_owner) WHERE state = 'running';

-- Promotion: waiting jobs whose time has come, across queues, longest due first. jobs_fetch
-- leads with the queue, so without this a promotion pass reads every waiting job, or, when
-- the statistics say due jobs are common, the whole table.
CREATE INDEX IF NOT EXISTS jobs_due ON conveyor.jobs (run_at) WHERE state IN ('scheduled','retryable');
