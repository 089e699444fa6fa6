-- Jobs of one kind, newest first: the kind filter of listings (the dashboard, `conveyor jobs
-- list --kind`) reads these entries instead of walking every job. SQLite updates an index
-- only when a column it holds changes, and a job's kind and id never do: the entry is
-- written once, at enqueue.
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs (kind, id);
