-- Idempotency keys: a write retried with the same key and the same request gets the
-- first attempt's result instead of being applied again. A key is stored in the
-- transaction of the write it belongs to, so a key exists exactly when its write
-- committed. The request is kept only as a keyed hash (never the value), the result as
-- the version it made and when.
CREATE TABLE idempotency_keys (
    -- The caller's token id and the key it chose: keys are per token.
    token_id            TEXT NOT NULL,
    key                 TEXT NOT NULL,
    rpc                 TEXT NOT NULL,
    -- HMAC-SHA256 of the request under a key derived from the master key.
    fingerprint         BLOB NOT NULL,
    name                TEXT NOT NULL,
    -- The result: the version written (or deleted at), when, and for a rotation when the
    -- version it replaced stops being readable.
    version             INTEGER NOT NULL,
    at                  INTEGER NOT NULL,
    previous_expires_at INTEGER,
    created_at          INTEGER NOT NULL,
    -- After this the key is forgotten (pruned in batches in the background).
    expires_at          INTEGER NOT NULL,
    PRIMARY KEY (token_id, key)
) STRICT;
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
