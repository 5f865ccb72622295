-- Rotation: per-credential rotation policies run by the scheduler, and background jobs
-- (KEK re-wrap) whose progress survives a crash.

CREATE TABLE rotation_policies (
    name            TEXT PRIMARY KEY REFERENCES credentials (name) ON DELETE CASCADE,
    kind            TEXT NOT NULL CHECK (kind IN ('manual', 'periodic', 'before_expiry', 'scheduled')),
    -- periodic: the period; before_expiry: how long before expires_at to rotate.
    interval_us     INTEGER,
    -- before_expiry: each rotation sets the credential's expires_at to now + validity.
    validity_us     INTEGER,
    -- scheduled: when.
    at_us           INTEGER,
    -- JSON generator spec: how a scheduled rotation makes the new value.
    generator       TEXT NOT NULL,
    grace_us        INTEGER NOT NULL CHECK (grace_us >= 0),
    -- The slot the scheduler runs next; NULL: nothing due. Claiming a slot is a
    -- compare-and-set on this column inside the rotation's own transaction.
    next_run_at     INTEGER,
    rotations       INTEGER NOT NULL DEFAULT 0,
    last_rotated_at INTEGER,
    last_error      TEXT,
    updated_at      INTEGER NOT NULL
) STRICT;
CREATE INDEX rotation_policies_due ON rotation_policies (next_run_at) WHERE next_run_at IS NOT NULL;

CREATE TABLE rotation_jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    kind           TEXT NOT NULL CHECK (kind IN ('kek')),
    state          TEXT NOT NULL CHECK (state IN ('running', 'completed', 'failed')),
    new_kek_id     INTEGER NOT NULL REFERENCES keks (id),
    total          INTEGER NOT NULL,
    done           INTEGER NOT NULL DEFAULT 0,
    -- Versions that could not be re-wrapped (failed authentication); their KEK stays.
    failed         INTEGER NOT NULL DEFAULT 0,
    -- The last (name, version) handled: a resumed job continues after it.
    cursor_name    TEXT,
    cursor_version INTEGER,
    started_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    error          TEXT,
    -- The daemon running the job and until when its claim holds without a heartbeat.
    lease_owner    TEXT,
    lease_until    INTEGER
) STRICT;
CREATE UNIQUE INDEX rotation_jobs_one_running ON rotation_jobs (kind) WHERE state = 'running';
