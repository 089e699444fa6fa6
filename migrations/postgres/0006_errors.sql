-- Jobs whose history holds an error, newest first: searching by error text (the dashboard,
-- `conveyor jobs list --error`) reads these instead of every job's history. Only rows with
-- an error have an entry, so a store of jobs that succeed pays nothing but the check.
-- The store repeats this predicate in its error filter so the planner can use the index.
CREATE INDEX IF NOT EXISTS jobs_errors ON conveyor.jobs (id) WHERE attempts @? '$[*].error';
