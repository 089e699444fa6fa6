-- Jobs whose history holds an error, newest first: searching by error text (the dashboard,
-- `conveyor jobs list --error`) reads these instead of every job's history. Only rows with
-- an error have an entry. An attempt without an error has no "error" key, and a quote
-- inside a JSON string is escaped, so the text `"error":` appears exactly when an attempt
-- has one. SQLite uses a partial index only when the query repeats its WHERE term exactly:
-- the store writes this one literally (`HAS_ERROR` in sqlite.rs).
CREATE INDEX IF NOT EXISTS jobs_errors ON jobs (id) WHERE instr(attempts, '"error":') > 0;
