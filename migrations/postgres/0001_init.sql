-- credvault schema, PostgreSQL. Timestamps are microseconds since the Unix epoch (UTC).
-- Names use the "C" collation so ordering and prefix ranges are bytewise on every server.

CREATE TABLE keyring (
    id          SMALLINT PRIMARY KEY CHECK (id = 1),
    source      TEXT NOT NULL CHECK (source IN ('passphrase', 'key-file')),
    kdf_salt    BYTEA,
    kdf_m_cost  BIGINT,
    kdf_t_cost  BIGINT,
    kdf_p_cost  BIGINT,
    verifier    BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE keks (
    id          BIGINT PRIMARY KEY,
    wrapped_key BYTEA NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
    created_at  BIGINT NOT NULL
);
-- At most one active KEK.
CREATE UNIQUE INDEX keks_one_active ON keks (state) WHERE state = 'active';

CREATE TABLE credentials (
    name            TEXT COLLATE "C" PRIMARY KEY,
    current_version BIGINT NOT NULL CHECK (current_version > 0),
    labels          TEXT NOT NULL DEFAULT '{}',
    description     TEXT NOT NULL DEFAULT '',
    owner           TEXT NOT NULL DEFAULT '',
    expires_at      BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    deleted_at      BIGINT
);

CREATE TABLE credential_versions (
    name        TEXT COLLATE "C" NOT NULL REFERENCES credentials (name) ON DELETE CASCADE,
    version     BIGINT NOT NULL CHECK (version > 0),
    state       TEXT NOT NULL CHECK (state IN ('current', 'previous', 'deprecated', 'destroyed')),
    kek_id      BIGINT NOT NULL REFERENCES keks (id),
    wrapped_dek BYTEA NOT NULL,
    -- NULL once the version is destroyed.
    ciphertext  BYTEA,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    PRIMARY KEY (name, version)
);
-- KEK re-wrap walks the DEKs of one KEK; expiry sweeps walk grace periods.
CREATE INDEX credential_versions_kek ON credential_versions (kek_id);
CREATE INDEX credential_versions_expiry ON credential_versions (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE tokens (
    -- Hex SHA-256 of the token; the token itself is never stored.
    token_hash   TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    policies     TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT
);
