-- Jobs of one kind, newest first: the kind filter of listings (the dashboard, `conveyor jobs
-- list --kind`) reads these entries instead of walking every job. A claim and a completion
-- each rewrite the row, and each row version gets an entry here: docs/performance.md
-- (Admin reads) has what that costs.
CREATE INDEX IF NOT EXISTS jobs_kind ON conveyor.jobs (kind, id);
