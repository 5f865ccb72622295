-- Folded reads: one row stands for `count` identical successful reads made between `at`
-- and `last_at` (NULL for a single event).
ALTER TABLE audit_log ADD COLUMN count BIGINT NOT NULL DEFAULT 1;
ALTER TABLE audit_log ADD COLUMN last_at BIGINT;
