-- A WriteCredentials call under an idempotency key remembers every write's result, in
-- request order, one per line: `version TAB deleted (0 or 1) TAB name` (a name holds no
-- control character). NULL for the single-credential writes, whose result is in
-- name / version.
ALTER TABLE idempotency_keys ADD COLUMN outcomes TEXT;
