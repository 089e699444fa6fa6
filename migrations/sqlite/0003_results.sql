-- A job's result (what its handler returned when it completed, JSON text) and the latest
-- progress its running attempt reported (JSON: attempt, percent, message, updated_at).
-- Both live in the job's row, so they go when the job is pruned; both NULL until written,
-- so a job that never reports either costs nothing more to claim or complete.
ALTER TABLE jobs ADD COLUMN result TEXT;
ALTER TABLE jobs ADD COLUMN progress TEXT;
