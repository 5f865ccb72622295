-- Rotation: per-credential rotation policies run by the scheduler, and background jobs
-- (KEK re-wrap) whose progress survives a crash.

CREATE TABLE rotation_policies (
    name            TEXT COLLATE "C" PRIMARY KEY REFERENCES credentials (name) ON DELETE CASCADE,
    kind            TEXT NOT NULL CHECK (kind IN ('manual', 'periodic', 'before_expiry', 'scheduled')),
    -- periodic: the period; before_expiry: how long before expires_at to rotate.
    interval_us     BIGINT,
    -- before_expiry: each rotation sets the credential's expires_at to now + validity.
    validity_us     BIGINT,
    -- scheduled: when.
    at_us           BIGINT,
    -- JSON generator spec: how a scheduled rotation makes the new value.
    generator       TEXT NOT NULL,
    grace_us        BIGINT NOT NULL CHECK (grace_us >= 0),
    -- The slot the scheduler runs next; NULL: nothing due. Claiming a slot is a
    -- compare-and-set on this column inside the rotation's own transaction.
    next_run_at     BIGINT,
    rotations       BIGINT NOT NULL DEFAULT 0,
    last_rotated_at BIGINT,
    last_error      TEXT,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX rotation_policies_due ON rotation_policies (next_run_at) WHERE next_run_at IS NOT NULL;

CREATE TABLE rotation_jobs (
    id             BIGSERIAL PRIMARY KEY,
    kind           TEXT NOT NULL CHECK (kind IN ('kek')),
    state          TEXT NOT NULL CHECK (state IN ('running', 'completed', 'failed')),
    new_kek_id     BIGINT NOT NULL REFERENCES keks (id),
    total          BIGINT NOT NULL,
    done           BIGINT NOT NULL DEFAULT 0,
    -- Versions that could not be re-wrapped (failed authentication); their KEK stays.
    failed         BIGINT NOT NULL DEFAULT 0,
    -- The last (name, version) handled: a resumed job continues after it.
    cursor_name    TEXT COLLATE "C",
    cursor_version BIGINT,
    started_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    finished_at    BIGINT,
    error          TEXT,
    -- The daemon running the job and until when its claim holds without a heartbeat.
    lease_owner    TEXT,
    lease_until    BIGINT
);
CREATE UNIQUE INDEX rotation_jobs_one_running ON rotation_jobs (kind) WHERE state = 'running';
