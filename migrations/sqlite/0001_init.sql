-- credvault schema, SQLite. Timestamps are microseconds since the Unix epoch (UTC).
-- TEXT compares bytewise (BINARY collation), which prefix ranges rely on.

CREATE TABLE keyring (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    source      TEXT NOT NULL CHECK (source IN ('passphrase', 'key-file')),
    kdf_salt    BLOB,
    kdf_m_cost  INTEGER,
    kdf_t_cost  INTEGER,
    kdf_p_cost  INTEGER,
    verifier    BLOB NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE keks (
    id          INTEGER PRIMARY KEY,
    wrapped_key BLOB NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
    created_at  INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX keks_one_active ON keks (state) WHERE state = 'active';

CREATE TABLE credentials (
    name            TEXT PRIMARY KEY,
    current_version INTEGER NOT NULL CHECK (current_version > 0),
    labels          TEXT NOT NULL DEFAULT '{}',
    description     TEXT NOT NULL DEFAULT '',
    owner           TEXT NOT NULL DEFAULT '',
    expires_at      INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    deleted_at      INTEGER
) STRICT;

CREATE TABLE credential_versions (
    name        TEXT NOT NULL REFERENCES credentials (name) ON DELETE CASCADE,
    version     INTEGER NOT NULL CHECK (version > 0),
    state       TEXT NOT NULL CHECK (state IN ('current', 'previous', 'deprecated', 'destroyed')),
    kek_id      INTEGER NOT NULL REFERENCES keks (id),
    wrapped_dek BLOB NOT NULL,
    ciphertext  BLOB,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    PRIMARY KEY (name, version)
) STRICT;
CREATE INDEX credential_versions_kek ON credential_versions (kek_id);
CREATE INDEX credential_versions_expiry ON credential_versions (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE tokens (
    token_hash   TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    policies     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER
) STRICT;
